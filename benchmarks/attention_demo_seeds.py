"""The `megaquant demo` model, fused vs unfused attention core, over several seeds (CPU; issue 8).

`PYTHONPATH=. python benchmarks/attention_demo_seeds.py --out DIR [--seeds 1234 1 2] [--modes ...]`
Copies the demo's instrumented megatron-core workspace (`megaquant demo` builds it in
~/.cache/megaquant/demo), sets each mode's role values on a copy (`megaquant.api.apply`), then trains the
demo's model (`megaquant.demo.demo_config`: 4 layers, hidden 128, seq 128, 150 steps, fp32 on CPU) once per
mode x seed x core (MEGAQUANT_ATTENTION=auto / unfused), two processes at a time with one thread each.
Writes summary.json (every run's per-step losses and final loss = mean of the last 10 steps) and prints the
seed band of each mode and core: the question is whether fused - unfused at one seed lies within the
seed-to-seed spread of either core (rounding amplified by training) or outside it (a semantic difference).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _workspace(src: Path, dst: Path, mode: str) -> Path:
    from megaquant import api  # type: ignore[attr-defined,unused-ignore]
    from megaquant.demo import mode_values
    from megaquant.launch.argv import role_settings

    if not dst.is_dir():
        shutil.copytree(src, dst, symlinks=True)
        if mode != "bf16":
            api.apply(dst, values=role_settings(mode_values(mode)), spec="megatron-core")
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--demo", type=Path, default=Path.home() / ".cache/megaquant/demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["FA_linear_mxfp8", "bf16"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    from megaquant.demo import demo_config
    from megaquant.launch.minitrain import build_argv, read_metrics
    from megaquant.report import final_loss

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.demo / "data" / "stdlib_docstrings_bytes"
    runs = []
    for mode in args.modes:
        tree = _workspace(args.demo / "megatron-core", args.out / "trees" / mode, mode)
        for seed in args.seeds:
            for core in ("auto", "unfused"):
                name = f"{mode}-s{seed}-{core}"
                cfg = dataclasses.replace(
                    demo_config(args.out / "runs" / name, data, args.steps), seed=seed, progress=False
                )
                env = dict(
                    os.environ,
                    PYTHONPATH=os.pathsep.join([str(tree), str(ROOT)]),
                    PYTHONWARNINGS="ignore",
                    MEGAQUANT_ATTENTION=core,
                    OMP_NUM_THREADS="1",
                )
                runs.append((name, mode, seed, core, cfg, env))
    pending, active, results = list(runs), [], {}
    while pending or active:
        while pending and len(active) < args.jobs:
            name, mode, seed, core, cfg, env = pending.pop(0)
            cfg.out.mkdir(parents=True, exist_ok=True)
            log = (cfg.out / "stdout.log").open("w")
            proc = subprocess.Popen(build_argv(cfg), env=env, stdout=log, stderr=subprocess.STDOUT)
            active.append((proc, name, mode, seed, core, cfg))
        proc, name, mode, seed, core, cfg = active.pop(0)
        proc.wait()
        losses = [float(m["loss"]) for m in read_metrics(cfg.out / "metrics.jsonl")]
        results[name] = dict(mode=mode, seed=seed, core=core, rc=proc.returncode, losses=losses,
                             final=final_loss(losses) if losses else None)  # fmt: skip
        print(f"{name}: rc {proc.returncode} final {results[name]['final']}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    for mode in args.modes:
        for core in ("auto", "unfused"):
            finals = [r["final"] for r in results.values() if r["mode"] == mode and r["core"] == core]
            finals = [f for f in finals if f is not None]
            if finals:
                spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
                print(f"{mode} {core}: {[round(f, 4) for f in finals]} mean {statistics.mean(finals):.4f} "
                      f"min..max {min(finals):.4f}..{max(finals):.4f} sd {spread:.4f}")  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
