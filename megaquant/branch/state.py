"""What a repository's megaquant state is: the recorded base of a throwaway branch, and the warnings
that explain an interrupted or unusual state (for `status`)."""

from __future__ import annotations

from pathlib import Path

import git

from megaquant.branch.journal import read_journal
from megaquant.branch.lock import lock_info
from megaquant.branch.repo import (
    BRANCH_PREFIX,
    Base,
    config_value,
    dirty_paths,
    git_errors,
    head_branch,
    worktree_root,
)
from megaquant.errors import GitStateError

__all__ = [
    "BASE_CONFIG_KEY",
    "BASE_TRAILER",
    "WORKTREE_CONFIG_KEY",
    "changed_since",
    "describe_state",
    "recorded_base",
    "user_commits",
]

BASE_CONFIG_KEY = "megaquantBase"
WORKTREE_CONFIG_KEY = "megaquantWorktree"  # set on branches made by --worktree: restore removes that worktree
BASE_TRAILER = "Megaquant-Base"


def recorded_base(repo: git.Repo, branch: str) -> Base | None:
    """The base recorded for a throwaway branch: branch config, then the newest commit trailer."""
    label = config_value(repo, f"branch.{branch}.{BASE_CONFIG_KEY}")
    if label:
        return Base.parse(label)
    if branch not in repo.heads:
        return None
    for commit in repo.iter_commits(branch, max_count=200):
        for line in str(commit.message).splitlines():
            if line.startswith(BASE_TRAILER + ":"):
                return Base.parse(line.split(":", 1)[1])
    return None


def user_commits(repo: git.Repo, base: Base, branch: str) -> list[str]:
    """Commits on the throwaway branch that megaquant did not make (they would be lost by deleting it)."""
    if branch not in repo.heads:
        return []
    return [
        f"{c.hexsha[:12]} {c.summary!s}"
        for c in repo.iter_commits(f"{base.commit}..{branch}")
        if f"\n{BASE_TRAILER}:" not in str(c.message)
    ]


def changed_since(repo: git.Repo, base: Base) -> set[str]:
    """Files the throwaway branch's commits changed relative to the base."""
    with git_errors("listing the files megaquant changed"):
        return set(repo.git.diff("--name-only", "-z", base.commit, "HEAD").split("\0")) - {""}


def _megaquant_worktrees(repo: git.Repo) -> list[tuple[Path, str]]:
    """(directory, branch) of the other worktrees of this repository that are on a megaquant branch."""
    with git_errors("listing worktrees"):
        listing = repo.git.worktree("list", "--porcelain")
    found: list[tuple[Path, str]] = []
    directory: Path | None = None
    for line in listing.splitlines():
        if line.startswith("worktree "):
            directory = Path(line.removeprefix("worktree "))
        elif line.startswith("branch refs/heads/" + BRANCH_PREFIX) and directory is not None:
            found.append((directory, line.removeprefix("branch refs/heads/")))
    here = worktree_root(repo)
    return [(d, b) for d, b in found if d.resolve() != here]


def describe_state(repo: git.Repo) -> list[str]:
    """Warnings that explain an interrupted or unusual state (for `status`)."""
    notes: list[str] = []
    for directory, name in _megaquant_worktrees(repo):
        gone = "" if directory.is_dir() else " (directory gone: `git worktree prune` forgets it)"
        hint = f"`megaquant restore --repo {directory}` undoes it"
        notes.append(f"megaquant worktree {directory} on {name}{gone}; {hint}")
    info = lock_info(repo)
    if info is not None:
        if info.alive:
            notes.append(f"repository lock held: {info.describe()}")
        else:
            notes.append(f"stale repository lock: {info.describe()}; `megaquant restore` breaks it")
    journal = read_journal(repo)
    what = "set" if journal is not None and journal.op == "set" else "restore"
    if journal is not None and info is not None and info.alive and info.pid == journal.pid:
        notes.append(f"megaquant {what} in progress (pid {journal.pid}, step {journal.step!r})")
    elif journal is not None:
        notes.append(
            f"interrupted megaquant {what} (pid {journal.pid}, last step {journal.step!r}, base "
            f"{journal.base.label()}, branch {journal.branch}); run `megaquant restore` to return to the base"
        )
    branch = head_branch(repo)
    if branch and branch.startswith(BRANCH_PREFIX):
        base = (journal.base if journal else None) or recorded_base(repo, branch)
        where = base.label() if base else "unknown base"
        notes.append(
            f"on megaquant throwaway branch {branch} (base {where}); `megaquant restore` returns to it"
        )
        written = {f.path for f in journal.files} if journal else set()
        try:
            changed = changed_since(repo, base) if base else set()
        except GitStateError as exc:  # e.g. the base commit is gone; status still reports the rest
            notes.append(f"cannot compare with the base: {exc}")
            changed = set()
        dirty = [p for p, code in dirty_paths(repo).items() if code != "??"]
        ours = [p for p in dirty if p in written]
        theirs = [p for p in dirty if p in changed and p not in written]
        if ours:
            notes.append(f"uncommitted megaquant edits (interrupted set): {', '.join(ours)}")
        if theirs:
            notes.append(
                f"files megaquant changed were edited since: {', '.join(theirs)}; "
                "commit or move those edits before `megaquant restore`"
            )
    return notes
