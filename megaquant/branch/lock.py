"""The repository lock: one megaquant operation at a time across all worktrees of a repository."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import git

from megaquant.branch.repo import common_dir
from megaquant.errors import LockedError

__all__ = ["LOCK_NAME", "LockInfo", "lock_info", "repo_lock"]

LOCK_NAME = "megaquant.lock"


@dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str
    op: str
    alive: bool

    def describe(self) -> str:
        state = "running" if self.alive else "dead (stale lock)"
        return f"megaquant {self.op} by pid {self.pid} on {self.host}, {state}"


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
    path = common_dir(repo) / LOCK_NAME
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
def repo_lock(
    repo: git.Repo, op: str, *, break_stale: bool = False, wait_s: float = 0.0
) -> Iterator[list[str]]:
    """Hold the repository lock (shared by all worktrees); yields notes (a stale lock that was broken).

    `wait_s` > 0: while another live process holds the lock, retry for up to that long (experiments started
    together in their own worktrees each hold it for the second or two of their set / restore) instead of
    failing at once. A lock this process holds itself is never waited for."""
    path = common_dir(repo) / LOCK_NAME
    notes: list[str] = []
    deadline = time.monotonic() + wait_s
    attempt = 0
    while True:
        attempt += 1
        if attempt > 2 and time.monotonic() >= deadline:
            raise LockedError(f"{path}: could not take the repository lock; try again")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = lock_info(repo)
            if info is None:
                continue  # released between our open and read
            ours = info.pid == os.getpid() and info.host == socket.gethostname()
            if info.alive and not ours and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            if info.alive or not break_stale:
                hint = "wait for it to finish" if info.alive else "run `megaquant restore` to break it"
                waited = f" (waited {wait_s:.0f} s)" if wait_s > 0 and info.alive and not ours else ""
                raise LockedError(f"{path}: repository locked by {info.describe()}{waited}; {hint}") from None
            path.unlink(missing_ok=True)
            notes.append(f"broke a stale lock: {info.describe()}")
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "op": op}, handle)
        break
    try:
        yield notes
    finally:
        path.unlink(missing_ok=True)
