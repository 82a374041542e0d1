"""`megaquant compare RUN...`: run directories (metrics.jsonl or Megatron train.log) to a table of loss gap vs
bf16, step time and peak memory, plus a loss-curve PNG and a markdown table."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer  # a core dependency; annotations of the command are resolved from module globals

from megaquant.errors import MegaquantError

__all__ = [
    "ReportError",
    "Row",
    "Run",
    "compare",
    "load_run",
    "markdown_table",
    "parse_megatron_log",
    "plot_losses",
    "register",
]

BASELINE = "bf16"

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
    recipe: str = "default"  # megaquant.recipes name from the manifest (runs before recipes: default)


@dataclass(frozen=True)
class Row:
    mode: str
    steps: int
    final_loss: float  # mean of the last `tail` logged losses
    loss_gap: float | None  # final_loss - baseline's final_loss (None: no baseline)
    step_time_s: float | None  # median, warm-up steps excluded
    time_ratio: float | None
    peak_mem_bytes: int | None
    mem_ratio: float | None
    recipe: str = "default"


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
            recipe,
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
            recipe,
        )
    raise ReportError(f"{path}: holds neither metrics.jsonl nor train.log; is it a run directory?")


def _skip(n: int) -> int:
    """Warm-up steps left out of timing: the first 10 % (at least 1 when there are 3 or more)."""
    return max(1, n // 10) if n >= 3 else 0


def compare(runs: Sequence[Run], *, tail: int = 10) -> tuple[Row, ...]:
    """One row per run; gaps and ratios against the run whose mode is bf16 (none: no gaps)."""
    if not runs:
        raise ReportError("no runs to compare; pass one or more run directories")
    rows = []
    for run in runs:
        if not run.losses:
            raise ReportError(f"{run.path}: the run logged no steps")
        last = run.losses[-min(tail, len(run.losses)) :]
        times = run.step_times_s[_skip(len(run.step_times_s)) :]
        rows.append(
            Row(
                run.mode,
                run.steps[-1],
                statistics.fmean(last),
                None,
                statistics.median(times) if times else None,
                None,
                run.peak_mem_bytes,
                None,
                run.recipe,
            )
        )
    base = next((r for r in rows if r.mode == BASELINE), None)
    if base is None:
        return tuple(rows)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return tuple(
        Row(
            r.mode,
            r.steps,
            r.final_loss,
            r.final_loss - base.final_loss,
            r.step_time_s,
            ratio(r.step_time_s, base.step_time_s),
            r.peak_mem_bytes,
            ratio(r.peak_mem_bytes, base.peak_mem_bytes),
            r.recipe,
        )
        for r in rows
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


def plot_losses(runs: Sequence[Run], path: Path, *, title: str = "Training loss") -> Path:
    """Loss curves (EMA-smoothed, raw faint) and each run's smoothed gap to bf16; PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in runs if r.mode == BASELINE), None)
    fig, axes = plt.subplots(1, 2 if base else 1, figsize=(13 if base else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    cmap = plt.get_cmap("tab10")
    for i, run in enumerate(runs):
        color = "black" if run.mode == BASELINE else cmap(i % 10)
        ax.plot(run.steps, run.losses, color=color, alpha=0.15, linewidth=0.8)
        ax.plot(run.steps, _ema(run.losses, 0.1), color=color, label=run.mode, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (EMA 0.1; raw faint)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if base:
        gap_ax = axes[0][1]
        base_loss = dict(zip(base.steps, _ema(base.losses, 0.1), strict=True))
        for i, run in enumerate(runs):
            if run is base:
                continue
            pairs = [
                (s, v - base_loss[s])
                for s, v in zip(run.steps, _ema(run.losses, 0.1), strict=True)
                if s in base_loss
            ]
            if pairs:
                gap_ax.plot([p[0] for p in pairs], [p[1] for p in pairs], color=cmap(i % 10), label=run.mode)
        gap_ax.axhline(0.0, color="black", linewidth=0.8)
        gap_ax.set_xlabel("step")
        gap_ax.set_ylabel("loss − bf16 loss (both EMA 0.1)")
        gap_ax.set_title("Gap to bf16")
        gap_ax.grid(alpha=0.3)
        gap_ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- CLI


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
        tail: Annotated[int, typer.Option(min=1, help="Final loss = mean of this many last steps.")] = 10,
    ) -> None:
        """Compare runs: final loss, gap vs bf16, median step time, peak memory; loss-curve PNG + markdown."""
        from rich.console import Console
        from rich.table import Table

        loaded = [load_run(p) for p in runs]
        rows = compare(loaded, tail=tail)
        header, body = table_cells(rows)
        table = Table(title=f"final loss = mean of the last {tail} steps; step time = median after warm-up")
        for column in header:
            table.add_column(column, justify="left" if column in ("mode", "recipe") else "right")
        for cells in body:
            table.add_row(*cells)
        console = Console()
        console.print(table)
        target = out or runs[0].resolve().parent
        target.mkdir(parents=True, exist_ok=True)
        (target / "compare.md").write_text(markdown_table(rows))
        png = plot_losses(loaded, target / "loss_curves.png")
        console.print(f"wrote {target / 'compare.md'} and {png}")
