"""Crash recovery: the real CLI killed (MEGAQUANT_FAULT test hook, exit 137) at every step of `set` and
`restore`; `status` must explain the state and `restore` must bring the tree back byte for byte.

The killed command runs in a subprocess; the follow-up commands run the same typer app in-process (CliRunner)
to keep the suite fast on a 2-core CI machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import git
import pytest
from test_api import LAYERS, make_fork_repo, snapshot
from typer.testing import CliRunner

from megaquant.branch import RESTORE_STEPS, SET_STEPS, dirty_paths
from megaquant.cli import app


def megaquant(repo: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEGAQUANT_FAULT"}
    if fault is not None:
        env["MEGAQUANT_FAULT"] = fault
    argv = [sys.executable, "-m", "megaquant", *args, "--repo", str(repo)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


class Done(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def in_process(repo: Path, *args: str) -> Done:
    """The same CLI app, run in this process (the fault hook is off here)."""
    result = CliRunner().invoke(app, [*args, "--repo", str(repo)])
    return Done(result.exit_code, result.stdout, result.stderr)


def status_json(repo: Path) -> dict[str, object]:
    done = in_process(repo, "status", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert isinstance(data, dict)
    return data


@pytest.fixture
def repo_with_bystanders(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A fixture repo plus someone's unrelated uncommitted edit and an untracked file; its snapshot."""
    root = make_fork_repo(tmp_path / "fork")
    (root / "README.md").write_text("fixture\nmy uncommitted note\n")
    (root / "scratch.txt").write_text("untracked\n")
    return root, snapshot(root)


def assert_back_to_base(root: Path, before: dict[str, bytes]) -> None:
    repo = git.Repo(root)
    assert snapshot(root) == before
    assert not repo.head.is_detached and repo.active_branch.name == "main"
    assert [h.name for h in repo.heads] == ["main"]
    assert not (Path(repo.git_dir) / "megaquant-journal.json").exists()
    assert not (Path(repo.git_dir) / "megaquant.lock").exists()
    assert dirty_paths(repo) == {"README.md": " M", "scratch.txt": "??"}


@pytest.mark.parametrize("step", SET_STEPS)
def test_set_killed_at_each_step(repo_with_bystanders: tuple[Path, dict[str, bytes]], step: str) -> None:
    root, before = repo_with_bystanders
    killed = megaquant(root, "set", "--linear", "mxfp8", "--qk", "mxfp4", fault=step)
    assert killed.returncode == 137, killed.stderr
    state = status_json(root)
    warnings = state["warnings"]
    assert isinstance(warnings, list) and warnings, f"status explains nothing after a kill at {step}"
    assert any("megaquant restore" in w for w in warnings), warnings
    # a second set is refused (lock or journal), not silently stacked on a half-done one
    again = in_process(root, "set", "--pv", "hifp8")
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "Traceback" not in again.stderr
    done = in_process(root, "restore")
    assert done.returncode == 0, done.stderr
    assert_back_to_base(root, before)
    assert status_json(root)["warnings"] == []


@pytest.mark.parametrize("step", RESTORE_STEPS)
def test_restore_killed_at_each_step(repo_with_bystanders: tuple[Path, dict[str, bytes]], step: str) -> None:
    root, before = repo_with_bystanders
    assert in_process(root, "set", "--linear", "mxfp8", "--qk", "mxfp4").returncode == 0
    killed = megaquant(root, "restore", fault=step)
    assert killed.returncode == 137, killed.stderr
    warnings = status_json(root)["warnings"]
    assert isinstance(warnings, list) and any("megaquant restore" in w for w in warnings), warnings
    done = in_process(root, "restore")
    assert done.returncode == 0, done.stderr
    assert_back_to_base(root, before)


def test_concurrent_set_refused_by_lock(repo_with_bystanders: tuple[Path, dict[str, bytes]]) -> None:
    root, before = repo_with_bystanders
    repo = git.Repo(root)
    lock = Path(repo.common_dir) / "megaquant.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "op": "set"}))
        refused = megaquant(root, "set", "--linear", "mxfp8")
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: ") and f"pid {holder.pid}" in refused.stderr
        assert snapshot(root) == before
        warnings = status_json(root)["warnings"]
        assert isinstance(warnings, list) and any("lock held" in w for w in warnings)
        # restore does not break a live lock either
        assert in_process(root, "restore").returncode == 1
    finally:
        holder.kill()
        holder.wait()
    lock.unlink()
    assert_back_to_base(root, before)


def test_two_real_processes_race(repo_with_bystanders: tuple[Path, dict[str, bytes]]) -> None:
    """Two `set` processes started together: one commits, the other is refused or finds nothing to do."""
    root, before = repo_with_bystanders
    env = dict(os.environ)
    argv = [sys.executable, "-m", "megaquant", "set", "--linear", "mxfp4", "--repo", str(root)]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in "ab"
    ]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(rc for rc, _ in results)[0] == 0, results
    for rc, err in results:
        assert rc in (0, 1) and (rc == 0 or err.startswith("error: ")), results
    repo = git.Repo(root)
    assert len(list(repo.iter_commits("main..megaquant/main"))) == 1
    assert "'mxfp4'" in (root / LAYERS).read_text()
    assert in_process(root, "restore").returncode == 0
    assert_back_to_base(root, before)


def test_restore_refuses_to_discard_user_edit(repo_with_bystanders: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = repo_with_bystanders
    assert in_process(root, "set", "--linear", "mxfp8").returncode == 0
    edited = (root / LAYERS).read_text() + "# my debugging print\n"
    (root / LAYERS).write_text(edited)
    refused = megaquant(root, "restore")
    assert refused.returncode == 1 and refused.stderr.startswith(f"error: {LAYERS}: edited on megaquant/main")
    assert (root / LAYERS).read_text() == edited and git.Repo(root).active_branch.name == "megaquant/main"


def test_detached_head_round_trip(repo_with_bystanders: tuple[Path, dict[str, bytes]]) -> None:
    root, before = repo_with_bystanders
    repo = git.Repo(root)
    sha = repo.head.commit.hexsha
    repo.git.checkout("--detach")
    assert in_process(root, "set", "--qk", "mxfp4").returncode == 0
    state = status_json(root)
    assert state["branch"] == f"megaquant/{sha[:12]}" and state["base"] == {"branch": None, "commit": sha}
    assert in_process(root, "restore").returncode == 0
    assert repo.head.is_detached and repo.head.commit.hexsha == sha and snapshot(root) == before


@pytest.mark.parametrize("step", ["locked", "write-partial", "add", "commit"])
def test_worktree_set_killed(repo_with_bystanders: tuple[Path, dict[str, bytes]], step: str) -> None:
    """--worktree: a kill leaves the main checkout as it was; restore inside the worktree removes it."""
    root, before = repo_with_bystanders
    worktree = root.parent / "exp"
    killed = megaquant(root, "set", "--linear", "mxfp8", "--worktree", str(worktree), fault=step)
    assert killed.returncode == 137, killed.stderr
    assert snapshot(root) == before and git.Repo(root).active_branch.name == "main"
    from_main = status_json(root)["warnings"]
    assert isinstance(from_main, list) and any(f"megaquant worktree {worktree}" in w for w in from_main)
    warnings = status_json(worktree)["warnings"]
    assert isinstance(warnings, list) and any("megaquant restore" in w for w in warnings), warnings
    done = in_process(worktree, "restore")
    assert done.returncode == 0, done.stderr
    assert not worktree.exists()
    assert_back_to_base(root, before)


@pytest.mark.parametrize("step", RESTORE_STEPS)
def test_worktree_restore_killed(repo_with_bystanders: tuple[Path, dict[str, bytes]], step: str) -> None:
    """A kill while restoring a --worktree: status (in the worktree, or in the main checkout once the
    worktree is gone) explains it; restore run where status points finishes the job."""
    root, before = repo_with_bystanders
    worktree = root.parent / "exp"
    assert in_process(root, "set", "--qk", "mxfp4", "--worktree", str(worktree)).returncode == 0
    killed = megaquant(worktree, "restore", fault=step)
    assert killed.returncode == 137, killed.stderr
    where = worktree if worktree.exists() else root
    warnings = status_json(where)["warnings"]
    assert isinstance(warnings, list) and any("megaquant restore" in w for w in warnings), warnings
    done = in_process(where, "restore")
    assert done.returncode == 0 and ("removed worktree" in done.stdout or "deleted" in done.stdout), done
    assert not worktree.exists()
    assert_back_to_base(root, before)
