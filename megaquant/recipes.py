"""Training recipes: how a quantization value is trained (scaling, rounding, transforms), one registry.

A recipe is orthogonal to the values written in the source: the sites say *which* format each GEMM uses
(mxfp8, hifp8, nvfp4, ...), the recipe says *how* (per-tensor scaling, stochastic rounding, random
Hadamard transforms, 2-D weight blocks, the fork's numerics). `megaquant.ops` applies it
(`ops.configure(recipe=NAME)`); `megaquant train --recipe NAME` records it in the run's manifest.
Pure: importing this module imports no torch (the CLI lists recipes without it).
"""

from __future__ import annotations

from dataclasses import dataclass

from megaquant.errors import ValueNameError

__all__ = [
    "DEFAULT_RECIPE",
    "RECIPES",
    "RECIPE_ENV",
    "RHT_SCOPES",
    "SR_SCOPES",
    "TENSOR_SCALINGS",
    "Recipe",
    "check_recipe",
    "get_recipe",
]

DEFAULT_RECIPE = "default"
RECIPE_ENV = "MEGAQUANT_RECIPE"
"""Environment variable read when megaquant.ops is imported: the recipe of every op call in the process
(the launcher sets it for the training process)."""

TENSOR_SCALINGS = ("none", "current", "delayed")
SR_SCOPES = ("none", "gradients", "backward")
RHT_SCOPES = ("none", "wgrad", "backward")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One named way of training the quantized GEMMs. Options apply per kind of GEMM: fprop (a forward
    GEMM: linear forward, attention QK and PV), dgrad (gradient of the activations) and wgrad (gradient of
    the weights). The values of the roles (the source) choose the formats; a recipe never changes them."""

    name: str
    """Registry key (`--recipe NAME`)."""
    title: str
    """One line for `megaquant train --list`."""
    source: str
    """Where the recipe comes from (paper, arXiv id, or this project)."""
    preset: str | None = None
    """Passed to fake_quant as `preset` ("fork": the fork's MX FLOOR + ties-away, HiF8 clamp, E5M2 QK)."""
    tensor_scaling: str = "none"
    """HiF8 operands only: "none"; "current" (a power-of-two scale per tensor from its own amax, moving it
    into binade 3 before the cast: HiF8's tensor scaling); "delayed" (the same scale from the largest amax
    of the last `amax_history` steps of the same operand slot, the current amax then joins the history)."""
    amax_history: int = 16
    """Length of the amax history per operand slot (delayed scaling only)."""
    stochastic_rounding: str = "none"
    """Backward GEMMs only, MX and NVFP4 operands (HiF8 stays ties-away): "none" (round to nearest);
    "gradients" (the incoming-gradient operand of dgrad and wgrad); "backward" (both operands of both)."""
    sr_prescale: float = 1.0
    """Stochastically rounded operands are multiplied by this before the cast and divided after it
    (3/4 for MXFP4, so the E8M0 FLOOR scale never clips a rounded-up block maximum)."""
    hadamard: str = "none"
    """Random Hadamard transform of both operands along the reduction axis, with the same random signs
    (so the product is unchanged before quantization): "none"; "wgrad"; "backward" (dgrad and wgrad)."""
    hadamard_block: int = 16
    """Size of the Hadamard blocks along the reduction axis."""
    weight_block_2d: bool = False
    """NVFP4 weights (the second operand of fprop and dgrad): 16x16 tiles share one scale, so forward and
    backward read the same quantized weight."""
    excludes: tuple[str, ...] = ()
    """Quantization values this recipe cannot express (refused when a site asks for them)."""
    fork_ops: bool = False
    """True: the fork's own ops (a tree whose spec is `fork`) can run it; they do only fork numerics."""

    def uses_rht(self) -> bool:
        return self.hadamard != "none"

    def per_gemm(self) -> dict[str, str]:
        """What the recipe does in each kind of GEMM (fprop, dgrad, wgrad), as text."""
        return {gemm: self._describe(gemm) for gemm in ("fprop", "dgrad", "wgrad")}

    def per_role(self, roles: tuple[str, ...]) -> dict[str, str]:
        """What the recipe does for each role name in `roles` (linear_fwd = fprop, linear_bwd = dgrad +
        wgrad, linear_dgrad / linear_wgrad, attention roles = fprop with no weight operand)."""
        gemms = self.per_gemm()
        out: dict[str, str] = {}
        for role in roles:
            if role == "linear_bwd":
                out[role] = f"dgrad: {gemms['dgrad']}; wgrad: {gemms['wgrad']}"
            elif role.startswith("linear_"):
                kind = {"fwd": "fprop"}.get(role.removeprefix("linear_"), role.removeprefix("linear_"))
                out[role] = gemms.get(kind, gemms["fprop"])
            else:  # attention GEMMs: forward GEMMs on activations; their backward is straight-through
                out[role] = self._describe("fprop", weights=False)
        return out

    def _describe(self, gemm: str, *, weights: bool = True) -> str:
        parts: list[str] = []
        if self.preset == "fork":
            parts.append("fork numerics (MX FLOOR + ties away, HiF8 clamp to [2^-22, 0.95*2^15], E5M2 QK)")
        if self.tensor_scaling == "current":
            parts.append("HiF8 per-tensor scale from the current amax")
        elif self.tensor_scaling == "delayed":
            parts.append(f"HiF8 per-tensor scale from an amax history of {self.amax_history} steps")
        if gemm == "fprop" and weights and self.weight_block_2d:
            parts.append("NVFP4 weights in 16x16 blocks")
        if gemm != "fprop":
            if self.stochastic_rounding == "gradients":
                parts.append("stochastic rounding of the gradient operand")
            elif self.stochastic_rounding == "backward":
                parts.append("stochastic rounding of both operands")
            if self.stochastic_rounding != "none" and self.sr_prescale != 1.0:
                parts.append(f"pre-scaled by {self.sr_prescale:g} around the cast")
            if self.hadamard == "backward" or (self.hadamard == "wgrad" and gemm == "wgrad"):
                parts.append(f"random Hadamard transform of both operands (blocks of {self.hadamard_block})")
            if gemm == "dgrad" and self.weight_block_2d:
                parts.append("NVFP4 weights in 16x16 blocks")
        return ", ".join(parts) or "round to nearest, no scaling beyond the format's own"


_RECIPES: tuple[Recipe, ...] = (
    Recipe(
        name="default",
        title="megaquant's spec-exact numerics as they are: round to nearest, no tensor scaling",
        source="this project (docs/formats.md); on a fork tree the fork's own ops, i.e. fork numerics",
        fork_ops=True,
    ),
    Recipe(
        name="fork",
        title="the fork's numerics on megaquant's ops (MX FLOOR + ties away, HiF8 clamp, E5M2 QK)",
        source="the custom_quant_type fork's quantization code (reference/fork-facts.md)",
        preset="fork",
        excludes=("nvfp4",),
        fork_ops=True,
    ),
    Recipe(
        name="hifp8_scaled",
        title="HiF8 with per-tensor (current) scaling before every HiF8 cast",
        source="HiF8 training practice: per-tensor scaling of activations, weights and gradients before each "
        "cast (Luo et al., arXiv:2409.16626; reference/formats.md 5.3)",
        tensor_scaling="current",
    ),
    Recipe(
        name="hifp8_delayed",
        title="HiF8 with delayed per-tensor scaling (max of a 64-step amax history per operand slot)",
        source="delayed scaling as in Transformer Engine's FP8 recipe; a 64-step max window as in the HiF8 "
        "QAT study arXiv:2605.26189",
        tensor_scaling="delayed",
        amax_history=64,
    ),
    Recipe(
        name="sr_gradients",
        title="stochastic rounding of the gradient operand of every backward GEMM (MX and NVFP4)",
        source="unbiased gradient estimates by SR (Tseng et al. 2025; NVIDIA, arXiv:2509.25149)",
        stochastic_rounding="gradients",
    ),
    Recipe(
        name="nvfp4_paper",
        title="NVFP4 pretraining: 16x16 weight blocks, RHT on wgrad inputs, SR on gradients",
        source="NVIDIA, 'Pretraining Large Language Models with NVFP4', arXiv:2509.25149",
        stochastic_rounding="gradients",
        hadamard="wgrad",
        hadamard_block=16,
        weight_block_2d=True,
    ),
    Recipe(
        name="mxfp4_tseng",
        title="MXFP4 backward: SR (3/4 pre-scale) and RHT (blocks of 64) on both operands of dgrad and wgrad",
        source="Tseng, Yu, Park, 'Training LLMs with MXFP4', AISTATS 2025 (arXiv:2502.20586)",
        stochastic_rounding="backward",
        sr_prescale=0.75,
        hadamard="backward",
        hadamard_block=64,
    ),
)

RECIPES: dict[str, Recipe] = {r.name: r for r in _RECIPES}


def get_recipe(name: str) -> Recipe:
    """The registry entry for `name`; unknown -> ValueNameError listing every recipe."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueNameError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


def check_recipe(name: str, values: dict[str, str] | None = None, *, spec: str | None = None) -> Recipe:
    """The recipe `name`, refused (ValueNameError, with the reason) when the run cannot express it: on a
    tree whose spec is the fork (its own ops do only fork numerics), or for a role value it excludes."""
    recipe = get_recipe(name)
    if spec == "fork" and not recipe.fork_ops:
        usable = ", ".join(r.name for r in RECIPES.values() if r.fork_ops)
        raise ValueNameError(
            f"recipe {name!r} cannot run on a fork tree: the fork's own ops do only fork numerics; use "
            f"{usable}, or `megaquant instrument` a stock Megatron tree (megaquant's ops run every recipe)"
        )
    for role, value in (values or {}).items():
        if value in recipe.excludes:
            raise ValueNameError(
                f"recipe {name!r} cannot express {role} = {value}: it reproduces numerics that have no "
                f"{value}; choose another recipe or value"
            )
    return recipe
