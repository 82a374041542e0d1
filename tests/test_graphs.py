"""CUDA graphs for a run (megaquant.launch.graphs): when `auto` turns Megatron's full-iteration graph on,
what it refuses, how the plan carries it, and how the path counters account for replayed steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaquant.launch.argv import Parallel
from megaquant.launch.graphs import GRAPH_FLAGS, decide_graphs, recipe_blockers
from megaquant.launch.run import TrainRequest, plan_run
from megaquant.ops import counters
from megaquant.pathcounts import merge
from megaquant.recipes import RECIPES, get_recipe


def _tree(tmp_path: Path, *, full_iteration: bool = True, fork_entry: bool = False) -> Path:
    tree = tmp_path / "tree"
    (tree / "megatron" / "core").mkdir(parents=True)
    training = tree / "megatron" / "training"
    training.mkdir(parents=True)
    choices = "['none', 'local', 'full_iteration']" if full_iteration else "['none', 'local']"
    (training / "arguments.py").write_text(f"CUDA_GRAPH_IMPLS = {choices}\n")
    if fork_entry:
        (tree / "pretrain_gpt.py").write_text("# the fork's own entry\n")
    return tree


def _decide(choice: str = "auto", recipe: str = "default", **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = dict(own_entry=True, training_root=None, moe=False, world_size=1, pipeline=1)
    args.update(kw)
    return decide_graphs(choice, recipe=get_recipe(recipe), **args)  # type: ignore[arg-type]


def test_auto_turns_graphs_on_only_where_a_replay_is_exact() -> None:
    assert _decide().enabled
    assert not _decide(own_entry=False).enabled
    assert "MoE" in _decide(moe=True).reason and not _decide(moe=True).enabled
    assert not _decide(world_size=2).enabled and not _decide(pipeline=2).enabled
    assert not _decide("off").enabled
    assert _decide("on", moe=True).enabled  # on: the user's call, except for what a replay gets wrong


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_auto_graphs_every_recipe(name: str) -> None:
    # stochastic rounding, per-GEMM random signs and delayed scaling keep no per-step host state
    # (tests/test_graphsafe.py); the random streams replay bit for bit on a GPU (tests/test_graphsafe_gpu.py),
    # and delayed scaling's training and validation losses did too (benchmarks/eval_graph_check.sh, s19)
    recipe = get_recipe(name)
    assert recipe_blockers(recipe) == []
    assert _decide(recipe=name).enabled, _decide(recipe=name).reason
    assert _decide("on", recipe=name).enabled
    assert _decide("off", recipe=name, extra=("--cuda-graph-impl", "full_iteration")).enabled
    assert not _decide("off", recipe=name).enabled


def test_the_registry_has_the_per_step_recipes_the_test_above_covers() -> None:
    # the test above must not pass vacuously
    assert {"sr_gradients", "nvfp4_paper", "mxfp4_tseng", "hifp8_scaled", "hifp8_delayed"} <= set(RECIPES)


def test_plan_adds_the_graph_flags_when_the_tree_supports_them(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    plan = plan_run(TrainRequest(model="tiny", dataset=None, megatron=tree, preset="smoke"))
    assert plan.cuda_graphs.enabled
    assert list(plan.megatron_args[-len(GRAPH_FLAGS) :]) == list(GRAPH_FLAGS)
    off = plan_run(TrainRequest(model="tiny", dataset=None, megatron=tree, preset="smoke", cuda_graphs="off"))
    assert not off.cuda_graphs.enabled and "--cuda-graph-impl" not in off.megatron_args
    sr = plan_run(
        TrainRequest(
            model="tiny",
            dataset=None,
            megatron=tree,
            preset="smoke",
            recipe="sr_gradients",
            spec="megatron-core",
            cuda_graphs="on",
        )
    )
    assert sr.cuda_graphs.enabled and "--cuda-graph-impl" in sr.megatron_args  # graph safe now (on)
    two = plan_run(
        TrainRequest(
            model="tiny", dataset=None, megatron=tree, preset="smoke", parallel=Parallel(nproc_per_node=2)
        )
    )
    assert not two.cuda_graphs.enabled


def test_plan_runs_evaluating_runs_under_the_graph(tmp_path: Path) -> None:
    # validation under the graph was verified on the H200 (docs/running.md, "CUDA graphs")
    tree = _tree(tmp_path)
    extra = ("--eval-iters", "2", "--eval-interval", "5")
    plan = plan_run(TrainRequest(model="tiny", dataset=None, megatron=tree, preset="smoke", extra=extra))
    assert plan.cuda_graphs.enabled, plan.cuda_graphs.reason


def test_plan_keeps_graphs_off_on_trees_without_them(tmp_path: Path) -> None:
    old = _tree(tmp_path / "old", full_iteration=False)
    assert not plan_run(
        TrainRequest(model="tiny", dataset=None, megatron=old, preset="smoke")
    ).cuda_graphs.enabled
    fork = _tree(tmp_path / "fork", fork_entry=True)
    plan = plan_run(TrainRequest(model="tiny", dataset=None, megatron=fork, preset="smoke"))
    assert not plan.cuda_graphs.enabled and "pretrain_gpt.py" in plan.cuda_graphs.reason


def test_user_graph_flag_is_not_doubled(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    extra = ("--cuda-graph-impl", "full_iteration", "--no-check-for-nan-in-loss-and-grad")
    plan = plan_run(TrainRequest(model="tiny", dataset=None, megatron=tree, preset="smoke", extra=extra))
    assert plan.cuda_graphs.enabled and plan.megatron_args.count("--cuda-graph-impl") == 1
    tail = ("--cuda-graph-warmup-steps", "2")  # the flags go before the extra arguments, which stay last
    plan = plan_run(TrainRequest(model="tiny", dataset=None, megatron=tree, preset="smoke", extra=tail))
    args = list(plan.megatron_args)
    assert args[-2:] == list(tail) and args[-2 - len(GRAPH_FLAGS) : -2] == list(GRAPH_FLAGS)


def _step(gemms: int, operands: int = 0) -> None:
    for _ in range(gemms):
        counters.count_gemm("linear_fwd", "triton")
    for _ in range(operands):
        counters.count_operand("linear_fwd", "cache")
    counters.mark_step()


def test_counters_extrapolate_replayed_steps_and_keep_eval_apart() -> None:
    counters.reset()
    try:
        counters.expect_graph(3)  # two warm-up steps, step 3 captured
        _step(10, 2)
        _step(10, 2)
        _step(7, 1)  # the captured step (fewer calls: e.g. cache hits that skip work)
        with counters.evaluation():  # a validation pass between steps
            for _ in range(5):
                counters.count_gemm("linear_fwd", "triton")
        _step(0)  # replays: nothing runs in Python
        _step(0)
        snap = counters.snapshot()
        assert snap["steps"] == 5
        assert snap["gemms"] == {"linear_fwd": {"triton": 10 + 10 + 7 * 3}}
        assert snap["operands"] == {"linear_fwd": {"cache": 2 + 2 + 1 * 3}}
        assert snap["eval_gemms"] == {"linear_fwd": {"triton": 5}}
        assert snap["cuda_graph"] == {"capture_step": 3, "replayed_steps": 2}
        merged = merge([snap, snap])
        assert (
            merged["gemms"]["linear_fwd"]["triton"] == 2 * 41 and merged["cuda_graph"]["replayed_steps"] == 2
        )
        assert merged["eval_gemms"]["linear_fwd"]["triton"] == 10
    finally:
        counters.reset()


def test_counters_without_a_graph_do_not_extrapolate() -> None:
    counters.reset()
    try:
        _step(4)
        _step(0)  # an eager step that counted nothing stays nothing
        snap = counters.snapshot()
        assert snap["gemms"] == {"linear_fwd": {"triton": 4}} and "cuda_graph" not in snap
    finally:
        counters.reset()


def test_a_failed_capture_tells_the_user_to_turn_graphs_off(tmp_path: Path) -> None:
    from megaquant.launch.run import failure_hint

    tree = _tree(tmp_path)
    plan = plan_run(TrainRequest(model="tiny", dataset=None, megatron=tree, preset="smoke"))
    log = tmp_path / "train.log"
    log.write_text("torch.AcceleratorError: CUDA error: operation not permitted when stream is capturing\n")
    hint = failure_hint(plan, log)
    assert hint is not None and "--cuda-graphs off" in hint
    log.write_text("RuntimeError: CUDA out of memory\n")
    assert failure_hint(plan, log) is None
    off = plan_run(TrainRequest(model="tiny", dataset=None, megatron=tree, preset="smoke", cuda_graphs="off"))
    log.write_text("operation not permitted when stream is capturing\n")
    assert failure_hint(off, log) is None


def test_the_training_process_accepts_a_graph_with_every_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    # megaquant.launch.pretrain run by hand with --cuda-graph-impl full_iteration: recipe_blockers decides,
    # and no recipe keeps per-step host state any more
    from megaquant.launch import pretrain
    from megaquant.recipes import RECIPE_ENV

    for name in ("sr_gradients", "mxfp4_tseng", "hifp8_delayed", "hifp8_scaled"):
        monkeypatch.setenv(RECIPE_ENV, name)
        pretrain._check_graph_recipe()
