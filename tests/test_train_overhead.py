"""benchmarks/train_overhead.py's loop with a fake `megaquant train` (no GPU, no Megatron): the table's
ratios, and `--keep-done` continuing a run across calls without re-running what it measured."""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

FAKE = """
import json, sys
from pathlib import Path
argv = sys.argv[1:]
run = Path(argv[argv.index("--run-dir") + 1])
mode = argv[argv.index("-q") + 1]
run.mkdir(parents=True)
step = 0.2 if mode == "bf16" else 0.25
with (run / "metrics.jsonl").open("w") as f:
    for i in range(6):
        row = {"step": i + 1, "loss": 5.0, "step_time_s": step, "peak_mem_bytes": 2**30}
        f.write(json.dumps(row) + "\\n")
(run / "manifest.json").write_text(json.dumps({"status": "succeeded", "path_counts": {"steps": 6}}))
with open(Path(__file__).with_name("calls.txt"), "a") as f:
    f.write(mode + "\\n")
if "--profile" in argv:  # what Megatron's torch.profiler leaves: TB_DIR/../torch_profile/rank-0.json.gz
    import gzip
    tb = Path(argv[argv.index("--tensorboard-dir") + 1])
    (tb.parent / "torch_profile").mkdir()
    events = [  # two traced steps: busy 1000 + 1200 us (two kernels overlap), 2500 us of kernels
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 0.0, "dur": 1000.0},
        {"ph": "X", "cat": "kernel", "name": "_mx_lastaxis_kernel", "ts": 2000.0, "dur": 500.0},
        {"ph": "X", "cat": "kernel", "name": "elementwise_kernel", "ts": 2200.0, "dur": 1000.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 9000.0},
    ]
    with gzip.open(tb.parent / "torch_profile" / "rank-0.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
"""


def _load() -> ModuleType:
    return load_script(BENCH / "train_overhead.py", "bench_train_overhead")


def _fake_cli(tmp_path: Path, out: Path) -> list[str]:
    """train_overhead's arguments for the tiny-smoke rows with FAKE standing in for `megaquant`."""
    fake = tmp_path / "fake_megaquant.py"
    fake.write_text(FAKE)
    args = ["--tree", str(tmp_path), "--data-root", str(tmp_path), "--out", str(out), "--only", "tiny-smoke"]
    return [*args, "--megaquant", f"{sys.executable} {fake}"]


def test_keep_done_continues_the_same_table_without_rerunning(tmp_path: Path) -> None:
    to = _load()
    out = tmp_path / "out"
    common = _fake_cli(tmp_path, out)
    assert to.main([*common, "--modes", "bf16"]) == 0
    assert to.main([*common, "--modes", "bf16,FA_linear_mxfp8", "--keep-done"]) == 0
    assert (tmp_path / "calls.txt").read_text().split() == ["bf16", "FA_linear_mxfp8"]  # bf16 kept
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"tiny-smoke-bf16", "tiny-smoke-FA_linear_mxfp8"}
    assert "| tiny-smoke | FA_linear_mxfp8 | 6 | 250.0 ms | 1.25× |" in (out / "table.md").read_text()
    # without --keep-done every row runs again
    assert to.main([*common, "--modes", "bf16"]) == 0
    assert (tmp_path / "calls.txt").read_text().split() == ["bf16", "FA_linear_mxfp8", "bf16"]


def test_ab_rows_set_the_environment_they_name() -> None:
    to = _load()
    ns = SimpleNamespace()
    assert (
        to.env_for(to.Row("1b-single", "FA_linear_hifp8+ts+noshare"), ns)["MEGAQUANT_SHARED_GRADS"] == "off"
    )
    assert to.env_for(to.Row("1b-single", "FA_linear_mxfp8+nocache"), ns)["MEGAQUANT_WEIGHT_CACHE"] == "off"
    plain = to.env_for(to.Row("1b-single", "FA_linear_hifp8+ts"), ns)
    assert plain.get("MEGAQUANT_SHARED_GRADS") == os.environ.get("MEGAQUANT_SHARED_GRADS")


def test_prof_rows_trace_replayed_steps_and_tabulate_their_kernels(tmp_path: Path) -> None:
    to = _load()
    out = tmp_path / "out"
    ns = SimpleNamespace(megaquant=["megaquant"], tree=tmp_path, data_root=tmp_path, steps=12)
    argv = to.argv_for(to.Row("1b-single", "FA_linear_mxfp8+prof"), ns, out / "run")
    at = argv.index("--profile-step-start")
    assert argv[at + 1 : at + 4] == ["8", "--profile-step-end", "10"]  # after the graph's capture at step 4
    assert argv[argv.index("--tensorboard-dir") + 1] == str(out / "run" / "tb")
    assert "--profile" not in to.argv_for(to.Row("1b-single", "FA_linear_mxfp8"), ns, out / "run")
    common = _fake_cli(tmp_path, out)
    assert to.main([*common, "--modes", "bf16,FA_linear_mxfp8+prof", "--pack-to", str(tmp_path / "o")]) == 0
    with tarfile.open(tmp_path / "o" / "train_overhead.tgz") as tar:
        names = set(tar.getnames())
    assert {"results.json", "table.md", "tiny-smoke-bf16.log", "runs/tiny-smoke-bf16/metrics.jsonl"} <= names
    assert not any(n.endswith(".json.gz") for n in names)  # the trace stays behind
    results = json.loads((out / "results.json").read_text())
    trace = results["tiny-smoke-FA_linear_mxfp8_prof"]["trace"]
    assert trace["gpu_busy_ms"] == 1.1 and trace["kernel_ms"] == 1.25 and trace["kernels"] == 1.5
    assert {k: v["ms"] for k, v in trace["by_kind"].items()} == {"gemm": 0.5, "quant": 0.25, "other": 0.5}
    assert "trace" not in results["tiny-smoke-bf16"]
    cut = out / "runs" / "tiny-smoke-FA_linear_mxfp8_prof" / "torch_profile" / "rank-0.json.gz"
    cut.write_bytes(cut.read_bytes()[:40])  # a trace cut short: the row keeps its times, says why no trace
    row = to.measure(cut.parents[1], 3)
    assert row["median_ms"] == 250.0 and "trace" not in row and row["trace_error"].startswith("EOFError")
    text = (out / "table.md").read_text()
    assert "| tiny-smoke | FA_linear_mxfp8+prof | 1.1 ms | 1.2 ms | 0.5 ms | 0.2 ms | 0.5 ms | 2 |" in text


def test_every_shape_and_the_profiler_flags_pass_megatrons_own_parser(tmp_path: Path) -> None:
    """Each shape's `megaquant train` request, plain and +prof, planned by megaquant and parsed by
    megatron-core 0.19.2's parse_args + validate_args, before any GPU time."""
    pytest.importorskip("triton", reason="megatron-core 0.19's argument parsing imports triton")
    from megaquant.errors import MegaquantError
    from megaquant.launch.run import TrainRequest, plan_run
    from megaquant.launch.validate import Case, source_for, validate

    to = _load()
    try:
        source = source_for(None)
    except MegaquantError as exc:
        pytest.skip(f"no Megatron sources with megatron/training available: {exc}")
    ns = SimpleNamespace(
        megaquant=["megaquant"], tree=tmp_path / "tree", data_root=tmp_path / "data", steps=12
    )
    cases = {}
    for shape in to.SHAPES:
        for mode in ("FA_linear_mxfp8", "FA_linear_mxfp8+prof"):
            argv = to.argv_for(to.Row(shape, mode), ns, tmp_path / "run")
            split = argv.index("--")
            options, extra = argv[2:split], tuple(argv[split + 1 :])
            request = TrainRequest(
                model=options[options.index("--model") + 1],
                dataset="sample",
                mode=options[options.index("-q") + 1],
                preset=options[options.index("--training-config") + 1],
                megatron=ns.tree,
                data_root=ns.data_root,
                steps=12,
                extra=extra,
                spec="megatron-core",
            )
            cases[(shape, mode)] = Case(argv=plan_run(request, require_tree=False).megatron_args)
    verdicts = validate(list(cases.values()), source)
    assert {key: v.error for key, v in zip(cases, verdicts, strict=True) if not v.ok} == {}
