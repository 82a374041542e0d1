"""Rebuild the real-text results of docs/results from the stored run directories, one command:

    python benchmarks/results_page.py                 # docs/results/runs -> docs/results/README.md + PNGs
    python benchmarks/results_page.py --check         # exit 1 if README.md is not what the runs give

Reads every run directory under the store (`<batch>/<run>/`, as `results_runs.py unpack` writes them) whose
manifest.json trained on the `realtext` dataset; the smoke runs (sample corpus, byte tokens) are left to
smoke.md. Runs are grouped into families by their shape (model, layers, sequence, global batch, steps: the
manifest's Megatron arguments) and into cells by (mode, recipe); the seeds of a cell give its band.

Definitions (the page states them too):
- final training loss: `megaquant.report.final_loss`, the mean of the last 10 logged steps;
- final validation loss: Megatron's evaluation after training (`validation loss at iteration N on
  validation set`), else its last in-loop evaluation;
- gap: paired by seed. A seed fixes the initial weights, the order of the training data and the validation
  samples Megatron draws, so a cell's seed s is compared with bf16's seed s: gap = the mean over the seeds
  both have of (cell's loss - bf16's loss), shown with the min and max of those per-seed gaps and how many
  seeds agree in sign. bf16's own row gives its seed-to-seed spread (each seed minus the mean of its
  seeds), the scale of the noise between unpaired runs;
- step time: `megaquant.report.step_time` (median after warm-up) per run, the median over the cell's runs
  that had the GPU to themselves (results_run.json `overlapped` empty), else over all its runs, marked
  "shared"; peak memory the largest `peak_mem_bytes` (another run on the GPU does not change it). Times
  compare on one card only: a family's card is its bf16 runs' (the manifest's `gpus`; the lent H200 for
  runs stored before manifests named it), a cell's time comes from its runs on that card, and a cell with
  none shows its own card's time, named, with no ratio to bf16.

Everything between `<!-- results:begin -->` and `<!-- results:end -->` in the page is generated; the rest is
written by hand. Figures are PNGs next to the page (matplotlib, the `plot` extra).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaquant.launch.modes import MODES
from megaquant.recipes import RECIPES
from megaquant.report import ReportError, Run, final_loss, load_run, plot_style, run_setup, step_time

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
DATASET = "realtext"
BASELINE = ("bf16", "default")
CALIBRATION = frozenset({"calib", "calib-recipes"})
"""Batches of short runs, one at a time, for step times: a table of their own, not families with gaps."""
ROOT = Path(__file__).resolve().parents[1]

_VALIDATION = re.compile(
    r"validation loss at iteration\s+(\d+)( on validation set)?\s*\|"
    r"\s*lm loss value:\s*([0-9.eE+-]+|nan|inf)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ValPoint:
    """One Megatron evaluation: the iteration, the validation lm loss, and whether it is the final one."""

    step: int
    loss: float
    final: bool = False

    def as_json(self) -> dict[str, object]:
        return {"step": self.step, "loss": self.loss, "final": self.final}


def parse_validation(text: str) -> list[ValPoint]:
    """Megatron's `validation loss at iteration N [on validation set] | lm loss value: X` lines."""
    return [
        ValPoint(int(m.group(1)), float(m.group(3)), m.group(2) is not None)
        for m in map(_VALIDATION.search, text.splitlines())
        if m is not None
    ]


def final_validation(points: Sequence[ValPoint]) -> float | None:
    """The evaluation after training if there is one, else the last in-loop one; None: no evaluation."""
    finals = [p for p in points if p.final]
    chosen = finals[-1] if finals else (points[-1] if points else None)
    return None if chosen is None else chosen.loss


GPU_BEFORE_RECORDING = "NVIDIA H200"
"""The card of the runs stored before manifests named it (sessions 13–21): each of their calls ran on the
one lent NVIDIA H200 (docs/benchmarks.md §6h–§6l)."""


@dataclass(frozen=True)
class StoredRun:
    name: str
    run: Run
    family: str
    mode: str
    recipe: str
    seed: int | None
    validation: tuple[ValPoint, ...]
    path_counts: dict[str, Any] | None
    record: dict[str, Any]
    attention_core: tuple[str, ...]
    commit: str | None
    batch: str = ""
    cuda_graph: bool | None = None
    """Whether the run trained under Megatron's full-iteration CUDA graph (manifest `cuda_graphs`)."""
    megaquant_source: str | None = None
    """Which megaquant code trained the run (the manifest environment's `megaquant_source`, a digest of
    megaquant's files: megaquant.launch.run); None for runs recorded before session 18."""
    gpus: tuple[str, ...] | None = None
    """The host's GPUs as the manifest environment's `gpus` names them (since session 22); None before."""

    @property
    def gpu(self) -> str:
        """The card the run trained on: the first the manifest names (these are one-GPU runs), else the
        lent H200 that every run recorded before the manifest had the field trained on."""
        return self.gpus[0] if self.gpus else GPU_BEFORE_RECORDING

    @property
    def train_final(self) -> float:
        return final_loss(self.run.losses)

    @property
    def val_final(self) -> float | None:
        return final_validation(self.validation)

    @property
    def shared_gpu(self) -> bool:
        return bool(self.record.get("overlapped"))

    @property
    def step_time_s(self) -> float | None:
        """The run's step time (megaquant.report.step_time) over the steps it ran alone: a run the driver
        prestarted the next one beside (results_runs.py --prestart-s) stops at the step where that began."""
        times = self.run.step_times_s
        prestart = self.record.get("prestart")
        if isinstance(prestart, dict) and isinstance(prestart.get("from_step"), int):
            times = [t for s, t in zip(self.run.steps, times, strict=False) if s < prestart["from_step"]]
        return step_time(times)


def _last_flag(args: Sequence[str], flag: str) -> str | None:
    value = None
    for i, word in enumerate(args):
        name, eq, inline = word.partition("=")
        if name == flag:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def family_of(manifest: dict[str, Any], steps: int) -> str:
    """A family's name: model, depth, sequence, sequences per step, steps and, when Megatron evaluated the
    whole validation split (`--full-validation`) or a fixed validation shuffle (`validation_seed`), that:
    from the run's own record."""
    setup = run_setup(manifest)

    def number(key: str) -> str:
        value = setup.get(key, "?")
        try:
            return str(int(float(value)))
        except ValueError:
            return value

    args = [str(a) for a in manifest.get("megatron_args") or []]
    full = ", full validation" if "--full-validation" in args else ""
    if manifest.get("validation_seed") is not None:
        full += f", validation seed {manifest['validation_seed']}"
    return (
        f"{manifest.get('model', '?')}, {number('layers')} layers, seq {number('seq_len')}, "
        f"{number('global_batch')} seq/step, {steps} steps{full}"
    )


def _gpus(value: object) -> tuple[str, ...] | None:
    return tuple(str(v) for v in value) if isinstance(value, list) and value else None


def load_store(root: Path) -> tuple[list[StoredRun], list[str]]:
    """Every realtext run under `root` (any depth), and notes on the run directories left out and why."""
    runs: list[StoredRun] = []
    notes: list[str] = []
    for manifest_path in sorted(root.rglob("manifest.json")):
        path = manifest_path.parent
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            notes.append(f"{path}: manifest.json is not JSON ({exc.msg})")
            continue
        if manifest.get("dataset") != DATASET:
            continue
        name = path.relative_to(root).as_posix()
        if manifest.get("status") != "succeeded":
            notes.append(f"{name}: {manifest.get('status')} (exit {manifest.get('exit_code')}); left out")
            continue
        try:
            run = load_run(path)
        except ReportError as exc:
            notes.append(f"{name}: {exc}; left out")
            continue
        if not run.losses:
            notes.append(f"{name}: no steps logged; left out")
            continue
        if (path / "validation.jsonl").is_file():
            raw = [json.loads(line) for line in (path / "validation.jsonl").read_text().splitlines() if line]
            validation = tuple(ValPoint(int(r["step"]), float(r["loss"]), bool(r.get("final"))) for r in raw)
        elif (path / "train.log").is_file():
            validation = tuple(parse_validation((path / "train.log").read_text(errors="replace")))
        else:
            validation = ()
        record_path = path / "results_run.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        args = [str(a) for a in manifest.get("megatron_args") or []]
        seed = _last_flag(args, "--seed")
        runs.append(
            StoredRun(
                name=name,
                run=run,
                family=family_of(manifest, run.steps[-1]),
                mode=run.mode,
                recipe=run.recipe,
                seed=None if seed is None else int(seed),
                validation=validation,
                path_counts=manifest.get("path_counts"),
                record=record,
                attention_core=tuple(str(c) for c in manifest.get("attention_core") or ()),
                commit=manifest.get("commit"),
                batch=str(record.get("batch") or Path(name).parts[0]),
                cuda_graph=(manifest.get("cuda_graphs") or {}).get("enabled"),
                megaquant_source=(manifest.get("environment") or {}).get("megaquant_source"),
                gpus=_gpus((manifest.get("environment") or {}).get("gpus")),
            )
        )
    return runs, notes


@dataclass(frozen=True)
class Band:
    """A cell's final losses over seeds against bf16: `mean` the cell's mean loss, `gap` the mean paired gap,
    `low`/`high` the smallest and largest per-seed gap, `seeds` how many seeds the gap pairs, `agree` how
    many of them have the gap's sign. For bf16 itself: gap 0 and its seeds' spread around their mean."""

    mean: float
    gap: float
    low: float
    high: float
    seeds: int = 0
    agree: int = 0

    def overlaps(self, other: Band) -> bool:
        return self.low <= other.high and other.low <= self.high


def band(values: Sequence[float], baseline_mean: float) -> Band:
    """bf16's own band: its seeds around their mean (`baseline_mean`)."""
    if not values:
        raise ValueError("a band needs at least one seed")
    mean = statistics.fmean(values)
    return Band(
        mean, mean - baseline_mean, min(values) - baseline_mean, max(values) - baseline_mean, len(values)
    )


def paired_band(values: dict[int | None, float], baseline: dict[int | None, float]) -> Band | None:
    """The gap of a cell against bf16 seed by seed (the seeds both have); None: no seed in common."""
    common = [s for s in values if s is not None and s in baseline]
    if not values or not common:
        return None
    gaps = [values[s] - baseline[s] for s in common]
    gap = statistics.fmean(gaps)
    agree = sum(1 for g in gaps if (g > 0) == (gap > 0) and g != 0)
    return Band(statistics.fmean(values.values()), gap, min(gaps), max(gaps), len(gaps), agree)


@dataclass(frozen=True)
class Cell:
    family: str
    mode: str
    recipe: str
    runs: tuple[StoredRun, ...]
    val: Band | None
    """None: some seed has no validation loss, or the family has no bf16 run with one."""
    train: Band | None
    step_time_s: float | None
    peak_mem_bytes: int | None
    time_shared: bool = False
    """step_time_s comes from runs that shared the GPU (the cell has no run that had it alone)."""
    time_gpu: str | None = None
    """The card step_time_s was measured on, where it is not the family's (its bf16 runs' card): the cell
    has no run on that one. None: the family's card."""

    @property
    def seeds(self) -> tuple[int | None, ...]:
        return tuple(r.seed for r in self.runs)


def _cell_order(key: tuple[str, str]) -> tuple[int, int, int, str, str]:
    """bf16 first, then the mode registry's order (FA, linear, FA_linear; mxfp8, mxfp4, hifp8, nvfp4), then
    the recipe registry's; names neither knows last, by name."""
    modes, recipes = list(MODES), list(RECIPES)
    mode, recipe = key
    return (
        key != BASELINE,
        modes.index(mode) if mode in modes else len(modes),
        recipes.index(recipe) if recipe in recipes else len(recipes),
        mode,
        recipe,
    )


def cells(runs: Sequence[StoredRun]) -> dict[str, list[Cell]]:
    """family -> cells in `_cell_order`; bands against the family's bf16."""
    families: dict[str, dict[tuple[str, str], list[StoredRun]]] = {}
    for r in runs:
        families.setdefault(r.family, {}).setdefault((r.mode, r.recipe), []).append(r)
    out: dict[str, list[Cell]] = {}
    for family, groups in families.items():
        base = groups.get(BASELINE, [])
        cards = collections.Counter(r.gpu for r in (base or [r for g in groups.values() for r in g]))
        family_gpu = cards.most_common(1)[0][0]
        base_val = {r.seed: r.val_final for r in base}
        base_train = {r.seed: r.train_final for r in base}
        keys = sorted(groups, key=_cell_order)
        built = []
        for key in keys:
            members = tuple(sorted(groups[key], key=lambda r: (r.seed is None, r.seed or 0, r.name)))
            vals = {r.seed: r.val_final for r in members}
            trains = {r.seed: r.train_final for r in members}
            # step times compare only on one card: a cell's time comes from its runs on the family's card,
            # and only where it has none from another card's runs (then named, and no ratio)
            on_card = [r for r in members if r.gpu == family_gpu]
            time_gpu = None if on_card else members[0].gpu
            candidates = on_card or [r for r in members if r.gpu == time_gpu]
            alone = [r for r in candidates if not r.shared_gpu]
            timed = alone or candidates
            times = [t for t in (r.step_time_s for r in timed) if t is not None]
            peaks = [r.run.peak_mem_bytes for r in members if r.run.peak_mem_bytes is not None]
            if key == BASELINE:
                known = [v for v in vals.values() if v is not None]
                val = None if None in vals.values() else band(known, statistics.fmean(known))
                train = band(list(trains.values()), statistics.fmean(trains.values()))
            else:
                val = (
                    None
                    if None in vals.values() or None in base_val.values()
                    else paired_band(
                        {s: v for s, v in vals.items() if v is not None},
                        {s: v for s, v in base_val.items() if v is not None},
                    )
                )
                train = paired_band(trains, base_train)
            built.append(
                Cell(
                    family=family,
                    mode=key[0],
                    recipe=key[1],
                    runs=members,
                    val=val,
                    train=train,
                    step_time_s=statistics.median(times) if times else None,
                    peak_mem_bytes=max(peaks) if peaks else None,
                    time_shared=not alone,
                    time_gpu=time_gpu,
                )
            )
        out[family] = built
    return out


# ---------------------------------------------------------------- markdown


def _f(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None or math.isnan(value) else format(value, spec) + suffix


def _band_text(b: Band | None) -> str:
    return "—" if b is None else f"{b.gap:+.4f} [{b.low:+.4f}, {b.high:+.4f}]"


def _agree_text(b: Band | None, baseline: bool) -> str:
    if b is None:
        return "—"
    if baseline:
        return f"(spread of {b.seeds} seeds)"
    if b.seeds < 2:
        return f"{b.seeds} seed"
    return f"{b.agree} of {b.seeds}"


def _slug(family: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", family.lower()).strip("-")


def _paths_per_step(counts: dict[str, Any] | None) -> str:
    if not counts:
        return "—"
    steps = max(1, int(counts.get("steps") or 1))
    totals = {"triton": 0, "reference": 0, "plain": 0}
    for paths in (counts.get("gemms") or {}).values():
        for path, n in paths.items():
            totals[path] = totals.get(path, 0) + int(n)
    fallbacks = len(counts.get("fallbacks") or [])
    text = " / ".join(f"{totals[p] / steps:.0f}" for p in ("triton", "reference", "plain"))
    return f"{text} ({fallbacks} fallback shapes)" if fallbacks else text


def family_section(family: str, family_cells: Sequence[Cell], figures: dict[str, str]) -> str:
    base = next((c for c in family_cells if (c.mode, c.recipe) == BASELINE), None)
    lines = [f"### {family}", ""]
    titles = sorted(
        {str(r.record["shape_title"]) for c in family_cells for r in c.runs if r.record.get("shape_title")}
    )
    lines += [f"{title} (`results_runs.py`).\n" for title in titles]
    for label, file in figures.items():
        lines += [f"![{label}]({file})", ""]
    lines += [
        "| mode | recipe | seeds | final val loss | val gap vs bf16, paired by seed [min, max] "
        "| seeds with the gap's sign | final train loss | train gap, paired [min, max] |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for c in family_cells:
        is_base = (c.mode, c.recipe) == BASELINE
        lines.append(
            f"| {c.mode} | {c.recipe} | {len(c.runs)} | {_f(c.val.mean if c.val else None, '.4f')} | "
            f"{_band_text(c.val)} | {_agree_text(c.val, is_base)} | "
            f"{_f(c.train.mean if c.train else None, '.4f')} | {_band_text(c.train)} |"
        )
    base_time = base.step_time_s if base else None
    base_mem = base.peak_mem_bytes if base else None
    lines += [
        "",
        "| mode | recipe | step time (ms) | vs bf16 | peak memory (GiB) | vs bf16 "
        "| GPU shared with other runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in family_cells:
        # a ratio only between times of runs that had the GPU alone: a shared run's step is slowed by the
        # others by an amount nobody measured, so a ratio with one would be an invented number
        clean = base is not None and not base.time_shared and not c.time_shared and c.time_gpu is None
        t_ratio = c.step_time_s / base_time if clean and c.step_time_s and base_time else None
        m_ratio = c.peak_mem_bytes / base_mem if c.peak_mem_bytes and base_mem else None
        shared = sum(r.shared_gpu for r in c.runs)
        ms = None if c.step_time_s is None else c.step_time_s * 1e3
        gib = None if c.peak_mem_bytes is None else c.peak_mem_bytes / 2**30
        mark = (" (shared)" if c.time_shared and ms else "") + (
            f" (on {c.time_gpu})" if c.time_gpu and ms else ""
        )
        lines.append(
            f"| {c.mode} | {c.recipe} | {_f(ms, '.1f')}{mark} | {_f(t_ratio, '.2f', '×')} | "
            f"{_f(gib, '.2f')} | {_f(m_ratio, '.2f', '×')} | {shared} of {len(c.runs)} |"
        )
    lines += [
        "",
        "| run | seed | steps | final train loss | final val loss | step time (ms) "
        "| GEMMs per step: triton / reference / plain "
        "| attention core | CUDA graph | GPU | commit | megaquant source |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- | --- | --- |",
    ]
    for c in family_cells:
        for r in c.runs:
            core = ", ".join(sorted({a.split(" ", 1)[0] for a in r.attention_core})) or "—"
            seed = r.seed if r.seed is not None else "—"
            graph = "—" if r.cuda_graph is None else ("on" if r.cuda_graph else "off")
            # per run, so a cell whose runs trained on different code (a faster kernel landed between
            # its seeds; since session 18 the megaquant source column says which) shows each run's own
            # time beside the cell's median
            t = r.step_time_s
            ms = _f(None if t is None else t * 1e3, ".1f") + (" (shared)" if r.shared_gpu and t else "")
            commit = (r.commit or "—")[:10]
            lines.append(
                f"| {r.name} | {seed} | {r.run.steps[-1]} | {r.train_final:.4f} | {_f(r.val_final, '.4f')} | "
                f"{ms} | {_paths_per_step(r.path_counts)} | {core} | {graph} | {r.gpu} | {commit} | "
                f"{r.megaquant_source or '—'} |"
            )
    return "\n".join(lines) + "\n"


def calibration_section(runs: Sequence[StoredRun]) -> str:
    """The short one-at-a-time runs: clean step time and memory per shape and mode, and what start-up and
    evaluation cost (the driver's wall time minus the steps' own time)."""
    lines = [
        "### Step time and memory, one run at a time (calibration)",
        "",
        "| family | mode | recipe | steps | step time (ms) | peak memory (GiB) | GPU shared | "
        "start-up + evaluation (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in runs:
        t = r.step_time_s
        wall = r.record.get("wall_s")
        rest = None if wall is None else float(wall) - sum(r.run.step_times_s)
        gib = None if r.run.peak_mem_bytes is None else r.run.peak_mem_bytes / 2**30
        ms = None if t is None else t * 1e3
        shared = "yes" if r.shared_gpu else "no"
        lines.append(
            f"| {r.family} | {r.mode} | {r.recipe} | {r.run.steps[-1]} | {_f(ms, '.1f')} | "
            f"{_f(gib, '.2f')} | {shared} | {_f(rest, '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def generated(runs: Sequence[StoredRun], notes: Sequence[str], figures: dict[str, dict[str, str]]) -> str:
    calibration = [r for r in runs if r.batch in CALIBRATION]
    families = [r for r in runs if r.batch not in CALIBRATION]
    if not runs:
        body = "No real-text runs are stored yet ([plan.md](plan.md): the batches that will produce them).\n"
    else:
        grouped = cells(families)
        sections = [family_section(f, cs, figures.get(f, {})) for f, cs in grouped.items()]
        if not families:
            sections.insert(0, "No family batch is stored yet ([plan.md](plan.md)).\n")
        if calibration:
            sections.append(calibration_section(calibration))
        body = "\n".join(sections)
    if notes:
        body += "\nRun directories left out:\n\n" + "".join(f"- {n}\n" for n in notes)
    note = "<!-- generated by `python benchmarks/results_page.py`; do not edit by hand -->"
    return f"{BEGIN}\n{note}\n\n{body}{END}"


def splice(page: str, block: str) -> str:
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"the page has no {BEGIN} ... {END} block to fill")
    return page[:start] + block + page[end + len(END) :]


# ---------------------------------------------------------------- figures


def _ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


def _paired_val_curve(cell: Cell, base_runs: Sequence[StoredRun]) -> dict[int, list[float]]:
    """step -> the in-loop validation gaps (cell's seed s minus bf16's seed s) at that step, over the seeds
    both have. bf16's own curve: each seed minus the seeds' mean (its spread around 0)."""
    by_seed = {r.seed: {p.step: p.loss for p in r.validation if not p.final} for r in base_runs}
    out: dict[int, list[float]] = {}
    if tuple(cell.runs) == tuple(base_runs):  # bf16 itself
        steps = sorted({s for v in by_seed.values() for s in v})
        for s in steps:
            vals = [v[s] for v in by_seed.values() if s in v]
            out[s] = [x - statistics.fmean(vals) for x in vals]
        return out
    for r in cell.runs:
        base = by_seed.get(r.seed)
        if r.seed is None or base is None:
            continue
        for p in r.validation:
            if not p.final and p.step in base:
                out.setdefault(p.step, []).append(p.loss - base[p.step])
    return out


def plot_family(family: str, family_cells: Sequence[Cell], out_dir: Path) -> dict[str, str]:
    """Two PNGs: training (EMA, first seed) and validation loss curves (mean over seeds, min-max shaded);
    the final validation gap per cell with its seed band, bf16's band shaded. Returns label -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slug = _slug(family)
    files: dict[str, str] = {}
    base_runs = next((c.runs for c in family_cells if (c.mode, c.recipe) == BASELINE), ())
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    other = 0
    for c in family_cells:
        if (c.mode, c.recipe) == BASELINE:
            style: dict[str, Any] = {"color": "black", "linestyle": "-", "zorder": 3}
        else:
            color, linestyle, marker = plot_style(other)
            other += 1
            style = {"color": color, "linestyle": linestyle, "marker": marker, "markevery": 0.1}
        label = c.mode if c.recipe == "default" else f"{c.mode} + {c.recipe}"
        first = c.runs[0]
        train_ax.plot(
            first.run.steps, _ema(first.run.losses), label=label, linewidth=1.2, markersize=3, **style
        )
        gaps = _paired_val_curve(c, base_runs)
        if gaps:
            steps = sorted(gaps)
            val_ax.plot(steps, [statistics.fmean(gaps[s]) for s in steps], label=label, markersize=3, **style)
            if len({len(v) for v in gaps.values()} - {1}):
                val_ax.fill_between(
                    steps, [min(gaps[s]) for s in steps], [max(gaps[s]) for s in steps],
                    color=style["color"], alpha=0.15,
                )  # fmt: skip
    train_ax.set(xlabel="step", ylabel="training loss (EMA 0.1, first seed)", title="Training loss")
    val_ax.set(
        xlabel="step",
        ylabel="validation loss − bf16's, same seed (mean; min-max shaded)",
        title="Validation loss gap vs bf16, paired by seed",
    )
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 + len(family_cells) // 12)
    fig.suptitle(family)
    fig.tight_layout()
    files["loss curves"] = f"{slug}-loss.png"
    fig.savefig(out_dir / files["loss curves"], dpi=110)
    plt.close(fig)

    banded = [c for c in family_cells if c.val is not None]
    base = next((c for c in banded if (c.mode, c.recipe) == BASELINE), None)
    if banded and base is not None and base.val is not None:
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(banded) + 1.5))
        ax.axvspan(
            base.val.low, base.val.high, color="grey", alpha=0.25, label="bf16 seed-to-seed spread (unpaired)"
        )
        for i, c in enumerate(banded):
            assert c.val is not None
            ax.errorbar(
                c.val.gap, i, xerr=[[c.val.gap - c.val.low], [c.val.high - c.val.gap]], fmt="o", color="black"
            )
        ax.set_yticks(range(len(banded)))
        ax.set_yticklabels([c.mode if c.recipe == "default" else f"{c.mode} + {c.recipe}" for c in banded])
        ax.invert_yaxis()
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set(
            xlabel="final validation loss − bf16's, paired by seed (mean; min-max over seeds)", title=family
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        files["gap vs bf16"] = f"{slug}-gap.png"
        fig.savefig(out_dir / files["gap vs bf16"], dpi=110)
        plt.close(fig)
    return files


def build(runs_root: Path, page: Path, *, figures: bool = True) -> str:
    """The page's new text (figures written next to it when `figures`)."""
    runs, notes = load_store(runs_root)
    grouped = cells([r for r in runs if r.batch not in CALIBRATION])
    paths: dict[str, dict[str, str]] = {}
    for family, family_cells in grouped.items():
        if figures:
            paths[family] = plot_family(family, family_cells, page.parent)
        else:  # --check: the names the figures would have, without drawing them
            slug = _slug(family)
            names = {"loss curves": f"{slug}-loss.png"}
            base = next((c for c in family_cells if (c.mode, c.recipe) == BASELINE), None)
            if base is not None and base.val is not None and any(c.val for c in family_cells):
                names["gap vs bf16"] = f"{slug}-gap.png"
            paths[family] = names
    return splice(page.read_text(), generated(runs, notes, paths))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "docs/results/runs", help="the results store")
    parser.add_argument("--page", type=Path, default=ROOT / "docs/results/README.md")
    parser.add_argument("--check", action="store_true", help="compare with the page on disk; write nothing")
    ns = parser.parse_args(argv)
    text = build(ns.runs, ns.page, figures=not ns.check)
    if ns.check:
        if text != ns.page.read_text():
            print(
                f"{ns.page}: out of date with {ns.runs}; run python benchmarks/results_page.py",
                file=sys.stderr,
            )
            return 1
        print(f"{ns.page}: up to date")
        return 0
    ns.page.write_text(text)
    print(f"wrote {ns.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
