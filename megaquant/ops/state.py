"""Run-time state of the recipes: the step, per-GEMM seeds and the amax histories of delayed scaling.

Everything a step passes to its kernels and torch ops as a host value is the same every step, so that a
CUDA graph captured in one step replays correctly in the next (megaquant.launch.graphs); what changes from
step to step lives in device tensors that `next_step()` updates eagerly, outside the captured region.

Seeds: every stochastically rounded operand and every random Hadamard transform draws a seed from
(base seed, number of draws so far in the step) -- a host int, the same every step -- and the kernels mix it
with the step's device word (`step_word(device)`: a 0-d int64 tensor holding a hash of (base seed, step),
which `next_step()` overwrites in place) into the key of their random stream, on the device
(formats._random.mixed_key). A training process runs its GEMMs in the same order each step, so the same run
(same seed, same code) gets the same random bits: runs are reproducible, while each GEMM of each step gets
fresh ones. Trainers call `next_step()` once per optimizer step (minitrain and megaquant.launch.pretrain do);
without it the draw counter simply keeps growing. A step word is made on the first draw on its device; made
during a CUDA graph capture it would be the capture's constant, so that raises (run one step eagerly first:
Megatron's graph warm-up steps do).

Delayed scaling keeps one amax history per operand slot: (role, GEMM kind, operand, dtype, shape, how many
times that key was seen in this step). The slots of step t are those of step t-1 when the step runs the same
GEMMs in the same order, so each history follows one tensor (a layer's weight, its input, its gradient).
A history is a device tensor of the last `length` amaxes, newest first (zeros where the slot has fewer), and
recording shifts it by one: fixed-index ops, no host position. Before the first `next_step()` there is no
step to remember, and delayed scaling acts as current scaling; so does a slot first met inside a CUDA graph
capture (its history would be created by the graph, i.e. anew every replay), without being recorded, and so
does every operand of a validation pass (`evaluation()`, since session 18: evaluation reads and records no
history, so a validation loss does not depend on the evaluations before it, and a replayed evaluation
should equal the eager one; the GPU check of that is benchmarks/eval_graph_check.sh).

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
from collections.abc import Iterator
from contextlib import contextmanager
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
    "step_word",
]

_MASK64 = (1 << 64) - 1
_FIXED_SALT = 0x5248_5446  # "RHTF": the fixed-sign-vector seed is not any step's draw
_STEP_SALT = 0x5354_4550  # "STEP": the step word is no draw's seed
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
    histories: dict[tuple[object, ...], torch.Tensor] = field(default_factory=dict)
    words: dict[torch.device, torch.Tensor] = field(default_factory=dict)
    """The step word per device (step_word)."""
    evaluating: bool = False
    """Inside `evaluation()`: delayed scaling acts as current scaling and records nothing."""


_STATE = _State()


def reset_state(seed: int = 0) -> None:
    """Start over: base seed `seed`, step 0, no amax histories (a new run in the same process)."""
    global _STATE
    _STATE = _State(seed=seed)
    PLAIN_SCOPE[0] = 0


@contextmanager
def evaluation() -> Iterator[None]:
    """A validation pass: its forwards leave the training state alone. Delayed scaling scales each operand
    by its own amax (current scaling) and neither reads nor records a history. Otherwise an evaluation
    (which runs after a training step, so its calls count on past that step's slots) would grow slots of
    its own that only later evaluations read: a validation loss would depend on the evaluations before
    it, and a CUDA-graph replay of the pass (which meets those slots as new, so scales them as current)
    would differ from eager. The trainers' evaluation wraps enter it (megaquant.launch.pretrain)."""
    before = _STATE.evaluating
    _STATE.evaluating = True
    try:
        yield
    finally:
        _STATE.evaluating = before


def next_step() -> int:
    """Mark the start of the next optimizer step; returns its number (1 for the first). Overwrites the step
    words in place (one tiny fill per device, asynchronous: no host synchronisation)."""
    _STATE.step += 1
    _STATE.draws = 0
    _STATE.seen.clear()
    if _STATE.words:
        value = _word(_STATE.step)
        for word in _STATE.words.values():
            word.fill_(value)
    return _STATE.step


def _word(step: int) -> int:
    return _mix(_STATE.seed, step, _STEP_SALT)


def step_word(device: torch.device) -> torch.Tensor:
    """This step's device word on `device` (0-d int64, a 31-bit hash of the base seed and the step): the
    same tensor every step, its value updated by next_step(). The kernels mix it into every per-step seed."""
    word = _STATE.words.get(device)
    if word is None:
        import torch

        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            from megaquant.errors import MegaquantError

            raise MegaquantError(
                "a per-step random seed was first needed inside a CUDA graph capture, where its value would "
                "be frozen; run at least one training step eagerly before capturing (Megatron: "
                "--cuda-graph-warmup-steps 1 or more), or train without CUDA graphs"
            )
        word = _STATE.words[device] = torch.full((), _word(_STATE.step), dtype=torch.int64, device=device)
    return word


def step() -> int:
    """The current step number (0 before the first next_step())."""
    return _STATE.step


def draw_seed() -> int:
    """The next seed of this step (one per stochastically rounded operand or Hadamard transform): a function
    of the base seed and the draw's position in the step only; the kernels mix in step_word() on the device,
    so the random bits are fresh every step while this host value repeats."""
    _STATE.draws += 1
    return _mix(_STATE.seed, _STATE.draws)


def fixed_seed() -> int:
    """The run's one fixed seed (a Hadamard sign vector shared by every GEMM, layer and step): depends on
    the base seed only; draws nothing."""
    return _mix(_STATE.seed, _FIXED_SALT)


def history(key: tuple[object, ...], length: int, amax: torch.Tensor) -> torch.Tensor:
    """The amax to scale with for operand slot `key` under delayed scaling, then record `amax` (a 0-d
    tensor on the operand's device; nothing is read back to the host).

    Returns the max over the slot's history (the last `length` steps) when it has one, else `amax` itself
    (the first step, every call before the first next_step(), and every call inside `evaluation()`, which
    records nothing). Three fixed-index device ops per call
    (the max, the shifted history, its copy back); amaxes are >= 0, so the zeros of a history shorter than
    `length` never win the max.
    """
    import torch

    if _STATE.step == 0 or _STATE.evaluating:
        return amax
    _STATE.seen[key] += 1
    slot = (*key, _STATE.seen[key])
    values = _STATE.histories.get(slot)
    if values is None:
        if amax.is_cuda and torch.cuda.is_current_stream_capturing():
            return amax  # a history made by the graph would start over every replay: current scaling
        values = torch.zeros(length, dtype=torch.float32, device=amax.device)
        values[0] = amax
        _STATE.histories[slot] = values
        return amax
    scale_amax = values.amax()
    values.copy_(torch.cat((amax.reshape(1).to(values.dtype), values[:-1])))
    return scale_amax
