"""`megaquant demo`: instrument the installed megatron-core, train a tiny Llama-shaped model under bf16 and
one quantized mode through the real set -> train -> restore cycle, and print the loss comparison."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from megaquant.errors import LaunchError, ValueNameError
from megaquant.megatron_src import quiet_megatron_import

if TYPE_CHECKING:
    from megaquant.launch.minitrain import MinitrainConfig

__all__ = ["DemoRow", "Corpus", "demo_config", "mode_values", "prepare_corpus", "register", "run_demo"]

SPEC = "megatron-core"


@dataclass(frozen=True)
class DemoRow:
    mode: str
    values: dict[str, str]
    final_loss: float  # `megaquant.report.final_loss`: the mean of the last 10 steps' losses, as in compare
    gap_to_bf16: float
    step_time_s: float  # `megaquant.report.step_time`: the median after warm-up, as in compare
    run_dir: Path


@dataclass(frozen=True)
class Corpus:
    prefix: Path  # Megatron indexed dataset prefix (.bin/.idx)
    description: str
    tokens: int


def mode_values(mode: str) -> dict[str, str]:
    """Role values of a mode name, from the launcher's one mode registry (`megaquant.launch.modes`)."""
    from megaquant.launch.modes import MODES

    if mode not in MODES:
        raise ValueNameError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    return MODES[mode].values()


def demo_config(out: Path, data: Path, steps: int) -> MinitrainConfig:
    """The demo's model: 4 layers, hidden 128, 4 heads (2 KV groups), SwiGLU 384, byte vocabulary, seq 128."""
    from megaquant.launch.minitrain import MinitrainConfig

    return MinitrainConfig(
        out=out,
        data=data,
        vocab_size=256,
        layers=4,
        hidden=128,
        ffn=384,
        heads=4,
        query_groups=2,
        seq_len=128,
        micro_batch=8,
        steps=steps,
        lr=3e-3,
        min_lr=3e-4,
        warmup=max(1, steps // 20),
        log_interval=max(1, steps // 5),
    )


def prepare_corpus(workdir: Path) -> Corpus:
    """A small real-text corpus as a Megatron indexed dataset, built offline.

    Stand-in until the launcher's `megaquant.data` sample corpus and tokenizer land: the docstrings of
    Python's own standard library (real English prose, present on every machine), byte-level tokens.
    """
    import numpy as np

    with quiet_megatron_import():
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = workdir / "data" / "stdlib_docstrings_bytes"
    if prefix.with_suffix(".idx").is_file():
        tokens = (prefix.with_suffix(".bin").stat().st_size) // 2
        return Corpus(prefix, "stand-in: Python stdlib docstrings, byte tokens", tokens)
    texts = _stdlib_docstrings()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix.with_suffix(".bin")), dtype=np.uint16)
    total = 0
    for text in texts:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        builder.add_document(ids, [len(ids)])
        total += len(ids)
    builder.finalize(str(prefix.with_suffix(".idx")))
    return Corpus(prefix, "stand-in: Python stdlib docstrings, byte tokens", total)


def _stdlib_docstrings(limit_bytes: int = 2_000_000) -> list[str]:
    """Module, class and function docstrings of a fixed list of pure-Python stdlib modules (deterministic)."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    size = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200 and doc.isascii():
                    texts.append(doc + "\n\n")
                    size += len(doc)
        if size >= limit_bytes:
            break
    return texts


def ensure_workspace(workdir: Path) -> Path:
    """workdir/megatron-core: a git copy of the installed megatron-core, instrumented (reused if present)."""
    from megaquant.instrument import copy_installed, instrument_repo

    workspace = workdir / "megatron-core"
    if not (workspace / ".git").is_dir():
        copy_installed(workspace)
    instrument_repo(workspace)  # no-op when already instrumented
    return workspace


def run_demo(
    workdir: Path,
    *,
    steps: int = 150,
    mode: str = "FA_linear_mxfp8",
    on_event: Callable[[str], None] = lambda _: None,
) -> tuple[Corpus, list[DemoRow]]:
    """bf16, then `mode`: apply the role values (throwaway branch), train, restore; return the comparison."""
    from megaquant import api  # type: ignore[attr-defined,unused-ignore]
    from megaquant.launch.argv import role_settings
    from megaquant.launch.minitrain import run_minitrain
    from megaquant.report import final_loss, step_time

    modes = ["bf16"] if mode == "bf16" else ["bf16", mode]
    plans = {m: mode_values(m) for m in modes}
    workdir.mkdir(parents=True, exist_ok=True)
    on_event(f"workspace: instrumenting a copy of the installed megatron-core in {workdir / 'megatron-core'}")
    workspace = ensure_workspace(workdir)
    corpus = prepare_corpus(workdir)
    on_event(f"corpus: {corpus.description}, {corpus.tokens:,} tokens at {corpus.prefix}")
    rows: list[DemoRow] = []
    for name in modes:
        result = api.apply(workspace, values=role_settings(plans[name]), spec=SPEC)
        try:
            on_event(
                f"{name}: {_describe(plans[name])} (branch {result.branch}, commit {str(result.commit)[:12]})"
            )
            run = run_minitrain(demo_config(workdir / "runs" / name, corpus.prefix, steps), workspace)
        finally:
            api.restore(workspace)
        if not run.metrics:
            raise LaunchError(f"{name}: the run wrote no metrics; see {run.out / 'train.log'}")
        final = final_loss([float(m["loss"]) for m in run.metrics])  # the definition compare uses
        times = step_time([float(m["step_time_s"]) for m in run.metrics])
        base = rows[0].final_loss if rows else final
        rows.append(DemoRow(name, plans[name], final, final - base, times or 0.0, run.out))
    return corpus, rows


def _describe(values: Mapping[str, str]) -> str:
    return ", ".join(f"{role}={value}" for role, value in values.items())


def format_table(rows: list[DemoRow]) -> list[tuple[str, ...]]:
    base_time = rows[0].step_time_s
    return [
        (
            r.mode,
            f"{r.final_loss:.4f}",
            f"{r.gap_to_bf16:+.4f}",
            f"{r.step_time_s * 1e3:.1f}",
            f"{r.step_time_s / base_time:.2f}x",
        )
        for r in rows
    ]


def register(app: typer.Typer) -> None:

    from megaquant.megatron_src import cache_dir

    @app.command("demo")
    def demo_command(
        workdir: Annotated[
            Path | None, typer.Option(help="Scratch directory (default: ~/.cache/megaquant/demo).")
        ] = None,
        steps: Annotated[int, typer.Option(min=2, help="Training steps per mode.")] = 150,
        mode: Annotated[str, typer.Option(help="The quantized mode compared with bf16.")] = "FA_linear_mxfp8",
    ) -> None:
        """Train a tiny Llama-shaped megatron-core model under bf16 and MODE; print the loss comparison."""
        from rich.console import Console
        from rich.table import Table

        from megaquant.report import FINAL_LOSS_TAIL

        console = Console()
        mode_values(mode)  # fail on a bad name before any work
        corpus, rows = run_demo(
            workdir or cache_dir() / "demo", steps=steps, mode=mode, on_event=console.print
        )
        table = Table(
            title=f"megaquant demo: {steps} steps per mode, same seed and data order; final loss = mean of "
            f"the last {FINAL_LOSS_TAIL} steps, as in `megaquant compare`"
        )
        for column in ("mode", "final loss", "gap to bf16", "step time (ms)", "vs bf16"):
            table.add_column(column, justify="left" if column == "mode" else "right")
        for cells in format_table(rows):
            table.add_row(*cells)
        console.print(table)
        console.print(
            f"data: {corpus.description}. Runs (metrics.jsonl, train.log): {rows[0].run_dir.parent}. "
            "Fake quantization emulates accuracy; it is slower than bf16 by design."
        )
