"""megaquant.branch on real git repositories with plain file edits: lock, journal, worktree, restore."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import git
import pytest

from megaquant import branch
from megaquant.errors import GitStateError, LockedError

SOURCE = b"custom_quant_type = 'bf16'\nx = 1\n"
NEW = b"custom_quant_type = 'mxfp8'\nx = 1\n"


def make_repo(root: Path) -> git.Repo:
    root.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(root, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "Test")
        cfg.set_value("user", "email", "test@example.com")
    (root / "pkg").mkdir()
    (root / "pkg" / "a.py").write_bytes(SOURCE)
    (root / "pkg" / "b.py").write_bytes(SOURCE)
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    repo.git.add("--", "pkg/a.py", "pkg/b.py", "run.sh")
    repo.git.commit("-q", "-m", "initial")
    return repo


@pytest.fixture
def repo(tmp_path: Path) -> git.Repo:
    return make_repo(tmp_path / "repo")


def root_of(repo: git.Repo) -> Path:
    return branch.worktree_root(repo)


def set_files(repo: git.Repo, new: dict[str, bytes]) -> branch.Committed:
    """What api.apply does after planning: lock, then commit_files with the planned bytes."""
    root = root_of(repo)
    before = {p: (root / p).read_bytes() for p in new}
    base = branch.current_base(repo)
    name = branch.throwaway_branch(base)
    message = branch.commit_message("megaquant set linear_fwd=mxfp8", "", base, {"linear_fwd": "mxfp8"})
    with branch.repo_lock(repo, "set"):
        return branch.commit_files(repo, new, before, base=base, branch=name, message=message)


def test_blob_hash_matches_git(repo: git.Repo) -> None:
    assert branch.blob_hash(SOURCE) == repo.git.hash_object(str(root_of(repo) / "pkg" / "a.py"))


def test_set_commits_on_throwaway_branch_with_trailers(repo: git.Repo) -> None:
    base_sha = repo.head.commit.hexsha
    done = set_files(repo, {"pkg/a.py": NEW})
    assert repo.active_branch.name == "megaquant/main" == done.branch
    assert done.commit == repo.head.commit.hexsha
    message = str(repo.head.commit.message)
    assert f"Megaquant-Base: main@{base_sha}" in message
    assert "Megaquant-Values: linear_fwd=mxfp8" in message
    assert list(repo.head.commit.stats.files) == ["pkg/a.py"]
    assert (root_of(repo) / "pkg" / "a.py").read_bytes() == NEW
    assert not repo.is_dirty(untracked_files=True)
    assert branch.read_journal(repo) is None and branch.lock_info(repo) is None
    assert branch.recorded_base(repo, "megaquant/main") == branch.Base("main", base_sha)


def test_file_mode_kept(repo: git.Repo) -> None:
    set_files(repo, {"run.sh": b"#!/bin/sh\necho bye\n"})
    assert os.stat(root_of(repo) / "run.sh").st_mode & 0o777 == 0o755
    assert not repo.is_dirty()


def test_other_dirty_and_untracked_work_untouched(repo: git.Repo) -> None:
    root = root_of(repo)
    (root / "pkg" / "b.py").write_bytes(b"# my work\n")
    (root / "notes.txt").write_text("untracked\n")
    set_files(repo, {"pkg/a.py": NEW})
    assert (root / "pkg" / "b.py").read_bytes() == b"# my work\n"
    assert (root / "notes.txt").read_text() == "untracked\n"
    assert list(repo.head.commit.stats.files) == ["pkg/a.py"]
    restored = branch.restore(repo)
    assert restored.restored and repo.active_branch.name == "main"
    assert (root / "pkg" / "b.py").read_bytes() == b"# my work\n"
    assert (root / "notes.txt").read_text() == "untracked\n"


@pytest.mark.parametrize("how", ["modified", "staged"])
def test_dirty_target_refused_nothing_written(repo: git.Repo, how: str) -> None:
    root = root_of(repo)
    (root / "pkg" / "a.py").write_bytes(b"# edited\n")
    if how == "staged":
        repo.git.add("pkg/a.py")
    with pytest.raises(GitStateError, match=r"pkg/a.py: has uncommitted changes"):
        set_files(repo, {"pkg/a.py": NEW})
    assert (root / "pkg" / "a.py").read_bytes() == b"# edited\n"
    assert repo.active_branch.name == "main" and "megaquant/main" not in repo.heads
    assert branch.read_journal(repo) is None and branch.lock_info(repo) is None


def test_symlink_target_refused(repo: git.Repo, tmp_path: Path) -> None:
    outside = tmp_path / "outside.py"
    outside.write_bytes(SOURCE)
    os.symlink(outside, root_of(repo) / "link.py")
    repo.git.add("link.py")
    repo.git.commit("-q", "-m", "link")
    with pytest.raises(GitStateError, match="symlink or outside"):
        set_files(repo, {"link.py": NEW})
    assert outside.read_bytes() == SOURCE


def test_lock_is_exclusive_and_names_holder(repo: git.Repo) -> None:
    with branch.repo_lock(repo, "set"):
        info = branch.lock_info(repo)
        assert info is not None and info.pid == os.getpid() and info.alive
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            set_files(repo, {"pkg/a.py": NEW})
    assert branch.lock_info(repo) is None


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_lock_reported_and_broken_by_restore(repo: git.Repo) -> None:
    lock = Path(repo.common_dir) / "megaquant.lock"
    import socket

    lock.write_text(f'{{"pid": {dead_pid()}, "host": "{socket.gethostname()}", "op": "set"}}')
    info = branch.lock_info(repo)
    assert info is not None and not info.alive
    assert any("stale repository lock" in w for w in branch.describe_state(repo))
    with pytest.raises(LockedError, match="stale lock.*megaquant restore"):
        set_files(repo, {"pkg/a.py": NEW})
    result = branch.restore(repo)
    assert "broke a stale lock" in result.message and not lock.exists()


def test_restore_nothing(repo: git.Repo) -> None:
    result = branch.restore(repo)
    assert not result.restored and "nothing to restore" in result.message


def test_restore_deletes_branch_or_keeps_it(repo: git.Repo) -> None:
    set_files(repo, {"pkg/a.py": NEW})
    result = branch.restore(repo, keep=True)
    assert result.restored and repo.active_branch.name == "main" and "megaquant/main" in repo.heads
    assert (root_of(repo) / "pkg" / "a.py").read_bytes() == SOURCE
    repo.git.branch("-D", "megaquant/main")
    set_files(repo, {"pkg/a.py": NEW})
    branch.restore(repo)
    assert "megaquant/main" not in repo.heads and repo.active_branch.name == "main"


def test_second_set_reuses_branch_and_base(repo: git.Repo) -> None:
    base_sha = repo.head.commit.hexsha
    set_files(repo, {"pkg/a.py": NEW})
    root = root_of(repo)
    base, name = branch.recorded_base(repo, "megaquant/main"), "megaquant/main"
    assert base is not None
    with branch.repo_lock(repo, "set"):
        branch.commit_files(
            repo,
            {"pkg/b.py": NEW},
            {"pkg/b.py": SOURCE},
            base=base,
            branch=name,
            message=branch.commit_message("second", "", base, {}),
        )
    assert len(list(repo.iter_commits(f"{base_sha}..megaquant/main"))) == 2
    assert branch.restore(repo).restored and repo.head.commit.hexsha == base_sha
    assert (root / "pkg" / "b.py").read_bytes() == SOURCE


def test_existing_branch_elsewhere_refused(repo: git.Repo) -> None:
    set_files(repo, {"pkg/a.py": NEW})
    branch.restore(repo, keep=True)
    (root_of(repo) / "c.py").write_text("x = 2\n")
    repo.git.add("c.py")
    repo.git.commit("-q", "-m", "moved on")
    with pytest.raises(GitStateError, match="megaquant/main already exists"):
        set_files(repo, {"pkg/a.py": NEW})
    assert repo.active_branch.name == "main" and branch.read_journal(repo) is None


def test_restore_refuses_user_edit_on_branch(repo: git.Repo) -> None:
    set_files(repo, {"pkg/a.py": NEW})
    root = root_of(repo)
    (root / "pkg" / "a.py").write_bytes(NEW + b"# user edit\n")
    with pytest.raises(GitStateError, match=r"pkg/a.py: edited on megaquant/main after megaquant changed it"):
        branch.restore(repo)
    assert repo.active_branch.name == "megaquant/main"
    assert (root / "pkg" / "a.py").read_bytes() == NEW + b"# user edit\n"
    assert any("pkg/a.py" in w and "edited since" in w for w in branch.describe_state(repo))


def test_restore_refuses_user_commit_unless_keep(repo: git.Repo) -> None:
    set_files(repo, {"pkg/a.py": NEW})
    root = root_of(repo)
    (root / "pkg" / "b.py").write_bytes(b"# user commit\n")
    repo.git.commit("-q", "-m", "my experiment tweak", "--", "pkg/b.py")
    with pytest.raises(GitStateError, match="my experiment tweak"):
        branch.restore(repo)
    assert repo.active_branch.name == "megaquant/main"
    assert branch.restore(repo, keep=True).restored
    assert "megaquant/main" in repo.heads and repo.active_branch.name == "main"


def test_detached_head_base(repo: git.Repo) -> None:
    sha = repo.head.commit.hexsha
    repo.git.checkout("--detach", sha)
    done = set_files(repo, {"pkg/a.py": NEW})
    assert done.branch == f"megaquant/{sha[:12]}" and done.base == branch.Base(None, sha)
    assert f"Megaquant-Base: {sha}" in str(repo.head.commit.message)
    assert branch.restore(repo).restored
    assert repo.head.is_detached and repo.head.commit.hexsha == sha
    assert f"megaquant/{sha[:12]}" not in repo.heads


def test_worktree_leaves_main_checkout_untouched(repo: git.Repo, tmp_path: Path) -> None:
    base = branch.current_base(repo)
    with branch.repo_lock(repo, "set"):
        wt = branch.add_worktree(repo, tmp_path / "exp1", base)
        name = branch.head_branch(wt)
        assert name == "megaquant/main-exp1"
        branch.commit_files(
            wt,
            {"pkg/a.py": NEW},
            {"pkg/a.py": SOURCE},
            base=base,
            branch=name,
            message=branch.commit_message("m", "", base, {}),
        )
    assert (tmp_path / "exp1" / "pkg" / "a.py").read_bytes() == NEW
    assert (root_of(repo) / "pkg" / "a.py").read_bytes() == SOURCE and repo.active_branch.name == "main"
    assert branch.recorded_base(wt, name) == base
    result = branch.restore(branch.open_repo(tmp_path / "exp1"))
    assert result.restored and not (tmp_path / "exp1").exists() and name not in repo.heads


def test_worktree_restore_refuses_untracked_output(repo: git.Repo, tmp_path: Path) -> None:
    base = branch.current_base(repo)
    with branch.repo_lock(repo, "set"):
        branch.add_worktree(repo, tmp_path / "exp2", base)
    (tmp_path / "exp2" / "result.log").write_text("loss 1.0\n")
    with pytest.raises(GitStateError, match="removing worktree"):
        branch.restore(branch.open_repo(tmp_path / "exp2"))
    assert (tmp_path / "exp2" / "result.log").read_text() == "loss 1.0\n"


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(GitStateError, match="not inside a git repository"):
        branch.open_repo(tmp_path)
    with pytest.raises(GitStateError, match="no such directory"):
        branch.open_repo(tmp_path / "missing")


def test_lock_being_written_counts_as_held(repo: git.Repo) -> None:
    lock = Path(repo.common_dir) / "megaquant.lock"
    lock.write_text("")  # created, owner not done writing
    with pytest.raises(LockedError):
        branch.restore(repo)
    os.utime(lock, (1, 1))  # an old empty lock: its writer died
    assert "broke a stale lock" in branch.restore(repo).message


def test_restore_when_base_branch_was_deleted(repo: git.Repo) -> None:
    repo.git.checkout("-q", "-b", "dev")
    set_files(repo, {"pkg/a.py": NEW})
    repo.git.branch("-D", "dev")
    with pytest.raises(
        GitStateError, match=r"base branch dev no longer exists; recreate it \(`git branch dev"
    ):
        branch.restore(repo)
    assert repo.active_branch.name == "megaquant/dev" and branch.read_journal(repo) is None


def test_set_inside_a_users_own_worktree_restores_in_place(repo: git.Repo, tmp_path: Path) -> None:
    """A worktree the user made (not --worktree) is a checkout like any other: restore must not remove it."""
    repo.git.worktree("add", "-q", "-b", "feature", str(tmp_path / "mine"))
    mine = branch.open_repo(tmp_path / "mine")
    set_files(mine, {"pkg/a.py": NEW})
    assert branch.head_branch(mine) == "megaquant/feature"
    assert branch.restore(mine).restored
    assert (tmp_path / "mine").is_dir() and branch.head_branch(mine) == "feature"
    assert (tmp_path / "mine" / "pkg" / "a.py").read_bytes() == SOURCE


def test_failed_commit_is_explained_and_restore_undoes_it(repo: git.Repo) -> None:
    """A commit git refuses (here: signing with a failing gpg) leaves a state status explains."""
    repo.git.config("commit.gpgsign", "true")
    repo.git.config("gpg.program", "false")
    with pytest.raises(
        GitStateError, match=r"git commit failed.*half done on megaquant/main.*megaquant restore"
    ):
        set_files(repo, {"pkg/a.py": NEW})
    notes = branch.describe_state(repo)
    assert any("interrupted megaquant set" in n for n in notes)
    assert any("uncommitted megaquant edits" in n and "pkg/a.py" in n for n in notes)
    assert branch.restore(repo).restored
    assert (root_of(repo) / "pkg" / "a.py").read_bytes() == SOURCE and repo.active_branch.name == "main"
    assert not repo.is_dirty() and "megaquant/main" not in repo.heads
