"""Training presets: batch, sequence, length, learning-rate schedule and optimizer, one table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megaquant.argvalues import flag_values
from megaquant.errors import LaunchError

__all__ = ["DATA_SPLIT", "EVAL_POINTS", "PRESETS", "Preset", "get_preset"]

DATA_SPLIT = "100,0,0"
"""Megatron `--split` of every preset: evaluation is off (`--eval-iters 0`), so no validation or test split
is built; a 1 % validation split of a small corpus (the built-in sample: ~8 documents) holds fewer tokens
than one sequence, and Megatron's sampler asserts on an empty split even when it never evaluates."""


EVAL_POINTS = 10
"""Evaluations per run on a dataset with a validation split (`Dataset.eval_iters` > 0)."""


@dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    title: str
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    train_samples: int
    lr: float
    min_lr: float
    lr_warmup_fraction: float
    log_interval: int = 1
    save_interval: int | None = None

    @property
    def train_iters(self) -> int:
        return -(-self.train_samples // self.global_batch_size)

    def with_overrides(self, extra: tuple[str, ...] | list[str]) -> Preset:
        """The preset with the batch and sequence sizes that extra Megatron arguments override (the last
        occurrence wins, as in Megatron's parser), so `--steps`, the LR schedule and the eval interval are
        computed from the batch the run really has. Pure."""
        fields = {"--global-batch-size": "global_batch_size", "--micro-batch-size": "micro_batch_size",
                  "--seq-length": "seq_length"}  # fmt: skip
        changes: dict[str, Any] = {}
        for flag, name in fields.items():
            for value in flag_values(extra, flag):
                try:
                    changes[name] = int(value)
                except ValueError:
                    raise LaunchError(f"extra argument {flag} {value!r}: expected an integer") from None
        return dataclasses.replace(self, **changes) if changes else self

    def with_steps(self, steps: int) -> Preset:
        """The same preset run for `steps` optimizer steps: length, LR decay and warmup (a fraction of the
        length) and the eval interval all follow, since each is derived from `train_samples`."""
        if steps < 1:
            raise LaunchError(f"--steps must be >= 1, got {steps}")
        return dataclasses.replace(self, train_samples=steps * self.global_batch_size)

    def megatron_args(self, *, eval_iters: int = 0) -> list[str]:
        """`eval_iters` (the dataset's, see `Dataset.eval_iters`): 0 = evaluation off, the default; else
        Megatron evaluates `eval_iters` validation batches `EVAL_POINTS` times in the run (and at its end)."""
        eval_interval = self.train_iters if eval_iters == 0 else max(1, self.train_iters // EVAL_POINTS)
        args = [
            "--micro-batch-size", str(self.micro_batch_size),
            "--global-batch-size", str(self.global_batch_size),
            "--seq-length", str(self.seq_length),
            "--train-samples", str(self.train_samples),
            "--lr", repr(self.lr),
            "--min-lr", repr(self.min_lr),
            "--lr-decay-style", "cosine",
            "--lr-decay-samples", str(self.train_samples),
            "--lr-warmup-fraction", repr(self.lr_warmup_fraction),
            "--adam-beta1", "0.9",
            "--adam-beta2", "0.95",
            "--weight-decay", "0.1",
            "--clip-grad", "1.0",
            "--log-interval", str(self.log_interval),
            "--log-throughput",
            "--eval-iters", str(eval_iters),  # 0 with DATA_SPLIT: no validation split is needed
            "--eval-interval", str(eval_interval),  # Megatron divides by it even with no eval iters
            "--seed", "1234",
        ]  # fmt: skip
        if self.save_interval is not None:
            args += ["--save-interval", str(self.save_interval)]
        return args


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="standard",
            title="the original full run: 47.34 M samples of 8192 tokens",
            micro_batch_size=1,
            global_batch_size=128,
            seq_length=8192,
            train_samples=47_340_000,
            lr=1.5e-4,
            min_lr=1e-5,
            lr_warmup_fraction=0.002,
            log_interval=10,
            save_interval=1000,
        ),
        Preset(
            name="fast",
            title="the original quick run: 1000 samples of 2048 tokens",
            micro_batch_size=1,
            global_batch_size=32,
            seq_length=2048,
            train_samples=1000,
            lr=1e-4,
            min_lr=1e-5,
            lr_warmup_fraction=0.0,
        ),
        Preset(
            name="smoke",
            title="minutes: 20 steps of 8 x 256 tokens (pair with --model tiny)",
            micro_batch_size=1,
            global_batch_size=8,
            seq_length=256,
            train_samples=160,
            lr=1e-3,
            min_lr=1e-4,
            lr_warmup_fraction=0.1,
        ),
        Preset(
            name="single-gpu",
            title="one card: 500 steps of 16 x 1024 tokens for comparing modes",
            micro_batch_size=2,
            global_batch_size=16,
            seq_length=1024,
            train_samples=8000,
            lr=3e-4,
            min_lr=3e-5,
            lr_warmup_fraction=0.02,
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise LaunchError(f"unknown training preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
