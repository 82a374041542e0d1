"""Quantization modes: each mode names a value for every role (bf16 included), one table."""

from __future__ import annotations

from dataclasses import dataclass

from megaquant.errors import LaunchError
from megaquant.spec import GROUPS, ROLES

__all__ = [
    "ATTENTION_MODES",
    "FORMATS",
    "MODES",
    "ROLES",
    "SEED_MODES",
    "Mode",
    "get_mode",
    "mode_for_values",
]

FORMATS = ("mxfp8", "mxfp4", "hifp8", "nvfp4")
_SEED_FORMATS = ("mxfp8", "mxfp4", "hifp8")  # the original system's ten modes use these


@dataclass(frozen=True, kw_only=True)
class Mode:
    name: str
    linear: str
    qk: str
    pv: str
    seed: bool
    """One of the original system's ten modes (the ones `megaquant scripts` writes files for)."""

    def values(self) -> dict[str, str]:
        """role -> canonical value, for every role (`linear` is all three linear GEMMs)."""
        linear = dict.fromkeys(GROUPS["linear"], self.linear)
        return {**linear, "qk": self.qk, "pv": self.pv}

    @property
    def quantizes(self) -> bool:
        return any(v != "none" for v in self.values().values())


def _modes() -> list[Mode]:
    modes = [Mode(name="bf16", linear="none", qk="none", pv="none", seed=True)]
    for f in FORMATS:
        modes.append(Mode(name=f"FA_{f}", linear="none", qk=f, pv="none", seed=f in _SEED_FORMATS))
    for f in FORMATS:
        modes.append(Mode(name=f"linear_{f}", linear=f, qk="none", pv="none", seed=f in _SEED_FORMATS))
    for f in FORMATS:
        modes.append(Mode(name=f"FA_linear_{f}", linear=f, qk=f, pv="none", seed=f in _SEED_FORMATS))
    for f in FORMATS:
        modes.append(Mode(name=f"qk_{f}", linear="none", qk=f, pv="none", seed=False))
        modes.append(Mode(name=f"pv_{f}", linear="none", qk="none", pv=f, seed=False))
        modes.append(Mode(name=f"qk_pv_{f}", linear="none", qk=f, pv=f, seed=False))
    return modes


MODES: dict[str, Mode] = {m.name: m for m in _modes()}
SEED_MODES: tuple[str, ...] = tuple(m.name for m in MODES.values() if m.seed)
ATTENTION_MODES: tuple[str, ...] = tuple(m.name for m in MODES.values() if m.name.startswith(("qk_", "pv_")))


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise LaunchError(f"unknown quantization mode {name!r}; choose one of: {', '.join(MODES)}") from None


def mode_for_values(values: dict[str, str]) -> str:
    """The registry name of a role assignment, or 'custom' when overrides left the table."""
    for mode in MODES.values():
        if mode.values() == values:
            return mode.name  # FA_f and qk_f are the same values: the seed name wins
    return "custom"
