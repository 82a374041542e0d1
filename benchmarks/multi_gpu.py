"""Issue 12 on a two-GPU machine, through `megaquant train`: tensor, pipeline and expert parallelism and two
worktree experiments at once, in one device call; then one summary of what ran and what it showed.

    python benchmarks/multi_gpu.py --tree MQ_MEGATRON --data-root DATA --out DIR [--steps 20] [--budget-s 540]
    python benchmarks/multi_gpu.py --rehearse --tree ... --data-root ... --out DIR [--validate batch]
    python benchmarks/multi_gpu.py --compare-only --out DIR     # summary.txt again from DIR's run dirs

Runs (each one `megaquant train` on the built-in sample corpus, `--steps` optimizer steps, RUNS below):
  tp1-bf16 / tp1-FA_linear_mxfp8  Llama-3.2-1B full depth, single-gpu preset, one GPU each, AT ONCE from two
                                  `--worktree`s with CUDA_VISIBLE_DEVICES=0 / 1 (issue item 4; they are
                                  also the TP=1 / PP=1 baselines); CUDA graphs `auto` = on (one GPU)
  tp2-*                           the same, `--nproc-per-node 2 --tp 2` (item 1); graphs auto = off
  pp2-*                           the same, `--nproc-per-node 2 --pp 2` (item 2)
  ep2-FA_linear_mxfp8             DeepSeek-V2-Lite cut to 2 layers (dense + one 64-expert MoE layer, as
                                  benchmarks/deepseek_smoke.sh), smoke preset, `--nproc-per-node 2 --ep 2`
Phases run one after the other, the runs of one phase at once (PHASES: the TP=1 pair, one GPU each; the
two TP2 runs; the two PP2 runs with the EP2 run). `--sequential` runs one at a time instead (clean step
times, ~9.5 min: more than one call holds once setup is counted; use it with `--only`). Before the first
phase the driver rehearses every command (`--dry-run`, one batched Megatron validation; the runs then pass
`--no-validate`) and snapshots the main checkout (HEAD, status, branches, worktree list). Every run trains
its own `--worktree` (runs at once on one checkout would share its throwaway branch; megaquant train
refuses that); after the TP=1 phase the driver checks the main checkout unchanged, both worktrees gone,
and each manifest naming its own worktree, commit and GPU,
and after the last phase the main checkout again and that no worktree is left.

Time estimate (H200 x2; start-up ~45-60 s per run incl. imports, Megatron init, data, model build and the
first Triton compiles; the 1B step ~0.3 s under the graph on one GPU, ~1-1.3 s eager per TP/PP rank with
8 microbatches; the DeepSeek cut ~90 s start-up, ~1 s per step), at 20 steps: setup (instrument, data
prepare) ~45 s + rehearsal ~15 s + TP1 pair ~70 s + TP2 pair ~95 s + PP2 pair with EP2 ~150 s = ~375 s
(6.3 min), plus ~25 s for benchmarks/device_env.sh before it. `--budget-s` (multi_gpu.sh: 480 s from its
start, less setup) starts no phase whose estimate ends past the budget and interrupts what still runs at
it (megaquant train then records `interrupted` and restores); after every phase OUT/multi_gpu.tgz and
OUT/summary.txt are rewritten, so a killed call still returns what finished. Step times of runs that shared
the GPUs with another run are marked (`with`) and are upper bounds.

The comparator (`summarize`): per run exit code, status, median step time (steps after --warmup), peak
memory (the last rank: it holds the loss), CUDA graphs, GEMMs per rank by path (triton / reference / plain;
for DeepSeek also the experts' forward GEMMs per rank, megaquant.pathcounts `scoped`); loss of TP2 and PP2
against TP1 per mode, max |delta| over the steps (bf16 TP changes reduction order: rounding-level
differences are expected and reported, not asserted); the worktree checks; then every problem found.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import interrupt  # noqa: E402

QUANTIZED = "FA_linear_mxfp8"
PORT_BASE = 29610
WARMUP_STEPS = 3
TAIL_BYTES = 400_000
"""train.log beyond this goes into the tarball as its head and tail."""


@dataclass(frozen=True, kw_only=True)
class Run:
    name: str
    item: str
    """Issue 12's item: 'worktrees' (4, also the TP=1 baselines), 'tp' (1), 'pp' (2), 'ep' (3)."""
    mode: str
    model: str = "llama32-1b"
    preset: str = "single-gpu"
    layout: tuple[str, ...] = ()
    """megaquant train's parallel options."""
    extra: tuple[str, ...] = ()
    """Megatron arguments after `--`."""
    gpus: str = "0,1"
    """CUDA_VISIBLE_DEVICES."""
    est_s: float = 95.0
    """Planning assumption: wall time of this run alone (the phase budget check)."""

    @property
    def nproc(self) -> int:
        return int(_flag(self.layout, "--nproc-per-node") or 1)


def _flag(args: Sequence[str], flag: str) -> str | None:
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    return values[-1] if values else None


TWO_TP = ("--nproc-per-node", "2", "--tp", "2")
TWO_PP = ("--nproc-per-node", "2", "--pp", "2")
DEEPSEEK_CUT = ("--num-layers", "2", "--moe-layer-freq", "([0]+[1]*1)")

RUNS: dict[str, Run] = {
    r.name: r
    for r in (
        Run(name="tp1-bf16", item="worktrees", mode="bf16", gpus="0", est_s=70),
        Run(name=f"tp1-{QUANTIZED}", item="worktrees", mode=QUANTIZED, gpus="1", est_s=70),
        Run(name="tp2-bf16", item="tp", mode="bf16", layout=TWO_TP),
        Run(name=f"tp2-{QUANTIZED}", item="tp", mode=QUANTIZED, layout=TWO_TP),
        Run(name="pp2-bf16", item="pp", mode="bf16", layout=TWO_PP),
        Run(name=f"pp2-{QUANTIZED}", item="pp", mode=QUANTIZED, layout=TWO_PP),
        Run(
            name=f"ep2-{QUANTIZED}",
            item="ep",
            mode=QUANTIZED,
            model="deepseek2_lite",
            preset="smoke",
            layout=("--nproc-per-node", "2", "--ep", "2"),
            extra=DEEPSEEK_CUT,
            est_s=120,
        ),
    )
}
PHASES: tuple[tuple[str, ...], ...] = (
    ("tp1-bf16", f"tp1-{QUANTIZED}"),  # one GPU each: the two worktree experiments at once
    ("tp2-bf16", f"tp2-{QUANTIZED}"),  # both on GPUs 0 and 1
    (
        "pp2-bf16",
        f"pp2-{QUANTIZED}",
        f"ep2-{QUANTIZED}",
    ),  # three at once: fits the call, times are upper bounds
)
BASELINES = {name: f"tp1-{r.mode}" for name, r in RUNS.items() if r.item in ("tp", "pp")}
"""Each TP2 / PP2 run's losses are compared with the TP=1 run of its mode."""


# ------------------------------------------------------------------------------------------ commands


def worktree_dir(ns: argparse.Namespace, run: Run) -> Path:
    return Path(ns.worktrees) / run.name


def argv_for(
    run: Run, ns: argparse.Namespace, port: int, *, dry: bool = False, validate: bool = False
) -> list[str]:
    """The `megaquant train` argv of one run (the rehearsal adds --dry-run --json and may validate)."""
    argv = [*ns.megaquant, "train", "--megatron", str(ns.tree), "--model", run.model, "--dataset", "sample"]
    argv += ["--data-root", str(ns.data_root), "--training-config", run.preset, "-q", run.mode]
    argv += ["--steps", str(ns.steps), "--run-dir", str(ns.out / "runs" / run.name)]
    # every run in its own worktree: runs at once on one checkout would set their roles on one throwaway
    # branch (megaquant train refuses a second run on a checkout being trained)
    argv += ["--master-port", str(port), *run.layout, "--worktree", str(worktree_dir(ns, run))]
    if dry:
        argv += ["--dry-run", "--json"]
    if not validate:
        argv.append("--no-validate")
    # each run its own dataset-index cache: runs at once building the same cache files would race
    return [*argv, "--", *run.extra, "--data-cache-path", str(ns.out / "cache" / run.name)]


def ports(names: Sequence[str]) -> dict[str, int]:
    """One rendezvous port per run (runs at once must not share torchrun's --master-port)."""
    return {name: PORT_BASE + i for i, name in enumerate(RUNS) if name in names}


NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""NVLink multicast stays off (the lent machines require it: a program using it can take the host's shared
GPUs out of service); set for every run whatever the caller's environment says."""


def run_env(run: Run) -> dict[str, str]:
    return {**os.environ, **NO_MULTICAST, "CUDA_VISIBLE_DEVICES": run.gpus}


def _shown(run: Run, argv: Sequence[str]) -> str:
    return f"CUDA_VISIBLE_DEVICES={run.gpus} {shlex.join(argv)}"


# ----------------------------------------------------------------------------------------- rehearsal


def _dry_run(run: Run, argv: list[str]) -> dict[str, Any]:
    done = subprocess.run(argv, env=run_env(run), capture_output=True, text=True, check=False)
    out: dict[str, Any] = {"exit_code": done.returncode, "stderr": done.stderr[-3000:]}
    try:
        out["plan"] = json.loads(done.stdout)
    except ValueError:
        out["stdout"] = done.stdout[-3000:]
    return out


def layout_problems(run: Run, plan: Mapping[str, Any]) -> list[str]:
    """What a dry run's plan gets wrong for `run`'s intended layout (empty: nothing)."""
    args = list(plan.get("megatron_args", []))
    want = {
        "--tensor-model-parallel-size": _flag(run.layout, "--tp") or "1",
        "--pipeline-model-parallel-size": _flag(run.layout, "--pp") or "1",
    }
    if run.item == "ep":
        want["--expert-model-parallel-size"] = _flag(run.layout, "--ep") or "1"
    problems = [
        f"{flag} is {_flag(args, flag)}, expected {v}" for flag, v in want.items() if _flag(args, flag) != v
    ]
    argv = list(plan.get("argv", []))
    if "torch.distributed.run" in argv and _flag(argv, "--nproc-per-node") != str(run.nproc):
        problems.append(f"torchrun --nproc-per-node {_flag(argv, '--nproc-per-node')}, expected {run.nproc}")
    if plan.get("problems"):
        problems += [f"problem: {p}" for p in plan["problems"]]
    if plan.get("mode") != run.mode:
        problems.append(f"mode {plan.get('mode')}, expected {run.mode}")
    return problems


def rehearse(ns: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """Print every command, dry-run each (`--dry-run --json`), check the layouts; `--validate batch`: one
    Megatron parse_args + validate_args over every run's argv (the parser `megaquant train` would use),
    `each`: every dry run validates itself. Touches no tree (a dry run sets nothing)."""
    each = ns.validate == "each"
    by_port = ports(names)
    commands = {n: argv_for(RUNS[n], ns, by_port[n], dry=True, validate=each) for n in names}
    for name in names:
        print(f"[{name}] {_shown(RUNS[name], argv_for(RUNS[name], ns, by_port[name]))}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, ns.jobs)) as pool:
        done = dict(zip(names, pool.map(lambda n: _dry_run(RUNS[n], commands[n]), names), strict=True))
    report: dict[str, Any] = {"validate": ns.validate, "runs": {}}
    for name in names:
        result = done[name]
        plan = result.get("plan") or {}
        problems = (
            [] if result["exit_code"] == 0 else [f"dry run exit {result['exit_code']}: {result['stderr']}"]
        )
        problems += layout_problems(RUNS[name], plan) if plan else ["no JSON plan printed"]
        report["runs"][name] = {
            "command": argv_for(RUNS[name], ns, by_port[name]),
            "dry_run": commands[name],
            "exit_code": result["exit_code"],
            "megatron_args": plan.get("megatron_args"),
            "argv": plan.get("argv"),
            "cuda_graphs": plan.get("cuda_graphs"),
            "validated_against": plan.get("validated_against"),
            "problems": problems,
        }
    if ns.validate == "batch":
        report["validation"] = _batch_validate(ns, names, report["runs"])
    report["ok"] = all(not r["problems"] for r in report["runs"].values())
    return report


def _batch_validate(ns: argparse.Namespace, names: Sequence[str], runs: dict[str, Any]) -> str:
    """One child process: Megatron's parser over every run's argv (what each dry run would have checked)."""
    from megaquant.errors import MegaquantError
    from megaquant.launch.validate import Case, megatron_version, source_for, validate

    tree = Path(ns.tree)
    checked = [n for n in names if runs[n]["megatron_args"]]
    try:
        source = source_for(tree if (tree / "megatron" / "core").is_dir() else None)
        verdicts = validate(
            [Case(argv=tuple(runs[n]["megatron_args"]), world_size=RUNS[n].nproc) for n in checked], source
        )
    except MegaquantError as exc:
        return f"not validated: {exc}"
    for name, verdict in zip(checked, verdicts, strict=True):
        runs[name]["validated"] = verdict.ok
        if not verdict.ok:
            runs[name]["problems"].append(f"Megatron rejects the argv: {verdict.error}")
    return f"Megatron {megatron_version(source)} parse_args + validate_args ({source})"


# --------------------------------------------------------------------------------------- the real runs


def git_state(tree: Path) -> dict[str, str]:
    """What the worktree runs must leave alone in the main checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tree), *args], capture_output=True, text=True, check=False
        ).stdout

    return {
        "head": git("rev-parse", "HEAD").strip(),
        "branch": git("symbolic-ref", "-q", "--short", "HEAD").strip(),
        "status": git("status", "--porcelain"),
        "branches": git("for-each-ref", "--format=%(refname)", "refs/heads"),
        "worktrees": git("worktree", "list", "--porcelain"),
    }


def _stop(proc: subprocess.Popen[bytes]) -> int:
    interrupt([proc], 30.0)
    return 124


def run_phase(ns: argparse.Namespace, names: Sequence[str], deadline: float) -> dict[str, dict[str, Any]]:
    by_port = ports(names)
    started: dict[str, tuple[subprocess.Popen[bytes], float, io.BufferedWriter]] = {}
    (ns.out / "logs").mkdir(parents=True, exist_ok=True)
    for name in names:
        run = RUNS[name]
        if (ns.out / "runs" / name).exists():
            shutil.rmtree(ns.out / "runs" / name)
        log = (ns.out / "logs" / f"{name}.txt").open("wb")
        argv = argv_for(run, ns, by_port[name])
        print(f"multi_gpu: start {_shown(run, argv)}", flush=True)
        proc = subprocess.Popen(argv, env=run_env(run), stdout=log, stderr=subprocess.STDOUT)
        started[name] = (proc, time.monotonic(), log)
    results: dict[str, dict[str, Any]] = {}
    for name, (proc, t0, log) in started.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = _stop(proc)
        log.close()
        results[name] = {
            "exit_code": code,
            "wall_s": round(time.monotonic() - t0, 1),
            "gpus": RUNS[name].gpus,
            "concurrent_with": [n for n in names if n != name],
        }
        print(f"multi_gpu: {name}: exit {code}, {results[name]['wall_s']} s", flush=True)
    return results


def worktree_checks(
    ns: argparse.Namespace, before: Mapping[str, str], after: Mapping[str, str]
) -> dict[str, Any]:
    """Item 4: both worktree runs trained their own checkout and commit on their own GPU, the main checkout
    is as it was, and both worktrees are gone (restored)."""
    checks: dict[str, bool] = {}
    for key in ("head", "branch", "status", "branches", "worktrees"):
        checks[f"main checkout {key} unchanged"] = before.get(key) == after.get(key)
    commits = {}
    for name, run in RUNS.items():
        if run.item != "worktrees":
            continue
        manifest = _json(ns.out / "runs" / name / "manifest.json") or {}
        env = manifest.get("environment") or {}
        commits[name] = manifest.get("commit")
        checks[f"{name}: succeeded"] = manifest.get("status") == "succeeded"
        checks[f"{name}: trained its own worktree"] = manifest.get("checkout") == str(worktree_dir(ns, run))
        checks[f"{name}: on GPU {run.gpus}"] = env.get("cuda_visible_devices") == run.gpus
        checks[f"{name}: base is the main HEAD"] = (manifest.get("base") or {}).get("commit") == before.get(
            "head"
        )
        checks[f"{name}: commit recorded"] = bool(manifest.get("commit"))
        checks[f"{name}: restored"] = bool(manifest.get("restored")) and not worktree_dir(ns, run).exists()
    values = [c for c in commits.values() if c]
    checks["the two runs trained different commits"] = len(set(values)) == len(commits) == 2
    return {"checks": checks, "commits": commits, "before": dict(before), "after": dict(after)}


# ------------------------------------------------------------------------------------------ comparator


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def rank_counts(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Every rank's own path counts file (path_counts.rank<R>.json), by rank."""
    out = {}
    for path in sorted(run_dir.glob("path_counts.rank*.json")):
        snap = _json(path)
        rank = path.name.removeprefix("path_counts.rank").removesuffix(".json")
        if isinstance(snap, dict) and rank.isdigit():
            out[int(rank)] = snap
    return out


def paths(table: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """GEMMs per path over all roles of one counts table (triton / reference / plain, and empty if any)."""
    totals = {"triton": 0, "reference": 0, "plain": 0}
    for per_path in table.values():
        for path, n in per_path.items():
            totals[path] = totals.get(path, 0) + int(n)
    return totals


def loss_gap(run: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """max |loss - baseline loss| over the steps both have (matched by step number), where and how many."""
    ref = {int(m["step"]): float(m["loss"]) for m in base}
    deltas = [
        (int(m["step"]), abs(float(m["loss"]) - ref[int(m["step"])])) for m in run if int(m["step"]) in ref
    ]
    if not deltas:
        return {"steps": 0, "max_abs": None, "at_step": None, "identical": False}
    step, worst = max(deltas, key=lambda d: d[1])
    return {
        "steps": len(deltas),
        "max_abs": worst,
        "at_step": step,
        "first_step_abs": deltas[0][1],
        "identical": worst == 0.0,
        "of_steps": (len(run), len(base)),
    }


def measure(name: str, run_dir: Path, warmup: int = WARMUP_STEPS) -> dict[str, Any]:
    manifest = _json(run_dir / "manifest.json") or {}
    steps = metrics(run_dir)
    timed = steps[warmup:] or steps
    per_rank = rank_counts(run_dir)
    return {
        "status": manifest.get("status"),
        "exit_code": manifest.get("exit_code"),
        "cuda_graphs": (manifest.get("cuda_graphs") or {}).get("enabled"),
        "steps": len(steps),
        "losses": [m["loss"] for m in steps],
        "median_step_ms": statistics.median(m["step_time_s"] for m in timed) * 1e3 if timed else None,
        "peak_gib": max(m["peak_mem_bytes"] for m in steps) / 2**30 if steps else None,
        "ranks": {r: paths(s.get("gemms", {})) for r, s in per_rank.items()},
        "expert_ranks": {
            r: paths(s["scoped"]["experts"]) for r, s in per_rank.items() if "experts" in s.get("scoped", {})
        },
        "fallbacks": sum(len(s.get("fallbacks", [])) for s in per_rank.values()),
        "commit": manifest.get("commit"),
        "checkout": manifest.get("checkout"),
    }


def run_problems(run: Run, m: Mapping[str, Any]) -> list[str]:
    """What a finished run's record shows wrong for issue 12 (empty: nothing)."""
    out = []
    if m.get("status") != "succeeded":
        out.append(f"status {m.get('status')}, exit {m.get('exit_code')}")
    if not m.get("steps"):
        out.append("no per-step metrics (metrics.jsonl empty or missing)")
    ranks = m.get("ranks", {})
    missing = sorted(set(range(run.nproc)) - set(ranks))
    if missing:
        out.append(f"no path counts from rank(s) {missing}")
    for rank, p in sorted(ranks.items()):
        if run.mode == "bf16" and p["triton"]:
            out.append(f"rank {rank}: bf16 run with {p['triton']} Triton GEMMs")
        if run.mode != "bf16" and not p["triton"]:
            out.append(f"rank {rank}: no Triton GEMM (this rank did not quantize)")
        if run.mode != "bf16" and p["reference"]:
            out.append(f"rank {rank}: {p['reference']} GEMMs on the torch reference")
    if run.item == "ep":
        experts = m.get("expert_ranks", {})
        for rank in range(run.nproc):
            if not experts.get(rank, {}).get("triton"):
                out.append(f"rank {rank}: no expert GEMM on Triton (its experts were not quantized)")
    return out


def _per_rank(table: Mapping[int, Mapping[str, int]]) -> str:
    return ", ".join(f"r{r} {p['triton']}/{p['reference']}/{p['plain']}" for r, p in sorted(table.items()))


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(empty)"


def summarize(out_dir: Path, record: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """summary.txt's text and the measured values, from the run dirs under out_dir/runs and the driver's
    record (exit codes, wall times, concurrency, rehearsal, worktree checks)."""
    launched = record.get("runs", {})
    measured = {name: measure(name, out_dir / "runs" / name) for name in RUNS if name in launched}
    lines = ["# issue 12 on two GPUs: megaquant train, TP / PP / EP / two worktrees at once", ""]
    lines += [f"machine: {record.get('machine', '?')}", f"steps per run: {record.get('steps')}", ""]
    lines.append(
        "| run | item | GPUs | exit | status | steps | median step | peak (last rank) | graphs | with | "
        "GEMMs per rank triton/reference/plain | expert fwd GEMMs per rank |"
    )
    lines.append("|---|---|---|---:|---|---:|---:|---:|---|---|---|---|")
    problems: list[str] = []
    for name, run in RUNS.items():
        if name not in launched:
            why = record.get("skipped", {}).get(name, "not run")
            lines.append(f"| {name} | {run.item} | {run.gpus} | — | {why} | | | | | | | |")
            problems.append(f"{name}: not run ({why})")
            continue
        m = measured[name]
        ranks, experts = _per_rank(m["ranks"]), _per_rank(m["expert_ranks"])
        step = f"{m['median_step_ms']:.1f} ms" if m["median_step_ms"] is not None else "—"
        peak = f"{m['peak_gib']:.2f} GiB" if m["peak_gib"] is not None else "—"
        together = ", ".join(launched[name].get("concurrent_with", [])) or "alone"
        lines.append(
            f"| {name} | {run.item} | {run.gpus} | {launched[name].get('exit_code')} | {m['status']} | "
            f"{m['steps']} | {step} | {peak} | {m['cuda_graphs']} | {together} | {ranks} | {experts or '—'} |"
        )
        problems += [f"{name}: {p}" for p in run_problems(run, m)]
        if m["status"] is None:  # refused before training: what megaquant train said is in its log
            tail = _log_tail(out_dir / "logs" / f"{name}.txt")
            problems.append(f"{name}: no manifest; its log ends: {tail}")
    lines += ["", "loss against the TP=1 run of the same mode (max |delta| over the steps both have):"]
    gaps: dict[str, Any] = {}
    for name, base in BASELINES.items():
        if name in measured and base in measured:
            gap = loss_gap(metrics(out_dir / "runs" / name), metrics(out_dir / "runs" / base))
            gaps[name] = gap
            if gap["max_abs"] is None:
                lines.append(f"  {name} vs {base}: no common steps")
                problems.append(f"{name}: no losses to compare with {base}")
                continue
            lines.append(
                f"  {name} vs {base}: max |delta| {gap['max_abs']:.6g} at step {gap['at_step']} over "
                f"{gap['steps']} steps (step 1: {gap['first_step_abs']:.3g}; identical: {gap['identical']})"
            )
    checks = record.get("worktree_checks")
    if checks:
        lines += ["", "two worktree experiments at once (CUDA_VISIBLE_DEVICES=0 / 1):"]
        for what, ok in checks["checks"].items():
            lines.append(f"  {'ok  ' if ok else 'FAIL'} {what}")
            if not ok:
                problems.append(f"worktrees: {what}")
        lines.append(f"  commits: {checks.get('commits')}")
    unchanged = record.get("main_checkout_unchanged")
    if unchanged is not None:
        left = record.get("worktrees_left", [])
        lines.append(f"after all runs: main checkout unchanged {unchanged}; worktrees left: {left or 'none'}")
        problems += [f"main checkout {k} changed by the runs" for k, ok in unchanged.items() if not ok]
        problems += [f"worktree {w} left behind (not restored)" for w in left]
    rehearsal = record.get("rehearsal")
    if rehearsal:
        bad = {n: r["problems"] for n, r in rehearsal["runs"].items() if r["problems"]}
        how = rehearsal.get("validation", "each dry run")
        lines += ["", f"rehearsal (dry runs; validation: {how}): {bad or 'all passed'}"]
        problems += [f"rehearsal {n}: {p}" for n, ps in bad.items() for p in ps]
    lines += ["", f"took {record.get('took_s', '?')} s"]
    lines += ["", "PROBLEMS:" if problems else "no problems found", *(f"  - {p}" for p in problems)]
    return "\n".join(lines) + "\n", {"runs": measured, "loss_gaps": gaps, "problems": problems}


def pack(out_dir: Path, target: Path) -> None:
    """One tarball of everything small: manifests, metrics, per-rank counts, logs (long ones cut), records."""
    tmp = target.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(out_dir.rglob("*")):
            if not path.is_file() or path.suffix in (".bin", ".idx", ".pt", ".npy") or path in (target, tmp):
                continue
            data = path.read_bytes()
            if len(data) > TAIL_BYTES:
                data = (
                    data[: TAIL_BYTES // 4] + b"\n[... cut by multi_gpu.py ...]\n" + data[-TAIL_BYTES // 2 :]
                )
            info = tarfile.TarInfo(str(path.relative_to(out_dir)))
            info.size = len(data)
            info.mtime = int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, target)


def _write_summary(ns: argparse.Namespace, record: Mapping[str, Any]) -> str:
    text, values = summarize(ns.out, record)
    (ns.out / "summary.txt").write_text(text)
    (ns.out / "results.json").write_text(json.dumps({**record, **values}, indent=1, default=str) + "\n")
    if ns.pack_to is not None:
        ns.pack_to.mkdir(parents=True, exist_ok=True)
        pack(ns.out, ns.pack_to / "multi_gpu.tgz")
        (ns.pack_to / "summary.txt").write_text(text)
    return text


def _machine() -> str:
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    done = (
        subprocess.run(query, capture_output=True, text=True, check=False) if shutil.which(query[0]) else None
    )
    gpus = "; ".join(done.stdout.strip().splitlines()) if done and done.returncode == 0 else "no nvidia-smi"
    try:
        import torch

        versions = f"torch {torch.__version__}"
    except ImportError:
        versions = "no torch"
    return f"{gpus}; {versions}; Python {sys.version.split()[0]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, help="instrumented Megatron tree (megaquant instrument)")
    parser.add_argument("--data-root", type=Path, help="with the prepared sample dataset")
    parser.add_argument("--out", type=Path, required=True, help="run dirs, logs, results.json, summary.txt")
    parser.add_argument(
        "--pack-to", type=Path, default=None, help="also write multi_gpu.tgz + summary.txt here"
    )
    parser.add_argument("--worktrees", type=Path, default=Path("/tmp/mq-mgpu-worktrees"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=",".join(RUNS), help="runs, comma-separated")
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="start no phase past it; stop runs at it"
    )
    parser.add_argument("--sequential", action="store_true", help="one run at a time (clean step times)")
    parser.add_argument("--rehearse", action="store_true", help="print and dry-run every command only")
    parser.add_argument("--validate", choices=("batch", "each"), default="batch", help="rehearsal validation")
    parser.add_argument("--no-rehearse", action="store_true", help="real runs without the rehearsal first")
    parser.add_argument("--compare-only", action="store_true", help="summary.txt from OUT's run dirs again")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="dry runs at once")
    parser.add_argument("--megaquant", default=None, help="the CLI as words (default: megaquant on PATH)")
    ns = parser.parse_args(argv)
    ns.out = ns.out.resolve()
    if ns.compare_only:
        sys.stdout.write(_write_summary(ns, _json(ns.out / "results.json") or {}))
        return 0
    if ns.tree is None or ns.data_root is None:
        parser.error("--tree and --data-root are required (except with --compare-only)")
    found = shutil.which("megaquant")
    ns.megaquant = (
        shlex.split(ns.megaquant)
        if ns.megaquant
        else ([found] if found else [sys.executable, "-m", "megaquant"])
    )
    ns.tree, ns.data_root, ns.worktrees = ns.tree.resolve(), ns.data_root.resolve(), ns.worktrees.resolve()
    names = [n for n in ns.only.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    ns.out.mkdir(parents=True, exist_ok=True)
    ns.worktrees.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if ns.rehearse:
        report = rehearse(ns, names)
        (ns.out / "rehearsal.json").write_text(json.dumps(report, indent=1) + "\n")
        for name, r in report["runs"].items():
            print(f"[{name}] dry run exit {r['exit_code']}: {'ok' if not r['problems'] else r['problems']}")
        print(f"validation: {report.get('validation', 'each dry run')}")
        return 0 if report["ok"] else 1
    record: dict[str, Any] = {"machine": _machine(), "steps": ns.steps, "runs": {}, "skipped": {}}
    if not ns.no_rehearse:
        record["rehearsal"] = rehearse(ns, names)
    phases = [(n,) for p in PHASES for n in p] if ns.sequential else list(PHASES)
    before = git_state(ns.tree)
    deadline = t0 + ns.budget_s
    for phase in phases:
        todo = [n for n in phase if n in names]
        if not todo:
            continue
        estimate = max(RUNS[n].est_s for n in todo) * (1.0 if len(todo) == 1 else 1.25)  # sharing slows
        if time.monotonic() + estimate > deadline:
            record["skipped"].update(
                dict.fromkeys(todo, f"budget: {estimate:.0f} s estimated past --budget-s")
            )
            continue
        pair = any(RUNS[n].item == "worktrees" for n in todo)
        record["runs"].update(run_phase(ns, todo, deadline))
        if pair:
            record["worktree_checks"] = worktree_checks(ns, before, git_state(ns.tree))
        record["took_s"] = round(time.monotonic() - t0)
        _write_summary(ns, record)
    after = git_state(ns.tree)
    record["main_checkout_unchanged"] = {k: before[k] == after[k] for k in before}
    record["worktrees_left"] = sorted(p.name for p in ns.worktrees.iterdir())
    record["took_s"] = round(time.monotonic() - t0)
    sys.stdout.write(_write_summary(ns, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
