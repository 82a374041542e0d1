"""The lifecycle of `set` and `restore`: throwaway branch or worktree, journalled atomic writes, one commit
with trailers; back to the base, repairing an interrupted operation and refusing to discard a user's edits.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import git

from megaquant.branch.journal import Journal, JournalFile, drop_journal, read_journal, write_journal
from megaquant.branch.lock import repo_lock
from megaquant.branch.repo import (
    BRANCH_PREFIX,
    Base,
    atomic_write,
    blob_hash,
    config_value,
    dirty_paths,
    fault,
    git_errors,
    head_branch,
    head_commit,
    open_repo,
    throwaway_branch,
    worktree_root,
)
from megaquant.branch.state import (
    BASE_CONFIG_KEY,
    BASE_TRAILER,
    WORKTREE_CONFIG_KEY,
    changed_since,
    recorded_base,
    user_commits,
)
from megaquant.errors import GitStateError

__all__ = [
    "RESTORE_STEPS",
    "SET_STEPS",
    "VALUES_TRAILER",
    "Committed",
    "Restored",
    "add_worktree",
    "commit_files",
    "commit_message",
    "discard_worktree",
    "restore",
]

VALUES_TRAILER = "Megaquant-Values"
# Named steps of `set` and `restore`, in order; MEGAQUANT_FAULT=<step> exits with 137 right after that step.
SET_STEPS = ("locked", "journal", "branch", "write-partial", "write", "add", "commit", "unjournal")
RESTORE_STEPS = ("restore-locked", "restore-revert", "restore-journal", "restore-checkout", "restore-delete")


@dataclass(frozen=True)
class Committed:
    repo: str
    branch: str
    base: Base
    commit: str | None


@dataclass(frozen=True)
class Restored:
    restored: bool
    branch: str | None
    message: str


# ---------------------------------------------------------------- set


def _checked_target(root: Path, rel: str) -> Path:
    target = (root / rel).absolute()
    if not target.resolve().is_relative_to(root) or target.is_symlink():
        raise GitStateError(f"{rel}: a symlink or outside the repository; megaquant will not write it")
    return target


def _check_branch(repo: git.Repo, base: Base, name: str) -> None:
    """An existing throwaway branch is reused only if HEAD is on it or it points at HEAD."""
    if head_branch(repo) != name and name in repo.heads and repo.heads[name].commit.hexsha != base.commit:
        raise GitStateError(
            f"branch {name} already exists at {repo.heads[name].commit.hexsha[:12]}, not at "
            f"{base.label()}; run `megaquant restore` there, or delete it (`git branch -D {name}`)"
        )


def _prepare_branch(repo: git.Repo, base: Base, name: str) -> None:
    """Check out the throwaway branch (reused or created at HEAD; the tree does not change)."""
    if head_branch(repo) == name:
        return
    with git_errors(f"checking out {name}"):
        repo.git.config(f"branch.{name}.{BASE_CONFIG_KEY}", base.label())
        repo.git.checkout(*([name] if name in repo.heads else ["-b", name]))


def add_worktree(repo: git.Repo, directory: Path, base: Base) -> git.Repo:
    """Create `directory` as a new git worktree on a fresh throwaway branch at the base commit."""
    if directory.exists() and any(directory.iterdir()):
        raise GitStateError(f"{directory}: exists and is not empty; choose a new directory for --worktree")
    name = throwaway_branch(base, directory)
    if name in repo.heads:
        raise GitStateError(
            f"branch {name} already exists; delete it (`git branch -D {name}`) or pick another DIR"
        )
    with git_errors(f"creating worktree {directory}"):
        repo.git.config(f"branch.{name}.{BASE_CONFIG_KEY}", base.label())
        repo.git.config(f"branch.{name}.{WORKTREE_CONFIG_KEY}", str(directory.resolve()))
        repo.git.worktree("add", "-b", name, str(directory), base.commit)
    return open_repo(directory)


def discard_worktree(repo: git.Repo, directory: Path, branch: str) -> None:
    """Remove a worktree megaquant just created (and its branch) after a failure before any commit."""
    with git_errors(f"removing the new worktree {directory}"):
        repo.git.worktree("remove", "--force", str(directory))
        repo.git.branch("-D", branch)


def commit_files(
    repo: git.Repo,
    new_sources: Mapping[str, bytes],
    before: Mapping[str, bytes],
    *,
    base: Base,
    branch: str,
    message: str,
) -> Committed:
    """Under the held lock: refuse dirty targets, journal, branch, write atomically, add, commit.

    `before`: the bytes each change was planned from; a target whose bytes or git state differ is refused.
    """
    root = worktree_root(repo)
    paths = sorted(new_sources)
    targets = {p: _checked_target(root, p) for p in paths}
    dirty = dirty_paths(repo, paths)
    for p in paths:
        if p in dirty:
            kind = "untracked" if dirty[p] == "??" else "uncommitted changes"
            raise GitStateError(f"{p}: has {kind}; commit or stash them first (nothing was written)")
        if targets[p].read_bytes() != before[p]:
            raise GitStateError(f"{p}: changed while megaquant was planning; run the command again")
    _check_branch(repo, base, branch)
    fault("locked")
    journal = Journal(
        "set",
        base,
        branch,
        tuple(JournalFile(p, blob_hash(before[p]), blob_hash(new_sources[p])) for p in paths),
        "journal",
        os.getpid(),
    )
    write_journal(repo, journal)
    fault("journal")
    try:
        _prepare_branch(repo, base, branch)
    except GitStateError:
        drop_journal(repo)  # nothing was written
        raise
    try:
        write_journal(repo, dataclasses.replace(journal, step="branch"))
        fault("branch")
        for i, p in enumerate(paths):
            atomic_write(targets[p], new_sources[p], stat.S_IMODE(targets[p].stat().st_mode))
            if i == 0:
                fault("write-partial")
        fault("write")
        with git_errors("staging the rewritten files"):
            repo.git.add("--", *paths)
        fault("add")
        with git_errors("committing the rewritten files"):
            repo.git.commit("--no-verify", "-q", "-m", message, "--", *paths)
    except (GitStateError, OSError) as exc:
        raise GitStateError(
            f"{exc}; the set is half done on {branch}: `megaquant restore` undoes it"
        ) from exc
    fault("commit")
    drop_journal(repo)
    fault("unjournal")
    return Committed(str(root), branch, base, repo.head.commit.hexsha)


def commit_message(subject: str, body: str, base: Base, values: Mapping[str, str]) -> str:
    trailer_values = " ".join(f"{role}={value}" for role, value in values.items())
    parts = [subject, body.strip(), f"{BASE_TRAILER}: {base.label()}\n{VALUES_TRAILER}: {trailer_values}"]
    return "\n\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------- restore


def _main_worktree(repo: git.Repo) -> Path:
    with git_errors("listing worktrees"):
        first = repo.git.worktree("list", "--porcelain").splitlines()[0]
    return Path(first.removeprefix("worktree "))


def restore(repo: git.Repo, *, keep: bool = False, lock_wait_s: float = 0.0) -> Restored:
    """Return to the recorded base, undoing an interrupted set; refuse rather than discard a user's edits.
    `lock_wait_s`: how long to wait for another live process's repository lock (see repo_lock)."""
    with repo_lock(repo, "restore", break_stale=True, wait_s=lock_wait_s) as notes:
        fault("restore-locked")
        result = _restore_locked(repo, keep=keep)
    if notes:
        message = "; ".join([*notes, result.message])
        return Restored(result.restored or bool(notes), result.branch, message)
    return result


def _restore_locked(repo: git.Repo, *, keep: bool) -> Restored:
    journal = read_journal(repo)
    on = head_branch(repo)
    if journal is None and not (on and on.startswith(BRANCH_PREFIX)):
        where = on or f"detached {head_commit(repo) or 'HEAD'}"
        return Restored(False, None, f"nothing to restore: {where} is not a megaquant branch")
    branch = journal.branch if journal else on
    assert branch is not None
    base = journal.base if journal else recorded_base(repo, branch)
    if base is None:
        raise GitStateError(
            f"{branch}: no recorded base (no branch config, journal or {BASE_TRAILER} trailer); "
            "check out the branch you want and delete this one by hand"
        )
    if journal is not None and journal.op == "restore-worktree":
        # a worktree restore was killed after removing the worktree: only its branch is left to delete
        if branch in repo.heads:
            with git_errors(f"deleting {branch}"):
                repo.git.branch("-D", branch)
        drop_journal(repo)
        return Restored(True, branch, f"deleted {branch}, left by an interrupted worktree restore")
    root = worktree_root(repo)
    ours = {f.path: f for f in journal.files} if journal and journal.op == "set" else {}
    # Only the throwaway branch can hold megaquant's writes; other uncommitted work elsewhere is not ours.
    dirty = {p: code for p, code in dirty_paths(repo).items() if code != "??"} if on == branch else {}
    # Uncommitted edits of other files are carried to the base by the checkout (git refuses rather than
    # overwrite); edits of files megaquant changed would be lost, so they are refused.
    changed = changed_since(repo, base) if dirty else set()
    revert: list[str] = []
    for p in dirty:
        entry = ours.get(p)
        current = blob_hash((root / p).read_bytes()) if (root / p).is_file() else ""
        if entry is not None and current in (entry.before, entry.after):
            revert.append(p)
        elif entry is not None or p in changed:
            raise GitStateError(
                f"{p}: edited on {branch} after megaquant changed it; commit or move the edit, then run "
                "restore again (nothing was discarded)"
            )
    if base.branch is not None and base.branch not in repo.heads:
        raise GitStateError(
            f"the base branch {base.branch} no longer exists; recreate it (`git branch {base.branch} "
            f"{base.commit}`) and run restore again, or check out another branch and delete {branch}"
        )
    if not keep:
        foreign = user_commits(repo, base, branch)
        if foreign:
            raise GitStateError(
                f"{branch} has commits megaquant did not make ({'; '.join(foreign)}); deleting the branch "
                "would lose them: use `megaquant restore --keep`, or cherry-pick them first"
            )
    if revert:
        with git_errors("reverting megaquant's uncommitted writes"):
            repo.git.checkout("HEAD", "--", *revert)
    for entry in ours.values():
        (root / entry.path).with_name(f".{Path(entry.path).name}.megaquant-tmp").unlink(missing_ok=True)
    fault("restore-revert")
    write_journal(repo, Journal("restore", base, branch, (), "restore", os.getpid()))
    fault("restore-journal")
    made_by_worktree = config_value(repo, f"branch.{branch}.{WORKTREE_CONFIG_KEY}")
    if made_by_worktree and on == branch and Path(made_by_worktree) == root:
        return _remove_worktree(repo, base, branch, keep=keep)
    with git_errors(f"checking out the base {base.label()}"):
        if base.branch is not None and on != base.branch:
            repo.git.checkout(base.branch)
        elif base.branch is None and (on is not None or head_commit(repo) != base.commit):
            repo.git.checkout("--detach", base.commit)
    fault("restore-checkout")
    if not keep and branch in repo.heads:
        with git_errors(f"deleting {branch}"):
            repo.git.branch("-D", branch)
    fault("restore-delete")
    drop_journal(repo)
    kept = f" (kept {branch})" if keep else f" and deleted {branch}"
    return Restored(True, branch, f"restored {base.label()}{kept}")


def _remove_worktree(repo: git.Repo, base: Base, branch: str, *, keep: bool) -> Restored:
    """Restore of a `--worktree` checkout: remove it (git refuses if it holds untracked files), then delete
    its branch. The main checkout's journal covers the window between the two."""
    root = worktree_root(repo)
    main = git.Repo(_main_worktree(repo))
    pending = read_journal(main)
    if pending is not None:
        raise GitStateError(
            f"{worktree_root(main)} has an interrupted megaquant {pending.op}; "
            "run `megaquant restore` there first"
        )
    if not keep:
        write_journal(main, Journal("restore-worktree", base, branch, (), "restore", os.getpid()))
    drop_journal(repo)
    try:
        with git_errors(f"removing worktree {root} (move untracked files out of it first)"):
            main.git.worktree("remove", str(root))
    except GitStateError:
        drop_journal(main)  # the worktree and its branch are still there; nothing is half done
        raise
    fault("restore-checkout")
    if not keep and branch in main.heads:
        with git_errors(f"deleting {branch}"):
            main.git.branch("-D", branch)
    fault("restore-delete")
    drop_journal(main)
    kept = f" (kept {branch})" if keep else f" and deleted {branch}"
    return Restored(True, branch, f"removed worktree {root}{kept}")
