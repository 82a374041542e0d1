"""Path counts files: which path each quantized GEMM of a training process took, as the run dir keeps them.

A training process whose environment names a directory in PATH_COUNTS_ENV writes its counts there as
`path_counts.rank<RANK>.json` (megaquant.ops.counters does, at exit and when the trainer asks);
`megaquant train` sets the variable to the run directory and folds the sum over ranks into manifest.json
(`collect`). Pure: no torch, so the launcher and `megaquant compare` read these files without it.

One file (and the folded sum) is a JSON object:

    {"gemms": {ROLE: {PATH: n}}, "operands": {ROLE: {PATH: n}}, "fallbacks": [{...}], "steps": n}

ROLE is the role keyword the op got (or configure()'s), else the op's name (`matmul`, `matmul.grad`,
`baddbmm`, `bmm`, `linear`); a GEMM's PATH is "triton", "reference" (any operand on the torch reference)
or "plain" (value none); an operand's is "triton", "reference", "cache" (a weight quantized earlier in
the same optimizer step) or "shared" (wgrad's gradient operand, the copy dgrad made: HiF8's q(dy), or the
token-blocked MX copy dgrad's read of dy produced; megaquant.ops.shared). "fallbacks" lists each CUDA
operand shape that ran the reference, with why.
Optional: "eval_gemms" / "eval_operands" (validation passes, kept out of the per-step counts),
"scoped": {NAME: {ROLE: {PATH: n}}} (the forward GEMMs run inside a named scope, e.g. "experts": an MoE
layer's experts on this rank; also counted in "gemms") and
"cuda_graph": {"capture_step": k, "replayed_steps": n} when the trainer ran Megatron's full-iteration
CUDA graph: the ops run in Python only up to step k, and each replayed step counts as step k did.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["FILE_GLOB", "PATH_COUNTS_ENV", "collect", "file_name", "merge", "summary"]

PATH_COUNTS_ENV = "MEGAQUANT_PATH_COUNTS"
"""Directory a training process writes its path counts file into (set by `megaquant train`)."""
FILE_GLOB = "path_counts.rank*.json"
_RANK = re.compile(r"path_counts\.rank(\d+)\.json$")


def file_name(rank: int) -> str:
    return f"path_counts.rank{rank}.json"


def _add(into: dict[str, dict[str, int]], table: Mapping[str, Mapping[str, int]]) -> None:
    for role, paths in table.items():
        row = into.setdefault(role, {})
        for path, n in paths.items():
            row[path] = row.get(path, 0) + int(n)


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' counts (fallbacks concatenated, rank kept; steps: the largest)."""
    gemms: dict[str, dict[str, int]] = {}
    operands: dict[str, dict[str, int]] = {}
    eval_gemms: dict[str, dict[str, int]] = {}
    eval_operands: dict[str, dict[str, int]] = {}
    scoped: dict[str, dict[str, dict[str, int]]] = {}
    fallbacks: list[dict[str, Any]] = []
    steps = 0
    graph: dict[str, Any] | None = None
    cache: dict[str, Any] | None = None
    for snap in snapshots:
        _add(gemms, snap.get("gemms", {}))
        _add(operands, snap.get("operands", {}))
        _add(eval_gemms, snap.get("eval_gemms", {}))
        _add(eval_operands, snap.get("eval_operands", {}))
        for name, table in snap.get("scoped", {}).items():
            _add(scoped.setdefault(name, {}), table)
        fallbacks.extend(snap.get("fallbacks", []))
        steps = max(steps, int(snap.get("steps", 0)))
        graph = graph or snap.get("cuda_graph")
        if snap.get("weight_cache"):  # the same decision on every rank; the largest rank's holding
            rank = dict(snap["weight_cache"])
            if cache is not None:
                rank["peak_bytes"] = max(int(cache.get("peak_bytes") or 0), int(rank.get("peak_bytes") or 0))
            cache = rank
    merged: dict[str, Any] = {"gemms": gemms, "operands": operands, "fallbacks": fallbacks, "steps": steps}
    if eval_gemms:
        merged.update(eval_gemms=eval_gemms, eval_operands=eval_operands)
    if scoped:
        merged["scoped"] = scoped
    if graph:
        merged["cuda_graph"] = graph
    if cache:
        merged["weight_cache"] = cache
    return merged


def collect(run_dir: Path) -> dict[str, Any] | None:
    """The merged counts of every rank's file in `run_dir` plus `ranks` (None when there is no file, e.g.
    the fork's own ops, which count nothing). Unreadable files are listed under `unreadable`."""
    snaps: list[dict[str, Any]] = []
    ranks: list[int] = []
    unreadable: list[str] = []
    for path in sorted(Path(run_dir).glob(FILE_GLOB)):
        match = _RANK.search(path.name)
        try:
            snap = json.loads(path.read_text())
        except (OSError, ValueError):
            unreadable.append(path.name)
            continue
        if match and isinstance(snap, dict):
            ranks.append(int(match.group(1)))
            snaps.append(snap)
    if not snaps and not unreadable:
        return None
    merged = merge(snaps)
    merged["ranks"] = sorted(ranks)
    if unreadable:
        merged["unreadable"] = unreadable
    return merged


def summary(counts: Mapping[str, Any]) -> str:
    """One line: GEMMs per path over all roles, e.g. `triton 3328, reference 0, plain 0`."""
    totals = {"triton": 0, "reference": 0, "plain": 0}
    for paths in counts.get("gemms", {}).values():
        for path, n in paths.items():
            totals[path] = totals.get(path, 0) + int(n)
    return ", ".join(f"{path} {n}" for path, n in totals.items())
