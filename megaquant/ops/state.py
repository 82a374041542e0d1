"""Run-time state of the recipes: the step, per-GEMM seeds and the amax histories of delayed scaling.

Seeds: every stochastically rounded operand and every random Hadamard transform draws a seed from
(base seed, step, number of draws so far in the step). A training process runs its GEMMs in the same order
each step, so the same run (same seed, same code) draws the same seeds: runs are reproducible, while each
GEMM of each step gets fresh random bits. Trainers call `next_step()` once per optimizer step (minitrain and
megaquant.launch.pretrain do); without it the draw counter simply keeps growing.

Delayed scaling keeps one amax history per operand slot: (role, GEMM kind, operand, dtype, shape, how many
times that key was seen in this step). The slots of step t are those of step t-1 when the step runs the same
GEMMs in the same order, so each history follows one tensor (a layer's weight, its input, its gradient).
Before the first `next_step()` there is no step to remember, and delayed scaling acts as current scaling.

A recipe with one fixed Hadamard sign vector (nvfp4_paper) takes it from `fixed_seed()`: the same for every
GEMM and step of the run, a function of the base seed only (draws nothing, so the other seeds do not move).

`PLAIN_SCOPE` is the recipe's BF16 layers at run time (megaquant.ops.layers sets it around the forward and
the backward of each such layer): 0, quantize as the sites say; PLAIN_LINEAR, the linear GEMMs (quant_matmul,
quant_linear) run plain; PLAIN_ALL, the attention GEMMs too. One process-wide cell, read once per op call:
Megatron runs forward and backward one after the other (the backward on the autograd engine's thread), and
a per-thread flag set by the forward hooks would not reach that thread anyway.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "PLAIN_ALL",
    "PLAIN_LINEAR",
    "PLAIN_SCOPE",
    "draw_seed",
    "fixed_seed",
    "history",
    "next_step",
    "reset_state",
    "step",
]

_MASK64 = (1 << 64) - 1
_FIXED_SALT = 0x5248_5446  # "RHTF": the fixed-sign-vector seed is not any step's draw
PLAIN_LINEAR = 1
PLAIN_ALL = 2
PLAIN_SCOPE: list[int] = [0]
"""[mode]: 0, PLAIN_LINEAR or PLAIN_ALL (module docstring). A list so the ops read it without a lookup."""


def _mix(*words: int) -> int:
    """splitmix64 over the words: a well-spread 31-bit seed (positive int32, what the kernels take)."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (w & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & 0x7FFF_FFFF


@dataclass
class _State:
    seed: int = 0
    step: int = 0
    draws: int = 0
    seen: Counter[tuple[object, ...]] = field(default_factory=Counter)
    histories: dict[tuple[object, ...], tuple[torch.Tensor, list[int]]] = field(default_factory=dict)


_STATE = _State()


def reset_state(seed: int = 0) -> None:
    """Start over: base seed `seed`, step 0, no amax histories (a new run in the same process)."""
    global _STATE
    _STATE = _State(seed=seed)
    PLAIN_SCOPE[0] = 0


def next_step() -> int:
    """Mark the start of the next optimizer step; returns its number (1 for the first)."""
    _STATE.step += 1
    _STATE.draws = 0
    _STATE.seen.clear()
    return _STATE.step


def step() -> int:
    """The current step number (0 before the first next_step())."""
    return _STATE.step


def draw_seed() -> int:
    """The next seed of this step (one per stochastically rounded operand or Hadamard transform)."""
    _STATE.draws += 1
    return _mix(_STATE.seed, _STATE.step, _STATE.draws)


def fixed_seed() -> int:
    """The run's one fixed seed (a Hadamard sign vector shared by every GEMM, layer and step): depends on
    the base seed only; draws nothing."""
    return _mix(_STATE.seed, _FIXED_SALT)


def history(key: tuple[object, ...], length: int, amax: torch.Tensor) -> torch.Tensor:
    """The amax to scale with for operand slot `key` under delayed scaling, then record `amax` (a 0-d
    tensor on the operand's device; nothing is read back to the host).

    Returns the max over the slot's history (the last `length` steps) when it has one, else `amax` itself
    (the first step, and every call before the first next_step()).
    """
    import torch

    if _STATE.step == 0:
        return amax
    _STATE.seen[key] += 1
    slot = (*key, _STATE.seen[key])
    entry = _STATE.histories.get(slot)
    if entry is None:
        values = torch.zeros(length, dtype=torch.float32, device=amax.device)
        values[0] = amax
        _STATE.histories[slot] = (values, [1])
        return amax
    values, filled = entry
    scale_amax = values.amax()
    values[filled[0] % length] = amax
    filled[0] += 1
    return scale_amax
