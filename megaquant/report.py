"""`megaquant compare RUN...`: run directories (metrics.jsonl or Megatron train.log) to a table of loss gap vs
bf16, step time and peak memory, plus a loss-curve PNG and a markdown table.

`final_loss` and `step_time` are the one definition of those numbers: `megaquant demo` uses them too."""

from __future__ import annotations

import json
import math
import re
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer  # a core dependency; annotations of the command are resolved from module globals

from megaquant.errors import MegaquantError

__all__ = [
    "FINAL_LOSS_TAIL",
    "ReportError",
    "Row",
    "Run",
    "Skipped",
    "baseline_first",
    "compare",
    "comparability_warnings",
    "final_loss",
    "labels",
    "load_run",
    "load_runs",
    "loss_figure",
    "markdown_table",
    "parse_megatron_log",
    "plot_losses",
    "plot_style",
    "print_table",
    "register",
    "run_setup",
    "step_time",
]

BASELINE = "bf16"
FINAL_LOSS_TAIL = 10
"""How many of the last logged losses `final_loss` averages by default."""

_ITERATION = re.compile(r"iteration\s+(\d+)\s*/\s*\d+\s*\|")
_FIELD = {
    "ms": re.compile(r"elapsed time per iteration \(ms\):\s*([0-9.eE+-]+)"),
    "loss": re.compile(r"lm loss:\s*([0-9.eE+-]+|nan|inf)", re.IGNORECASE),
}
_MAX_ALLOCATED = re.compile(r"max allocated:\s*([0-9.eE+-]+)")  # Megatron's memory report, in MB


class ReportError(MegaquantError):
    """A run directory cannot be read as a training run."""


@dataclass(frozen=True)
class Run:
    """One training run's per-step curve, as read from its directory."""

    path: Path
    mode: str
    steps: tuple[int, ...]
    losses: tuple[float, ...]
    step_times_s: tuple[float, ...]
    peak_mem_bytes: int | None
    source: str  # "metrics.jsonl" | "train.log"
    values: tuple[tuple[str, str], ...] = ()  # role -> value, from the manifest when recorded
    setup: tuple[tuple[str, str], ...] = ()  # what must match to compare runs (`run_setup`), as recorded
    status: str | None = None  # the manifest's status ("succeeded", "failed", ...); None: not recorded
    recipe: str = "default"  # megaquant.recipes name from the manifest (runs before recipes: default)
    seed: int | None = None  # Megatron's --seed from the manifest's arguments; None: not recorded


@dataclass(frozen=True)
class Skipped:
    """A run directory left out of a comparison, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Row:
    mode: str  # the run's mode; with its directory name when two compared runs share a mode
    steps: int
    final_loss: float  # `final_loss`: mean of the last `tail` logged losses
    loss_gap: float | None  # final_loss - baseline's final_loss (None: no baseline)
    step_time_s: float | None  # median, warm-up steps excluded
    time_ratio: float | None
    peak_mem_bytes: int | None
    mem_ratio: float | None
    recipe: str = "default"


def final_loss(losses: Sequence[float], tail: int = FINAL_LOSS_TAIL) -> float:
    """A run's final loss: the mean of its last `tail` logged losses (all of them when it logged fewer).

    The one definition, used by `megaquant compare`, `megaquant demo` and the published tables: a mean over
    the last steps rather than the last step alone, whose loss moves with its one batch."""
    if not losses:
        raise ReportError("no losses logged: a final loss needs at least one step")
    if tail < 1:
        raise ReportError(f"tail must be at least 1 (got {tail})")
    return statistics.fmean(losses[-tail:])


def _skip(n: int) -> int:
    """Warm-up steps left out of timing: the first 10 % (at least 1 when there are 3 or more)."""
    return max(1, n // 10) if n >= 3 else 0


def step_time(step_times_s: Sequence[float]) -> float | None:
    """A run's step time: the median after warm-up (the first 10 %, at least 1 of 3 or more); None: none."""
    kept = step_times_s[_skip(len(step_times_s)) :]
    return statistics.median(kept) if kept else None


def parse_megatron_log(text: str) -> list[tuple[int, float, float | None]]:
    """(iteration, lm loss, ms per iteration) from Megatron's training-log lines; other lines are ignored."""
    points = []
    for line in text.splitlines():
        it = _ITERATION.search(line)
        loss = _FIELD["loss"].search(line)
        if it is None or loss is None:
            continue
        ms = _FIELD["ms"].search(line)
        points.append((int(it.group(1)), float(loss.group(1)), float(ms.group(1)) if ms else None))
    return points


def _manifest(path: Path) -> dict[str, object]:
    file = path / "manifest.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg}); fix or remove it") from exc
    return data if isinstance(data, dict) else {}


_SHAPE_FLAGS = {
    "--num-layers": "layers",
    "--hidden-size": "hidden",
    "--ffn-hidden-size": "ffn",
    "--num-attention-heads": "heads",
    "--num-query-groups": "query_groups",
    "--seq-length": "seq_len",
    "--micro-batch-size": "micro_batch",
    "--global-batch-size": "global_batch",
    "--rotary-base": "rope_base",
    "--lr": "lr",
    "--min-lr": "min_lr",
    "--lr-warmup-iters": "warmup",
}
_SHAPE_KEYS = frozenset(_SHAPE_FLAGS.values())


def _canonical(value: object) -> str:
    """Numbers compare by value ("3e-4" == 0.0003, "500000" == 500000.0); anything else as JSON or text."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float | str):
        try:
            return repr(float(value))
        except ValueError:
            return str(value)
    return json.dumps(value, sort_keys=True)


def run_setup(manifest: dict[str, object]) -> dict[str, str]:
    """What a manifest records that must match for two runs to be compared: model, dataset, preset,
    trainer, device, recipe (missing: "default"), the attention core's path (fused / unfused, when
    recorded) and the shape (layers, hidden, ..., batch, lr schedule;
    from `shape` or from the Megatron arguments). Seeds may differ (that is how noise is measured); steps
    are taken from the logged curve. Keys a manifest does not record are absent."""
    setup: dict[str, str] = {}
    for key in ("model", "dataset", "preset", "trainer"):
        if manifest.get(key) is not None:
            setup[key] = str(manifest[key])
    environment = manifest.get("environment")
    device = manifest.get("device")
    if device is None and isinstance(environment, dict):
        device = environment.get("device")
    if device is not None:
        setup["device"] = str(device)
    recipe = manifest.get("recipe")
    setup["recipe"] = (
        "default" if recipe is None else (recipe if isinstance(recipe, str) else _canonical(recipe))
    )
    cores = manifest.get("attention_core")  # ["fused (triton) qk=... pv=...", ...]: compare the path only
    if isinstance(cores, list) and cores:
        setup["attention_core"] = ",".join(sorted({str(core).split(" ", 1)[0] for core in cores}))
    shape = manifest.get("shape")
    if isinstance(shape, dict):
        setup.update({k: _canonical(v) for k, v in shape.items() if k in _SHAPE_KEYS})
    args = manifest.get("megatron_args")
    if isinstance(args, list):
        words = [str(a) for a in args]
        for i, word in enumerate(words):
            flag, eq, inline = word.partition("=")
            if flag in _SHAPE_FLAGS and (eq or i + 1 < len(words)):
                setup[_SHAPE_FLAGS[flag]] = _canonical(inline if eq else words[i + 1])  # the last one wins
    return setup


def _seed(manifest: dict[str, object]) -> int | None:
    """The last --seed of the manifest's Megatron arguments (as Megatron's parser reads it), if any."""
    args = manifest.get("megatron_args")
    if not isinstance(args, list):
        return None
    words = [str(a) for a in args]
    seed = None
    for i, word in enumerate(words):
        flag, eq, inline = word.partition("=")
        if flag == "--seed" and (eq or i + 1 < len(words)):
            try:
                seed = int(inline if eq else words[i + 1])
            except ValueError:
                seed = None
    return seed


def load_run(path: Path) -> Run:
    """Read a run directory: manifest.json (mode, role values) + metrics.jsonl, else train.log."""
    if not path.is_dir():
        raise ReportError(
            f"{path}: not a directory; pass run directories (holding metrics.jsonl or train.log)"
        )
    manifest = _manifest(path)
    mode = str(manifest.get("mode") or manifest.get("quantization") or path.name)
    recipe = str(manifest.get("recipe") or "default")
    raw_values = manifest.get("values")
    values = (
        tuple(sorted((str(k), str(v)) for k, v in raw_values.items())) if isinstance(raw_values, dict) else ()
    )
    setup = tuple(sorted(run_setup(manifest).items()))
    status = None if manifest.get("status") is None else str(manifest["status"])
    if status is None and isinstance(manifest.get("exit_code"), int):
        status = "succeeded" if manifest["exit_code"] == 0 else "failed"
    metrics = path / "metrics.jsonl"
    log = path / "train.log"
    if metrics.is_file() and metrics.stat().st_size > 0:
        steps, losses, times, peaks = [], [], [], []
        for number, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                steps.append(int(rec["step"]))
                losses.append(float(rec["loss"]))
                times.append(float(rec["step_time_s"]))
                if rec.get("peak_mem_bytes") is not None:
                    peaks.append(int(rec["peak_mem_bytes"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ReportError(
                    f"{metrics}:{number}: expected a JSON object with step, loss, step_time_s "
                    f"(and peak_mem_bytes); got {line[:80]!r} ({exc})"
                ) from exc
        return Run(
            path,
            mode,
            tuple(steps),
            tuple(losses),
            tuple(times),
            max(peaks, default=None),
            "metrics.jsonl",
            values,
            setup,
            status,
            recipe,
            _seed(manifest),
        )
    if log.is_file():
        text = log.read_text(errors="replace")
        points = parse_megatron_log(text)
        if not points:
            raise ReportError(
                f"{log}: no Megatron iteration lines with 'lm loss' found; is this a training log?"
            )
        mem = [float(m.group(1)) for m in _MAX_ALLOCATED.finditer(text)]
        return Run(
            path,
            mode,
            tuple(p[0] for p in points),
            tuple(p[1] for p in points),
            tuple(p[2] / 1e3 for p in points if p[2] is not None),
            int(max(mem) * 2**20) if mem else None,
            "train.log",
            values,
            setup,
            status,
            recipe,
            _seed(manifest),
        )
    raise ReportError(f"{path}: holds neither metrics.jsonl nor train.log; is it a run directory?")


FAILED_STATUSES = frozenset({"failed", "interrupted"})


def load_runs(paths: Sequence[Path]) -> tuple[tuple[Run, ...], tuple[Skipped, ...]]:
    """The runs that can be compared, and the others with why: unreadable, no steps logged, or a manifest
    that says the run failed or was interrupted (its curve stops early)."""
    runs: list[Run] = []
    skipped: list[Skipped] = []
    for path in paths:
        try:
            run = load_run(path)
        except ReportError as exc:
            skipped.append(Skipped(path, str(exc)))
            continue
        if not run.losses:
            skipped.append(Skipped(path, f"{path}: the run logged no steps"))
        elif run.status in FAILED_STATUSES:
            skipped.append(
                Skipped(path, f"{path}: the run {run.status} (manifest.json): its curve is partial")
            )
        else:
            runs.append(run)
    return tuple(runs), tuple(skipped)


def baseline_first(runs: Sequence[Run]) -> list[Run]:
    """The baseline (the first run whose mode is bf16) first, the others in the order given."""
    base = next((r for r in runs if r.mode == BASELINE), None)
    return list(runs) if base is None else [base, *(r for r in runs if r is not base)]


def labels(runs: Sequence[Run]) -> list[str]:
    """One distinct name per run: its mode, plus its directory when modes repeat (then its path)."""
    modes = [r.mode for r in runs]
    named = [m if modes.count(m) == 1 else f"{m} ({r.path.name})" for m, r in zip(modes, runs, strict=True)]
    return [n if named.count(n) == 1 else f"{r.mode} ({r.path})" for n, r in zip(named, runs, strict=True)]


def comparability_warnings(runs: Sequence[Run]) -> tuple[str, ...]:
    """One warning per setup key (`run_setup`, and the number of steps) on which the runs that record it
    differ: their gaps and ratios would compare different experiments. Runs are listed bf16 first."""
    runs = baseline_first(runs)
    names = labels(runs)
    setups = [dict(r.setup) | {"steps": str(r.steps[-1]) if r.steps else "0"} for r in runs]
    warnings = []
    for key in dict.fromkeys(k for setup in setups for k in setup):
        groups: dict[str, list[str]] = {}
        for name, setup in zip(names, setups, strict=True):
            if key in setup:
                groups.setdefault(setup[key], []).append(name)
        if len(groups) > 1:
            parts = "; ".join(f"{value}: {', '.join(who)}" for value, who in groups.items())
            warnings.append(f"runs are not comparable: {key} differs ({parts})")
    return tuple(warnings)


def compare(runs: Sequence[Run], *, tail: int = FINAL_LOSS_TAIL) -> tuple[Row, ...]:
    """One row per run, the bf16 baseline first; gaps and ratios against it (no bf16 run: no gaps)."""
    if not runs:
        raise ReportError("no runs to compare; pass one or more run directories")
    runs = baseline_first(runs)
    rows = []
    for run, name in zip(runs, labels(runs), strict=True):
        if not run.losses:
            raise ReportError(f"{run.path}: the run logged no steps")
        rows.append(
            Row(
                name,
                run.steps[-1],
                final_loss(run.losses, tail),
                None,
                step_time(run.step_times_s),
                None,
                run.peak_mem_bytes,
                None,
                run.recipe,
            )
        )
    if runs[0].mode != BASELINE:
        return tuple(rows)
    bases = baselines(runs)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return tuple(
        Row(
            r.mode,
            r.steps,
            r.final_loss,
            r.final_loss - rows[b].final_loss,
            r.step_time_s,
            ratio(r.step_time_s, rows[b].step_time_s),
            r.peak_mem_bytes,
            ratio(r.peak_mem_bytes, rows[b].peak_mem_bytes),
            r.recipe,
        )
        for r, b in zip(rows, bases, strict=True)
    )


def baselines(runs: Sequence[Run]) -> list[int]:
    """Per run (in `baseline_first` order, bf16 first), the index of the bf16 run it is compared with: the
    bf16 run of its own seed when there is one (a seed fixes the initial weights and the data order, so
    the gap is the mode's, not the seed's), else the first bf16 run. bf16 runs are compared with the first
    bf16 run (their gaps are the seed spread)."""
    first = 0
    by_seed: dict[int, int] = {}
    for i, run in enumerate(runs):
        if run.mode == BASELINE and run.seed is not None:
            by_seed.setdefault(run.seed, i)
    out = []
    for run in runs:
        paired = by_seed.get(run.seed) if run.seed is not None and run.mode != BASELINE else None
        out.append(first if paired is None else paired)
    return out


def pairing_note(runs: Sequence[Run]) -> str | None:
    """A line saying that gaps are paired by seed, when some run is compared with a bf16 run other than the
    first (None otherwise)."""
    runs = baseline_first(runs)
    if not runs or runs[0].mode != BASELINE:
        return None
    bases = baselines(runs)
    if all(b == 0 for b in bases):
        return None
    seeds = sorted({seed for b in bases if (seed := runs[b].seed) is not None})
    return (
        "gaps and ratios are paired by seed: each run is compared with the bf16 run of its own seed ("
        + ", ".join(str(x) for x in seeds)
        + "); bf16 runs show their gap to the first bf16 run (the seed spread)"
    )


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:{spec}}{suffix}"
    )


def table_cells(rows: Sequence[Row]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header: tuple[str, ...] = (
        "mode",
        "steps",
        "final loss",
        "gap vs bf16",
        "step time (ms)",
        "vs bf16",
        "peak memory (GiB)",
        "vs bf16",
    )
    body: list[tuple[str, ...]] = [
        (
            r.mode,
            str(r.steps),
            _fmt(r.final_loss, ".4f"),
            _fmt(r.loss_gap, "+.4f"),
            _fmt(None if r.step_time_s is None else r.step_time_s * 1e3, ".1f"),
            _fmt(r.time_ratio, ".2f", "×"),
            _fmt(None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**30, ".2f"),
            _fmt(r.mem_ratio, ".2f", "×"),
        )
        for r in rows
    ]
    if any(r.recipe != "default" for r in rows):  # the recipe column, once a run used one
        header = (header[0], "recipe", *header[1:])
        body = [(cells[0], r.recipe, *cells[1:]) for cells, r in zip(body, rows, strict=True)]
    return header, body


def markdown_table(rows: Sequence[Row]) -> str:
    header, body = table_cells(rows)
    align = ["---" if column in ("mode", "recipe") else "---:" for column in header]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _ema(values: Sequence[float], alpha: float) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)  # matplotlib's tab10
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_style(index: int) -> tuple[str, str, str]:
    """(colour, line style, marker) of the index-th non-baseline run (the baseline is black, solid, plain).
    Colour cycles fastest, line style every 10 runs, the marker (7, coprime to 40) every run: no two runs
    share a style up to 40 x 7 = 280 runs, and neighbours differ in colour and marker."""
    return (
        _COLORS[index % len(_COLORS)],
        _LINESTYLES[(index // len(_COLORS)) % len(_LINESTYLES)],
        _MARKERS[index % len(_MARKERS)],
    )


def loss_figure(runs: Sequence[Run], *, title: str = "Training loss") -> Any:
    """The matplotlib Figure of `plot_losses`: curves (EMA-smoothed, raw faint), bf16 first; gaps to bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = baseline_first(runs)
    names = labels(runs)
    base = runs[0] if runs and runs[0].mode == BASELINE else None
    styles: dict[int, dict[str, Any]] = {}
    for i, run in enumerate(r for r in runs if r is not base):
        color, linestyle, marker = plot_style(i)
        styles[id(run)] = {"color": color, "linestyle": linestyle, "marker": marker, "markevery": 0.1}
    if base is not None:
        styles[id(base)] = {"color": "black", "linestyle": "-", "marker": "None", "zorder": 3}  # on top
    fig, axes = plt.subplots(1, 2 if base else 1, figsize=(13 if base else 7, 4.8), squeeze=False)
    columns = 1 + len(runs) // 12
    ax = axes[0][0]
    for run, name in zip(runs, names, strict=True):
        style = styles[id(run)]
        ax.plot(run.steps, run.losses, color=style["color"], alpha=0.15, linewidth=0.8)
        ax.plot(run.steps, _ema(run.losses, 0.1), label=name, linewidth=1.4, markersize=4, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (EMA 0.1; raw faint)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=columns)
    if base:
        gap_ax = axes[0][1]
        base_loss = dict(zip(base.steps, _ema(base.losses, 0.1), strict=True))
        for run, name in zip(runs, names, strict=True):
            if run is base:
                continue
            pairs = [
                (s, v - base_loss[s])
                for s, v in zip(run.steps, _ema(run.losses, 0.1), strict=True)
                if s in base_loss
            ]
            if pairs:
                gap_ax.plot(
                    [p[0] for p in pairs],
                    [p[1] for p in pairs],
                    label=name,
                    markersize=4,
                    **styles[id(run)],
                )
        gap_ax.axhline(0.0, color="black", linewidth=0.8)
        gap_ax.set_xlabel("step")
        gap_ax.set_ylabel("loss − bf16 loss (both EMA 0.1)")
        gap_ax.set_title("Gap to bf16")
        gap_ax.grid(alpha=0.3)
        gap_ax.legend(fontsize=7, ncol=columns)
    fig.tight_layout()
    return fig


def plot_losses(runs: Sequence[Run], path: Path, *, title: str = "Training loss") -> Path:
    """Loss curves (EMA-smoothed, raw faint) and each run's smoothed gap to bf16; PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = loss_figure(runs, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- CLI


def print_table(console: Any, rows: Sequence[Row], title: str) -> None:
    """Every cell in full at any width: not a terminal, plain text (the markdown table); a terminal wide
    enough, a rich table; a narrower one, one block per run (its name on a line of its own)."""
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    header, body = table_cells(rows)
    if not console.is_terminal:
        console.out(f"{title}\n{markdown_table(rows)}", highlight=False, end="")
        return
    # The cells never wrap: a table with one-line headers, else headers wrapped to their column's widest
    # cell, else (too narrow even for that) one block per run.
    widths = [max(len(cells[i]) for cells in body) for i in range(len(header))]
    for wrap in (False, True):
        table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)
        for i, (column, width) in enumerate(zip(header, widths, strict=True)):
            lines = textwrap.wrap(column, width, break_long_words=False) if wrap else [column]
            table.add_column("\n".join(lines), justify="left" if i == 0 else "right", no_wrap=True)
        for cells in body:
            table.add_row(*(Text(c) for c in cells))  # Text: a run named "[x]" is not rich markup
        if Measurement.get(console, console.options.update_width(10**6), table).maximum <= console.width:
            console.print(table)
            return
    console.print(Text(title, style="italic"))
    for cells in body:
        parts: list[str] = []
        for name, cell in zip(header[1:], cells[1:], strict=True):
            if name == "vs bf16" and parts:
                parts[-1] += f" ({cell} bf16)"
            else:
                parts.append(f"{name} {cell}")
        console.print(Text(cells[0], style="bold"), soft_wrap=True)  # the terminal wraps it; rich never cuts
        console.print(Text("    " + " · ".join(parts)))


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_command(
        runs: Annotated[
            list[Path], typer.Argument(metavar="RUN...", help="Run directories (metrics.jsonl or train.log).")
        ],
        out: Annotated[
            Path | None,
            typer.Option(
                help="Where to write loss_curves.png and compare.md (default: the first run's parent)."
            ),
        ] = None,
        tail: Annotated[
            int, typer.Option(min=1, help="Final loss = mean of this many last logged losses.")
        ] = FINAL_LOSS_TAIL,
    ) -> None:
        """Compare runs: final loss, gap vs bf16, median step time, peak memory; loss-curve PNG + markdown.
        Unreadable, empty and failed runs are skipped with a note; runs of different setups are warned of."""
        from rich.console import Console

        loaded, skipped = load_runs(runs)
        notes = [f"note: skipped {s.reason}" for s in skipped]
        for note in notes:
            typer.echo(note, err=True)
        if not loaded:
            raise ReportError("no run to compare: every run given was skipped (see the notes above)")
        warnings = [f"warning: {w}" for w in comparability_warnings(loaded)]
        for warning in warnings:
            typer.echo(warning, err=True)
        paired = pairing_note(loaded)
        if paired is not None:
            notes.append(f"note: {paired}")
            typer.echo(notes[-1], err=True)
        rows = compare(loaded, tail=tail)
        console = Console()
        print_table(
            console, rows, f"final loss = mean of the last {tail} steps; step time = median after warm-up"
        )
        target = out or loaded[0].path.resolve().parent
        target.mkdir(parents=True, exist_ok=True)
        extra = "".join(f"\n{line}\n" for line in notes + warnings)
        (target / "compare.md").write_text(markdown_table(rows) + extra)
        png = plot_losses(loaded, target / "loss_curves.png")
        console.print(f"wrote {target / 'compare.md'} and {png}", highlight=False)
