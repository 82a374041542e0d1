#!/usr/bin/env python3
"""The seed-compatible launcher front end: `python train_config.py --model M --dataset D --quantization Q`.

A thin shell over megaquant.launch (the same registries and launcher as `megaquant train`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from megaquant.errors import MegaquantError
from megaquant.launch.datasets import DATASETS
from megaquant.launch.models import MODELS
from megaquant.launch.modes import ATTENTION_MODES, MODES, SEED_MODES
from megaquant.launch.presets import PRESETS
from megaquant.recipes import RECIPES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a model x dataset x quantization combination on Megatron-LM (megaquant).",
        epilog="Extra Megatron arguments go after `--`. `megaquant train --help` has the full option set.",
    )
    p.add_argument("--list", action="store_true", help="show models, datasets, modes and training configs")
    p.add_argument("--model", choices=list(MODELS), default="llama32-1b")
    p.add_argument("--dataset", choices=list(DATASETS), default="wikipedia")
    p.add_argument("--quantization", choices=list(SEED_MODES), default=None, help="one of the ten modes")
    p.add_argument(
        "--fa-quantization",
        choices=list(ATTENTION_MODES),
        default=None,
        help="attention variant (the old flash_attention_config.py): qk_F, pv_F, qk_pv_F",
    )
    p.add_argument("--training-config", choices=list(PRESETS), default="fast")
    p.add_argument("--recipe", choices=list(RECIPES), default="default", help="training recipe")
    p.add_argument(
        "--cuda-graphs", choices=["auto", "on", "off"], default="auto", help="full-iteration CUDA graph"
    )
    p.add_argument("--megatron", type=Path, default=Path("."), help="Megatron-LM tree (default: here)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps instead of the config's length")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true", help="print the command and role values; change nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from megaquant.launch.argv import Parallel
    from megaquant.launch.launcher import format_listing, train
    from megaquant.launch.run import TrainRequest

    raw = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in raw:
        at = raw.index("--")
        raw, extra = raw[:at], raw[at + 1 :]
    args = parser().parse_args(raw)
    if args.list:
        sys.stdout.write(format_listing())
        return 0
    if args.quantization and args.fa_quantization:
        parser().error("give --quantization or --fa-quantization, not both")
    mode = args.fa_quantization or args.quantization or "bf16"
    assert mode in MODES
    request = TrainRequest(
        model=args.model,
        dataset=args.dataset,
        mode=mode,
        preset=args.training_config,
        megatron=args.megatron,
        parallel=Parallel(nproc_per_node=args.nproc_per_node),
        run_dir=args.run_dir,
        extra=tuple(extra),
        steps=args.steps,
        recipe=args.recipe,
        cuda_graphs=args.cuda_graphs,
    )
    try:
        return train(request, out=sys.stdout, dry_run=args.dry_run)
    except MegaquantError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the tree was restored\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
