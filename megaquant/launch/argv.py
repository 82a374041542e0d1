"""Pure builders: a mode's role values, the Megatron argv of model x dataset x preset, the torchrun argv."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from megaquant.errors import LaunchError
from megaquant.launch.datasets import Dataset
from megaquant.launch.models import Model
from megaquant.launch.modes import ROLES, Mode
from megaquant.launch.presets import Preset
from megaquant.spec import GROUPS, canonical_value

__all__ = [
    "FAKE_QUANT_FLAGS",
    "LENGTH_FLAGS",
    "REFUSED_FLAGS",
    "TRAIN_ENV",
    "Entry",
    "Parallel",
    "check_extra_args",
    "entry_for",
    "megatron_args",
    "mla_supported",
    "role_settings",
    "role_values",
    "torchrun_argv",
    "train_env",
]

FAKE_QUANT_FLAGS = (
    "--transformer-impl", "local",  # the quantization sites live in the local (non-TE) modules
    "--bf16",  # fake quantization is quantize -> dequantize -> bf16 GEMM; no Transformer Engine FP8 flags
    "--no-gradient-accumulation-fusion",  # a fused wgrad kernel bypasses the hooked wgrad GEMM
    "--no-masked-softmax-fusion",
    "--no-rope-fusion",  # fused RoPE needs Transformer Engine
    "--no-persist-layer-norm",
)  # fmt: skip
"""Flags every generated run carries."""

REFUSED_FLAGS: Mapping[str, str] = {
    "--sequence-parallel": "the local implementation's RMSNorm rejects sequence parallelism",
    "--apply-layernorm-1p": "the local implementation's RMSNorm has no 1p variant",
    "--fp8-format": "Transformer Engine FP8 is a different mechanism; fake-quant modes run with --bf16 only",
    "--fp8-recipe": "Transformer Engine FP8 is a different mechanism; fake-quant modes run with --bf16 only",
    "--fp16": "fake-quant modes run with --bf16",
    "--moe-grouped-gemm": "grouped expert kernels bypass the hooked local linear layers (experts would run "
    "unquantized)",
}
"""Extra Megatron arguments the launcher refuses, with the reason."""

LENGTH_FLAGS = ("--train-iters", "--train-samples", "--lr-decay-iters", "--lr-warmup-iters")
"""Extra arguments that would change the run length without its schedule (the presets count samples):
`megaquant train --steps N` rewrites length, LR decay, warmup and eval interval together instead."""


def role_values(
    mode: Mode, *, linear: str | None = None, qk: str | None = None, pv: str | None = None
) -> dict[str, str]:
    """Every role's canonical value: the mode's, then the --linear/--qk/--pv overrides."""
    values = mode.values()
    if linear is not None:
        values.update(dict.fromkeys(GROUPS["linear"], canonical_value(linear)))
    if qk is not None:
        values["qk"] = canonical_value(qk)
    if pv is not None:
        values["pv"] = canonical_value(pv)
    assert tuple(values) == ROLES
    return values


def role_settings(values: Mapping[str, str]) -> dict[str, str]:
    """What to ask `megaquant set` for `values` (every role): the `linear` group when the linear roles
    agree, so a tree without some of them (the fork's wgrad) runs as the mode means; else each role."""
    linear = {values[role] for role in GROUPS["linear"]}
    if len(linear) == 1:
        rest = {role: value for role, value in values.items() if role not in GROUPS["linear"]}
        return {"linear": linear.pop(), **rest}
    return dict(values)


@dataclass(frozen=True, kw_only=True)
class Parallel:
    """Model parallel sizes and torchrun's process layout."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    rdzv_id: str | None = None
    """Set: c10d rendezvous at master_addr:master_port (Slurm, elastic); node ranks are then assigned."""

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self) -> None:
        for name in ("tp", "pp", "ep", "nproc_per_node", "nnodes"):
            if getattr(self, name) < 1:
                raise LaunchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1} (--nnodes)")
        if self.world_size % (self.tp * self.pp):
            raise LaunchError(
                f"world size {self.world_size} (nproc-per-node x nnodes) is not divisible by "
                f"TP x PP = {self.tp * self.pp}; change --tp/--pp or the process count"
            )


def check_extra_args(extra: Sequence[str]) -> None:
    """Refuse extra Megatron arguments that would make the run quantize nothing or fail on local modules."""
    for i, arg in enumerate(extra):
        flag, _, inline = arg.partition("=")
        if flag in REFUSED_FLAGS:
            raise LaunchError(f"extra argument {arg!r}: refused, {REFUSED_FLAGS[flag]}; remove it")
        if flag in LENGTH_FLAGS:
            raise LaunchError(
                f"extra argument {flag}: refused, the training configs are sample-based and set the length, "
                "LR schedule and eval interval together; use `--steps N` (megaquant option) instead"
            )
        if flag == "--transformer-impl":
            value = inline or (extra[i + 1] if i + 1 < len(extra) else "")
            if value != "local":
                raise LaunchError(
                    f"extra argument --transformer-impl {value or '(missing)'}: the quantization sites live "
                    "in the local modules, a Transformer Engine run would quantize nothing; remove it"
                )


def megatron_args(
    model: Model,
    dataset: Dataset | None,
    preset: Preset,
    parallel: Parallel,
    *,
    data_root: Path,
    tokenizer: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The Megatron arguments of one run (no program name). dataset None: `--mock-data`. Pure."""
    check_extra_args(extra)
    parallel.check()
    eval_iters = dataset.eval_iters if dataset is not None else 0
    args = list(FAKE_QUANT_FLAGS) + model.megatron_args() + preset.megatron_args(eval_iters=eval_iters)
    args += [
        "--tensor-model-parallel-size", str(parallel.tp),
        "--pipeline-model-parallel-size", str(parallel.pp),
    ]  # fmt: skip
    if model.moe:
        args += ["--expert-model-parallel-size", str(parallel.ep)]
    elif parallel.ep != 1:
        raise LaunchError(f"--ep {parallel.ep}: model {model.name} has no experts; drop --ep")
    if dataset is None:
        args += ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(model.vocab_size)]
    else:
        if tokenizer is None:
            tokenizer = str(data_root / dataset.tokenizer) if dataset.tokenizer else model.tokenizer
        args += [
            "--data-path", str(data_root / dataset.prefix),
            "--split", dataset.split,
            "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", tokenizer,
        ]  # fmt: skip
    return args + list(extra)


@dataclass(frozen=True, kw_only=True)
class Entry:
    """What torchrun starts: the tree's pretrain_gpt.py, or megaquant's own entry with the tree importable."""

    argv: tuple[str, ...]
    pythonpath: Path | None
    own_metrics: bool
    """True: megaquant.launch.pretrain, which accepts `--mq-metrics FILE`."""


def entry_for(tree: Path) -> Entry:
    script = tree / "pretrain_gpt.py"
    if script.is_file():
        return Entry(argv=(str(script),), pythonpath=tree, own_metrics=False)
    return Entry(argv=("-m", "megaquant.launch.pretrain"), pythonpath=tree, own_metrics=True)


def torchrun_argv(python: str, parallel: Parallel, entry: Entry, args: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run <layout> <entry> <args>` as an argv list."""
    argv = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(parallel.nproc_per_node)]
    argv += ["--nnodes", str(parallel.nnodes)]
    if parallel.rdzv_id is not None:
        argv += [
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{parallel.master_addr}:{parallel.master_port}",
            "--rdzv-id", parallel.rdzv_id,
        ]  # fmt: skip
    else:
        argv += [
            "--node-rank", str(parallel.node_rank),
            "--master-addr", parallel.master_addr,
            "--master-port", str(parallel.master_port),
        ]  # fmt: skip
    return argv + list(entry.argv) + list(args)


TRAIN_ENV: Mapping[str, str] = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
"""Set for every training process (Megatron requires it with tensor/context parallelism before Blackwell)."""


def train_env(entry: Entry, base: Mapping[str, str]) -> dict[str, str]:
    """The environment additions of a training process (the tree first on PYTHONPATH)."""
    env = dict(TRAIN_ENV)
    if entry.pythonpath is not None:
        rest = base.get("PYTHONPATH", "")
        env["PYTHONPATH"] = str(entry.pythonpath) + (f":{rest}" if rest else "")
    return env


_MLA_KWARGS = re.compile(r"def __init__\([^)]*\bk_channels\b[^)]*\bv_channels\b", re.S)


def mla_supported(tree: Path) -> bool:
    """True when the tree's local DotProductAttention accepts MLA's k_channels/v_channels (instrumented)."""
    path = tree / "megatron" / "core" / "transformer" / "dot_product_attention.py"
    try:
        return bool(_MLA_KWARGS.search(path.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False
