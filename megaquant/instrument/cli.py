"""`megaquant instrument`: the command line over `instrument_repo` (parse, call, print)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from megaquant.instrument.rules import DEFAULT_BRANCH

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("instrument")
    def instrument_command(
        repo: Annotated[
            Path | None, typer.Option(help="A git checkout holding megatron/core (e.g. Megatron-LM).")
        ] = None,
        from_installed: Annotated[
            Path | None,
            typer.Option("--from-installed", help="Copy the installed megatron-core into this new git repo."),
        ] = None,
        include_lm_head: Annotated[
            bool, typer.Option(help="Quantize the output layer (LM head) of every model too.")
        ] = False,
        branch: Annotated[
            str, typer.Option(help="Branch that receives the instrumentation commit.")
        ] = DEFAULT_BRANCH,
    ) -> None:
        """Hook stock Megatron's linear and attention GEMMs to megaquant.ops (custom_quant_type sites)."""
        from megaquant.instrument.repo import copy_installed, instrument_repo

        if (repo is None) == (from_installed is None):
            raise typer.BadParameter("give exactly one of --repo DIR or --from-installed DIR")
        target = copy_installed(from_installed) if from_installed is not None else repo
        assert target is not None
        result = instrument_repo(target, include_lm_head=include_lm_head, branch=branch)
        heads = []
        for edit in result.edits:
            if edit.kind == "lm_head":
                heads.append(edit.scope)
            elif edit.kind == "unhooked":
                typer.echo(f"{'unhooked':8} {edit.file}:{edit.line} {edit.scope} {edit.detail}")
            else:
                state = "added" if edit.applied else "present"
                typer.echo(
                    f"{state:8} {edit.file}:{edit.line} {edit.scope} {edit.kind} {edit.role or ''}".rstrip()
                )
        if heads:
            typer.echo(f"LM head excluded (stays unquantized) in: {', '.join(heads)}")
        if result.commit:
            typer.echo(f"committed {result.commit[:12]} on branch {result.branch} in {result.repo}")
        else:
            typer.echo(f"already instrumented: nothing to do in {result.repo}")
