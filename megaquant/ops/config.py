"""What a quantized op does: value names, roles, process-wide defaults (configure) and their resolution."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from megaquant.errors import ValueNameError
from megaquant.formats import PRESETS
from megaquant.recipes import DEFAULT_RECIPE, RECIPE_ENV, check_recipe
from megaquant.spec import ROLES

__all__ = [
    "GEMMS",
    "QUANT_VALUES",
    "RECIPE_ENV",
    "ROLES",
    "QuantConfig",
    "configure",
    "environment_defaults",
    "quant_config",
]

QUANT_VALUES = ("mxfp8", "mxfp4", "hifp8", "nvfp4", "none")
_ALIASES = {"bf16": "none"}
GEMMS = ("fprop", "dgrad", "wgrad")
"""What a call computes in the training step (hook keyword `gemm`): a forward GEMM, the gradient of the
activations, or the gradient of the weights. Recipes apply their backward options to dgrad/wgrad."""
_FORWARD_FORMAT = {"mxfp8": "mxfp8_e4m3", "mxfp4": "mxfp4_e2m1", "hifp8": "hifp8", "nvfp4": "nvfp4"}
_GRADIENT_FORMAT = {"mxfp8": "mxfp8_e5m2", "mxfp4": "mxfp4_e2m1", "hifp8": "hifp8", "nvfp4": "nvfp4"}
_STOCHASTIC_VALUES = frozenset(("mxfp8", "mxfp4", "nvfp4"))  # HiF8 defines ties-away rounding only
_PLAIN = frozenset(("none", "bf16"))
PRESET_ENV = "MEGAQUANT_PRESET"
"""Environment variable read at import: its value becomes the default `preset` of every op call."""


def environment_defaults() -> dict[str, Any]:
    """The defaults MEGAQUANT_PRESET / MEGAQUANT_RECIPE set (read at import; trainers that call configure()
    pass them on, so configure(recipe=...) does not drop an environment preset)."""
    pairs = (("preset", PRESET_ENV), ("recipe", RECIPE_ENV))
    return {key: os.environ[env] for key, env in pairs if os.environ.get(env)}


_DEFAULTS: dict[str, Any] = environment_defaults()


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
    """True when this GEMM's HiF8 operands get a per-tensor scale (current or delayed)."""
    recipe: str = DEFAULT_RECIPE
    """Name of the recipe (megaquant.recipes) the fields below were resolved from."""
    role: str | None = None
    gemm: str | None = None
    """fprop, dgrad or wgrad when the call says so; None: fprop, or an unnamed backward GEMM (grad=True)."""
    tensor_scaling: str = "none"
    """"none", "current" or "delayed" (HiF8 only; see megaquant.ops.state for the amax histories)."""
    amax_history: int = 16
    stochastic: str = "none"
    """Backward GEMMs: which operands round stochastically ("none", "gradients", "backward")."""
    sr_prescale: float = 1.0
    hadamard: str = "none"
    """Backward GEMMs whose operands get a random Hadamard transform ("none", "wgrad", "backward")."""
    hadamard_block: int = 16
    hadamard_signs: str = "per_gemm"
    """"per_gemm" (a sign vector per transformed GEMM and step) or "fixed" (one per run: state.fixed_seed)."""
    weight_block_2d: bool = False
    """NVFP4 only: weight operands in 16x16 tiles."""
    grad: bool = False
    """A gradient GEMM: grad=True, or gemm dgrad/wgrad (its first operand is the incoming gradient)."""


def configure(**defaults: Any) -> None:
    """Process-wide defaults for the keywords hook sites do not pass (recipe, grad, preset, role, gemm,
    quantize_grads, block_size, scale, rounding, tensor_scale), e.g. configure(recipe="hifp8_scaled") in a
    training process. Replaces earlier defaults (including MEGAQUANT_PRESET / MEGAQUANT_RECIPE); keywords
    given at a call still win. An unknown recipe raises ValueNameError listing the recipes."""
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
    block_size: int | None = None,
    scale: str = "floor",
    rounding: str = "even",
    tensor_scale: bool = False,
    recipe: str = DEFAULT_RECIPE,
    gemm: str | None = None,
) -> QuantConfig:
    """Resolve a hook site's value name into formats.

    mxfp8 -> E4M3 (E5M2 when grad=True, i.e. the GEMM is a gradient GEMM), mxfp4 -> E2M1, hifp8 -> HiF8.
    Backward GEMMs (quantize_grads=True) use the gradient format: E5M2 / E2M1 / HiF8. preset="fork" with
    role="qk" uses E5M2 for mxfp8 and mxfp4 (as the fork did), and passes preset="fork" to fake_quant
    (MX: FLOOR + ties away; HiF8: clamp to [2^-22, 0.95*2^15]). nvfp4 -> NVFP4 (both directions).

    `recipe` (megaquant.recipes) fills in how the value is trained: its preset (unless `preset` is given),
    tensor scaling of HiF8 operands, stochastic rounding and Hadamard transforms of backward GEMMs (MX and
    NVFP4 operands), 2-D NVFP4 weight blocks. A recipe that excludes the value raises ValueNameError.
    `gemm` names the GEMM kind (fprop, dgrad, wgrad); grad=True without it is a backward GEMM of unnamed kind.
    """
    canonical = _ALIASES.get(value, value)
    if canonical not in QUANT_VALUES:
        raise ValueNameError(
            f"unknown quantization value {value!r}; expected one of {', '.join(QUANT_VALUES)} (or 'bf16')"
        )
    if role is not None and role not in ROLES:
        raise ValueNameError(f"unknown GEMM role {role!r}; expected one of {', '.join(ROLES)}")
    if gemm is not None and gemm not in GEMMS:
        raise ValueNameError(f"unknown GEMM kind {gemm!r}; expected one of {', '.join(GEMMS)}")
    r = check_recipe(recipe, {role or "value": canonical})
    if r.preset is not None:
        if preset not in (None, r.preset):
            raise ValueNameError(f"recipe {recipe!r} implies preset {r.preset!r}; got preset={preset!r}")
        preset = r.preset
    if preset not in (None, *PRESETS):
        raise ValueNameError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if grad and gemm == "fprop":
        raise ValueNameError("grad=True marks a gradient GEMM; gemm='fprop' contradicts it")
    grad = grad or gemm in ("dgrad", "wgrad")
    fmt = grad_fmt = None
    if canonical != "none":
        fmt = (_GRADIENT_FORMAT if grad else _FORWARD_FORMAT)[canonical]
        grad_fmt = _GRADIENT_FORMAT[canonical]
        if preset == "fork" and role == "qk" and canonical in ("mxfp8", "mxfp4"):
            fmt = grad_fmt = "mxfp8_e5m2"
    if block_size is None:  # the format's own block: 16 for NVFP4, 32 for MX (unused by HiF8)
        block_size = 16 if canonical == "nvfp4" else 32
    tensor_scaling = r.tensor_scaling if canonical == "hifp8" else "none"
    if tensor_scale and tensor_scaling == "none":  # the keyword: current scaling (HiF8 only, as before)
        tensor_scaling = "current" if canonical == "hifp8" else "none"
    return QuantConfig(
        value=canonical,
        fmt=fmt,
        grad_fmt=grad_fmt,
        quantize_grads=quantize_grads,
        block_size=block_size,
        scale=scale,
        rounding=rounding,
        preset=preset,
        tensor_scale=tensor_scaling != "none",
        recipe=r.name,
        role=role,
        gemm=gemm,
        grad=grad,
        tensor_scaling=tensor_scaling,
        amax_history=r.amax_history,
        stochastic=r.stochastic_rounding if canonical in _STOCHASTIC_VALUES else "none",
        sr_prescale=r.sr_prescale,
        hadamard=r.hadamard if canonical != "none" else "none",
        hadamard_block=r.hadamard_block,
        hadamard_signs=r.hadamard_signs,
        weight_block_2d=r.weight_block_2d and canonical == "nvfp4",
    )
