"""benchmarks/results_runs.py: the run matrix, the argv it gives `megaquant train`, and the run loop (several
runs at once, the budget, the tarball) against a stand-in for `megaquant train`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results_runs as rr  # noqa: E402

from megaquant.launch.modes import SEED_MODES, get_mode  # noqa: E402
from megaquant.launch.run import TrainRequest, plan_run  # noqa: E402
from megaquant.recipes import bf16_layers_for_args, check_recipe  # noqa: E402


def _flag(args: list[str] | tuple[str, ...], flag: str) -> str:
    values = [args[i + 1] for i, a in enumerate(args) if a == flag]
    assert values, flag
    return values[-1]  # Megatron's parser: the last occurrence wins


def _planned_args(spec: rr.RunSpec, tmp_path: Path) -> tuple[list[str], tuple[str, ...]]:
    """(megaquant train options, the Megatron argv megaquant's planner makes of them) for one run."""
    argv = rr.train_argv(
        spec,
        megaquant=["megaquant"],
        tree=tmp_path / "tree",
        data_root=tmp_path / "data",
        run_dir=tmp_path / "run",
        port=29510,
        cache=tmp_path / "cache",
    )
    split = argv.index("--")
    options, extra = argv[2:split], tuple(argv[split + 1 :])
    request = TrainRequest(
        model=_flag(options, "--model"),
        dataset=_flag(options, "--dataset"),
        mode=_flag(options, "-q"),
        preset=_flag(options, "--training-config"),
        megatron=tmp_path / "tree",
        data_root=tmp_path / "data",
        steps=int(_flag(options, "--steps")),
        extra=extra,
        spec="megatron-core",
        recipe=_flag(options, "--recipe"),
    )
    return options, plan_run(request, require_tree=False).megatron_args


@pytest.mark.parametrize("shape", list(rr.SHAPES))
def test_megaquant_train_gets_the_steps_shape_eval_and_seed_asked_for(shape: str, tmp_path: Path) -> None:
    """Through megaquant's own planner: `--steps` counts optimizer steps at the global batch given after `--`
    (the presets count samples; megaquant train rescales them)."""
    options, args = _planned_args(rr.RunSpec(shape=shape, mode="FA_linear_mxfp8", seed=1236), tmp_path)
    shape_ = rr.SHAPES[shape]
    assert int(_flag(args, "--train-samples")) // int(_flag(args, "--global-batch-size")) == shape_.steps
    assert int(_flag(args, "--train-samples")) % int(_flag(args, "--global-batch-size")) == 0
    assert _flag(args, "--lr-decay-samples") == _flag(args, "--train-samples")
    assert int(_flag(args, "--global-batch-size")) == shape_.global_batch
    assert int(_flag(args, "--seq-length")) == shape_.seq
    assert int(_flag(args, "--eval-interval")) == shape_.steps // rr.EVAL_POINTS
    assert _flag(args, "--seed") == "1236" and _flag(args, "--split") == "98,2,0"
    assert _flag(args, "--data-cache-path") == str(tmp_path / "cache")
    assert _flag(options, "--master-port") == "29510"
    assert "--full-validation" not in args  # crashes megatron-core 0.19.2 (megaquant train refuses it)
    if shape_.validation_seed is None:
        assert "--validation-seed" not in options
    else:  # a megaquant train option (the fixed validation shuffle), not a Megatron argument
        assert _flag(options, "--validation-seed") == str(shape_.validation_seed)
    assert rr.SHAPES["dsv2-2l"].validation_seed == rr.SHAPES["1b"].validation_seed == 1234
    assert rr.SHAPES["8b-4l"].validation_seed is None  # 8b-4l keeps its stored protocol


def test_the_deepseek_depth_check_is_the_headline_cells_with_moe_layers_quantized() -> None:
    runs = rr.BATCHES["dsv2-4l"]
    assert {(r.mode, r.recipe) for r in runs} == set(rr.HEADLINE) and len(runs) == 15
    assert runs[0].mode == "bf16" and {r.seed for r in runs} == set(rr.SEEDS)
    args = ["--num-layers", str(rr.SHAPES["dsv2-4l"].layers)]
    assert bf16_layers_for_args("nvfp4_paper", args) == (4,)  # layers 2 and 3, MoE, stay NVFP4
    assert bf16_layers_for_args("nvfp4_paper", ["--num-layers", "2"]) == (2,)  # dsv2-2l: its only MoE layer


@pytest.mark.parametrize("shape", rr.FULL_FAMILIES)
def test_each_family_covers_the_issue_matrix(shape: str) -> None:
    runs = rr.BATCHES[shape]
    assert len({r.name for r in runs}) == len(runs)
    cells = {(r.mode, r.recipe) for r in runs}
    assert {m for m, _ in cells} >= set(SEED_MODES) | set(rr.NVFP4_MODES)
    assert cells >= set(rr.RECIPE_CELLS)
    for mode, recipe in cells:  # every cell is one megaquant's ops can run
        check_recipe(recipe, get_mode(mode).values(), spec="megatron-core")
    for cell in rr.HEADLINE:
        assert sorted(r.seed for r in runs if (r.mode, r.recipe) == cell) == list(rr.SEEDS)
    assert all(r.shape == shape and r.length() == rr.SHAPES[shape].steps for r in runs)
    assert runs[0].mode == "bf16"  # the baseline first: a cut-short batch still has it


def test_only_eager_runs_share_the_gpu_by_default() -> None:
    graph_run = rr.RunSpec(shape="8b-4l", mode="FA_linear_mxfp8", seed=1234)
    eager = rr.RunSpec(shape="dsv2-2l", mode="FA_linear_hifp8", recipe="hifp8_delayed", seed=1234)
    delayed = rr.RunSpec(shape="8b-4l", mode="FA_linear_hifp8", recipe="hifp8_delayed", seed=1234)
    tseng = rr.RunSpec(shape="8b-4l", mode="FA_linear_mxfp4", recipe="mxfp4_tseng", seed=1234)
    moe = rr.RunSpec(shape="dsv2-2l", mode="bf16", seed=1234)  # DeepSeek's MoE is never graphed
    assert rr.graphed(graph_run) and not rr.graphed(eager) and not rr.graphed(moe)
    assert rr.graphed(delayed) and not rr.may_share(delayed, [graph_run])
    assert rr.may_share(graph_run, [])
    assert not rr.may_share(graph_run, [graph_run])  # two graphed runs: 1.10x, and neither time is clean
    assert rr.may_share(eager, [graph_run]) and rr.may_share(graph_run, [eager])
    assert rr.may_share(moe, [eager])
    assert rr.graphed(tseng) and not rr.may_share(tseng, [graph_run])  # its random streams replay exactly
    assert rr.cost_factor(eager) == 4.5 and rr.cost_factor(graph_run) == 1.05
    assert rr.cost_factor(delayed) == 1.5
    assert rr.cost_factor(tseng) == 1.25  # measured at 1B with the session-17 kernels (session 18)


def test_budget_decision() -> None:
    spec = rr.RunSpec(shape="8b-4l", mode="bf16", steps=100)
    assumed = rr.estimate_s(spec, {})
    assert assumed == pytest.approx(rr.SHAPES["8b-4l"].startup_s + 100 * rr.SHAPES["8b-4l"].step_s)
    startup = rr.SHAPES["8b-4l"].startup_s
    assert rr.estimate_s(spec, {"8b-4l": 2.0}) == pytest.approx(startup + 200.0)  # measured wins
    # session 16: a 134 s hifp8_scaled run of 320 steps; nvfp4_paper then estimated from it
    scaled = rr.RunSpec(shape="8b-4l", mode="FA_linear_hifp8", recipe="hifp8_scaled", seed=1236)
    paper = rr.RunSpec(shape="8b-4l", mode="FA_linear_nvfp4", recipe="nvfp4_paper", seed=1236)
    step = rr.per_step_s(scaled, 134.0, 0)
    assert step == pytest.approx((134.0 - startup) / 320 / 1.1)
    assert rr.estimate_s(paper, {"8b-4l": step}) < 180  # not 195 s: the start-up is not a step cost
    assert rr.per_step_s(scaled, 134.0, 1) < step  # measured while sharing: counted as if alone
    assert rr.per_step_s(scaled, 20.0, 0) == pytest.approx(10.0 / 320 / 1.1)  # start-up capped at half
    slow = rr.RunSpec(shape="8b-4l", mode="FA_linear_mxfp4", recipe="mxfp4_tseng", steps=100)
    assert rr.estimate_s(slow, {"8b-4l": 2.0}) > rr.estimate_s(spec, {"8b-4l": 2.0})
    assert rr.can_start(100.0, 200.0, [], 300.0) and not rr.can_start(100.0, 201.0, [], 300.0)
    # a long run alone fits; next to it nothing starts that would push it past the budget
    assert rr.can_start(0.0, 500.0, [], 540.0)
    assert not rr.can_start(0.0, 100.0, [(0.0, 500.0)], 540.0)  # 500 s x 1.3 > 540
    assert rr.can_start(0.0, 100.0, [(0.0, 300.0)], 540.0)  # 390 and 130 s both fit
    assert not rr.can_start(450.0, 100.0, [], 540.0)
    alone = rr.start_estimate(spec, {"8b-4l": 2.0}, 0)
    assert alone == pytest.approx(startup + 200.0) and rr.start_estimate(spec, {"8b-4l": 2.0}, 1) > alone


FAKE = r"""
import signal, sys
signal.signal(signal.SIGINT, lambda *_: STOP())  # first: the driver may interrupt at once
import json, os, time
from pathlib import Path

argv = sys.argv[1:]
assert argv[0] == "train"


def flag(name):
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


run = Path(flag("--run-dir"))
run.mkdir(parents=True, exist_ok=True)
extra = argv[argv.index("--") + 1 :]
manifest = {"schema": 1, "mode": flag("-q"), "model": flag("--model"), "dataset": flag("--dataset")}
manifest.update(recipe=flag("--recipe"), megatron_args=extra, status="running", exit_code=None)


def write(status, code):
    manifest.update(status=status, exit_code=code)
    (run / "manifest.json").write_text(json.dumps(manifest))


def STOP():
    write("interrupted", -2)
    sys.exit(130)


write("running", None)
with open(os.environ["FAKE_LOG"], "a") as log:
    started = {"run": run.name, "tree": flag("--megatron"), "port": flag("--master-port")}
    started["start"] = time.time()
    log.write(json.dumps(started) + "\n")
if f"{flag('--model')}:{flag('-q')}" in os.environ.get("FAKE_FAIL", "").split(","):
    write("failed", 3)
    sys.exit(3)
time.sleep(float(os.environ["FAKE_SLEEP"]))
steps = int(flag("--steps"))
step_s = float(os.environ.get("FAKE_STEP_S", "0"))  # > 0: one step at a time, as training logs them
metrics = [
    {"step": i, "loss": 5.0 - i / 10, "step_time_s": step_s or 0.1, "peak_mem_bytes": 1}
    for i in range(1, steps + 1)
]
with (run / "metrics.jsonl").open("w") as out:
    for m in metrics:
        time.sleep(step_s)
        out.write(json.dumps(m) + "\n")
        out.flush()
if step_s:  # the prestart tests read when training ended
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps({"run": run.name, "trained": time.time()}) + "\n")
time.sleep(float(os.environ.get("FAKE_FINAL_EVAL_S", "0")))  # trained; evaluating and exiting
evals = " validation loss at iteration 2 | lm loss value: 4.500000E+00 | lm loss PPL: 9.0E+01 | \n"
evals += " validation loss at iteration 4 on validation set | lm loss value: 4.250000E+00 | \n"
(run / "train.log").write_text("".join(f"line {i}\n" for i in range(500)) + evals)
counts = {"gemms": {}, "operands": {}, "fallbacks": [], "steps": 4}
(run / "path_counts.rank0.json").write_text(json.dumps(counts))
write("succeeded", 0)
"""


def _fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleep: float) -> tuple[str, Path]:
    script = tmp_path / "fake_megaquant.py"
    script.write_text(FAKE)
    log = tmp_path / "fake.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_SLEEP", str(sleep))
    return f"{sys.executable} {script}", log


def _run(tmp_path: Path, megaquant: str, *extra: str, tree: Path | None = None) -> int:
    """`results_runs.py run --batch test` with WORK tmp/w and OUT tmp/out (tree: a bare stand-in)."""
    if tree is None:
        tree = tmp_path / "tree"
        (tree / ".git").mkdir(parents=True, exist_ok=True)
    paths = ["--tree", str(tree), "--data-root", str(tmp_path / "data"), "--work", str(tmp_path / "w")]
    return rr.main(
        ["run", "--batch", "test", *paths, "--out", str(tmp_path / "out"), "--megaquant", megaquant, *extra]
    )


def test_runs_share_the_gpu_in_their_own_trees_and_come_back_in_one_tarball(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = tuple(rr.RunSpec(shape="8b-4l", mode=m, steps=8) for m in ("bf16", "FA_mxfp8", "linear_mxfp8"))
    monkeypatch.setitem(rr.BATCHES, "test", batch)
    megaquant, log = _fake(tmp_path, monkeypatch, sleep=1.0)
    assert _run(tmp_path, megaquant, "--concurrency", "2", "--share-any", "--budget-s", "600") == 0
    starts = [json.loads(line) for line in log.read_text().splitlines()]
    first, second = starts[0], starts[1]
    assert first["tree"] != second["tree"] and first["port"] != second["port"]  # concurrent: apart
    assert abs(first["start"] - second["start"]) < 1.0  # and really at once
    assert (tmp_path / "w" / "trees" / "slot1" / ".git").is_dir()  # slot 1 trains a copy
    with tarfile.open(tmp_path / "out" / "test.tar.gz") as tar:
        names = set(tar.getnames())
    for spec in batch:
        for file in (
            "manifest.json",
            "metrics.jsonl",
            "validation.jsonl",
            "train_tail.log",
            "timing.log",
            "results_run.json",
        ):
            assert f"test/{spec.name}/{file}" in names
        assert f"test/{spec.name}/path_counts.rank0.json" in names
    assert not any(n.endswith("/train.log") for n in names)  # the full log stays on the machine
    store = tmp_path / "store"
    written = rr.unpack(tmp_path / "out" / "test.tar.gz", store)
    assert sorted(p.name for p in written) == sorted(s.name for s in batch)
    run = store / "test" / batch[0].name
    assert [json.loads(x)["final"] for x in (run / "validation.jsonl").read_text().splitlines()] == [
        False,
        True,
    ]
    assert len((run / "train_tail.log").read_text().splitlines()) == rr.TAIL_LINES
    record = json.loads((run / "results_run.json").read_text())
    assert record["concurrency"] == 2 and batch[1].name in record["overlapped"] and record["exit_code"] == 0
    assert record["started_utc"] < record["ended_utc"] and record["started_utc"].endswith("+00:00")
    with pytest.raises(SystemExit, match="already in the store, succeeded"):
        rr.unpack(tmp_path / "out" / "test.tar.gz", store)
    for spec in batch:  # a stored run that failed is replaced by the one that ran again
        (store / "test" / spec.name / "manifest.json").write_text(json.dumps({"status": "failed"}))
    assert len(rr.unpack(tmp_path / "out" / "test.tar.gz", store)) == len(batch)
    assert all(rr._succeeded(store / "test" / s.name / "manifest.json") for s in batch)
    with pytest.raises(SystemExit, match="already in the store, succeeded"):
        rr.unpack(tmp_path / "out" / "test.tar.gz", store)
    assert rr.unpack(tmp_path / "out" / "test.tar.gz", store, replace=True)


def test_the_budget_stops_starting_runs_and_interrupts_overrunning_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = (rr.RunSpec(shape="8b-4l", mode="bf16", steps=8), rr.RunSpec(shape="1b", mode="bf16"))
    monkeypatch.setitem(rr.BATCHES, "test", batch)
    quick = rr.Shape(**{**rr.SHAPES["8b-4l"].__dict__, "startup_s": 1.0, "step_s": 0.0})
    monkeypatch.setitem(rr.SHAPES, "8b-4l", quick)  # estimated 1 s, fits; the 1b run (~minutes) does not
    megaquant, log = _fake(tmp_path, monkeypatch, sleep=60.0)  # ... and the first overruns its estimate
    start = time.monotonic()
    assert _run(tmp_path, megaquant, "--budget-s", "6") == 0
    assert time.monotonic() - start < 40
    assert [json.loads(line)["run"] for line in log.read_text().splitlines()] == [batch[0].name]
    with tarfile.open(tmp_path / "out" / "test.tar.gz") as tar:
        member = tar.extractfile(f"test/{batch[0].name}/manifest.json")
        assert member is not None
        assert json.loads(member.read())["status"] == "interrupted"
        assert not any(batch[1].name in n for n in tar.getnames())
    driver_log = (tmp_path / "out" / "test.driver.log").read_text()
    assert "interrupting" in driver_log and f"not started: {batch[1].name}" in driver_log


def test_a_run_that_has_trained_its_last_step_finishes_past_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 15's DeepSeek hifp8_delayed run was interrupted seconds after its final validation: a run
    whose metrics show its last step gets --finish-grace-s; one still training past the grace does not."""
    batch = (rr.RunSpec(shape="8b-4l", mode="bf16", steps=8),)
    monkeypatch.setitem(rr.BATCHES, "test", batch)
    quick = rr.Shape(**{**rr.SHAPES["8b-4l"].__dict__, "startup_s": 1.0, "step_s": 0.0})
    monkeypatch.setitem(rr.SHAPES, "8b-4l", quick)
    megaquant, _ = _fake(tmp_path, monkeypatch, sleep=0.5)
    monkeypatch.setenv("FAKE_FINAL_EVAL_S", "6")  # trained by 0.5 s, exits at ~6.5 s: past the 3 s budget
    assert _run(tmp_path, megaquant, "--budget-s", "3", "--finish-grace-s", "30") == 0
    with tarfile.open(tmp_path / "out" / "test.tar.gz") as tar:
        member = tar.extractfile(f"test/{batch[0].name}/manifest.json")
        assert member is not None and json.loads(member.read())["status"] == "succeeded"
    driver_log = (tmp_path / "out" / "test.driver.log").read_text()
    assert "has trained its last step, letting it finish" in driver_log
    monkeypatch.setenv("FAKE_FINAL_EVAL_S", "60")  # a final evaluation longer than the grace is cut
    start = time.monotonic()
    again = tmp_path / "again"  # a fresh --work: the first run is done in the old one
    assert _run(again, megaquant, "--budget-s", "3", "--finish-grace-s", "4") == 0
    assert time.monotonic() - start < 40
    with tarfile.open(again / "out" / "test.tar.gz") as tar:
        member = tar.extractfile(f"test/{batch[0].name}/manifest.json")
        assert member is not None and json.loads(member.read())["status"] == "interrupted"


def test_a_shape_whose_runs_all_failed_starts_no_more_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first 1b run fails (its set-up, say): the other 1b runs wait and are not started, the 8B runs
    go on; after an 8B run succeeded, an 8B failure is that mode's own and the next 8B run still starts."""
    modes_8b = ("bf16", "FA_linear_mxfp8", "FA_linear_mxfp4")
    batch = (
        rr.RunSpec(shape="1b", mode="bf16", steps=8),
        rr.RunSpec(shape="1b", mode="FA_linear_mxfp8", steps=8),
        *(rr.RunSpec(shape="8b-4l", mode=m, steps=8) for m in modes_8b),
    )
    monkeypatch.setitem(rr.BATCHES, "test", batch)
    monkeypatch.setenv("FAKE_FAIL", "llama32-1b:bf16,llama31-8b:FA_linear_mxfp8")
    megaquant, log = _fake(tmp_path, monkeypatch, sleep=0.0)
    assert _run(tmp_path, megaquant, "--budget-s", "3000") == 0
    started = [json.loads(line)["run"] for line in log.read_text().splitlines()]
    assert started == [batch[0].name, *(s.name for s in batch[2:])]  # 1b's second run never started
    driver_log = (tmp_path / "out" / "test.driver.log").read_text()
    assert (
        f"not starting {batch[1].name}: no run of their shape succeeded (1b: {batch[0].name} failed)"
        in driver_log
    )
    with tarfile.open(tmp_path / "out" / "test.tar.gz") as tar:
        names = tar.getnames()
    assert not any(batch[1].name in n for n in names) and any(batch[4].name in n for n in names)


def test_unpack_refuses_members_outside_batch_run_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        (tmp_path / "x").write_text("x")
        tar.add(tmp_path / "x", arcname="../escape")
    with pytest.raises(SystemExit, match="unexpected member"):
        rr.unpack(bad, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_skip_done_leaves_out_succeeded_runs_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = rr.BATCHES["8b-4l"]
    for spec, status in ((batch[0], "succeeded"), (batch[1], "failed")):
        (tmp_path / "8b-4l" / spec.name).mkdir(parents=True)
        (tmp_path / "8b-4l" / spec.name / "manifest.json").write_text(json.dumps({"status": status}))
    assert rr.main(["plan", "--batch", "8b-4l", "--skip-done", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert f"| {batch[0].name} |" not in table and f"| {batch[1].name} |" in table  # a failed run runs again
    assert f"{len(batch) - 1} runs" in table
    other = tmp_path / "other"  # a second store, e.g. a warm machine's work dir
    (other / "8b-4l" / batch[2].name).mkdir(parents=True)
    (other / "8b-4l" / batch[2].name / "manifest.json").write_text(json.dumps({"status": "succeeded"}))
    assert rr.main(["plan", "--batch", "8b-4l", "--skip-done", str(tmp_path), "--skip-done", str(other)]) == 0
    table = capsys.readouterr().out
    assert f"| {batch[2].name} |" not in table and f"{len(batch) - 2} runs" in table
    # `run` also leaves out what its --work dir already holds (a warm machine's earlier call)
    ns = argparse.Namespace(batch="8b-4l", only="", skip_done=None, work=tmp_path / "work")
    (ns.work / "runs" / "8b-4l" / batch[3].name).mkdir(parents=True)
    (ns.work / "runs" / "8b-4l" / batch[3].name / "manifest.json").write_text('{"status": "succeeded"}')
    assert [s.name for _, s in rr._select(ns)] == [s.name for s in batch if s is not batch[3]]


def test_skip_leaves_out_named_runs(capsys: pytest.CaptureFixture[str]) -> None:
    batch = rr.BATCHES["1b"]
    names = f"{batch[0].name},{batch[2].name}"
    assert rr.main(["plan", "--batch", "1b", "--skip", names]) == 0
    table = capsys.readouterr().out
    assert f"| {batch[0].name} |" not in table and f"| {batch[1].name} |" in table
    assert f"{len(batch) - 2} runs" in table
    with pytest.raises(SystemExit, match="--skip: not in batch 1b: nope"):
        rr.main(["plan", "--batch", "1b", "--skip", "nope"])


TRAINER = r"""
import os, sys, time
steps = 6
for step in range(1, steps + 1):
    print(f" [2026-01-01 00:00:00] iteration {step:8d}/{steps:8d} | consumed samples: {2 * step} | "
          f"elapsed time per iteration (ms): {100.0 + step:.1f} | learning rate: 1.0E-04 | "
          f"lm loss: {6.0 - step / 10:.6E} | loss scale: 1.0 |", flush=True)
    if step % 3 == 0:
        print(f" validation loss at iteration {step} | lm loss value: {6.1 - step / 10:.6E} | ", flush=True)
    time.sleep(0.2)
print(" validation loss at iteration 6 on validation set | lm loss value: 5.450000E+00 | ", flush=True)
"""


def test_real_megaquant_train_two_at_once_then_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole chain on CPU: the real `megaquant train` CLI sets and restores roles on a fixture fork tree
    and its slot copy at the same time (a fake trainer through MEGAQUANT_TRAIN_COMMAND stands in for
    torchrun), the tarball comes back, unpack, and the page builder reads the stored runs."""
    import shlex

    import git
    import results_page as rp
    from conftest import make_git_repo

    tree = make_git_repo(tmp_path, "v1_three")
    head = git.Repo(tree).head.commit.hexsha
    data = tmp_path / "data"
    prefix = data / "dataset/realtext_processed/realtext_processed_text_document"
    prefix.parent.mkdir(parents=True)
    for suffix in (".bin", ".idx"):
        prefix.with_name(prefix.name + suffix).write_bytes(b"")
    (data / "tokenizers/realtext-bpe-32k").mkdir(parents=True)
    (data / "tokenizers/realtext-bpe-32k/tokenizer.json").write_text("{}")
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    monkeypatch.setenv("MEGAQUANT_TRAIN_COMMAND", shlex.join([sys.executable, str(script)]))
    batch = tuple(rr.RunSpec(shape="8b-4l", mode=m, steps=8) for m in ("bf16", "linear_mxfp4"))
    monkeypatch.setitem(rr.BATCHES, "test", batch)
    code = _run(tmp_path, f"{sys.executable} -m megaquant", "--concurrency", "2", "--share-any", tree=tree)
    assert code == 0
    store = tmp_path / "store"
    rr.unpack(tmp_path / "out" / "test.tar.gz", store)
    for spec in batch:
        manifest = json.loads((store / "test" / spec.name / "manifest.json").read_text())
        assert manifest["status"] == "succeeded", (
            tmp_path / "w" / "runs" / "test" / f"{spec.name}.out"
        ).read_text()
        assert manifest["mode"] == spec.mode and manifest["base"]["commit"] == head
        assert "restored" in manifest["restored"]
    assert git.Repo(tree).active_branch.name == "main"  # every slot tree is back on its base
    assert git.Repo(tmp_path / "w" / "trees" / "slot1").active_branch.name == "main"
    runs, notes = rp.load_store(store)
    assert not notes and sorted(r.mode for r in runs) == sorted(s.mode for s in batch)
    assert all(r.val_final == pytest.approx(5.45) and r.run.steps == (1, 2, 3, 4, 5, 6) for r in runs)
    assert any(r.shared_gpu for r in runs)


def test_every_batch_argv_passes_megatrons_own_parser(tmp_path: Path) -> None:
    """Each distinct Megatron argv of every batch (the same for every mode of a shape; lengths differ)
    through megatron-core 0.19.2's parse_args + validate_args + sample counts, before any GPU time."""
    pytest.importorskip("triton", reason="megatron-core 0.19's argument parsing imports triton")
    from megaquant.errors import MegaquantError
    from megaquant.launch.validate import Case, source_for, validate

    try:
        source = source_for(None)
    except MegaquantError as exc:
        pytest.skip(f"no Megatron sources with megatron/training available: {exc}")
    specs = {(s.shape, s.length()): s for batch in rr.BATCHES.values() for s in batch}  # seeds: one flag
    cases = {key: Case(argv=_planned_args(spec, tmp_path)[1]) for key, spec in specs.items()}
    verdicts = validate(list(cases.values()), source)
    assert {key: v.error for key, v in zip(cases, verdicts, strict=True) if not v.ok} == {}


def test_timing_log_keeps_where_the_time_besides_the_steps_went() -> None:
    rows = [
        "using world size: 1",
        "[after megatron is initialized] datetime: 2026-12-01 20:16:20 ",
        "> building train, validation, and test datasets ...",
        "[after dataloaders are built] datetime: 2026-12-01 20:16:33 ",
        "(min, max) time across ranks (ms):",
        "    model-and-optimizer-setup ......................: (10592.11, 10592.11)",
        "    train/valid/test-data-iterators-setup ..........: (1846.53, 1846.53)",
        "training ...",
        *(f" [2026-12-01 20:16:4{i}.1] iteration {i + 1:8d}/     320 | lm loss: 9.0E+00 |" for i in range(7)),
        "CUDA graph capture done for training!!!",
        "(min, max) time across ranks (ms):",
        "    evaluate .......................................: (612.30, 612.30)",
        " validation loss at iteration 32 on validation set | lm loss value: 6.0E+00 |",
    ]
    kept = rr.timing_lines("\n".join(rows) + "\n").splitlines()
    assert kept == [rows[1], rows[3], *rows[4:7], *rows[8:13], rows[15], *rows[16:18]]


def test_phases_split_a_runs_wall_time_by_the_driver_and_megatron_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    timing = (
        "[after in-process setup and before initialize_megatron] datetime: 2026-12-03 18:00:19.727273 \n"
        "[after megatron is initialized] datetime: 2026-12-03 18:00:21.822389 \n"
        "[before the start of training step] datetime: 2026-12-03 18:00:22.160233 \n"
        "    evaluate .......................................: (697.54, 697.54)\n"
        "[after training is done] datetime: 2026-12-03 18:01:50.406946 \n"
    )
    record = {
        "wall_s": 120.0,
        "started_utc": "2026-12-03T17:59:55.000+00:00",
        "ended_utc": "2026-12-03T18:01:55.000+00:00",
    }
    split = rr.phases(record, timing)
    assert split == dict(zip(rr.PHASES, (24.7, 2.4, 88.2, 4.6), strict=True))
    assert sum(split.values()) == pytest.approx(120.0, abs=0.15)
    assert rr.phases({"wall_s": 120.0}, timing) is None  # no driver times and no manifest
    manifest = {"start": "2026-12-03T17:59:56+00:00", "end": "2026-12-03T18:01:55+00:00"}
    assert rr.phases({"wall_s": 120.0}, timing, manifest) == dict(
        zip(rr.PHASES, (23.7, 2.4, 88.2, 4.6), strict=True)
    )
    # since session 18's entry Megatron also prints the worker's start, after its other stamps: the earliest
    # stamp, not the first line, ends the first phase
    early = timing + "[before library-setup] datetime: 2026-12-03 18:00:05.000000\n"
    assert rr.phases(record, early) == dict(zip(rr.PHASES, (10.0, 17.2, 88.2, 4.6), strict=True))
    assert rr.phases(record, timing.replace("[after training is done]", "[x]")) is None
    run = tmp_path / "fam" / "run-a"
    run.mkdir(parents=True)
    (run / "results_run.json").write_text(json.dumps(record))
    (run / "timing.log").write_text(timing)
    (tmp_path / "fam" / "_driver").mkdir()  # not a run: left out
    assert rr.main(["phases", str(tmp_path / "fam")]) == 0
    assert "| run-a | 120.0 | 24.7 | 2.4 | 88.2 | 4.6 |" in capsys.readouterr().out


def _prestart_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, startup_s: float
) -> list[dict[str, Any]]:
    """Two graphed 8B-cut runs one at a time with --prestart-s: a fake whose start-up takes `startup_s`,
    then 12 steps of 0.25 s; the driver looks every 0.1 s. Returns the fake's log lines."""
    batch = tuple(rr.RunSpec(shape="8b-4l", mode=m, steps=12) for m in ("bf16", "FA_mxfp8"))
    monkeypatch.setitem(rr.BATCHES, "test", batch)
    monkeypatch.setattr(rr, "POLL_S", 0.1)
    monkeypatch.setattr(rr, "AFTER_TRAINING_S", 0.2)
    monkeypatch.setenv("FAKE_STEP_S", "0.25")
    monkeypatch.setenv("FAKE_FINAL_EVAL_S", "0.5")
    megaquant, log = _fake(tmp_path, monkeypatch, sleep=startup_s)
    assert _run(tmp_path, megaquant, "--prestart-s", "1.5", "--budget-s", "600") == 0
    return [json.loads(line) for line in log.read_text().splitlines()]


def _records(tmp_path: Path) -> dict[str, dict[str, Any]]:
    store = tmp_path / "store"
    rr.unpack(tmp_path / "out" / "test.tar.gz", store)
    return {d.name: json.loads((d / "results_run.json").read_text()) for d in (store / "test").iterdir()}


def test_a_prestarted_runs_start_up_overlaps_the_last_seconds_of_the_one_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _prestart_batch(tmp_path, monkeypatch, startup_s=2.5)  # start-up longer than the overlap
    first, second = rr.BATCHES["test"]
    starts = {e["run"]: e for e in events if "start" in e}
    trained = {e["run"]: e["trained"] for e in events if "trained" in e}
    assert starts[second.name]["start"] < trained[first.name]  # started while the first still trained
    assert starts[first.name]["tree"] != starts[second.name]["tree"]  # in the spare slot's tree
    assert starts[first.name]["port"] != starts[second.name]["port"]
    records = _records(tmp_path)
    one, two = records[first.name], records[second.name]
    assert one["overlapped"] == [] and two["overlapped"] == []  # only a start-up overlapped: no sharing
    assert one["prestart"]["successor"] == second.name and 2 <= one["prestart"]["from_step"] <= 12
    assert two["prestarted_beside"] == first.name and "prestart" not in two


def test_a_prestarted_run_that_trains_before_the_other_ends_shares_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _prestart_batch(tmp_path, monkeypatch, startup_s=0.0)  # trains at once, beside the first's last steps
    first, second = rr.BATCHES["test"]
    records = _records(tmp_path)
    assert records[first.name]["overlapped"] == [second.name]
    assert records[second.name]["overlapped"] == [first.name]
    assert "prestart" not in records[first.name] and "prestarted_beside" not in records[second.name]


def test_remaining_time_and_the_prestart_candidate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert rr.remaining_s(run, 100) == float("inf")  # nothing logged yet
    rows = [{"step": i, "step_time_s": 0.25} for i in range(1, 91)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9')
    assert rr.remaining_s(run, 100) == pytest.approx(10 * 0.25 + rr.AFTER_TRAINING_S)
    spec = rr.RunSpec(shape="8b-4l", mode="bf16", steps=100)
    ending = rr.Active(spec, 0, None, run, 0.0)  # type: ignore[arg-type]
    assert rr.prestart_candidate([ending], 1, 11.0) is ending
    assert rr.prestart_candidate([ending], 1, 10.0) is None  # 10.5 s left
    assert rr.prestart_candidate([ending], 1, 0.0) is None  # off
    assert rr.prestart_candidate([ending], 2, 11.0) is None  # a slot is free: no need
    follower = rr.Active(spec, 1, None, tmp_path / "other", 0.0, predecessor=ending)  # type: ignore[arg-type]
    ending.successor = "next"
    assert rr.prestart_candidate([ending, follower], 1, 11.0) is None  # one prestart at a time


def test_two_batches_share_one_driver_and_each_gets_its_own_tarball(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graphed = (rr.RunSpec(shape="1b", mode="bf16", steps=8), rr.RunSpec(shape="1b", mode="FA_mxfp8", steps=8))
    eager = (rr.RunSpec(shape="dsv2-2l", mode="bf16", steps=8),)
    assert all(rr.graphed(s) for s in graphed) and not rr.graphed(eager[0])
    monkeypatch.setitem(rr.BATCHES, "test", graphed)
    monkeypatch.setitem(rr.BATCHES, "test2", eager)
    megaquant, log = _fake(tmp_path, monkeypatch, sleep=1.0)
    tree = tmp_path / "tree"
    (tree / ".git").mkdir(parents=True)
    paths = ["--tree", str(tree), "--data-root", str(tmp_path / "data"), "--work", str(tmp_path / "w")]
    common = [*paths, "--out", str(tmp_path / "out"), "--megaquant", megaquant, "--concurrency", "3"]
    assert rr.main(["run", "--batch", "test,test2", *common]) == 0
    starts = [json.loads(line)["run"] for line in log.read_text().splitlines()]
    # the second graphed run does not start beside the first; the eager run of the other batch does
    assert sorted(starts[:2]) == sorted([graphed[0].name, eager[0].name]) and starts[2] == graphed[1].name
    store = tmp_path / "store"
    assert [p.name for p in rr.unpack(tmp_path / "out" / "test2.tar.gz", store)] == [eager[0].name]
    assert sorted(p.name for p in rr.unpack(tmp_path / "out" / "test.tar.gz", store)) == sorted(
        s.name for s in graphed
    )
    record = json.loads((store / "test2" / eager[0].name / "results_run.json").read_text())
    assert record["batch"] == "test2" and graphed[0].name in record["overlapped"]
    assert (tmp_path / "out" / "test_test2.driver.log").is_file()
    # stored runs of either batch are left out the next time
    assert rr._select(argparse.Namespace(batch="test,test2", only="", skip_done=[store], work=None)) == []
    with pytest.raises(SystemExit, match="unknown nope"):
        rr.main(["plan", "--batch", "test,nope"])


def test_the_results_call_script_parses_and_refuses_without_out(tmp_path: Path) -> None:
    """benchmarks/results_call.sh, the one command of a GPU call (docs/results/plan.md): valid bash, and
    without the device tool's $OUT it stops before installing anything."""
    script = ROOT / "benchmarks" / "results_call.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "OUT must name the folder" in done.stderr


def test_the_recipe_calibration_runs_are_short_and_go_to_the_calibration_table() -> None:
    """calib-recipes: short runs of the two RHT recipes for their step time with the current kernels; the
    page puts them in its calibration table, not into the families' seeds and gaps."""
    import results_page as rp

    batch = rr.BATCHES["calib-recipes"]
    assert {(s.mode, s.recipe) for s in batch} >= {("FA_linear_mxfp4", "mxfp4_tseng")}
    assert all(s.steps is not None and s.steps < rr.SHAPES[s.shape].steps for s in batch)
    assert "calib-recipes" in rp.CALIBRATION and "calib" in rp.CALIBRATION
    assert not {s.name for s in batch} & {s.name for s in rr.family("8b-4l") + rr.family("1b")}
