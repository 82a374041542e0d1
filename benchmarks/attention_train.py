"""End to end: `megaquant train` with the fused attention core vs the unfused local path (issue 8).

Run on the GPU machine after `. benchmarks/device_env.sh`: `python3 benchmarks/attention_train.py --out DIR`.
Instruments the installed megatron-core (`megaquant instrument --from-installed`), prepares the built-in
sample corpus, then trains the Llama-3.1-8B shape cut to 2 layers at the standard preset's seq 8192 (micro
batch 1, global batch 2) for --steps steps per mode, fused (MEGAQUANT_ATTENTION=auto) and unfused
(MEGAQUANT_ATTENTION=unfused). Prints median step time (steps 3 and later), peak memory, final losses and
the largest per-step loss difference fused vs unfused; writes summary.json / summary.md into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXTRA = (
    "--num-layers", "2", "--global-batch-size", "2", "--lr-warmup-fraction", "0.1", "--log-interval", "1",
    "--split", "100,0,0",
)  # fmt: skip
"""Megatron arguments after `--` (the 8B shape cut to 2 layers). The run length goes through megaquant's
`--steps` (it refuses --train-samples after `--`: LR schedule and eval interval follow the step count)."""


def _megaquant(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> int:
    return subprocess.run([sys.executable, "-m", "megaquant", *args], env=env, timeout=timeout).returncode


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mq-attn"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", nargs="+", default=["bf16", "FA_linear_mxfp8"])
    parser.add_argument("--timeout-s", type=float, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tree, data = args.work / "megatron", args.work / "data"
    if not tree.exists():
        assert _megaquant("instrument", "--from-installed", str(tree)) == 0
        assert _megaquant("data", "prepare", "--dataset", "sample", "--data-root", str(data)) == 0
    extra = list(EXTRA)
    summary: list[dict[str, object]] = []
    curves: dict[str, list[float]] = {}
    for mode in args.modes:
        for core in ("fused", "unfused"):
            name = f"{mode}-{core}"
            run_dir = args.out / name
            env = {**os.environ, "MEGAQUANT_ATTENTION": "auto" if core == "fused" else "unfused"}
            start = time.monotonic()
            try:
                code = _megaquant(
                    "train", "--megatron", str(tree), "--model", "llama31-8b", "--dataset", "sample",
                    "--data-root", str(data), "-q", mode, "--training-config", "standard",
                    "--run-dir", str(run_dir), "--steps", str(args.steps), "--", *extra, env=env,
                    timeout=args.timeout_s,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                code = 124
            rows = _metrics(run_dir)
            manifest = run_dir / "manifest.json"
            cores = json.loads(manifest.read_text()).get("attention_core") if manifest.is_file() else None
            times = [r["step_time_s"] * 1000 for r in rows[2:]]
            row: dict[str, object] = dict(
                mode=mode, core=core, exit=code, steps=len(rows), wall_s=round(time.monotonic() - start, 1),
                step_ms=round(statistics.median(times), 1) if times else None,
                peak_gib=round(max(r["peak_mem_bytes"] for r in rows) / 2**30, 2) if rows else None,
                final_loss=rows[-1]["loss"] if rows else None, attention_core=cores,
            )  # fmt: skip
            curves[name] = [r["loss"] for r in rows]
            summary.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "| mode | attention core | step (median, ms) | peak GiB | final loss | max loss diff vs unfused |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in summary:
        fused, unfused = curves.get(f"{row['mode']}-fused", []), curves.get(f"{row['mode']}-unfused", [])
        pairs = list(zip(fused, unfused, strict=False))
        diff = max((abs(a - b) for a, b in pairs), default=float("nan")) if row["core"] == "fused" else None
        cores = ", ".join(row["attention_core"] or [])  # type: ignore[arg-type]
        lines.append(
            f"| {row['mode']} | {row['core']} ({cores}) | {row['step_ms']} | {row['peak_gib']} | "
            f"{row['final_loss']} | {'' if diff is None else f'{diff:.4f}'} |"
        )
    text = "\n".join(lines)
    print(text)
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps(dict(runs=summary, losses=curves), indent=2) + "\n")


if __name__ == "__main__":
    main()
