"""Training recipes: how a quantization value is trained (scaling, rounding, transforms), one registry.

A recipe is orthogonal to the values written in the source: the sites say *which* format each GEMM uses
(mxfp8, hifp8, nvfp4, ...), the recipe says *how* (per-tensor scaling, stochastic rounding, random
Hadamard transforms, 2-D weight blocks, the fork's numerics). `megaquant.ops` applies it
(`ops.configure(recipe=NAME)`); `megaquant train --recipe NAME` records it in the run's manifest.
Pure: importing this module imports no torch (the CLI lists recipes without it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megaquant.argvalues import flag_values
from megaquant.errors import ValueNameError

__all__ = [
    "DEFAULT_RECIPE",
    "HADAMARD_SIGNS",
    "RECIPES",
    "RECIPE_ENV",
    "RHT_SCOPES",
    "SR_SCOPES",
    "TENSOR_SCALINGS",
    "Recipe",
    "bf16_layers_for_args",
    "check_recipe",
    "get_recipe",
    "layer_count",
]

DEFAULT_RECIPE = "default"
RECIPE_ENV = "MEGAQUANT_RECIPE"
"""Environment variable read when megaquant.ops is imported: the recipe of every op call in the process
(the launcher sets it for the training process)."""

TENSOR_SCALINGS = ("none", "current", "delayed")
SR_SCOPES = ("none", "gradients", "backward")
RHT_SCOPES = ("none", "wgrad", "backward")
HADAMARD_SIGNS = ("per_gemm", "fixed")


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
    hadamard_signs: str = "per_gemm"
    """The random sign vector of the transform: "per_gemm" (a fresh vector for every transformed GEMM of
    every step, from the run's seed); "fixed" (one vector for the whole run, every layer and every step,
    drawn once from the run's seed; NVIDIA's NVFP4 recipe uses one fixed sign vector)."""
    weight_block_2d: bool = False
    """NVFP4 weights (the second operand of fprop and dgrad): 16x16 tiles share one scale, so forward and
    backward read the same quantized weight."""
    bf16_layers: float = 0.0
    """Fraction of the transformer layers whose hooked GEMMs all run unquantized (BF16): at least this
    fraction, rounded up (`bf16_layer_numbers`): at least one layer when > 0, and never every layer. 0:
    none."""
    bf16_first_share: float = 0.0
    """Of those layers, the share taken from the start of the network (rounded to nearest, halves up); the
    rest are the last layers."""
    bf16_attention: bool = True
    """True: in a BF16 layer the attention GEMMs (QK, PV) run unquantized too, not only its linear layers."""
    excludes: tuple[str, ...] = ()
    """Quantization values this recipe cannot express (refused when a site asks for them)."""
    fork_ops: bool = False
    """True: the fork's own ops (a tree whose spec is `fork`) can run it; they do only fork numerics."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.bf16_layers < 1.0 or not 0.0 <= self.bf16_first_share <= 1.0:
            raise ValueNameError(
                f"recipe {self.name!r}: bf16_layers must be in [0, 1) and bf16_first_share in [0, 1], got "
                f"{self.bf16_layers!r} and {self.bf16_first_share!r}"
            )
        if self.hadamard_signs not in HADAMARD_SIGNS:
            raise ValueNameError(
                f"recipe {self.name!r}: hadamard_signs must be one of {', '.join(HADAMARD_SIGNS)}, got "
                f"{self.hadamard_signs!r}"
            )

    def uses_rht(self) -> bool:
        return self.hadamard != "none"

    def bf16_layer_numbers(self, num_layers: int) -> tuple[int, ...]:
        """The 1-based (global, as Megatron's `layer_number`) transformer layers kept in BF16 for a model
        of `num_layers` layers: n = ceil(bf16_layers * num_layers), at least 1 and at most num_layers - 1
        (one layer stays quantized), the first round(n * bf16_first_share) of them at the start, the rest
        at the end. Pure.

        nvfp4_paper (0.16, share 0.2): 62 layers -> 1, 2, 55..62 (the paper's 12B model: first two and
        last eight blocks); 16 -> 1, 15, 16; 4 -> 4; 1 -> none."""
        if num_layers < 1 or self.bf16_layers == 0.0:
            return ()
        n = min(
            num_layers - 1, max(1, math.ceil(self.bf16_layers * num_layers - 1e-9))
        )  # one stays quantized
        first = math.floor(n * self.bf16_first_share + 0.5)
        return (*range(1, first + 1), *range(num_layers - (n - first) + 1, num_layers + 1))

    def bf16_rule(self) -> str:
        """The BF16-layer rule as text ("" when the recipe keeps no layer in BF16)."""
        if self.bf16_layers == 0.0:
            return ""
        where = "linear and attention GEMMs" if self.bf16_attention else "linear GEMMs"
        share = f"{self.bf16_first_share:.0%} of them first, the rest last"
        return f"BF16 layers: {self.bf16_layers:.0%} of the transformer layers ({share}; all their {where})"

    def listing(self) -> str:
        """One line for `megaquant train --list`: the title, and the BF16-layer rule if any."""
        rule = self.bf16_rule()
        return f"{self.title}; {rule}" if rule else self.title

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
                signs = "one fixed sign vector" if self.hadamard_signs == "fixed" else "signs per GEMM"
                parts.append(
                    f"random Hadamard transform of both operands (blocks of {self.hadamard_block}, {signs})"
                )
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
        title="NVFP4 pretraining: 16x16 weight blocks, RHT (one fixed sign vector) on wgrad inputs, SR on "
        "gradients",
        source="NVIDIA, 'Pretraining Large Language Models with NVFP4', arXiv:2509.25149",
        stochastic_rounding="gradients",
        hadamard="wgrad",
        hadamard_block=16,
        hadamard_signs="fixed",
        weight_block_2d=True,
        bf16_layers=0.16,
        bf16_first_share=0.2,
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


def layer_count(megatron_args: Sequence[str]) -> int | None:
    """The last `--num-layers` of a Megatron argv (None when it has none). Pure."""
    return next((int(v) for v in reversed(flag_values(megatron_args, "--num-layers")) if v.isdigit()), None)


def bf16_layers_for_args(name: str, megatron_args: Sequence[str]) -> tuple[int, ...]:
    """The BF16 layers of recipe `name` for a Megatron argv (its last `--num-layers`); () when the recipe
    keeps none or the argv has no layer count. Pure (what the dry run and the manifest record)."""
    layers = layer_count(megatron_args)
    return get_recipe(name).bf16_layer_numbers(layers) if layers else ()
