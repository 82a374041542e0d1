"""Run batches of `megaquant train` runs for docs/results (issue 11): a run matrix, several runs at once on
one GPU, a wall-clock budget, and only the small files of each run brought back.

    python benchmarks/results_runs.py plan [--batch NAME]                  # the matrix, estimated times
    python benchmarks/results_runs.py run --batch NAME[,NAME...] --tree T --data-root D --work W --out OUT \\
        [--concurrency 2] [--budget-s 480] [--only|--skip RUN,...] [--prestart-s 15]   # on the GPU machine
    python benchmarks/results_runs.py unpack OUT/NAME.tar.gz [--into docs/results/runs]   # here, after
    python benchmarks/results_runs.py phases docs/results/runs/8b-4l     # where runs' wall time went

Every run is one `megaquant train` (argv list, subprocess), as a user would start it: roles set on a git tree,
torchrun -> megaquant.launch.pretrain, manifest.json + metrics.jsonl, restore. Runs that share the GPU each
get their own copy of the instrumented tree (`megaquant train` holds a repository lock while it sets and
restores roles, shared by all worktrees of one repository), their own --master-port and their own Megatron
dataset-index cache (two processes building the same cache files would race).

The budget: a run starts only when its estimated wall time (measured on earlier runs of the same shape in
this batch, else the assumed step time of SHAPES) ends before --budget-s; at --budget-s the driver
interrupts what still runs (the manifest then says `interrupted`, the tree is restored), except a run that
has logged its last step: it gets --finish-grace-s to end its final evaluation and exit. A shape whose
runs have all failed so far starts no more runs in the batch (`shape_failing`: a set-up failure would repeat
in each of them); other shapes go on. After every run it
rewrites OUT/<batch>.tar.gz: per run manifest.json, metrics.jsonl, path_counts.rank*.json,
validation.jsonl (Megatron's evaluations, parsed from train.log), train_tail.log (the log's last lines),
timing.log (the log's timestamps and timer reports: where the time besides the steps went) and
results_run.json (this driver's record: slot, concurrency, wall time, its UTC start and end since session
18, which runs overlapped it; `phases` splits the wall time with timing.log's datetimes). The lent
machine returns at most 8 files, so one tarball carries a whole batch; `unpack` puts it under
docs/results/runs/<batch>/<run>/, where `python benchmarks/results_page.py` reads it.

`--prestart-s S` (session 18) starts the next run in a spare slot (its own tree copy, port and cache) when
a running run is predicted to end within S seconds (`remaining_s`: its steps to go at its recent step time,
plus AFTER_TRAINING_S), so the next run's ~25 s of start-up (torchrun, imports; docs/benchmarks.md §6k)
overlaps the other's last steps and exit instead of following them. That is not counted as sharing: the
ending run's record says where the overlap began (`prestart.from_step`) and the page takes its step time
over the steps before; the new run's record names the run it started beside (`prestarted_beside`). If
the new run logs a training step before the other has ended, both count as sharing the GPU, as with
--concurrency.

Several batches in one call (`--batch 1b,dsv2-2l`) share one driver, one budget and one set of slots, so
every run's record names all the runs that overlapped it, whichever batch they came from; each batch still
gets its own tarball. This is how a graphed, GPU-bound run of one family can use the GPU time that the
host-bound, eager runs of another leave idle (`may_share`).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import interrupt  # noqa: E402
from results_page import parse_validation  # noqa: E402

BASE_PRESET = "single-gpu"
"""Every shape trains on this preset's schedule: AdamW, lr 3e-4 cosine to 3e-5, 2 % warm-up (of the run)."""
SEEDS = (1234, 1235, 1236)
EVAL_POINTS = 10
TAIL_LINES = 200
PORT_BASE = 29500


@dataclass(frozen=True, kw_only=True)
class Shape:
    """A model cut and batch shape of the results page. `step_s`/`startup_s` are planning assumptions (bf16,
    one run on the GPU), replaced by measured times once a run of the shape finished in the batch."""

    name: str
    model: str
    title: str
    seq: int
    micro_batch: int
    global_batch: int
    steps: int
    layers: int | None = None
    """None: the model's full depth."""
    extra: tuple[str, ...] = ()
    step_s: float
    startup_s: float
    basis: str
    """Where `step_s` comes from (docs/benchmarks.md)."""
    validation_seed: int | None = None
    """`megaquant train --validation-seed`: the 10 validation batches shuffled by this seed for every run,
    so the seeds evaluate the same text at no extra cost (the bf16 seed band is then training noise
    only). For `dsv2-2l` and `1b`; not for `8b-4l`, whose first runs were stored before it (the page pairs
    every gap by seed, which makes its 10-batch evaluations comparable too). Megatron's
    `--full-validation` is no option: megatron-core 0.19.2 crashes at its first evaluation without
    `--multiple-validation-sets` (`'int' object is not subscriptable`, session 13's first 1b run), and
    `megaquant train` refuses it."""

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * self.seq


_DSV2_2L = Shape(
    name="dsv2-2l",
    model="deepseek2_lite",
    title="DeepSeek-V2-Lite cut to 2 layers (the dense first layer + one MoE layer: 64 experts "
    "top-6 + the shared expert; MLA), seq 2048, 4 sequences per step",
    seq=2048,
    micro_batch=4,
    global_batch=4,
    steps=300,
    layers=2,
    extra=("--moe-layer-freq", "([0]+[1]*1)"),
    step_s=0.13,
    startup_s=100,  # 11 evaluations of 10 batches, eager
    validation_seed=1234,
    basis="benchmarks.md §6g (D), this very shape through megaquant train on the sample corpus: "
    "bf16 125.9 ms and FA_linear_mxfp8 214.0 ms (1.70x: cost_factor's 1.7) per step, eager, the GPU "
    "busy 40 % / 26 % of it (host-bound: run 3 at a time); 14.45 GiB peak per run",
)

SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape(
            name="1b",
            model="llama32-1b",
            title="Llama-3.2-1B, full depth (16 layers), seq 2048, 4 sequences per step",
            seq=2048,
            micro_batch=4,
            global_batch=4,
            steps=1000,
            step_s=0.15,
            startup_s=75,
            basis="benchmarks.md §6c: bf16 281 ms per 16 x 1024 tokens (8 microbatches) under the CUDA "
            "graph; one microbatch of 4 x 2048 tokens: about half the kernels, plus longer attention",
            validation_seed=1234,
        ),
        _DSV2_2L,
        replace(
            _DSV2_2L,
            name="dsv2-4l",
            title="DeepSeek-V2-Lite cut to 4 layers (the dense first layer + three MoE layers: 64 experts "
            "top-6 + the shared expert; MLA), seq 2048, 4 sequences per step",
            layers=4,
            extra=("--moe-layer-freq", "([0]+[1]*3)"),
            step_s=0.26,
            startup_s=130,
            basis="not measured: twice dsv2-2l's 0.13 s (three MoE layers instead of one, the eager step "
            "host-bound per layer); ~37 GiB per run predicted (dsv2-2l's 16.9 GiB plus two MoE layers of "
            "553 M parameters at ~18 bytes each with AdamW), so three fit the H200 at once",
        ),
        Shape(
            name="8b-4l",
            model="llama31-8b",
            title="Llama-3.1-8B cut to 4 layers, seq 8192, 2 sequences per step",
            seq=8192,
            micro_batch=2,
            global_batch=2,
            steps=320,  # >= 300 and 320 x 2 samples a multiple of the preset's global batch (16)
            layers=4,
            step_s=0.254,
            startup_s=45,
            basis="measured (benchmarks.md §6d): bf16 253.7 ms per step under the CUDA graph, 126 s per "
            "320-step run with its 11 evaluations, alone on the H200",
        ),
    )
}

HEADLINE: tuple[tuple[str, str], ...] = (
    ("bf16", "default"),
    ("FA_linear_mxfp8", "default"),
    ("FA_linear_mxfp4", "mxfp4_tseng"),
    ("FA_linear_hifp8", "hifp8_scaled"),
    ("FA_linear_nvfp4", "nvfp4_paper"),
)
"""Cells trained with every seed of SEEDS: bf16 and each format's headline mode with its paper recipe."""
SEED_MODES = (
    "bf16",
    "FA_mxfp8",
    "FA_hifp8",
    "FA_mxfp4",
    "linear_mxfp8",
    "linear_hifp8",
    "linear_mxfp4",
    "FA_linear_mxfp8",
    "FA_linear_hifp8",
    "FA_linear_mxfp4",
)  # megaquant.launch.modes.SEED_MODES, spelled out so the batches below do not move if the registry does
NVFP4_MODES = ("FA_nvfp4", "linear_nvfp4", "FA_linear_nvfp4")
RECIPE_CELLS: tuple[tuple[str, str], ...] = (
    ("linear_hifp8", "hifp8_scaled"),
    ("FA_linear_hifp8", "hifp8_scaled"),
    ("FA_linear_hifp8", "hifp8_delayed"),
    ("FA_linear_mxfp4", "sr_gradients"),
    ("FA_linear_mxfp4", "mxfp4_tseng"),
    ("FA_linear_nvfp4", "nvfp4_paper"),
)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    shape: str
    mode: str
    recipe: str = "default"
    seed: int = SEEDS[0]
    steps: int | None = None
    """None: the shape's."""

    @property
    def name(self) -> str:
        recipe = "" if self.recipe == "default" else f"+{self.recipe}"
        return f"{self.shape}-{self.mode}{recipe}-s{self.seed}" + (
            "" if self.steps is None else f"-{self.steps}st"
        )

    def length(self) -> int:
        return SHAPES[self.shape].steps if self.steps is None else self.steps


def _cells(shape: str) -> list[RunSpec]:
    """One family's matrix in priority order. Tier 1: the headline cells with every seed (seed by seed, so a
    cut-short batch still has bf16 and every format once); tier 2: every other seed, nvfp4 and recipe cell
    with the first seed."""
    tier1 = [RunSpec(shape=shape, mode=m, recipe=r, seed=seed) for seed in SEEDS for m, r in HEADLINE]
    pairs = [*((m, "default") for m in (*SEED_MODES, *NVFP4_MODES)), *RECIPE_CELLS]
    tier2 = [
        RunSpec(shape=shape, mode=m, recipe=r) for m, r in dict.fromkeys(pairs) if (m, r) not in HEADLINE
    ]
    return tier1 + tier2


def family(shape: str) -> tuple[RunSpec, ...]:
    return tuple(_cells(shape))


BATCHES: dict[str, tuple[RunSpec, ...]] = {
    # session 1, first command, one run at a time: the step time and start-up of every shape, bf16 and
    # FA_linear_mxfp8, before the long runs (the assumptions in SHAPES are extrapolations)
    "calib": (
        RunSpec(shape="1b", mode="bf16", steps=40),
        RunSpec(shape="1b", mode="FA_linear_mxfp8", steps=40),
        RunSpec(shape="8b-4l", mode="bf16", steps=24),
        RunSpec(shape="8b-4l", mode="FA_linear_mxfp8", steps=24),
        RunSpec(shape="dsv2-2l", mode="bf16", steps=16),
        RunSpec(shape="dsv2-2l", mode="FA_linear_mxfp8", steps=16),
    ),
    # session 18: the two RHT recipes' step time with the session-17 transform and pre-scale kernels,
    # short and alone (their 8B-cut seeds and 1B nvfp4_paper seeds all ran before the kernels; a run of
    # a few hundred steps gives the median the page's calibration table shows, without adding a seed)
    "calib-recipes": (
        RunSpec(shape="8b-4l", mode="FA_linear_mxfp4", recipe="mxfp4_tseng", steps=96),
        RunSpec(shape="8b-4l", mode="FA_linear_nvfp4", recipe="nvfp4_paper", steps=96),
        RunSpec(shape="1b", mode="FA_linear_nvfp4", recipe="nvfp4_paper", steps=200),
    ),
    "8b-4l": family("8b-4l"),
    "dsv2-2l": family("dsv2-2l"),
    "1b": family("1b"),
    # the depth check of the DeepSeek cut: the headline cells only (tier 1). In the 2-layer cut
    # nvfp4_paper's BF16-layer rule keeps the only MoE layer in BF16; at 4 layers it keeps layer 4 and
    # quantizes two MoE layers, and every format meets three MoE layers instead of one
    "dsv2-4l": tuple(_cells("dsv2-4l")[: len(SEEDS) * len(HEADLINE)]),
}
"""Named batches; a batch too long for one command is run as several commands with `--skip-done` (runs whose
results are already in the store are left out) or `--only`."""
FULL_FAMILIES = ("8b-4l", "dsv2-2l", "1b")
"""The batches that cover the issue's whole matrix (ten seed modes, nvfp4, recipes); dsv2-4l is tier 1."""


def extra_args(spec: RunSpec, *, cache: Path) -> list[str]:
    """The Megatron arguments after `--`: the shape, the eval interval, the seed, the dataset-index cache."""
    shape = SHAPES[spec.shape]
    steps = spec.length()
    extra = ["--seq-length", str(shape.seq), "--micro-batch-size", str(shape.micro_batch)]
    extra += ["--global-batch-size", str(shape.global_batch)]
    if shape.layers is not None:
        extra += ["--num-layers", str(shape.layers)]
    extra += list(shape.extra)
    extra += ["--eval-interval", str(max(1, steps // EVAL_POINTS)), "--seed", str(spec.seed)]
    extra += ["--data-cache-path", str(cache)]
    return extra


def train_argv(
    spec: RunSpec,
    *,
    megaquant: Sequence[str],
    tree: Path,
    data_root: Path,
    run_dir: Path,
    port: int,
    cache: Path,
) -> list[str]:
    shape = SHAPES[spec.shape]
    argv = [*megaquant, "train", "--megatron", str(tree), "--model", shape.model, "--dataset", "realtext"]
    argv += ["--data-root", str(data_root), "--training-config", BASE_PRESET, "-q", spec.mode]
    argv += ["--recipe", spec.recipe, "--run-dir", str(run_dir), "--master-port", str(port), "--no-validate"]
    argv += ["--steps", str(spec.length())]  # --steps follows the global batch given after `--`
    if shape.validation_seed is not None:
        argv += ["--validation-seed", str(shape.validation_seed)]
    return argv + ["--", *extra_args(spec, cache=cache)]


_FA_ONLY = ("FA_", "qk_", "pv_")


def graphed(spec: RunSpec) -> bool:
    """Whether `megaquant train --cuda-graphs auto` runs this cell under the full-iteration CUDA graph: the
    launcher's own decision (megaquant.launch.graphs), for megaquant's entry on one GPU."""
    from megaquant.launch.graphs import decide_graphs
    from megaquant.recipes import get_recipe

    decision = decide_graphs(
        "auto",
        recipe=get_recipe(spec.recipe),
        own_entry=True,
        training_root=None,
        moe=SHAPES[spec.shape].model == "deepseek2_lite",
        world_size=1,
        pipeline=1,
    )
    return decision.enabled


def cost_factor(spec: RunSpec) -> float:
    """Assumed step time of a mode relative to bf16 (planning only). Cells under the full-iteration CUDA graph
    (`graphed`) cost about what bf16 does: 1.02x (FA_linear_mxfp8) and 1.04x (+ hifp8_scaled) measured at
    the 8B cut (benchmarks.md §6d), 1.05-1.09x at the 1B single-gpu shape (§6c). The step-state recipes
    under the graph cost more than session 9 predicted (1.15-1.25x): at the 1B shape nvfp4_paper 239.5 ms
    against bf16's 153.0 ms per step (1.57x; docs/results/runs/1b, steps 400-1000 of its s1234 run, alone
    on the GPU by then), mxfp4_tseng 1.25x with the session-17 transform and pre-scale kernels (1B
    s1236, session 18: 193.1 ms against bf16's 154.2; 2.40x before them); sr_gradients not measured,
    assumed 1.25x; hifp8_delayed graphed (since session 19) 1.52x at the 8B cut (386.7 ms, session 19).
    Eager cells of a graphed shape (none since session 19; `--cuda-graphs off`): 3.7x (mxfp4_tseng) and
    2.7x (nvfp4_paper) at the 8B cut when they ran eager while sharing the GPU (§6d), assumed 3x.
    DeepSeek's MoE runs eager in every mode, bf16 too: 1.7x for quantized modes (§7, host-bound), 1.9x
    tensor-scaled HiF8, 2.5x the SR / RHT recipes, 4.5x delayed-scaled HiF8 (session 15: estimated at
    2.5x it ran ~1.8x past its estimate)."""
    if spec.mode == "bf16":
        return 1.0
    step_state = spec.recipe in ("sr_gradients", "mxfp4_tseng", "nvfp4_paper", "hifp8_delayed")
    attention_only = spec.mode.startswith(_FA_ONLY) and not spec.mode.startswith("FA_linear")
    if SHAPES[spec.shape].model == "deepseek2_lite":  # eager: dropless MoE cannot be captured
        factor = 1.1 if attention_only else 1.7
        if spec.recipe in ("hifp8_scaled", "hifp8_delayed"):
            factor = max(factor, 1.9)
        if spec.recipe == "hifp8_delayed":
            return 4.5
        return 2.5 if step_state else factor
    if not graphed(spec):
        return 3.0
    graphed_recipe = {
        "mxfp4_tseng": 1.25,
        "nvfp4_paper": 1.6,
        "sr_gradients": 1.25,
        "hifp8_scaled": 1.1,
        "hifp8_delayed": 1.5,
    }
    return graphed_recipe.get(spec.recipe, 1.05)


def may_share(spec: RunSpec, active: Sequence[RunSpec]) -> bool:
    """Whether `spec` may start beside the `active` runs: always alone; beside others only if it or all of
    them run eager. Two graphed runs at once gained only 1.10x throughput on the H200 (benchmarks.md §6d)
    and each one's step time would no longer be clean; an eager, host-bound run leaves the GPU idle between
    its launches, which another run can use."""
    return not active or not graphed(spec) or not any(graphed(a) for a in active)


def estimate_s(spec: RunSpec, measured: dict[str, float]) -> float:
    """Wall seconds of one run on its own: the shape's start-up plus its steps at the slowest measured
    seconds-per-step of its shape in this batch (`per_step_s`), else at the shape's assumed step time."""
    shape = SHAPES[spec.shape]
    step_s = measured.get(spec.shape, shape.step_s)
    return shape.startup_s + step_s * cost_factor(spec) * spec.length()


def per_step_s(spec: RunSpec, wall_s: float, others_at_start: int) -> float:
    """A finished run's bf16-equivalent seconds per step, as `estimate_s` uses it: its wall as if alone (a
    run that started beside others counts as its wall over start_estimate's sharing factor, or the
    slow-down would be counted twice), less the shape's start-up (the fixed part: start-up and the
    evaluations; at least half the wall stays, so a start-up assumed too long cannot make steps free),
    over its steps and its cost factor. Session 16: dividing start-up and all by the cost factor put a
    short run's fixed part into every step of the slower cells, and a run that fitted was not started."""
    alone = wall_s / (1 + SHARE_PENALTY * others_at_start)
    stepping = max(alone - SHAPES[spec.shape].startup_s, alone / 2)
    return stepping / spec.length() / cost_factor(spec)


SHARE_PENALTY = 0.3
"""Assumed slow-down of a run per other run on the GPU (planning only; unmeasured): a run that starts next
to others must fit with that margin, so a long run is not started where sharing would make it overrun."""


def start_estimate(spec: RunSpec, measured: dict[str, float], running: int) -> float:
    """The estimate a run must fit with when `running` other runs share the GPU."""
    return estimate_s(spec, measured) * (1 + SHARE_PENALTY * running)


def shape_failing(shape: str, failed: dict[str, list[str]], measured: dict[str, float]) -> bool:
    """Whether runs of `shape` should wait: one failed on its own and none of the shape has succeeded in
    this batch yet. A shape's first failure is usually its set-up (an argument, the data, memory), which
    every run of it would repeat, burning device time; once a run of the shape succeeds, a failure is the
    mode's own and the others go on. Runs of other shapes are not held up."""
    return bool(failed.get(shape)) and shape not in measured


def can_start(now: float, alone_s: float, active: Sequence[tuple[float, float]], budget_s: float) -> bool:
    """Whether a run estimated `alone_s` seconds on its own may start at `now` next to `active` runs, given as
    (start, estimate on their own): it must end inside the budget slowed by the others, and so must every
    active run slowed by one more (conservative: as if shared from its start)."""
    sharing = 1 + SHARE_PENALTY * len(active)
    return now + alone_s * sharing <= budget_s and all(s + e * sharing <= budget_s for s, e in active)


def plan_table(batch: Sequence[RunSpec], concurrency: int = 1) -> str:
    lines = [
        "| run | shape | mode | recipe | seed | steps | tokens | assumed wall |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    total = 0.0
    for spec in batch:
        shape = SHAPES[spec.shape]
        wall = estimate_s(spec, {})
        total += wall
        tokens = spec.length() * shape.global_batch * shape.seq
        lines.append(
            f"| {spec.name} | {spec.shape} | {spec.mode} | {spec.recipe} | {spec.seed} | {spec.length()} | "
            f"{tokens / 1e6:.1f} M | {wall / 60:.1f} min |"
        )
    lines.append(
        f"\n{len(batch)} runs, {total / 60:.0f} min one at a time; with {concurrency} at once at best "
        f"{total / 60 / concurrency:.0f} min (less where the GPU, not the host, bounds the step)"
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- collecting a run's small files

SMALL_FILES = ("manifest.json", "metrics.jsonl")
"""Kept whole; train.log only where no metrics.jsonl was written (then it holds the only loss curve)."""


def small_files(run_dir: Path, record: dict[str, object]) -> dict[str, bytes]:
    """The files of a run that go into the results store (name -> content)."""
    out: dict[str, bytes] = {}
    for name in SMALL_FILES:
        if (run_dir / name).is_file():
            out[name] = (run_dir / name).read_bytes()
    for path in sorted(run_dir.glob("path_counts.rank*.json")):
        out[path.name] = path.read_bytes()
    log = run_dir / "train.log"
    if log.is_file():
        text = log.read_text(encoding="utf-8", errors="replace")
        points = parse_validation(text)
        out["validation.jsonl"] = "".join(json.dumps(p.as_json()) + "\n" for p in points).encode()
        out["train_tail.log"] = "".join(text.splitlines(keepends=True)[-TAIL_LINES:]).encode()
        out["timing.log"] = timing_lines(text).encode()
        if "metrics.jsonl" not in out:  # a fork tree's pretrain_gpt.py: the log is the only curve
            out["train.log"] = text.encode()
    out["results_run.json"] = (json.dumps(record, indent=1) + "\n").encode()
    return out


_TIMING_MARKS = ("datetime:", "time to initialize", "time across ranks", "CUDA graph capture")
FIRST_ITERATIONS = 5


def timing_lines(log: str) -> str:
    """Where a run's wall time went besides its steps: Megatron's timestamps ("[after model, optimizer, ...]
    datetime: ...", time to initialize), its timer reports with their indented rows (set-up, evaluate), the
    graph's capture, and the first iterations' time-stamped lines (the start of training)."""
    keep: list[str] = []
    timers = iterations = 0
    for line in log.splitlines(keepends=True):
        if timers and line.startswith(("    ", "\t")):  # a timer report's rows
            keep.append(line)
            continue
        timers = 0
        if "time across ranks" in line:
            timers = 1
        if any(mark in line for mark in _TIMING_MARKS):
            keep.append(line)
        elif "] iteration " in line and iterations < FIRST_ITERATIONS:
            iterations += 1
            keep.append(line)
    return "".join(keep)


_STAMP = re.compile(r"^\[(?P<mark>[^\]]+)\] datetime: (?P<when>\S+ \S+)")
PHASES = ("before Megatron's setup", "setup to the first step", "training and evaluations", "after training")


def phases(
    record: dict[str, object], timing: str, manifest: dict[str, object] | None = None
) -> dict[str, float] | None:
    """A run's wall time in four parts (seconds), from the driver's start / end times (results_run.json's
    started_utc, ended_utc; since session 18) and Megatron's own datetimes in timing.log (the machine's
    local time, UTC on the lent machines): before the earliest timestamp (the CLI and torchrun; before
    session 18's entry also the worker's imports), from there to the first training step (imports since
    then, initialize, model, data), training with its evaluations, and
    after "after training is done" (the final evaluation, exit, the CLI's record and restore). A run stored
    before session 18 has no driver times: the manifest's start / end (whole seconds, taken after the
    roles are set and after the restore) stand in. None where a time is missing."""
    try:
        if "started_utc" in record:
            start = datetime.datetime.fromisoformat(str(record["started_utc"]))
            end = datetime.datetime.fromisoformat(str(record["ended_utc"]))
        else:
            start = datetime.datetime.fromisoformat(str((manifest or {})["start"]))
            end = datetime.datetime.fromisoformat(str((manifest or {})["end"]))
    except (KeyError, ValueError):
        return None
    marks: dict[str, datetime.datetime] = {}
    for line in timing.splitlines():
        m = _STAMP.match(line.strip())
        if m:
            marks.setdefault(
                m["mark"], datetime.datetime.fromisoformat(m["when"]).replace(tzinfo=datetime.UTC)
            )
    # the earliest stamp: Megatron's first before session 18's entry, the worker's start since (Megatron
    # prints "[before library-setup]" after the others, with an earlier time)
    first = min(marks.values(), default=None)
    step = marks.get("before the start of training step")
    done = marks.get("after training is done")
    if first is None or step is None or done is None:
        return None
    parts = (first - start, step - first, done - step, end - done)
    return dict(zip(PHASES, (round(p.total_seconds(), 1) for p in parts), strict=True))


def phases_table(run_dirs: Sequence[Path]) -> str:
    """`phases` of every run directory that records them, as a markdown table (the `phases` command)."""
    lines = ["| run | wall (s) | " + " | ".join(f"{p} (s)" for p in PHASES) + " |"]
    lines.append("| --- | ---: |" + " ---: |" * len(PHASES))
    for d in run_dirs:
        try:
            record = json.loads((d / "results_run.json").read_text())
            timing = (d / "timing.log").read_text()
            manifest = (
                json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else None
            )
        except (OSError, ValueError):
            continue
        split = phases(record, timing, manifest)
        if split is not None:
            lines.append(
                f"| {d.name} | {record.get('wall_s')} | " + " | ".join(str(split[p]) for p in PHASES) + " |"
            )
    return "\n".join(lines) + "\n"


def write_tarball(path: Path, batch: str, runs: dict[str, dict[str, bytes]]) -> None:
    """All collected runs as <batch>/<run>/<file>, written atomically (the command may be killed)."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for run, files in sorted(runs.items()):
            for name, content in sorted(files.items()):
                info = tarfile.TarInfo(f"{batch}/{run}/{name}")
                info.size = len(content)
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(content))
    os.replace(tmp, path)


def unpack(tarball: Path, into: Path, *, replace: bool = False) -> list[Path]:
    """Extract a batch tarball into the store; refuses paths outside <batch>/<run>/<file> and, unless
    `replace`, a run directory that holds a succeeded run (one that failed is replaced: `--skip-done` runs
    it again). Returns the run directories written."""
    written: dict[Path, None] = {}
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        for member in members:
            parts = Path(member.name).parts
            if (
                len(parts) != 3
                or not member.isfile()
                or any(p in ("..", "") or p.startswith("/") for p in parts)
            ):
                raise SystemExit(f"{tarball}: unexpected member {member.name!r}; not a results_runs tarball")
        runs = {into / Path(m.name).parent for m in members}
        kept = sorted(r for r in runs if _succeeded(r / "manifest.json"))
        if kept and not replace:
            raise SystemExit(f"already in the store, succeeded: {', '.join(map(str, kept))} (pass --replace)")
        for run in runs:  # a failed or interrupted run that ran again is replaced without asking
            if run.exists():
                shutil.rmtree(run)
        for member in members:
            target = into / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
            written[target.parent] = None
    return list(written)


# ---------------------------------------------------------------- the run loop (GPU machine)


@dataclass
class Active:
    spec: RunSpec
    slot: int
    proc: subprocess.Popen[bytes]
    run_dir: Path
    start: float
    started_utc: str = ""
    """When the run's `megaquant train` started (UTC, ISO seconds): against timing.log's own datetimes it
    splits the wall time into what came before Megatron's setup, training, and what came after."""
    overlapped: set[str] = field(default_factory=set)
    others_at_start: int = 0
    successor: str | None = None
    """The run prestarted beside this one's last seconds (--prestart-s): it does not count as sharing
    while only its start-up overlaps this run's end."""
    successor_from_step: int | None = None
    """This run's first step that may have run beside the successor's start-up."""
    predecessor: Active | None = None
    """The run this one was prestarted beside, while that run still runs."""
    prestarted_beside: str = ""
    """That run's name, once it ended before this run's first step (recorded in results_run.json)."""


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _logged_steps(run_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (run_dir / "metrics.jsonl").read_bytes().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def trained(run_dir: Path, steps: int) -> bool:
    """Whether the run's metrics.jsonl has logged step `steps` (its last): it is then in its final
    evaluation or its exit, and interrupting it would throw a finished run away (session 15: DeepSeek's
    hifp8_delayed run was interrupted 7 s after its final validation)."""
    rows = _logged_steps(run_dir)
    return bool(rows) and int(rows[-1]["step"]) >= steps


POLL_S = 2.0
"""How often the driver looks at its runs."""

AFTER_TRAINING_S = 8.0
"""A run's wall time after its last step: the final evaluation, Megatron's exit, the CLI's record and
restore (7-9 s measured over the stored runs, docs/benchmarks.md §6k)."""


def remaining_s(run_dir: Path, steps: int) -> float:
    """How long a training run has left: its steps to go at its recent step time, plus AFTER_TRAINING_S;
    infinite before it has logged a step (its start-up and first steps say nothing yet)."""
    rows = _logged_steps(run_dir)
    times = [float(r["step_time_s"]) for r in rows[-5:] if isinstance(r.get("step_time_s"), (int, float))]
    if not rows or not times:
        return float("inf")
    return max(0, steps - int(rows[-1]["step"])) * statistics.median(times) + AFTER_TRAINING_S


def prestart_candidate(active: Sequence[Active], concurrency: int, prestart_s: float) -> Active | None:
    """With every slot busy, the running run whose end is within `prestart_s` (the next run's start-up,
    ~25 s of CPU work before it touches the GPU, then runs beside its last steps and exit); one such
    prestart at a time."""
    if prestart_s <= 0 or any(a.predecessor is not None for a in active):
        return None
    counting = [a for a in active if a.successor is None]
    if len(counting) < concurrency:
        return None
    ending = [(remaining_s(a.run_dir, a.spec.length()), a.spec.name, a) for a in counting]
    left, _, run = min(ending, default=(float("inf"), "", None))
    return run if run is not None and left <= prestart_s else None


def _slot_trees(tree: Path, work: Path, n: int) -> list[Path]:
    """Slot 0 trains `tree` itself; every further slot a copy of it (own .git, so its own lock)."""
    trees = [tree]
    for i in range(1, n):
        copy = work / "trees" / f"slot{i}"
        if not copy.exists():
            shutil.copytree(tree, copy, symlinks=True)
        trees.append(copy)
    return trees


def _interrupt(runs: Sequence[Active], wait_s: float = 60.0) -> None:
    interrupt([run.proc for run in runs], wait_s)


def run_batch(ns: argparse.Namespace, selected: Sequence[tuple[str, RunSpec]]) -> dict[str, dict[str, bytes]]:
    """Run the selected (batch, run) pairs; returns the collected small files by run name."""
    work: Path = ns.work
    prestart_s = float(getattr(ns, "prestart_s", 0.0) or 0.0)
    trees = _slot_trees(ns.tree, work, ns.concurrency + (1 if prestart_s > 0 else 0))
    batch_of = {spec.name: name for name, spec in selected}
    batches = list(dict.fromkeys(batch_of.values())) or _batch_names(ns.batch)
    collected: dict[str, dict[str, bytes]] = {}
    pending = [spec for _, spec in selected]
    active: list[Active] = []
    measured: dict[str, float] = {}  # shape -> the slowest finished run's per_step_s
    failed: dict[str, list[str]] = {}  # shape -> runs that exited non-zero on their own (not interrupted)
    stopped: set[str] = set()  # runs the driver interrupted at the budget
    granted: set[str] = set()  # runs past the budget given --finish-grace-s to finish
    t0 = time.monotonic()
    log = (ns.out / f"{'_'.join(batches)}.driver.log").open("a")  # no '+': the lent machine refuses it

    def say(text: str) -> None:
        line = f"[{time.monotonic() - t0:6.0f} s] {text}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(
        f"batch {'+'.join(batches)}: {len(pending)} runs, concurrency {ns.concurrency}, "
        f"budget {ns.budget_s:.0f} s"
    )
    while pending or active:
        now = time.monotonic() - t0
        free = sorted(set(range(len(trees))) - {a.slot for a in active})
        while free and pending:
            counting = [a for a in active if a.successor is None]
            ending = (
                None
                if len(counting) < ns.concurrency
                else prestart_candidate(active, ns.concurrency, prestart_s)
            )
            if len(counting) >= ns.concurrency and ending is None:
                break
            running = len(active)
            beside = [a for a in active if a is not ending]
            others = [(a.start - t0, estimate_s(a.spec, measured)) for a in beside]
            spec = next(
                (
                    s
                    for s in pending
                    if not shape_failing(s.shape, failed, measured)
                    and (ns.share_any or may_share(s, [a.spec for a in beside]))
                    and can_start(now, estimate_s(s, measured), others, ns.budget_s)
                ),
                None,
            )
            if spec is None:
                break
            pending.remove(spec)
            slot = free.pop(0)
            run_dir = work / "runs" / batch_of[spec.name] / spec.name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            argv = train_argv(
                spec,
                megaquant=ns.megaquant,
                tree=trees[slot],
                data_root=ns.data_root,
                run_dir=run_dir,
                port=PORT_BASE + 10 * slot,
                cache=work / "cache" / f"slot{slot}",
            )
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            with (work / "runs" / batch_of[spec.name] / f"{spec.name}.out").open("w") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            new = Active(spec, slot, proc, run_dir, time.monotonic(), _utc_now(), others_at_start=len(beside))
            for other in beside:
                other.overlapped.add(spec.name)
                new.overlapped.add(other.spec.name)
            if ending is not None:
                ending.successor = spec.name
                logged = _logged_steps(ending.run_dir)
                ending.successor_from_step = int(logged[-1]["step"]) + 1 if logged else 1
                new.predecessor = ending
                left = remaining_s(ending.run_dir, ending.spec.length())
                say(f"prestart {spec.name} beside the last {left:.0f} s of {ending.spec.name}")
            active.append(new)
            say(
                f"start {spec.name} (slot {slot}, estimate {start_estimate(spec, measured, running):.0f} s): "
                + shlex.join(argv)
            )
        if not active:
            failing = [s for s in pending if shape_failing(s.shape, failed, measured)]
            if failing:
                shapes = dict.fromkeys(s.shape for s in failing)
                why = "; ".join(f"{shape}: {', '.join(failed[shape])} failed" for shape in shapes)
                names = ", ".join(s.name for s in failing)
                say(f"not starting {names}: no run of their shape succeeded ({why})")
            rest = [s for s in pending if s not in failing]
            if rest:
                say(f"budget: {now:.0f} s spent; not starting {', '.join(s.name for s in rest)}")
            break
        time.sleep(POLL_S)
        elapsed = time.monotonic() - t0
        over = elapsed >= ns.budget_s
        if over:
            overrunning = [a for a in active if a.proc.poll() is None and a.spec.name not in stopped]
            # a run that has logged its last step is in its final evaluation or exit: let it finish
            grace = elapsed < ns.budget_s + ns.finish_grace_s
            finishing = [a for a in overrunning if grace and trained(a.run_dir, a.spec.length())]
            for a in finishing:
                if a.spec.name not in granted:
                    granted.add(a.spec.name)
                    say(f"budget reached: {a.spec.name} has trained its last step, letting it finish")
            cut = [a for a in overrunning if a not in finishing]
            if cut:
                say(f"budget reached: interrupting {', '.join(a.spec.name for a in cut)}")
                stopped.update(a.spec.name for a in cut)
                _interrupt(cut)
        for done in list(active):
            if done.proc.poll() is None:
                continue
            active.remove(done)
            wall = time.monotonic() - done.start
            code = done.proc.returncode
            follower = next((a for a in active if a.predecessor is done), None)
            prestart: dict[str, object] | None = None
            if follower is not None:
                follower.predecessor = None
                if _logged_steps(follower.run_dir):  # its steps ran beside this run: that is sharing
                    done.overlapped.add(follower.spec.name)
                    follower.overlapped.add(done.spec.name)
                    say(f"{follower.spec.name} began training before {done.spec.name} ended: both shared")
                else:
                    follower.prestarted_beside = done.spec.name
                    prestart = {"successor": follower.spec.name, "from_step": done.successor_from_step}
            record = {
                "batch": batch_of[done.spec.name],
                "run": done.spec.name,
                "shape": done.spec.shape,
                "shape_title": SHAPES[done.spec.shape].title,
                "seed": done.spec.seed,
                "steps": done.spec.length(),
                "slot": done.slot,
                "concurrency": ns.concurrency,
                "overlapped": sorted(done.overlapped),
                "wall_s": round(wall, 1),
                "started_utc": done.started_utc,
                "ended_utc": _utc_now(),
                "exit_code": code,
            }
            if prestart is not None:
                record["prestart"] = prestart  # the page's step time stops at prestart["from_step"]
            if done.prestarted_beside:
                record["prestarted_beside"] = done.prestarted_beside  # only its start-up overlapped
            if code == 0:
                per_step = per_step_s(done.spec, wall, done.others_at_start)
                measured[done.spec.shape] = max(per_step, measured.get(done.spec.shape, 0.0))
            elif done.spec.name not in stopped:
                failed.setdefault(done.spec.shape, []).append(done.spec.name)
            collected[done.spec.name] = small_files(done.run_dir, record)
            batch = batch_of[done.spec.name]
            mine = {run: files for run, files in collected.items() if batch_of[run] == batch}
            write_tarball(ns.out / f"{batch}.tar.gz", batch, mine)
            say(f"end {done.spec.name}: exit {code}, {wall:.0f} s")
        if over:
            if pending:
                say(f"budget reached; not started: {', '.join(s.name for s in pending)}")
            pending.clear()
    log.close()
    return collected


# ---------------------------------------------------------------- the data and the tree (docs/data.md)

REALTEXT_FILES: dict[str, str] = {
    "dataset/realtext_processed/realtext_processed_text_document.bin": (
        "857f15e2797ca0dc68a2c616f876593e0d9b525707f8743035a2ebc1e4c715a6"
    ),
    "dataset/realtext_processed/realtext_processed_text_document.idx": (
        "f883b92c83b31d034b6ff0e7f4ae9dc9bd8c5a419c7266df1efd1b11e01216aa"
    ),
    "tokenizers/realtext-bpe-32k/special_tokens_map.json": (
        "6f50ab5a5a509a1c309d6171f339b196a900dc9c99ad0408ff23bb615fdae7ad"
    ),
    "tokenizers/realtext-bpe-32k/tokenizer.json": (
        "e3e7b2b601cad0a17f342db2a0aeeacd93c7a7ddf9ec10c1b59e5eb05522cf39"
    ),
    "tokenizers/realtext-bpe-32k/tokenizer_config.json": (
        "6fbadfc23979ab6b2374714c01415f1150cc1f6f66ea46617025f0e3c46efa5a"
    ),
}
"""The prepared realtext corpus every results run trains on (Debian 12 packages of docs/data.md, prepared
once with `megaquant data prepare --dataset realtext`): data-root-relative path -> SHA-256."""


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_data(data_root: Path) -> list[str]:
    """What differs from REALTEXT_FILES under `data_root` (missing files, other contents); [] = the same."""
    problems = []
    for rel, expected in REALTEXT_FILES.items():
        path = data_root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif _sha256(path) != expected:
            problems.append(f"{path}: SHA-256 {_sha256(path)[:12]}..., expected {expected[:12]}...")
    return problems


def pack_data(data_root: Path, out: Path) -> None:
    """The prepared corpus as one .tar.xz to carry to the GPU machine (~18.5 MB instead of 46.5 MB)."""
    problems = check_data(data_root)
    if problems:
        raise SystemExit("not the corpus the results use:\n" + "\n".join(problems))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tar:
        for rel in REALTEXT_FILES:
            tar.add(data_root / rel, arcname=rel)


def setup(data: Path, work: Path, megaquant: Sequence[str]) -> None:
    """On the GPU machine, idempotent: WORK/data from the carried tarball (checked), WORK/megatron =
    `megaquant instrument --from-installed` (once)."""
    data_root = work / "data"
    if check_data(data_root):
        with tarfile.open(data) as tar:
            names = tar.getnames()
            if sorted(names) != sorted(REALTEXT_FILES):
                raise SystemExit(f"{data}: holds {names}, expected {sorted(REALTEXT_FILES)}")
            tar.extractall(data_root, filter="data")
        problems = check_data(data_root)
        if problems:
            raise SystemExit("\n".join(problems))
    tree = work / "megatron"
    if not (tree / "megatron" / "core").is_dir():
        subprocess.run([*megaquant, "instrument", "--from-installed", str(tree)], check=True)


def _succeeded(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text()).get("status") == "succeeded"
    except (OSError, ValueError):
        return False


def _batch_names(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in BATCHES]
    if unknown or not names:
        raise SystemExit(f"--batch: unknown {', '.join(unknown) or '(none)'}; known: {', '.join(BATCHES)}")
    return list(dict.fromkeys(names))


def _select(ns: argparse.Namespace) -> list[tuple[str, RunSpec]]:
    """The (batch, run) pairs to run, in the batches' order: --only's names, less --skip's, less the stored
    successes."""
    selected = [(name, spec) for name in _batch_names(ns.batch) for spec in BATCHES[name]]
    for option, keep in (("only", True), ("skip", False)):
        given = getattr(ns, option, "") or ""
        if not given:
            continue
        names = set(given.split(","))
        unknown = names - {s.name for _, s in selected}
        if unknown:
            raise SystemExit(f"--{option}: not in batch {ns.batch}: {', '.join(sorted(unknown))}")
        selected = [(b, s) for b, s in selected if (s.name in names) == keep]
    stores = list(ns.skip_done or [])
    if getattr(ns, "work", None) is not None:
        stores.append(ns.work / "runs")  # a warm machine keeps the runs of its previous call there
    done = {
        (b, p.parent.name)
        for b in _batch_names(ns.batch)
        for st in stores
        for p in (st / b).glob("*/manifest.json")
        if _succeeded(p)
    }
    return [(b, s) for b, s in selected if (b, s.name) not in done]


def _megaquant(words: str | None) -> list[str]:
    """The CLI as an argv prefix: the given words, else `megaquant` on PATH, else `python -m megaquant`."""
    if words is not None:
        return shlex.split(words)
    found = shutil.which("megaquant")
    return [found] if found else [sys.executable, "-m", "megaquant"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print a batch's runs and assumed times")
    run = sub.add_parser("run", help="run a batch (GPU machine)")
    for p in (plan, run):
        p.add_argument(
            "--batch", default="calib", help=f"one of {', '.join(BATCHES)}, or several, comma-separated"
        )
        p.add_argument("--only", default="", help="run names, comma-separated")
        p.add_argument("--skip", default="", help="run names to leave out, comma-separated")
        p.add_argument(
            "--skip-done",
            type=Path,
            action="append",
            help="a results store: leave out its succeeded runs (repeatable; `run` also leaves out those "
            "already in --work, from an earlier call on the same machine)",
        )
        p.add_argument("--concurrency", type=int, default=1, help="runs at once on the GPU")
    run.add_argument("--tree", type=Path, required=True, help="instrumented Megatron tree (slot 0)")
    run.add_argument("--data-root", type=Path, required=True, help="holds the prepared realtext dataset")
    run.add_argument("--work", type=Path, required=True, help="run dirs, slot trees, index caches")
    run.add_argument("--out", type=Path, required=True, help="the batch tarball and driver log")
    run.add_argument("--budget-s", type=float, default=540.0, help="start nothing that would end later")
    run.add_argument(
        "--finish-grace-s",
        type=float,
        default=30.0,
        help="at the budget, a run that has logged its last step gets this long to finish its final "
        "evaluation and exit before it is interrupted (keep budget + grace + set-up under the machine's "
        "per-call limit)",
    )
    run.add_argument(
        "--prestart-s",
        type=float,
        default=0.0,
        help="start the next run this many seconds before a running run is predicted to end, in a spare "
        "slot, so its ~25 s of start-up overlaps the other's last steps and exit (0: off). The ending "
        "run's step time then stops where the overlap began; if the new run trains a step before the "
        "other ends, both count as sharing the GPU",
    )
    run.add_argument(
        "--share-any",
        action="store_true",
        help="with --concurrency > 1, let graphed runs share the GPU with each other too (default: a run "
        "shares the GPU only if it or every run already going is eager)",
    )
    run.add_argument("--megaquant", default=None, help="the CLI as words (default: megaquant on PATH)")
    pack = sub.add_parser("pack-data", help="the prepared realtext corpus as one .tar.xz (here)")
    pack.add_argument("--data-root", type=Path, required=True)
    pack.add_argument("--out", type=Path, required=True)
    setup_p = sub.add_parser("setup", help="data + instrumented tree under WORK (GPU machine)")
    setup_p.add_argument("--data", type=Path, required=True, help="the pack-data tarball")
    setup_p.add_argument("--work", type=Path, required=True)
    unpack_p = sub.add_parser("unpack", help="a batch tarball into the results store")
    unpack_p.add_argument("tarball", type=Path)
    unpack_p.add_argument(
        "--into", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/runs"
    )
    unpack_p.add_argument("--replace", action="store_true")
    phases_p = sub.add_parser("phases", help="where stored runs' wall time went (start-up, training, exit)")
    phases_p.add_argument("run_dirs", type=Path, nargs="+", help="run directories, or a family's directory")
    ns = parser.parse_args(argv)
    if ns.command == "phases":
        dirs = [
            c
            for d in ns.run_dirs
            for c in ([d] if (d / "results_run.json").exists() else sorted(d.iterdir()))
        ]
        print(phases_table(dirs), end="")
        return 0
    if ns.command == "pack-data":
        pack_data(ns.data_root, ns.out)
        print(f"wrote {ns.out}")
        return 0
    if ns.command == "setup":
        setup(ns.data, ns.work.resolve(), _megaquant(None))
        print(f"ready: {ns.work / 'megatron'}, {ns.work / 'data'}")
        return 0
    if ns.command == "unpack":
        for path in unpack(ns.tarball, ns.into, replace=ns.replace):
            print(f"wrote {path}")
        return 0
    selected = _select(ns)
    if ns.command == "plan":
        print(plan_table([spec for _, spec in selected], ns.concurrency), end="")
        return 0
    ns.megaquant = _megaquant(ns.megaquant)
    for name in ("tree", "data_root", "work", "out"):
        setattr(ns, name, getattr(ns, name).resolve())
    ns.out.mkdir(parents=True, exist_ok=True)
    collected = run_batch(ns, selected)
    ok = sum(1 for files in collected.values() if b'"status": "succeeded"' in files.get("manifest.json", b""))
    tarballs = ", ".join(str(ns.out / f"{b}.tar.gz") for b in dict.fromkeys(b for b, _ in selected))
    print(f"{ok} of {len(selected)} runs succeeded; {tarballs or 'nothing to run'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
