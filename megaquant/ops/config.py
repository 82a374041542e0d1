"""What a quantized op does: value names, roles, process-wide defaults (configure) and their resolution."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from megaquant.errors import ValueNameError
from megaquant.formats import PRESETS
from megaquant.spec import ROLES

__all__ = ["QUANT_VALUES", "ROLES", "QuantConfig", "configure", "quant_config"]

QUANT_VALUES = ("mxfp8", "mxfp4", "hifp8", "none")
_ALIASES = {"bf16": "none"}
_FORWARD_FORMAT = {"mxfp8": "mxfp8_e4m3", "mxfp4": "mxfp4_e2m1", "hifp8": "hifp8"}
_GRADIENT_FORMAT = {"mxfp8": "mxfp8_e5m2", "mxfp4": "mxfp4_e2m1", "hifp8": "hifp8"}
_PLAIN = frozenset(("none", "bf16"))
PRESET_ENV = "MEGAQUANT_PRESET"
"""Environment variable read at import: its value becomes the default `preset` of every op call."""
_DEFAULTS: dict[str, Any] = {"preset": os.environ[PRESET_ENV]} if os.environ.get(PRESET_ENV) else {}


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What one quantized GEMM does, resolved from the value name and keywords."""

    value: str
    """Canonical value name (one of QUANT_VALUES)."""
    fmt: str | None
    """Element format of both operands of this GEMM (None for "none")."""
    grad_fmt: str | None
    """Element format of both operands of each backward GEMM when quantize_grads (else unused)."""
    quantize_grads: bool
    block_size: int
    scale: str
    rounding: str
    preset: str | None
    tensor_scale: bool


def configure(**defaults: Any) -> None:
    """Process-wide defaults for the keywords hook sites do not pass (grad, preset, role, quantize_grads,
    block_size, scale, rounding, tensor_scale), e.g. configure(preset="fork") in a training process.
    Replaces earlier defaults (including MEGAQUANT_PRESET); keywords given at a call still win."""
    quant_config("mxfp8", **defaults)  # validate now, with a message naming the bad keyword
    _DEFAULTS.clear()
    _DEFAULTS.update(defaults)


def quant_config(value: str, **kw: Any) -> QuantConfig:
    """Resolve a hook site's value name and keywords (over the configure() defaults) into formats."""
    try:
        return _resolve(value, **{**_DEFAULTS, **kw})
    except TypeError as err:
        raise ValueNameError(f"bad keyword for a quantized op: {err}") from None


@functools.lru_cache(maxsize=256)
def _resolve(
    value: str,
    *,
    grad: bool = False,
    preset: str | None = None,
    role: str | None = None,
    quantize_grads: bool = False,
    block_size: int = 32,
    scale: str = "floor",
    rounding: str = "even",
    tensor_scale: bool = False,
) -> QuantConfig:
    """Resolve a hook site's value name into formats.

    mxfp8 -> E4M3 (E5M2 when grad=True, i.e. the GEMM is a gradient GEMM), mxfp4 -> E2M1, hifp8 -> HiF8.
    Backward GEMMs (quantize_grads=True) use the gradient format: E5M2 / E2M1 / HiF8. preset="fork" with
    role="qk" uses E5M2 for mxfp8 and mxfp4 (as the fork did), and passes preset="fork" to fake_quant
    (MX: FLOOR + ties away; HiF8: clamp to [2^-22, 0.95*2^15]).
    """
    canonical = _ALIASES.get(value, value)
    if canonical not in QUANT_VALUES:
        raise ValueNameError(
            f"unknown quantization value {value!r}; expected one of {', '.join(QUANT_VALUES)} (or 'bf16')"
        )
    if role is not None and role not in ROLES:
        raise ValueNameError(f"unknown GEMM role {role!r}; expected one of {', '.join(ROLES)}")
    if preset not in (None, *PRESETS):
        raise ValueNameError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    fmt = grad_fmt = None
    if canonical != "none":
        fmt = (_GRADIENT_FORMAT if grad else _FORWARD_FORMAT)[canonical]
        grad_fmt = _GRADIENT_FORMAT[canonical]
        if preset == "fork" and role == "qk" and canonical in ("mxfp8", "mxfp4"):
            fmt = grad_fmt = "mxfp8_e5m2"
    return QuantConfig(
        value=canonical,
        fmt=fmt,
        grad_fmt=grad_fmt,
        quantize_grads=quantize_grads,
        block_size=block_size,
        scale=scale,
        rounding=rounding,
        preset=preset,
        tensor_scale=tensor_scale,
    )
