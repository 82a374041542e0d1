"""Git lifecycle of `set`/`restore`: lock, throwaway branch or worktree, journal, atomic writes, commit.

GitPython only; knows nothing about Megatron. Test hook: `MEGAQUANT_FAULT=<step>` exits 137 at that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import git

from megaquant.errors import GitStateError, LockedError

__all__ = [
    "BRANCH_PREFIX",
    "FAULT_ENV",
    "RESTORE_STEPS",
    "SET_STEPS",
    "Base",
    "Committed",
    "Journal",
    "JournalFile",
    "LockInfo",
    "Restored",
    "add_worktree",
    "blob_hash",
    "commit_files",
    "commit_message",
    "config_value",
    "current_base",
    "describe_state",
    "discard_worktree",
    "dirty_paths",
    "git_errors",
    "head_branch",
    "head_commit",
    "lock_info",
    "open_repo",
    "read_journal",
    "recorded_base",
    "repo_lock",
    "restore",
    "throwaway_branch",
    "worktree_root",
]

BRANCH_PREFIX = "megaquant/"
FAULT_ENV = "MEGAQUANT_FAULT"
LOCK_NAME = "megaquant.lock"
JOURNAL_NAME = "megaquant-journal.json"
BASE_CONFIG_KEY = "megaquantBase"
WORKTREE_CONFIG_KEY = "megaquantWorktree"  # set on branches made by --worktree: restore removes that worktree
BASE_TRAILER = "Megaquant-Base"
VALUES_TRAILER = "Megaquant-Values"
# Named steps of `set` and `restore`, in order; MEGAQUANT_FAULT=<step> exits with 137 right after that step.
SET_STEPS = ("locked", "journal", "branch", "write-partial", "write", "add", "commit", "unjournal")
RESTORE_STEPS = ("restore-locked", "restore-revert", "restore-journal", "restore-checkout", "restore-delete")


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


@dataclass(frozen=True)
class JournalFile:
    path: str
    before: str
    after: str


@dataclass(frozen=True)
class Journal:
    """Written under the git dir before any file change; present only while an operation is in flight."""

    op: str
    base: Base
    branch: str
    files: tuple[JournalFile, ...]
    step: str
    pid: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, object]) -> Journal:
        base = data["base"]
        files = data.get("files") or []
        if not isinstance(base, dict) or not isinstance(files, list):
            raise ValueError("`base` must be an object and `files` a list")
        return Journal(
            op=str(data["op"]),
            base=Base(base.get("branch"), str(base["commit"])),
            branch=str(data["branch"]),
            files=tuple(JournalFile(str(f["path"]), str(f["before"]), str(f["after"])) for f in files),
            step=str(data.get("step", "")),
            pid=int(str(data.get("pid", 0))),
        )


@dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str
    op: str
    alive: bool

    def describe(self) -> str:
        state = "running" if self.alive else "dead (stale lock)"
        return f"megaquant {self.op} by pid {self.pid} on {self.host}, {state}"


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


# ---------------------------------------------------------------- repository basics


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


def _git_dir(repo: git.Repo) -> Path:
    return Path(repo.git_dir).resolve()


def _common_dir(repo: git.Repo) -> Path:
    # resolved: a linked worktree's common dir is `.git/worktrees/<name>/../..`, gone once it is removed
    return Path(repo.common_dir).resolve()


def _atomic_write(target: Path, data: bytes, mode: int | None = None) -> None:
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


# ---------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_info(repo: git.Repo) -> LockInfo | None:
    path = _common_dir(repo) / LOCK_NAME
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text or "{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        # Written between O_EXCL create and the dump: young means its owner is still writing it.
        return LockInfo(0, "?", "?", alive=age < 10)
    pid, host = int(data["pid"]), str(data.get("host", "?"))
    alive = _pid_alive(pid) if host == socket.gethostname() else True
    return LockInfo(pid, host, str(data.get("op", "?")), alive)


@contextlib.contextmanager
def repo_lock(repo: git.Repo, op: str, *, break_stale: bool = False) -> Iterator[list[str]]:
    """Hold the repository lock (shared by all worktrees); yields notes (a stale lock that was broken)."""
    path = _common_dir(repo) / LOCK_NAME
    notes: list[str] = []
    for _attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = lock_info(repo)
            if info is None:
                continue  # released between our open and read
            if info.alive or not break_stale:
                hint = "wait for it to finish" if info.alive else "run `megaquant restore` to break it"
                raise LockedError(f"{path}: repository locked by {info.describe()}; {hint}") from None
            path.unlink(missing_ok=True)
            notes.append(f"broke a stale lock: {info.describe()}")
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "op": op}, handle)
        break
    else:
        raise LockedError(f"{path}: could not take the repository lock; try again")
    try:
        yield notes
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- journal


def read_journal(repo: git.Repo) -> Journal | None:
    path = _git_dir(repo) / JOURNAL_NAME
    try:
        return Journal.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise GitStateError(f"{path}: unreadable megaquant journal ({exc}); inspect and delete it") from exc


def _write_journal(repo: git.Repo, journal: Journal) -> None:
    _atomic_write(_git_dir(repo) / JOURNAL_NAME, json.dumps(journal.to_json(), indent=1).encode())


def _drop_journal(repo: git.Repo) -> None:
    (_git_dir(repo) / JOURNAL_NAME).unlink(missing_ok=True)


# ---------------------------------------------------------------- state queries


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


def _user_commits(repo: git.Repo, base: Base, branch: str) -> list[str]:
    """Commits on the throwaway branch that megaquant did not make (they would be lost by deleting it)."""
    if branch not in repo.heads:
        return []
    return [
        f"{c.hexsha[:12]} {c.summary!s}"
        for c in repo.iter_commits(f"{base.commit}..{branch}")
        if f"\n{BASE_TRAILER}:" not in str(c.message)
    ]


def _changed_since(repo: git.Repo, base: Base) -> set[str]:
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
    if journal is not None:
        what = "set" if journal.op == "set" else "restore"
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
            changed = _changed_since(repo, base) if base else set()
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
    _write_journal(repo, journal)
    fault("journal")
    try:
        _prepare_branch(repo, base, branch)
    except GitStateError:
        _drop_journal(repo)  # nothing was written
        raise
    try:
        _write_journal(repo, dataclasses.replace(journal, step="branch"))
        fault("branch")
        for i, p in enumerate(paths):
            _atomic_write(targets[p], new_sources[p], stat.S_IMODE(targets[p].stat().st_mode))
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
    _drop_journal(repo)
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


def restore(repo: git.Repo, *, keep: bool = False) -> Restored:
    """Return to the recorded base, undoing an interrupted set; refuse rather than discard a user's edits."""
    with repo_lock(repo, "restore", break_stale=True) as notes:
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
        _drop_journal(repo)
        return Restored(True, branch, f"deleted {branch}, left by an interrupted worktree restore")
    root = worktree_root(repo)
    ours = {f.path: f for f in journal.files} if journal and journal.op == "set" else {}
    # Only the throwaway branch can hold megaquant's writes; other uncommitted work elsewhere is not ours.
    dirty = {p: code for p, code in dirty_paths(repo).items() if code != "??"} if on == branch else {}
    # Uncommitted edits of other files are carried to the base by the checkout (git refuses rather than
    # overwrite); edits of files megaquant changed would be lost, so they are refused.
    changed = _changed_since(repo, base) if dirty else set()
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
        foreign = _user_commits(repo, base, branch)
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
    _write_journal(repo, Journal("restore", base, branch, (), "restore", os.getpid()))
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
    _drop_journal(repo)
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
        _write_journal(main, Journal("restore-worktree", base, branch, (), "restore", os.getpid()))
    _drop_journal(repo)
    try:
        with git_errors(f"removing worktree {root} (move untracked files out of it first)"):
            main.git.worktree("remove", str(root))
    except GitStateError:
        _drop_journal(main)  # the worktree and its branch are still there; nothing is half done
        raise
    fault("restore-checkout")
    if not keep and branch in main.heads:
        with git_errors(f"deleting {branch}"):
            main.git.branch("-D", branch)
    fault("restore-delete")
    _drop_journal(main)
    kept = f" (kept {branch})" if keep else f" and deleted {branch}"
    return Restored(True, branch, f"removed worktree {root}{kept}")
