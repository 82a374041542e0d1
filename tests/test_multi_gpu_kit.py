"""benchmarks/multi_gpu.py (issue 12's two-GPU kit): the rehearsal dry-runs the exact `megaquant train`
commands of the device call on a fixture tree (TP / PP / EP layouts, worktrees, ports, one Megatron
validation over all of them), and the comparator computes loss gaps and per-rank checks right."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import git
import pytest
from conftest import fake_sample_files, make_git_repo

from megaquant.launch.run import TRAIN_COMMAND_ENV

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import multi_gpu as mg  # noqa: E402


def _tree_and_data(tmp_path: Path) -> tuple[Path, Path]:
    """A fixture Megatron tree whose attention takes MLA's channels (as `megaquant instrument` makes it), and
    a data root with the sample dataset's files and tokenizer in place (contents never read by a dry run)."""
    repo = make_git_repo(tmp_path, "v1_three")
    attention = repo / "megatron/core/transformer/dot_product_attention.py"
    text = attention.read_text()
    assert "def __init__(self, softmax_scale):" in text
    attention.write_text(
        text.replace("(self, softmax_scale):", "(self, softmax_scale, k_channels=None, v_channels=None):")
    )
    handle = git.Repo(repo)
    handle.git.add("--all")
    handle.index.commit("attention takes k_channels / v_channels")
    data = tmp_path / "data"
    fake_sample_files(data)
    return repo, data


def test_rehearsal_dry_runs_the_device_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, data = _tree_and_data(tmp_path)
    # Python 3.11 cannot train on any Megatron with megatron/training; the documented hook skips only that
    # question (the data checks, the layouts, Megatron's parser still run)
    monkeypatch.setenv(TRAIN_COMMAND_ENV, f"{sys.executable} -c pass")
    out = tmp_path / "out"
    cli = shlex.join([sys.executable, "-m", "megaquant"])
    args = ["--rehearse", "--tree", str(repo), "--data-root", str(data), "--out", str(out),
            "--worktrees", str(tmp_path / "wt"), "--megaquant", cli]  # fmt: skip
    before = mg.git_state(repo)
    code = mg.main(args)
    report = json.loads((out / "rehearsal.json").read_text())
    assert code == 0, json.dumps({n: r["problems"] for n, r in report["runs"].items()}, indent=1)
    printed = capsys.readouterr().out
    assert set(report["runs"]) == set(mg.RUNS)
    layouts = {
        "tp2-bf16": ("--nproc-per-node 2 --tp 2", {"--tensor-model-parallel-size": "2"}),
        "tp2-FA_linear_mxfp8": ("--nproc-per-node 2 --tp 2", {"--tensor-model-parallel-size": "2"}),
        "pp2-bf16": ("--nproc-per-node 2 --pp 2", {"--pipeline-model-parallel-size": "2"}),
        "pp2-FA_linear_mxfp8": ("--nproc-per-node 2 --pp 2", {"--pipeline-model-parallel-size": "2"}),
        "ep2-FA_linear_mxfp8": ("--nproc-per-node 2 --ep 2", {"--expert-model-parallel-size": "2"}),
    }
    ports = set()
    for name, r in report["runs"].items():
        command = shlex.join(r["command"])
        assert f"[{name}] CUDA_VISIBLE_DEVICES={mg.RUNS[name].gpus} {command}" in printed
        assert r["exit_code"] == 0 and r["problems"] == [] and "--no-validate" in r["command"]
        assert [a for a in r["dry_run"] if a not in ("--dry-run", "--json")] == r["command"]
        ports.add(mg._flag(r["command"], "--master-port"))
        assert mg._flag(r["command"], "--worktree") == str(tmp_path / "wt" / name)  # every run its own
        assert mg._flag(r["megatron_args"], "--data-cache-path") == str(out / "cache" / name)
        if name in layouts:
            option, megatron = layouts[name]
            assert option in command
            for flag, value in megatron.items():
                assert mg._flag(r["megatron_args"], flag) == value
        else:  # the two worktree experiments: one GPU each
            assert "--nproc-per-node" not in command
            assert mg._flag(r["megatron_args"], "--tensor-model-parallel-size") == "1"
    assert len(ports) == len(mg.RUNS)  # runs at once never share torchrun's rendezvous port
    ep = report["runs"]["ep2-FA_linear_mxfp8"]
    assert (
        mg._flag(ep["megatron_args"], "--num-layers") == "2"
        and "--moe-grouped-gemm" not in ep["megatron_args"]
    )
    assert mg._flag(ep["megatron_args"], "--moe-layer-freq") == "([0]+[1]*1)"
    assert all(not r["cuda_graphs"]["enabled"] for n, r in report["runs"].items() if n in layouts)
    assert mg.git_state(repo) == before and not (out / "runs").exists()  # a rehearsal sets nothing
    validation = report["validation"]
    if validation.startswith("not validated"):
        pytest.skip(f"Megatron's parser is not available here: {validation}")
    assert "parse_args + validate_args" in validation
    assert all(r["validated"] for r in report["runs"].values())


def test_every_run_keeps_nvlink_multicast_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    for run in mg.RUNS.values():
        env = mg.run_env(run)
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
        assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["CUDA_VISIBLE_DEVICES"] == run.gpus


def test_rehearsal_reports_a_wrong_layout() -> None:
    run = mg.RUNS["tp2-bf16"]
    plan = {"mode": "bf16", "megatron_args": ["--tensor-model-parallel-size", "1"], "problems": ["no data"]}
    plan["argv"] = ["python", "-m", "torch.distributed.run", "--nproc-per-node", "1"]
    problems = mg.layout_problems(run, plan)
    assert "--tensor-model-parallel-size is 1, expected 2" in problems
    assert "--pipeline-model-parallel-size is None, expected 1" in problems
    assert "torchrun --nproc-per-node 1, expected 2" in problems and "problem: no data" in problems


# ---------------------------------------------------------------------------------------- comparator


def _run_dir(out: Path, name: str, losses: list[float], ranks: dict[int, dict[str, object]]) -> None:
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True)
    manifest = {"status": "succeeded", "exit_code": 0, "cuda_graphs": {"enabled": False}, "commit": "c"}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    lines = [
        json.dumps({"step": i + 1, "loss": x, "step_time_s": 0.5 + i, "peak_mem_bytes": 2**30 * (i + 1)})
        for i, x in enumerate(losses)
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for rank, snap in ranks.items():
        (run_dir / f"path_counts.rank{rank}.json").write_text(json.dumps(snap))


def _counts(triton: int, plain: int = 0, experts: int | None = None) -> dict[str, object]:
    snap: dict[str, object] = {"gemms": {"linear_fwd": {"triton": triton, "plain": plain}}, "fallbacks": []}
    if experts is not None:
        snap["scoped"] = {"experts": {"linear_fwd": {"triton": experts}}}
    return snap


def test_comparator_on_synthetic_run_dirs(tmp_path: Path) -> None:
    base = [10.0, 9.0, 8.0, 7.0, 6.0]
    q = mg.QUANTIZED
    _run_dir(tmp_path, "tp1-bf16", base, {0: _counts(0, plain=5)})
    _run_dir(tmp_path, f"tp1-{q}", base, {0: _counts(9)})
    _run_dir(tmp_path, "tp2-bf16", [10.0, 9.0, 8.001, 7.0, 6.0], {0: _counts(0, 5), 1: _counts(0, 5)})
    _run_dir(tmp_path, f"tp2-{q}", [10.0, 9.25, 8.0, 7.0, 6.5], {0: _counts(9), 1: _counts(9)})
    _run_dir(tmp_path, "pp2-bf16", base, {0: _counts(0, 5)})  # rank 1's file is missing
    _run_dir(
        tmp_path, f"pp2-{q}", base[:3], {0: _counts(9), 1: _counts(0, plain=4)}
    )  # rank 1 did not quantize
    _run_dir(tmp_path, f"ep2-{q}", [1.0] * 5, {0: _counts(20, experts=12), 1: _counts(8, experts=0)})
    record = {"runs": {n: {"exit_code": 0, "concurrent_with": []} for n in mg.RUNS}, "steps": 5}
    text, values = mg.summarize(tmp_path, record)
    gaps = values["loss_gaps"]
    assert gaps["tp2-bf16"]["max_abs"] == pytest.approx(0.001) and gaps["tp2-bf16"]["at_step"] == 3
    assert gaps[f"tp2-{q}"]["max_abs"] == pytest.approx(0.5) and gaps[f"tp2-{q}"]["at_step"] == 5
    assert gaps["pp2-bf16"]["identical"] and gaps["pp2-bf16"]["max_abs"] == 0.0
    assert gaps[f"pp2-{q}"]["steps"] == 3 and gaps[f"pp2-{q}"]["of_steps"] == (3, 5)
    problems = values["problems"]
    assert "pp2-bf16: no path counts from rank(s) [1]" in problems
    assert f"pp2-{q}: rank 1: no Triton GEMM (this rank did not quantize)" in problems
    assert f"ep2-{q}: rank 1: no expert GEMM on Triton (its experts were not quantized)" in problems
    assert not [p for p in problems if p.startswith(("tp2-", "tp1-"))]  # the healthy runs: nothing found
    assert f"| ep2-{q} | ep |" in text and "r0 12/0/0, r1 0/0/0" in text
    m = values["runs"][f"tp2-{q}"]
    assert m["median_step_ms"] == pytest.approx(4000.0) and m["peak_gib"] == pytest.approx(5.0)  # 3.5, 4.5 s
    assert "PROBLEMS:" in text


def test_a_run_refused_before_training_shows_its_log(tmp_path: Path) -> None:
    # no manifest: megaquant train refused before the run; the summary quotes the end of what it printed
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "tp2-bf16.txt").write_text("planning\n\nerror: something refused it\n")
    record = {"runs": {"tp2-bf16": {"exit_code": 1, "concurrent_with": []}}, "steps": 5}
    _, values = mg.summarize(tmp_path, record)
    assert "tp2-bf16: no manifest; its log ends: planning | error: something refused it" in values["problems"]


def test_worktree_checks_catch_a_changed_main_checkout(tmp_path: Path) -> None:
    ns = type("NS", (), {"out": tmp_path, "worktrees": tmp_path / "wt"})()
    state = {"head": "h0", "branch": "main", "status": "", "branches": "refs/heads/main\n", "worktrees": "w"}
    for name, commit, gpu in (("tp1-bf16", "h0", "0"), (f"tp1-{mg.QUANTIZED}", "c1", "1")):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        manifest = {"status": "succeeded", "checkout": str(tmp_path / "wt" / name), "commit": commit,
                    "base": {"commit": "h0"}, "restored": "restored",
                    "environment": {"cuda_visible_devices": gpu}}  # fmt: skip
        (run_dir / "manifest.json").write_text(json.dumps(manifest))
    good = mg.worktree_checks(ns, state, dict(state))
    assert all(good["checks"].values()), good["checks"]
    bad = mg.worktree_checks(ns, state, {**state, "branches": "refs/heads/main\nrefs/heads/megaquant/main\n"})
    assert [k for k, ok in bad["checks"].items() if not ok] == ["main checkout branches unchanged"]


STAND_IN = r"""
import json, os, sys
# megaquant train's MEGAQUANT_TRAIN_COMMAND stand-in for torchrun: one "rank" per visible GPU, each writing
# its own path counts (Triton GEMMs where the checkout it was started in holds a quantized linear value;
# expert GEMMs for MoE args) and the last rank metrics.jsonl, as megaquant.launch.pretrain does
layers = open("megatron/core/tensor_parallel/layers.py").read()
quantized = "custom_quant_type = 'mxfp8'" in layers
args = sys.argv[1:]
metrics = args[args.index("--mq-metrics") + 1]
ranks = len(os.environ["CUDA_VISIBLE_DEVICES"].split(","))
steps = 3
for rank in range(ranks):
    snap = {"gemms": {"linear_fwd": {"triton": 8} if quantized else {"plain": 8}}, "fallbacks": []}
    if "--num-experts" in args:
        snap["scoped"] = {"experts": {"linear_fwd": {"triton" if quantized else "plain": 4}}}
    counts = os.path.join(os.environ["MEGAQUANT_PATH_COUNTS"], f"path_counts.rank{rank}.json")
    with open(counts, "w") as f:
        json.dump(snap, f)
tp = args[args.index("--tensor-model-parallel-size") + 1]
shift = 1e-3 if tp == "2" else 0.0
with open(metrics, "w") as f:
    for step in range(1, steps + 1):
        line = {"step": step, "loss": 10.0 / step + shift, "step_time_s": 0.1, "peak_mem_bytes": 2**30}
        f.write(json.dumps(line) + "\n")
print("stand-in trained", "quantized" if quantized else "bf16", flush=True)
"""


def test_device_flow_against_a_stand_in_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real run loop (phases at once, real `megaquant train` with real worktrees, restore, the worktree
    checks on the real git state, summary and tarball) with a stand-in for torchrun."""
    import tarfile

    repo, data = _tree_and_data(tmp_path)
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    monkeypatch.setenv(TRAIN_COMMAND_ENV, shlex.join([sys.executable, str(script)]))
    out, packed = tmp_path / "out", tmp_path / "OUT"
    cli = shlex.join([sys.executable, "-m", "megaquant"])
    args = ["--tree", str(repo), "--data-root", str(data), "--out", str(out), "--pack-to", str(packed),
            "--worktrees", str(tmp_path / "wt"), "--megaquant", cli, "--no-rehearse"]  # fmt: skip
    code = mg.main(args)
    summary = (packed / "summary.txt").read_text()
    assert code == 0
    assert "no problems found" in summary, summary
    assert "ok   main checkout head unchanged" in summary and "FAIL" not in summary
    assert "worktrees left: none" in summary
    assert "tp2-bf16 vs tp1-bf16: max |delta| 0.001 at step" in summary
    assert "pp2-FA_linear_mxfp8 vs tp1-FA_linear_mxfp8: max |delta| 0 at step" in summary
    results = json.loads((out / "results.json").read_text())
    assert results["runs"]["ep2-FA_linear_mxfp8"]["expert_ranks"] == {
        "0": {"triton": 4, "reference": 0, "plain": 0},
        "1": {"triton": 4, "reference": 0, "plain": 0},
    }
    assert set(results["worktree_checks"]["commits"]) == {"tp1-bf16", "tp1-FA_linear_mxfp8"}
    assert not list((tmp_path / "wt").iterdir()) and git.Repo(repo).active_branch.name == "main"
    with tarfile.open(packed / "multi_gpu.tgz") as tar:
        names = set(tar.getnames())
    for run in mg.RUNS:
        assert {f"runs/{run}/manifest.json", f"runs/{run}/metrics.jsonl", f"logs/{run}.txt"} <= names
    assert "runs/pp2-bf16/path_counts.rank1.json" in names and "summary.txt" in names
