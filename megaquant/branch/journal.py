"""The journal: what an in-flight `set` or `restore` is doing, written before any file changes, so a
killed process leaves a state that `status` explains and `restore` repairs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import git

from megaquant.branch.repo import Base, atomic_write, git_dir
from megaquant.errors import GitStateError

__all__ = ["JOURNAL_NAME", "Journal", "JournalFile", "drop_journal", "read_journal", "write_journal"]

JOURNAL_NAME = "megaquant-journal.json"


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


def read_journal(repo: git.Repo) -> Journal | None:
    path = git_dir(repo) / JOURNAL_NAME
    try:
        return Journal.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise GitStateError(f"{path}: unreadable megaquant journal ({exc}); inspect and delete it") from exc


def write_journal(repo: git.Repo, journal: Journal) -> None:
    atomic_write(git_dir(repo) / JOURNAL_NAME, json.dumps(journal.to_json(), indent=1).encode())


def drop_journal(repo: git.Repo) -> None:
    (git_dir(repo) / JOURNAL_NAME).unlink(missing_ok=True)
