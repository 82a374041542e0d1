"""CUDA graphs for a training run: Megatron's full-iteration graph, when megaquant can run under it.

At the shapes users train on one GPU, a step is host-bound: Megatron's local modules issue ~12,500 kernel
launches per step and the GPU is busy a third of the time, bf16 included, so every microsecond megaquant's
quantization adds on the host adds to the step. Megatron's `--cuda-graph-impl full_iteration` captures the
forward and backward of all microbatches once (after `--cuda-graph-warmup-steps` eager steps) and replays
the graph every later step: the host cost of the step disappears and the kernels (the same kernels, on the
same buffers) decide the step time. The optimizer step stays outside the graph.

What a graph cannot replay is host-side state that changes from step to step. The recipes keep none:
stochastic rounding and per-GEMM random Hadamard signs pass the same host seed every step and mix in a
device word that `next_step()` overwrites outside the graph, and delayed scaling shifts its amax histories
with fixed-index device ops (megaquant.ops.state; tests/test_graphsafe.py checks the host arguments,
tests/test_graphsafe_gpu.py the replay against eager, on an H200). `recipe_blockers` is where a recipe feature
that does keep such state would be refused. Delayed scaling's training steps replay exactly, and its
validation pass uses current scaling and records nothing (megaquant.ops.state.evaluation): `megaquant
train` of FA_linear_hifp8 + hifp8_delayed under the graph and eagerly gave bit-identical training and
validation losses on an H200 (benchmarks/eval_graph_check.sh, docs/benchmarks.md §6l).
Dropless MoE reads token counts back to the host (not capturable); multi-GPU and pipeline-parallel graphs
have not been verified here yet; the fork's own pretrain_gpt.py predates the full-iteration graph. `auto`
(the default) turns graphs on only where none of this applies, and says why not otherwise. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megaquant.argvalues import flag_values
from megaquant.errors import LaunchError
from megaquant.recipes import Recipe

__all__ = [
    "GRAPH_CHOICES",
    "GRAPH_FLAGS",
    "GraphDecision",
    "decide_graphs",
    "recipe_blockers",
]

GRAPH_CHOICES = ("auto", "on", "off")
GRAPH_FLAGS = ("--cuda-graph-impl", "full_iteration", "--no-check-for-nan-in-loss-and-grad")
"""Megatron's full-iteration graph; Megatron requires its NaN check (a host read per step) off with it."""


@dataclass(frozen=True)
class GraphDecision:
    enabled: bool
    reason: str
    """Why (for the dry run, the notes and manifest.json)."""


def recipe_blockers(recipe: Recipe) -> list[str]:
    """What in `recipe` a replayed graph would get wrong (empty: nothing). Every recipe feature is graph
    safe now (module docstring), so this is empty for every recipe in the registry."""
    del recipe
    return []


def _tree_supports(root: Path) -> bool:
    """Whether `root`'s megatron/training accepts `--cuda-graph-impl full_iteration` (0.17 and later)."""
    args = root / "megatron" / "training" / "arguments.py"
    try:
        return "full_iteration" in args.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def decide_graphs(
    choice: str,
    *,
    recipe: Recipe,
    own_entry: bool,
    training_root: Path | None,
    moe: bool,
    world_size: int,
    pipeline: int,
    extra: tuple[str, ...] = (),
) -> GraphDecision:
    """Resolve `--cuda-graphs auto|on|off` for one run. `training_root`: the Megatron whose megatron/training
    would train (launch.preflight.training_megatron; None: not known, e.g. a dry run on a path that is no
    tree). `on` with a blocker raises LaunchError; so does a blocking recipe when the extra arguments ask
    for a graph themselves (`-- --cuda-graph-impl ...`)."""
    if choice not in GRAPH_CHOICES:
        raise LaunchError(f"--cuda-graphs {choice!r}: expected one of {', '.join(GRAPH_CHOICES)}")
    given = flag_values(extra, "--cuda-graph-impl")
    if given:
        value = given[0]
        if value != "none" and recipe_blockers(recipe):
            raise LaunchError(
                f"extra argument --cuda-graph-impl {value}: recipe {recipe.name} cannot run under a CUDA "
                f"graph: {'; '.join(recipe_blockers(recipe))} (a replay would repeat one step's values)"
            )
        return GraphDecision(value not in ("", "none"), f"--cuda-graph-impl {value} from the extra arguments")
    if choice == "off":
        return GraphDecision(False, "--cuda-graphs off")
    blockers = recipe_blockers(recipe)
    if blockers:
        why = f"recipe {recipe.name}: {'; '.join(blockers)}, which a replayed graph would repeat"
        if choice == "on":
            raise LaunchError(f"--cuda-graphs on: {why}; use --cuda-graphs off")
        return GraphDecision(False, why)
    if choice == "on":
        return GraphDecision(True, "--cuda-graphs on")
    if not own_entry:
        return GraphDecision(False, "the tree's own pretrain_gpt.py trains (graphs need megaquant's entry)")
    if training_root is not None and not _tree_supports(training_root):
        return GraphDecision(
            False, "the megatron/training that trains has no full-iteration CUDA graph (< 0.17)"
        )
    if moe:
        return GraphDecision(False, "dropless MoE reads its token counts on the host (not capturable)")
    if world_size > 1 or pipeline > 1:
        return GraphDecision(False, "multi-GPU graphs are not verified yet (use --cuda-graphs on to try)")
    return GraphDecision(True, "single-GPU dense model, graph-safe recipe")
