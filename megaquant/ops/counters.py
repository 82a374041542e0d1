"""Path counters: per role, how many GEMMs and operands took the Triton kernels, the torch reference, the
plain op or the weight cache, or had no elements ("empty": an MoE expert that got no tokens); on CUDA a
reference fallback logs one line per shape with the reason.

The counts live in this process (`snapshot`, `reset`); with PATH_COUNTS_ENV (megaquant.pathcounts) set,
`write()` and interpreter exit store them in that directory, one file per rank (torchrun's RANK), for the
launcher to fold into the run's manifest. Counting is a dictionary increment per call: it is always on.
GEMMs that run inside a named scope (`push_scope`/`pop_scope`: the trainer opens "experts" around the
forward of an MoE layer's experts) are also counted under that name, so a rank's file says whether its own
experts were quantized, apart from the dense layers it runs too.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaquant.pathcounts import PATH_COUNTS_ENV, file_name

__all__ = [
    "count_gemm",
    "count_operand",
    "evaluation",
    "expect_graph",
    "mark_step",
    "note_fallback",
    "note_weight_cache",
    "pop_scope",
    "push_scope",
    "reset",
    "snapshot",
    "write",
]

_LOG = logging.getLogger("megaquant.ops")
_GEMMS: Counter[tuple[str, str]] = Counter()
_OPERANDS: Counter[tuple[str, str]] = Counter()
_FALLBACKS: dict[tuple[object, ...], dict[str, Any]] = {}
_STEPS = [0]
_EVAL_GEMMS: Counter[tuple[str, str]] = Counter()
_EVAL_OPERANDS: Counter[tuple[str, str]] = Counter()
_SCOPES: list[str] = []
_SCOPED: Counter[tuple[str, str, str]] = Counter()
_WEIGHT_CACHE: dict[str, Any] = {}


def note_weight_cache(enabled: bool, reason: str) -> None:
    """Record the training process's weight-cache decision; snapshot() adds what the cache held at most."""
    _WEIGHT_CACHE.clear()
    _WEIGHT_CACHE.update(enabled=enabled, reason=reason)


@dataclass
class _Graph:
    """Megatron's full-iteration CUDA graph: step `capture_step` is captured (and replayed), later steps only
    replay it, so no op runs in Python and nothing is counted; mark_step() adds the captured step's counts."""

    capture_step: int | None = None
    delta: tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]] | None = None
    mark: tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]] = (Counter(), Counter())
    replays: int = 0


_GRAPH = _Graph()


def expect_graph(capture_step: int) -> None:
    """The trainer runs under a full-iteration CUDA graph captured at optimizer step `capture_step` (1-based:
    Megatron's --cuda-graph-warmup-steps + 1); every later step that counts nothing is a replay of it."""
    _GRAPH.capture_step = capture_step


def count_gemm(role: str, path: str) -> None:
    _GEMMS[role, path] += 1
    if _SCOPES:
        _SCOPED[_SCOPES[-1], role, path] += 1


def push_scope(name: str) -> None:
    """GEMMs from now until pop_scope() are also counted under `name` (`scoped` in the snapshot); forward
    GEMMs only when opened by module forward hooks (the backward runs later, outside the hooks)."""
    _SCOPES.append(name)


def pop_scope() -> None:
    if _SCOPES:
        _SCOPES.pop()


def count_operand(role: str, path: str) -> None:
    _OPERANDS[role, path] += 1


def mark_step() -> None:
    """One optimizer step done (trainers call it; the files report how many steps the counts cover)."""
    _STEPS[0] += 1
    graph = _GRAPH
    if graph.capture_step is None:
        return
    if _STEPS[0] == graph.capture_step:
        graph.delta = (_GEMMS - graph.mark[0], _OPERANDS - graph.mark[1])
    elif _STEPS[0] > graph.capture_step and graph.delta is not None and graph.mark == (_GEMMS, _OPERANDS):
        _GEMMS.update(graph.delta[0])
        _OPERANDS.update(graph.delta[1])
        graph.replays += 1
    graph.mark = (Counter(_GEMMS), Counter(_OPERANDS))


@contextmanager
def evaluation() -> Iterator[None]:
    """Count the GEMMs inside (a validation pass) apart from the training steps' (`eval_gemms`, ...)."""
    gemms, operands, scoped = Counter(_GEMMS), Counter(_OPERANDS), Counter(_SCOPED)
    try:
        yield
    finally:
        _EVAL_GEMMS.update(_GEMMS - gemms)
        _EVAL_OPERANDS.update(_OPERANDS - operands)
        for counter, before in ((_GEMMS, gemms), (_OPERANDS, operands), (_SCOPED, scoped)):
            counter.clear()
            counter.update(before)  # type: ignore[arg-type]


def note_fallback(role: str, shape: tuple[int, ...], dtype: object, fmt: str, reason: str) -> None:
    """A CUDA operand ran the torch reference: count it, and log one line the first time for this shape."""
    key = (role, shape, str(dtype), fmt, reason)
    entry = _FALLBACKS.get(key)
    if entry is None:
        _FALLBACKS[key] = {
            "role": role, "shape": list(shape), "dtype": str(dtype), "fmt": fmt, "reason": reason, "calls": 1,
        }  # fmt: skip
        _LOG.warning(
            "megaquant: %s operand %s %s in %s ran the torch reference on CUDA (slow): %s",
            role, tuple(shape), dtype, fmt, reason,
        )  # fmt: skip
    else:
        entry["calls"] += 1


def _table(counter: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (role, path), n in sorted(counter.items()):
        out.setdefault(role, {})[path] = n
    return out


def snapshot() -> dict[str, Any]:
    """The counts so far, in the file format of megaquant.pathcounts."""
    out: dict[str, Any] = {
        "gemms": _table(_GEMMS),
        "operands": _table(_OPERANDS),
        "fallbacks": [dict(e) for e in _FALLBACKS.values()],
        "steps": _STEPS[0],
    }
    if _EVAL_GEMMS:
        out.update(eval_gemms=_table(_EVAL_GEMMS), eval_operands=_table(_EVAL_OPERANDS))
    if _SCOPED:
        scoped: dict[str, dict[str, dict[str, int]]] = {}
        for (name, role, path), n in sorted(_SCOPED.items()):
            scoped.setdefault(name, {}).setdefault(role, {})[path] = n
        out["scoped"] = scoped
    if _GRAPH.capture_step is not None:
        out["cuda_graph"] = {"capture_step": _GRAPH.capture_step, "replayed_steps": _GRAPH.replays}
    if _WEIGHT_CACHE:
        from megaquant.ops import weights

        held = weights.stats()
        out["weight_cache"] = {**_WEIGHT_CACHE, "peak_bytes": held["peak_bytes"], "bound": held["max_bytes"]}
    return out


def reset() -> None:
    _GEMMS.clear()
    _OPERANDS.clear()
    _FALLBACKS.clear()
    _STEPS[0] = 0
    _EVAL_GEMMS.clear()
    _EVAL_OPERANDS.clear()
    _SCOPES.clear()
    _SCOPED.clear()
    _WEIGHT_CACHE.clear()
    global _GRAPH
    _GRAPH = _Graph()


def write(directory: Path | str | None = None) -> Path | None:
    """Store snapshot() as `path_counts.rank<RANK>.json` in `directory` (default: $MEGAQUANT_PATH_COUNTS);
    nothing when there is no directory or nothing was counted. Returns the file written."""
    target = directory if directory is not None else os.environ.get(PATH_COUNTS_ENV)
    if not target or not (_GEMMS or _OPERANDS or _EVAL_GEMMS):
        return None
    path = Path(target) / file_name(int(os.environ.get("RANK", "0") or 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(snapshot(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _write_at_exit() -> None:
    try:
        write()
    except OSError as exc:  # a full disk must not turn a finished run into a traceback
        _LOG.warning("megaquant: could not write the path counts: %s", exc)


if os.environ.get(PATH_COUNTS_ENV):
    atexit.register(_write_at_exit)
