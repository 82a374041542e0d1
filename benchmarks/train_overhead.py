"""Fake-quantization overhead through the real launcher: `megaquant train` per shape x mode, one table.

Each row is one `megaquant train` run (argv list, subprocess): set the roles on the instrumented tree,
torchrun -> megaquant.launch.pretrain, metrics.jsonl + manifest.json (with the path counts), restore. The
table: median step time after the warm-up steps, ratio to bf16 at the same shape, peak memory and its
ratio, GEMMs per step by path (Triton / reference / plain) and weight-cache hits per step.

    python benchmarks/train_overhead.py --tree MQ_MEGATRON --data-root DATA --out OUT
    python benchmarks/train_overhead.py ... --only 1b-single,tiny-smoke --modes bf16,FA_linear_mxfp8

Shapes (the issue's): `1b-single` Llama-3.2-1B full depth, single-gpu preset (micro 2 x 1024, global 16);
`1b-fast` the same model with the fast preset (micro 1 x 2048, global 32); `8b-2l` Llama-3.1-8B cut to 2
layers at the standard preset's shape (micro 1 x 8192, global 2); `tiny-smoke` the tiny model, smoke preset.
Not in the default table: `dsv2-2l`, the results page's DeepSeek-V2-Lite cut (2 layers, seq 2048, 4 x 2048
per step; eager: its dropless MoE cannot be captured), e.g. for `+prof` traces of where its step goes.
Modes: bf16, FA_linear_{mxfp8, mxfp4, hifp8} and `FA_linear_hifp8+ts` (`--recipe hifp8_scaled`: per-tensor
scaled HiF8). `MODE+nocache` runs with MEGAQUANT_WEIGHT_CACHE=off (for the bit-identity check: same losses),
`MODE+noshare` with MEGAQUANT_SHARED_GRADS=off (HiF8's wgrad quantizes dy again: an A/B, same losses);
`MODE+again` repeats a row (its own run dir: bit-identity across runs);
`MODE+graph` / `MODE+nograph` run with `--cuda-graphs on` / `off` (Megatron's full-iteration CUDA graph;
without either, `megaquant train`'s default `auto` decides, see megaquant/launch/graphs.py);
`MODE+prof` traces steps 8-10 with Megatron's own torch.profiler (`--profile --use-pytorch-profiler`),
i.e. steps the graph replays, and adds their kernel time per step by kind to results.json and the table
(its median step includes the two traced steps: read its time from the row without +prof).

The whole table takes longer than one 10-minute device call: `--keep-done` continues a run in the same
`--out` (a warm machine's /tmp, or the results.json carried back), keeping the rows that succeeded there
and running the rest, so the table is still one run's (same code, same machine); `--budget-s` stops a call
before a row that would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import interrupt  # noqa: E402
from profile_step import analyse_trace  # noqa: E402

SHAPES: dict[str, tuple[str, str, tuple[str, ...], int]] = {
    # name: (model, preset, extra Megatron args, global batch)
    "1b-single": ("llama32-1b", "single-gpu", (), 16),
    "tiny-smoke": ("tiny", "smoke", (), 8),
    "1b-fast": ("llama32-1b", "fast", (), 32),
    "8b-2l": ("llama31-8b", "standard", ("--num-layers", "2", "--global-batch-size", "2"), 2),
    # not in the table: the results page's DeepSeek cut (eager: dropless MoE), for +prof traces
    "dsv2-2l": (
        "deepseek2_lite",
        "single-gpu",
        ("--seq-length", "2048", "--micro-batch-size", "4", "--global-batch-size", "4", "--num-layers", "2")
        + ("--moe-layer-freq", "([0]+[1]*1)"),
        4,
    ),
}
TABLE_SHAPES = ("1b-single", "tiny-smoke", "1b-fast", "8b-2l")
"""The issue's four shapes: the default of --only."""
PROFILE_STEPS = (8, 10)  # +prof rows trace these steps (replayed under the graph, which captures at 4)
MODES = ("bf16", "FA_linear_mxfp8", "FA_linear_hifp8+ts", "FA_linear_hifp8", "FA_linear_mxfp4")


@dataclass(frozen=True)
class Row:
    shape: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.shape}-{self.mode}".replace("+", "_")


def argv_for(row: Row, ns: argparse.Namespace, run_dir: Path) -> list[str]:
    model, preset, extra, _ = SHAPES[row.shape]
    mode = row.mode.split("+")[0]
    argv = [*ns.megaquant, "train", "--megatron", str(ns.tree), "--model", model, "--dataset", "sample"]
    argv += ["--data-root", str(ns.data_root), "--training-config", preset, "-q", mode]
    parts = row.mode.split("+")[1:]
    if "ts" in parts:
        argv += ["--recipe", "hifp8_scaled"]
    if "graph" in parts or "nograph" in parts:
        argv += ["--cuda-graphs", "on" if "graph" in parts else "off"]
    argv += ["--run-dir", str(run_dir), "--no-validate", "--steps", str(ns.steps), "--", *extra]
    if "prof" in parts:  # Megatron's own torch.profiler: the trace lands in RUN_DIR/torch_profile
        argv += ["--profile", "--use-pytorch-profiler", "--tensorboard-dir", str(run_dir / "tb")]
        argv += ["--profile-step-start", str(PROFILE_STEPS[0]), "--profile-step-end", str(PROFILE_STEPS[1])]
    return [*argv, "--log-interval", "1"]


def env_for(row: Row, ns: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    parts = row.mode.split("+")[1:]
    if "nocache" in parts:
        env["MEGAQUANT_WEIGHT_CACHE"] = "off"
    if "noshare" in parts:
        env["MEGAQUANT_SHARED_GRADS"] = "off"
    return env


def measure(run_dir: Path, warmup: int) -> dict[str, Any]:
    """Median step time after `warmup` steps, peak memory, losses, path counts of one run dir."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    timed = metrics[warmup:] or metrics
    manifest = json.loads((run_dir / "manifest.json").read_text())
    counts = manifest.get("path_counts") or {}
    steps = max(1, int(counts.get("steps") or len(metrics)))
    per_step: dict[str, float] = {}
    for paths in counts.get("gemms", {}).values():
        for path, n in paths.items():
            per_step[path] = per_step.get(path, 0) + n / steps
    cache = sum(paths.get("cache", 0) for paths in counts.get("operands", {}).values()) / steps
    trace = run_dir / "torch_profile" / "rank-0.json.gz"
    extra: dict[str, Any] = {}
    if trace.is_file():
        try:
            extra["trace"] = analyse_trace(trace, PROFILE_STEPS[1] - PROFILE_STEPS[0])
        except (OSError, EOFError, ValueError) as exc:  # a cut or partial trace: the row's times still count
            extra["trace_error"] = f"{type(exc).__name__}: {exc}"
    return {
        **extra,
        "steps": len(metrics),
        "median_ms": statistics.median(m["step_time_s"] for m in timed) * 1e3,
        "peak_bytes": max(m["peak_mem_bytes"] for m in metrics),
        "losses": [m["loss"] for m in metrics],
        "gemms_per_step": per_step,
        "cache_hits_per_step": cache,
        "fallbacks": counts.get("fallbacks", []),
        "status": manifest.get("status"),
    }


PACKED = ("results.json", "table.md", "*.log", "runs/*/manifest.json", "runs/*/metrics.jsonl")
PACKED += ("runs/*/path_counts.rank*.json",)


def pack(out: Path, tarball: Path) -> None:
    """`out`'s small files (PACKED; no traces, no checkpoints) into `tarball`, written whole or not at all."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    part = tarball.with_name(tarball.name + ".part")
    with tarfile.open(part, "w:gz") as tar:
        for pattern in PACKED:
            for path in sorted(out.glob(pattern)):
                tar.add(path, arcname=str(path.relative_to(out)))
    part.replace(tarball)


def kept_results(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier call's results.json that were measured (a failed or cut row runs again)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {name: r for name, r in earlier.items() if "median_ms" in r and r.get("exit_code") == 0}


def table(results: dict[str, dict[str, Any]], rows: list[Row]) -> str:
    lines = [
        "| shape | mode | steps | median step | vs bf16 | peak memory | vs bf16 | GEMMs/step triton / "
        "reference / plain | weight-cache hits/step |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        r = results.get(row.name)
        if r is None or "median_ms" not in r:
            why = "not run" if r is None else r.get("error", "failed")
            lines.append(f"| {row.shape} | {row.mode} | — | {why} | | | | | |")
            continue
        base = results.get(Row(row.shape, "bf16").name, {})
        ratio = f"{r['median_ms'] / base['median_ms']:.2f}×" if "median_ms" in base else "—"
        mem = f"{r['peak_bytes'] / base['peak_bytes']:.3f}×" if "peak_bytes" in base else "—"
        g = r["gemms_per_step"]
        paths = " / ".join(f"{g.get(p, 0):.0f}" for p in ("triton", "reference", "plain"))
        mode = row.mode if r.get("status") == "succeeded" else f"{row.mode} ({r.get('status')})"
        lines.append(
            f"| {row.shape} | {mode} | {r['steps']} | {r['median_ms']:.1f} ms | {ratio} | "
            f"{r['peak_bytes'] / 2**30:.2f} GiB | {mem} | {paths} | {r['cache_hits_per_step']:.0f} |"
        )
    return "\n".join(lines) + "\n" + trace_table(results, rows)


def trace_table(results: dict[str, dict[str, Any]], rows: list[Row]) -> str:
    """Kernel time per traced step of the +prof rows (Megatron's profiler over steps 8-10), or ''."""
    traced = [(row, results[row.name]["trace"]) for row in rows if "trace" in results.get(row.name, {})]
    if not traced:
        return ""
    lines = [
        "",
        f"Kernels per traced step (steps {PROFILE_STEPS[0]}-{PROFILE_STEPS[1]}, Megatron's torch.profiler):",
        "",
        "| shape | mode | GPU busy | kernel time | GEMMs | quantization | other | kernels |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row, t in traced:
        kind = " | ".join(
            f"{t['by_kind'].get(k, {}).get('ms', 0.0):.1f} ms" for k in ("gemm", "quant", "other")
        )
        lines.append(
            f"| {row.shape} | {row.mode} | {t['gpu_busy_ms']:.1f} ms | {t['kernel_ms']:.1f} ms | {kind} | "
            f"{t['kernels']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, required=True, help="instrumented Megatron tree")
    parser.add_argument("--data-root", type=Path, required=True, help="with the prepared sample dataset")
    parser.add_argument("--out", type=Path, required=True, help="run dirs, results.json, table.md")
    parser.add_argument(
        "--only", default=",".join(TABLE_SHAPES), help=f"shapes, comma-separated (of {', '.join(SHAPES)})"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="modes, comma-separated")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--budget-s", type=float, default=0.0, help="start no row past this (0: none)")
    parser.add_argument("--row-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--keep-done", action="store_true", help="keep the rows --out/results.json has measured; run the rest"
    )
    parser.add_argument(
        "--pack-to",
        type=Path,
        default=None,
        help="after every row, write DIR/train_overhead.tgz: results.json, table.md, the row logs, the run "
        "directories' small files (a lent machine returns few files, and only what a cut call left)",
    )
    parser.add_argument(
        "--megaquant", default=None, help="the CLI as words (default: `megaquant` on PATH, else python -m)"
    )
    ns = parser.parse_args(argv)
    if ns.megaquant is None:
        found = shutil.which("megaquant")
        ns.megaquant = [found] if found else [sys.executable, "-m", "megaquant"]
    else:
        ns.megaquant = shlex.split(ns.megaquant)
    ns.tree, ns.data_root, ns.out = ns.tree.resolve(), ns.data_root.resolve(), ns.out.resolve()
    unknown = [s for s in ns.only.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    rows = [Row(s, m) for s in ns.only.split(",") for m in ns.modes.split(",")]
    ns.out.mkdir(parents=True, exist_ok=True)
    results = kept_results(ns.out / "results.json") if ns.keep_done else {}
    start = time.monotonic()
    took: list[float] = []
    for row in rows:
        if row.name in results:
            print(f"train_overhead: {row.name}: kept from {ns.out / 'results.json'}", flush=True)
            continue
        elapsed = time.monotonic() - start
        if ns.budget_s and took and elapsed + max(took) > ns.budget_s:
            print(f"train_overhead: budget: {elapsed:.0f} s spent, not starting {row.name}", flush=True)
            continue
        run_dir = ns.out / "runs" / row.name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.monotonic()
        with (ns.out / f"{row.name}.log").open("w") as log:
            proc = subprocess.Popen(
                argv_for(row, ns, run_dir), env=env_for(row, ns), stdout=log, stderr=subprocess.STDOUT
            )
            try:
                code = proc.wait(timeout=ns.row_timeout_s)
            except subprocess.TimeoutExpired:
                interrupt([proc], 60.0)  # the next row starts from the instrumented base
                code = 124
        took.append(time.monotonic() - t0)
        try:
            results[row.name] = measure(run_dir, ns.warmup)
        except (OSError, ValueError, KeyError, statistics.StatisticsError) as exc:
            results[row.name] = {"error": f"exit {code}: {type(exc).__name__}"}
        results[row.name].update(exit_code=code, wall_s=round(took[-1], 1))
        print(f"train_overhead: {row.name}: exit {code}, {took[-1]:.0f} s", flush=True)
        (ns.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (ns.out / "table.md").write_text(table(results, rows))
        if ns.pack_to is not None:
            pack(ns.out, ns.pack_to / "train_overhead.tgz")
    print(table(results, rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
