"""Repository basics for the git lifecycle: the base, opening a checkout, git errors, atomic writes.

Test hook: `MEGAQUANT_FAULT=<step>` exits 137 at that step (`fault`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import git

from megaquant.errors import GitStateError

__all__ = [
    "BRANCH_PREFIX",
    "FAULT_ENV",
    "Base",
    "atomic_write",
    "blob_hash",
    "common_dir",
    "config_value",
    "current_base",
    "dirty_paths",
    "fault",
    "git_dir",
    "git_errors",
    "head_branch",
    "head_commit",
    "open_repo",
    "throwaway_branch",
    "worktree_root",
]

BRANCH_PREFIX = "megaquant/"
FAULT_ENV = "MEGAQUANT_FAULT"


def fault(step: str) -> None:
    """Test hook: simulate a crash (SIGKILL-like exit, no cleanup) at a named step."""
    if os.environ.get(FAULT_ENV) == step:
        os._exit(137)


@dataclass(frozen=True)
class Base:
    """What the throwaway branch was made from: a branch (with its commit then) or a detached commit."""

    branch: str | None
    commit: str

    def label(self) -> str:
        return f"{self.branch}@{self.commit}" if self.branch else self.commit

    @staticmethod
    def parse(label: str) -> Base:
        name, sep, commit = label.strip().rpartition("@")
        return Base(name, commit) if sep and name else Base(None, commit)


@contextlib.contextmanager
def git_errors(action: str) -> Iterator[None]:
    """Turn GitPython errors into a GitStateError a user can act on (no traceback at the CLI)."""
    try:
        yield
    except git.GitCommandError as exc:
        text = (exc.stderr or exc.stdout or str(exc)).strip().removeprefix("stderr:").strip().strip("'")
        detail = "; ".join(line.strip() for line in text.splitlines() if line.strip())  # one line
        raise GitStateError(
            f"{action}: git {exc.command[1] if len(exc.command) > 1 else ''} failed: {detail}"
        ) from exc
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        raise GitStateError(f"{action}: {exc} is not a git repository; pass --repo DIR") from exc


def open_repo(path: str | Path = ".") -> git.Repo:
    where = Path(path)
    if not where.exists():
        raise GitStateError(f"{where}: no such directory; pass --repo DIR of a git checkout")
    try:
        repo = git.Repo(where, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        raise GitStateError(f"{where}: not inside a git repository; pass --repo DIR of a checkout") from exc
    if repo.bare:
        raise GitStateError(f"{where}: a bare repository has no checkout to change")
    return repo


def worktree_root(repo: git.Repo) -> Path:
    assert repo.working_tree_dir is not None
    return Path(repo.working_tree_dir).resolve()


def head_branch(repo: git.Repo) -> str | None:
    return None if repo.head.is_detached else repo.active_branch.name


def head_commit(repo: git.Repo) -> str | None:
    """The HEAD commit, or None in a repository without commits."""
    try:
        return repo.head.commit.hexsha
    except ValueError:
        return None


def config_value(repo: git.Repo, key: str) -> str | None:
    try:
        return str(repo.git.config("--get", key)).strip() or None
    except git.GitCommandError:
        return None


def current_base(repo: git.Repo) -> Base:
    commit = head_commit(repo)
    if commit is None:
        raise GitStateError(f"{worktree_root(repo)}: no commit yet; commit the sources first")
    return Base(head_branch(repo), commit)


def throwaway_branch(base: Base, worktree: Path | None = None) -> str:
    name = BRANCH_PREFIX + (base.branch or base.commit[:12])
    return f"{name}-{worktree.name}" if worktree is not None else name


def blob_hash(data: bytes) -> str:
    """The git blob id of `data` (what `git hash-object` prints without filters)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git_dir(repo: git.Repo) -> Path:
    return Path(repo.git_dir).resolve()


def common_dir(repo: git.Repo) -> Path:
    # resolved: a linked worktree's common dir is `.git/worktrees/<name>/../..`, gone once it is removed
    return Path(repo.common_dir).resolve()


def atomic_write(target: Path, data: bytes, mode: int | None = None) -> None:
    """Temp file in the same directory + fsync + os.replace, so a reader sees the old or the new bytes."""
    tmp = target.with_name(f".{target.name}.megaquant-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode if mode is not None else 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def dirty_paths(repo: git.Repo, paths: Sequence[str] = ()) -> dict[str, str]:
    """path -> porcelain status code for modified, staged or untracked paths (limited to `paths` if given)."""
    with git_errors("reading the working-tree status"):
        # no optional index refresh: a read-only `status` must never hold index.lock against a `set`
        out = repo.git.status(
            "--porcelain=v1", "-z", "--untracked-files=all", "--", *paths, env={"GIT_OPTIONAL_LOCKS": "0"}
        )
    entries = out.split("\0")
    result: dict[str, str] = {}
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        code, name = entry[:2], entry[3:]
        if code[0] in "RC":
            i += 1  # the rename source follows
        result[name] = code
    return result
