"""The git and file edge of `megaquant instrument`: read a tree's sources, write and commit the plan."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from megaquant.errors import GitStateError
from megaquant.instrument import attention as fused_attention
from megaquant.instrument.plan import plan_instrument
from megaquant.instrument.rules import (
    DEFAULT_BRANCH,
    SPEC_NAME,
    InstrumentError,
    InstrumentRules,
    load_rules,
    rules_path,
)
from megaquant.instrument.transform import Edit

__all__ = ["InstrumentResult", "copy_installed", "instrument_repo", "read_sources"]


@dataclass(frozen=True)
class InstrumentResult:
    repo: str
    branch: str
    commit: str | None  # None: the tree was already instrumented, nothing committed
    edits: tuple[Edit, ...] = field(default_factory=tuple)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: `megatron/core/models/**/*.py` -> its models/."""
    parts = []
    for part in pattern.split("/"):
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return "/".join(parts)


def read_sources(root: Path, rules: InstrumentRules) -> dict[str, bytes]:
    """The files the rules name (those present) and the model sources the LM-head check covers."""
    sources = {f: (root / f).read_bytes() for f in rules.files() if (root / f).is_file()}
    if rules.lm_head is not None:
        base = root / _glob_root(rules.lm_head.models)
        if base.is_dir():
            for path in sorted(base.rglob("*.py")):
                rel = path.relative_to(root).as_posix()
                if rules.wants(rel) and "__pycache__" not in rel:
                    sources.setdefault(rel, path.read_bytes())
    return sources


def copy_installed(dest: Path, *, source: Path | None = None) -> Path:
    """Copy the installed megatron-core package (`megatron/`) into `dest`, a new git repo with one commit."""
    import git

    from megaquant.megatron_src import installed_megatron

    root = source or installed_megatron()
    if root is None:
        raise InstrumentError(
            "megatron-core is not installed; `pip install 'megaquant[megatron]'` or pass --repo"
        )
    if dest.exists() and any(dest.iterdir()):
        raise GitStateError(f"{dest}: exists and is not empty; choose a new directory for --from-installed")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        root / "megatron", dest / "megatron", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    repo = git.Repo.init(dest, initial_branch="stock")
    with repo.config_writer() as cfg:
        if not repo.config_reader().has_option("user", "email"):
            cfg.set_value("user", "email", "megaquant@localhost")
            cfg.set_value("user", "name", "megaquant")
    repo.git.add("--all", "--", "megatron")
    version = _installed_version()
    repo.index.commit(f"stock megatron-core {version} (copied by megaquant instrument --from-installed)")
    return dest


def _installed_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def instrument_repo(
    repo_dir: Path,
    *,
    include_lm_head: bool = False,
    branch: str = DEFAULT_BRANCH,
    rules: InstrumentRules | None = None,
) -> InstrumentResult:
    """Instrument the Megatron tree in git repo `repo_dir` and commit the result on `branch`.

    The branch is created from HEAD (or reused when it is checked out). Files to change must have no
    uncommitted edits. An already instrumented tree gives `commit=None` and touches nothing.
    """
    import git

    rules = rules or load_rules()
    try:
        repo = git.Repo(repo_dir)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        raise GitStateError(
            f"{repo_dir}: not a git repository; `git init` it or use --from-installed DIR"
        ) from exc
    root = Path(repo.working_tree_dir or repo_dir)
    sources = read_sources(root, rules)
    plan = plan_instrument(sources, rules, include_lm_head=include_lm_head)
    plan = fused_attention.with_fused_attention(plan, dict(sources), rules_path())
    current = None if repo.head.is_detached else repo.active_branch.name
    if not plan.changed:
        return InstrumentResult(str(root), current or repo.head.commit.hexsha, None, plan.edits)
    untracked = set(repo.untracked_files)  # one `git status`, not one per file (Megatron-LM is large)
    dirty = [f for f in plan.new_sources if f in untracked or repo.is_dirty(path=f)]
    if dirty:
        raise GitStateError(
            f"{', '.join(dirty)}: uncommitted changes; commit or discard them, then run again"
        )
    if current != branch:
        if branch in repo.heads:
            raise GitStateError(
                f"branch {branch!r} already exists; check it out (`git checkout {branch}`) "
                "or pass --branch NAME"
            )
        repo.create_head(branch).checkout()
    for rel, data in plan.new_sources.items():
        target = root / rel
        tmp = target.with_name(target.name + ".megaquant-tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    repo.index.add(list(plan.new_sources))
    roles = sorted({e.role for e in plan.edits if e.role})
    unhooked = sorted({f"{e.file}:{e.line}" for e in plan.edits if e.kind == "unhooked"})
    message = (
        "megaquant instrument: hook GEMMs to megaquant.ops\n\n"
        f"Megaquant-Instrument-Roles: {', '.join(roles)}\n"
        f"Megaquant-Instrument-LM-Head: {'included' if include_lm_head else 'excluded'}\n"
        + (f"Megaquant-Instrument-Unhooked: {', '.join(unhooked)}\n" if unhooked else "")
    )
    commit = repo.index.commit(message)
    with repo.config_writer() as cfg:  # names the spec that finds these sites (a hint for `status`/`set`)
        cfg.set_value("megaquant", "spec", SPEC_NAME)
    return InstrumentResult(str(root), branch, commit.hexsha, plan.edits)
