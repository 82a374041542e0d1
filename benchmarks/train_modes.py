"""Train one Llama-3.2-1B-shaped megatron-core model under every quantization mode (same seed and data order)
through the real set -> train -> restore cycle on an instrumented tree; write run dirs, a table and a plot.

One documented command on a GPU machine (megatron-core 0.19.2 installed, see docs/results/README.md):

    python benchmarks/train_modes.py --out results    # 4 layers, 100 steps: docs/results/ ran exactly this

Each mode: `megaquant.api.apply` sets every role on a throwaway branch of the instrumented workspace, the
trainer runs with that tree first on PYTHONPATH (`minitrain`: single-process loop on megatron-core's GPTModel;
`pretrain`: megaquant.launch.pretrain on megatron.training.pretrain under torchrun), `api.restore` follows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megaquant.demo import ensure_workspace, mode_values, prepare_corpus  # noqa: E402
from megaquant.launch.minitrain import MinitrainConfig, build_argv, run_minitrain  # noqa: E402
from megaquant.recipes import RECIPE_ENV, RECIPES  # noqa: E402

SPEC = "megatron-core"
MODES = (  # most telling first, so a run cut short by its time budget still answers the key questions
    "bf16",
    "FA_linear_mxfp8",
    "FA_linear_hifp8",
    "FA_linear_mxfp4",
    "linear_mxfp8",
    "linear_hifp8",
    "linear_mxfp4",
    "FA_mxfp8",
    "FA_hifp8",
    "FA_mxfp4",
)


@dataclass(frozen=True, kw_only=True)
class Shape:
    """Llama-3.2-1B's layer shape (models.md); depth reduced to fit the session's GPU time."""

    layers: int = 4
    hidden: int = 2048
    ffn: int = 8192
    heads: int = 32
    query_groups: int = 8
    rope_base: float = 500000.0
    seq_len: int = 2048
    micro_batch: int = 4
    steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 10
    seed: int = 1234


def minitrain_config(shape: Shape, out: Path, data: Path, recipe: str = "default") -> MinitrainConfig:
    return MinitrainConfig(
        out=out,
        data=data,
        vocab_size=256,
        layers=shape.layers,
        hidden=shape.hidden,
        ffn=shape.ffn,
        heads=shape.heads,
        query_groups=shape.query_groups,
        seq_len=shape.seq_len,
        micro_batch=shape.micro_batch,
        steps=shape.steps,
        lr=shape.lr,
        min_lr=shape.min_lr,
        warmup=shape.warmup,
        init_std=0.02,
        rope_base=shape.rope_base,
        seed=shape.seed,
        recipe=recipe,
        log_interval=max(1, shape.steps // 10),
        progress=False,
    )


def pretrain_argv(shape: Shape, out: Path, data: Path) -> list[str]:
    """torchrun argv for megaquant.launch.pretrain (one GPU), the same model and schedule as minitrain."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "megaquant.launch.pretrain",
        *("--num-layers", str(shape.layers), "--hidden-size", str(shape.hidden)),
        *("--ffn-hidden-size", str(shape.ffn), "--num-attention-heads", str(shape.heads)),
        *("--group-query-attention", "--num-query-groups", str(shape.query_groups)),
        *("--kv-channels", str(shape.hidden // shape.heads)),
        *("--seq-length", str(shape.seq_len), "--max-position-embeddings", str(shape.seq_len)),
        *("--micro-batch-size", str(shape.micro_batch), "--global-batch-size", str(shape.micro_batch)),
        *("--position-embedding-type", "rope", "--rotary-base", str(int(shape.rope_base))),
        *("--rotary-percent", "1.0", "--normalization", "RMSNorm", "--norm-epsilon", "1e-5"),
        *("--swiglu", "--disable-bias-linear", "--attention-dropout", "0", "--hidden-dropout", "0"),
        *("--init-method-std", "0.02", "--tokenizer-type", "NullTokenizer", "--vocab-size", "257"),
        *("--data-path", str(data), "--split", "100,0,0", "--data-cache-path", str(out / "index-cache")),
        *("--train-iters", str(shape.steps), "--lr", str(shape.lr), "--min-lr", str(shape.min_lr)),
        *("--lr-decay-style", "cosine", "--lr-warmup-iters", str(shape.warmup)),
        *("--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0"),
        *("--bf16", "--seed", str(shape.seed), "--log-interval", "1", "--eval-iters", "0"),
        *("--eval-interval", str(shape.steps + 1), "--mq-metrics", str(out / "metrics.jsonl")),
    ]


def run_pretrain(
    shape: Shape, out: Path, data: Path, tree: Path, timeout_s: float, recipe: str = "default"
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    paths = [str(tree.resolve()), str(root), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        RECIPE_ENV: recipe,
    }
    with (out / "train.log").open("w") as log:
        try:
            done = subprocess.run(
                pretrain_argv(shape, out, data),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.write(f"\nmegaquant: killed after {timeout_s:.0f} s\n")
            return 124
    return done.returncode


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        return f"cpu (torch {torch.__version__})"
    except ImportError:
        return "unknown"


def _tar(runs_root: Path, target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for run in sorted(p for p in runs_root.iterdir() if p.is_dir()):
            for name in ("manifest.json", "metrics.jsonl", "train.log", "minitrain.json"):
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"{run.name}/{name}")
    tmp.replace(target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="runs/<mode>/, compare.md, loss_curves.png here"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="workspace + corpus (default: OUT/../work)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, metavar="MODE")
    parser.add_argument("--trainer", choices=("minitrain", "pretrain"), default="minitrain")
    parser.add_argument("--budget-s", type=float, default=0.0, help="stop starting modes past this (0: none)")
    parser.add_argument("--pretrain-timeout-s", type=float, default=300.0, help="per mode, pretrain trainer")
    parser.add_argument("--suffix", default="", help="appended to run dir and mode label (e.g. _seed1235)")
    parser.add_argument("--recipe", default="default", choices=tuple(RECIPES), help="megaquant.recipes name")
    parser.add_argument("--tar", type=Path, default=None, help="also pack the run dirs into this .tar.gz")
    for name, default in asdict(Shape()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    args = parser.parse_args(argv)
    shape = Shape(**{k: getattr(args, k) for k in asdict(Shape())})
    from megaquant import api  # type: ignore[attr-defined,unused-ignore]

    start = time.monotonic()
    workdir = args.workdir or args.out.resolve().parent / "work"
    runs_root = args.out / "runs"
    runs_root.mkdir(parents=True, exist_ok=True)
    workspace = ensure_workspace(workdir)
    corpus = prepare_corpus(workdir)
    print(f"workspace {workspace}; corpus {corpus.description}, {corpus.tokens:,} tokens", flush=True)
    per_mode: list[float] = []
    for mode in args.modes:
        elapsed = time.monotonic() - start
        if args.budget_s and per_mode and elapsed + 1.2 * max(per_mode) > args.budget_s:
            print(f"budget: {elapsed:.0f} s spent; not starting {mode} and later modes", flush=True)
            break
        values = mode_values(mode)
        out = runs_root / (mode + args.suffix)
        t0 = time.monotonic()
        applied = api.apply(workspace, values=values, spec=SPEC)
        try:
            config = minitrain_config(shape, out, corpus.prefix, args.recipe)
            manifest = {
                "mode": mode + args.suffix,
                "values": dict(applied.values),
                "branch": applied.branch,
                "commit": applied.commit,
                "base": None if applied.base is None else asdict(applied.base),
                "trainer": args.trainer,
                "recipe": args.recipe,
                "shape": asdict(shape),
                "argv": build_argv(config)
                if args.trainer == "minitrain"
                else pretrain_argv(shape, out, corpus.prefix),
                "corpus": corpus.description,
                "device": _device(),
                "host": platform.node(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            out.mkdir(parents=True, exist_ok=True)
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
            print(f"{mode}: {values} on {applied.branch} @ {str(applied.commit)[:12]}", flush=True)
            if args.trainer == "minitrain":
                code = 0
                try:
                    run_minitrain(config, workspace)
                except Exception as exc:  # keep going: one broken mode must not lose the others
                    print(f"{mode}: FAILED: {exc}", flush=True)
                    code = 1
            else:
                code = run_pretrain(
                    shape,
                    out,
                    corpus.prefix,
                    workspace,
                    timeout_s=args.pretrain_timeout_s,
                    recipe=args.recipe,
                )
                print(f"{mode}: pretrain exit {code}", flush=True)
            manifest["exit_code"] = code
            manifest["wall_s"] = round(time.monotonic() - t0, 1)
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        finally:
            api.restore(workspace)
        per_mode.append(time.monotonic() - t0)
        if args.tar:
            _tar(runs_root, args.tar)
    from megaquant.report import compare, load_run, markdown_table, plot_losses

    done = [p for p in sorted(runs_root.iterdir()) if (p / "metrics.jsonl").is_file()]
    loaded = [load_run(p) for p in done if (p / "metrics.jsonl").stat().st_size > 0]
    loaded.sort(key=lambda r: MODES.index(r.mode) if r.mode in MODES else len(MODES))
    if loaded:
        table = markdown_table(compare(loaded))
        (args.out / "compare.md").write_text(table)
        plot_losses(loaded, args.out / "loss_curves.png")
        print(table, flush=True)
    print(f"total {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
