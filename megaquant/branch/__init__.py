"""Git lifecycle of `set`/`restore`, one module per concept: `repo` (base, checkout, git errors, atomic
writes), `lock`, `journal`, `state` (recorded base, warnings for `status`) and `lifecycle` (set, restore).

GitPython only; knows nothing about Megatron. Test hook: `MEGAQUANT_FAULT=<step>` exits 137 at that step.
"""

from __future__ import annotations

from megaquant.branch.journal import JOURNAL_NAME, Journal, JournalFile, read_journal
from megaquant.branch.lifecycle import (
    RESTORE_STEPS,
    SET_STEPS,
    VALUES_TRAILER,
    Committed,
    Restored,
    add_worktree,
    commit_files,
    commit_message,
    discard_worktree,
    restore,
)
from megaquant.branch.lock import LOCK_NAME, LockInfo, lock_info, repo_lock
from megaquant.branch.repo import (
    BRANCH_PREFIX,
    FAULT_ENV,
    Base,
    blob_hash,
    config_value,
    current_base,
    dirty_paths,
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
    describe_state,
    recorded_base,
)

__all__ = [
    "BASE_CONFIG_KEY",
    "BASE_TRAILER",
    "BRANCH_PREFIX",
    "FAULT_ENV",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "RESTORE_STEPS",
    "SET_STEPS",
    "VALUES_TRAILER",
    "WORKTREE_CONFIG_KEY",
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
