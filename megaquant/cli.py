"""The `megaquant` command line: parse options, call `megaquant.api`, print text (or `--json`).

Other modules add sub-commands: list the module in `_COMMAND_MODULES`; it exposes `register(app) -> None`.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from megaquant.errors import MegaquantError

if TYPE_CHECKING:
    from megaquant.api import ApplyResult, Status

__all__ = ["app", "main"]

# Modules that contribute sub-commands (each exposes `register(app: typer.Typer) -> None`).
_COMMAND_MODULES: tuple[str, ...] = (
    "megaquant.instrument",
    "megaquant.demo",
    "megaquant.report",
    "megaquant.launch.commands",
)


def _error_text(exc: Exception) -> str | None:
    """A GitPython error (only if GitPython is loaded) or an OS error as one line; None for anything else."""
    gitmod = sys.modules.get("git")
    if gitmod is not None and isinstance(exc, gitmod.exc.GitError):
        stderr = getattr(exc, "stderr", "") or ""
        return f"git: {str(stderr).strip() or exc}".replace("\n", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return None


class _Group(TyperGroup):
    """Turns megaquant's, git's and OS errors into `error: ...` on stderr and exit 1 (no traceback)."""

    def invoke(self, ctx: Any) -> Any:  # typer vendors click: its Context type is private
        try:
            return super().invoke(ctx)
        except MegaquantError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except Exception as exc:
            text = _error_text(exc)
            if text is None:
                raise
            typer.echo(f"error: {text}", err=True)
            raise typer.Exit(1) from None


RepoOpt = Annotated[Path, typer.Option("--repo", help="A path inside the git checkout to act on.")]
SpecOpt = Annotated[
    str | None,
    typer.Option(
        "--spec",
        help="Rewrite spec (rewrites/NAME.toml or a path); default: git config megaquant.spec, else fork.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
ValueOpt = "mxfp8 | mxfp4 | hifp8 | nvfp4 (not on the fork) | none (bf16 = none)"


def _print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2))


def _warn(warnings: tuple[str, ...]) -> None:
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)


def _show_status(result: Status) -> None:
    """Sites grouped by file, one line each (no truncation: `file:line` must survive a narrow terminal)."""
    where = result.branch or f"detached at {result.head[:12]}"
    typer.echo(f"{typer.style(result.repo, bold=True)} on {where}")
    if result.base is not None:
        typer.echo(f"throwaway branch of {result.base.branch or 'detached'} @ {result.base.commit[:12]}")
    roles = "  ".join(
        f"{role}={'(not in this tree, runs bf16)' if role in result.absent else value}"
        for role, value in result.values.items()
    )
    typer.echo(f"spec {result.spec}: {roles}")
    if not result.sites:
        typer.echo("no sites found")
    current = None
    for site in result.sites:
        if site.file != current:
            current = site.file
            typer.echo(typer.style(site.file, bold=True))
        value = repr(site.value) if site.value is not None else site.expr
        flags = [name for name, on in (("conditional", site.conditional), ("override", site.override)) if on]
        roles = ", ".join(site.roles) or "no GEMM"
        extra = f"  ({', '.join(flags)})" if flags else ""
        typer.echo(f"  {site.line:>5}  {site.scope}  {typer.style(value, fg='cyan')}  {roles}{extra}")
    _warn(result.warnings)


def _show_apply(result: ApplyResult, dry_run: bool) -> None:
    if dry_run:
        sys.stdout.write(result.diff)
    for change in result.changes:
        typer.echo(f"{change.file}:{change.line} {change.scope} [{change.role}] {change.old} -> {change.new}")
    values = " ".join(f"{role}={value}" for role, value in result.values.items())
    for role in result.absent:
        typer.echo(f"{role}: not in this tree, runs bf16")
    if dry_run:
        typer.echo(f"dry run: nothing written ({values})")
    elif result.commit is None:
        typer.echo(f"nothing to change: already {values}")
    else:
        typer.echo(f"committed {result.commit[:12]} on {result.branch} in {result.repo} ({values})")
    _warn(result.warnings)


def _add_core_commands(app: typer.Typer) -> None:
    @app.command("status")
    def status_command(repo: RepoOpt = Path("."), as_json: JsonOpt = False, spec: SpecOpt = None) -> None:
        """Show every quantization site, the branch and its base, and warnings about interrupted work."""
        from megaquant import api

        result = api.status(repo, spec=spec)
        _print_json(result.to_json()) if as_json else _show_status(result)

    @app.command("set")
    def set_command(
        repo: RepoOpt = Path("."),
        linear: Annotated[
            str | None, typer.Option(help=f"All linear roles the tree has (fwd, dgrad, wgrad): {ValueOpt}.")
        ] = None,
        linear_fwd: Annotated[str | None, typer.Option(help="Linear forward GEMM.")] = None,
        linear_bwd: Annotated[
            str | None, typer.Option(help="Both linear backward roles the tree has (dgrad, wgrad).")
        ] = None,
        linear_dgrad: Annotated[str | None, typer.Option(help="Linear data-gradient GEMM.")] = None,
        linear_wgrad: Annotated[str | None, typer.Option(help="Linear weight-gradient GEMM.")] = None,
        qk: Annotated[str | None, typer.Option(help="Attention Q·K^T GEMM.")] = None,
        pv: Annotated[str | None, typer.Option(help="Attention P·V GEMM.")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the diff; write nothing.")] = False,
        as_json: JsonOpt = False,
        worktree: Annotated[
            Path | None, typer.Option(help="Make the change in a new git worktree DIR; the checkout stays.")
        ] = None,
        spec: SpecOpt = None,
    ) -> None:
        """Set role values on the throwaway branch megaquant/<base> (one commit; restore undoes it).

        A group (--linear, --linear-bwd) sets the roles the tree has and names those it lacks; a role
        named on its own that the tree lacks, or one with no GEMM found, is an error (exit 1)."""
        options = (linear, linear_fwd, linear_bwd, linear_dgrad, linear_wgrad, qk, pv)
        if all(v is None for v in options):
            from megaquant.api import SET_OPTIONS

            raise typer.BadParameter(f"give at least one of {', '.join(SET_OPTIONS)}")
        from megaquant import api

        result = api.apply(
            repo,
            linear=linear,
            linear_fwd=linear_fwd,
            linear_bwd=linear_bwd,
            linear_dgrad=linear_dgrad,
            linear_wgrad=linear_wgrad,
            qk=qk,
            pv=pv,
            dry_run=dry_run,
            worktree=worktree,
            spec=spec,
        )
        _print_json(result.to_json()) if as_json else _show_apply(result, dry_run)

    @app.command("restore")
    def restore_command(
        repo: RepoOpt = Path("."),
        keep: Annotated[bool, typer.Option("--keep", help="Keep the throwaway branch.")] = False,
    ) -> None:
        """Return to the base (undoing an interrupted set); exits 0 when there is nothing to restore."""
        from megaquant import api

        typer.echo(api.restore(repo, keep=keep).message)

    @app.command("diff")
    def diff_command(repo: RepoOpt = Path(".")) -> None:
        """Print what megaquant committed on the throwaway branch, against its base."""
        from megaquant import api

        sys.stdout.write(api.diff(repo))


_CORE_COMMANDS = frozenset({"status", "set", "restore", "diff"})


def package_version() -> str:
    """The installed distribution's version (package metadata), else `megaquant.__version__` (source tree)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("megaquant")
    except importlib.metadata.PackageNotFoundError:
        from megaquant import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"megaquant {package_version()}")
        raise typer.Exit()


def build_app(modules: tuple[str, ...] | None = None) -> typer.Typer:
    """The typer app: the core commands plus those of `modules` (default: every `_COMMAND_MODULES` entry)."""
    new_app = typer.Typer(
        cls=_Group,
        name="megaquant",
        help="Exact, safe low-precision training experiments on Megatron-LM.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @new_app.callback()
    def _root(
        version: Annotated[
            bool,
            typer.Option(
                "--version",
                callback=_print_version,
                is_eager=True,
                help="Print the version and exit.",
            ),
        ] = False,
    ) -> None:
        pass

    _add_core_commands(new_app)
    for name in dict.fromkeys(_COMMAND_MODULES if modules is None else modules):
        importlib.import_module(name).register(new_app)
    return new_app


if TYPE_CHECKING:
    app: typer.Typer


def __getattr__(name: str) -> object:
    # `app` (every command) is built on first use, so `megaquant status` need not import the other modules.
    if name == "app":
        globals()["app"] = built = build_app()
        return built
    raise AttributeError(f"module 'megaquant.cli' has no attribute {name!r}")


def main() -> None:
    """Console entry point: a core command runs on an app without the registered modules (start-up time,
    and a broken optional module cannot take `status`/`set`/`restore`/`diff` down with it)."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    core_only = command in _CORE_COMMANDS or (command is None and "--version" in sys.argv[1:])
    chosen = build_app(()) if core_only else build_app()
    chosen(prog_name="megaquant")
