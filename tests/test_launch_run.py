"""Recorded runs on real fixture git repos through the real core API, with a fake training executable
(a tiny script that writes a Megatron-style log), selected through the documented MEGAQUANT_TRAIN_COMMAND
test/debug hook."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import git
import pytest
from conftest import make_git_repo

from megaquant import api
from megaquant.errors import LaunchError, RoleError
from megaquant.launch.argv import Parallel
from megaquant.launch.launcher import train
from megaquant.launch.run import (
    TRAIN_COMMAND_ENV,
    TrainRequest,
    execute,
    host_gpus,
    megaquant_source,
    plan_run,
)

FAKE_TRAINER = r"""
import os, sys, time
layers = open("megatron/core/tensor_parallel/layers.py").read()
values = sorted({line.split("=", 1)[1].strip() for line in layers.splitlines()
                 if line.strip().startswith("custom_quant_type =")})
print("fake trainer sees linear values", values, flush=True)
print("argv", " ".join(sys.argv[1:4]), flush=True)
steps = int(os.environ.get("FAKE_STEPS", "3"))
for step in range(1, steps + 1):
    print(f" [2026-01-01 00:00:0{step}] iteration {step:8d}/{steps:8d} | consumed samples: {8 * step} | "
          f"elapsed time per iteration (ms): {10.0 + step:.1f} | learning rate: 1.000000E-04 | "
          f"lm loss: {10.0 / step:.6E} | loss scale: 1.0 |", flush=True)
    if os.environ.get("FAKE_SLEEP"):
        time.sleep(float(os.environ["FAKE_SLEEP"]))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture
def fork_repo(tmp_path: Path) -> Path:
    return make_git_repo(tmp_path, "v1_three")


@pytest.fixture
def fake_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setenv(TRAIN_COMMAND_ENV, shlex.join([sys.executable, str(script)]))
    return script


def _request(repo: Path, tmp_path: Path, mode: str, **kw: object) -> TrainRequest:
    return TrainRequest(
        model="tiny",
        dataset=None,
        mode=mode,
        preset="smoke",
        megatron=repo,
        run_dir=tmp_path / "runs" / mode,
        **kw,  # type: ignore[arg-type]
    )


def _layers(repo: Path) -> str:
    return (repo / "megatron/core/tensor_parallel/layers.py").read_text()


def test_run_records_manifest_and_restores(fork_repo: Path, fake_trainer: Path, tmp_path: Path) -> None:
    before = _layers(fork_repo)
    head = git.Repo(fork_repo).head.commit.hexsha
    lines: list[str] = []
    record = execute(plan_run(_request(fork_repo, tmp_path, "linear_mxfp4")), echo=lines.append)
    assert record.exit_code == 0
    log = (record.run_dir / "train.log").read_text()
    assert "fake trainer sees linear values [\"'mxfp4'\"]" in log  # the roles were set while it trained
    assert "".join(lines) == log  # streamed and saved
    manifest = json.loads((record.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["exit_code"] == 0
    assert manifest["values"] == {
        "linear_fwd": "mxfp4",
        "linear_dgrad": "mxfp4",
        "linear_wgrad": "mxfp4",
        "qk": "none",
        "pv": "none",
    }
    assert manifest["mode"] == "linear_mxfp4"
    assert manifest["base"] == {"branch": "main", "commit": head}
    assert manifest["commit"] != head and len(manifest["commit"]) == 40  # the commit that trained
    assert manifest["argv"][:2] == [sys.executable, str(fake_trainer)]
    assert "--transformer-impl" in manifest["argv"] and manifest["log"] == "train.log"
    assert manifest["start"] <= manifest["end"]
    assert manifest["environment"]["python"]
    assert manifest["environment"]["megaquant_source"] == megaquant_source()  # which megaquant code ran
    assert manifest["environment"]["gpus"] == host_gpus()  # which cards (None here without nvidia-smi)
    assert "restored main" in manifest["restored"]
    # tree restored: back on main, sources unchanged, no throwaway branch left
    repo = git.Repo(fork_repo)
    assert repo.active_branch.name == "main" and _layers(fork_repo) == before
    assert [b.name for b in repo.branches] == ["main"]


def test_run_dir_is_readable_by_compare(fork_repo: Path, fake_trainer: Path, tmp_path: Path) -> None:
    from megaquant.report import load_run

    record = execute(plan_run(_request(fork_repo, tmp_path, "bf16")))
    run = load_run(record.run_dir)
    assert run.mode == "bf16" and run.steps == (1, 2, 3)
    assert run.losses == pytest.approx((10.0, 5.0, 10.0 / 3))


def test_bf16_sets_every_role_to_none(fork_repo: Path, fake_trainer: Path, tmp_path: Path) -> None:
    api.apply(
        fork_repo,
        values={
            "linear_fwd": "hifp8",
            "linear_dgrad": "hifp8",
            "linear_wgrad": "hifp8",
            "qk": "mxfp8",
            "pv": "mxfp8",
        },
    )
    git.Repo(fork_repo).git.checkout("main")  # leave a stale throwaway branch behind, as old runs did
    git.Repo(fork_repo).git.branch("-D", "megaquant/main")
    record = execute(plan_run(_request(fork_repo, tmp_path, "bf16")))
    assert "fake trainer sees linear values [\"'bf16'\"]" in (record.run_dir / "train.log").read_text()


def test_failed_run_restores_and_records_exit_code(
    fork_repo: Path, fake_trainer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EXIT", "3")
    before = _layers(fork_repo)
    record = execute(plan_run(_request(fork_repo, tmp_path, "FA_mxfp8")))
    assert record.exit_code == 3
    manifest = json.loads((record.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["exit_code"] == 3
    assert git.Repo(fork_repo).active_branch.name == "main" and _layers(fork_repo) == before


def test_ctrl_c_stops_the_trainer_and_restores(
    fork_repo: Path, fake_trainer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_STEPS", "1000")
    monkeypatch.setenv("FAKE_SLEEP", "0.05")
    before = _layers(fork_repo)

    def ctrl_c_at_step_2(line: str) -> None:
        if "iteration        2/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(plan_run(_request(fork_repo, tmp_path, "FA_linear_hifp8")), echo=ctrl_c_at_step_2)
    manifest = json.loads((tmp_path / "runs" / "FA_linear_hifp8" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["exit_code"] != 0
    assert "iteration      999/" not in (tmp_path / "runs" / "FA_linear_hifp8" / "train.log").read_text()
    assert git.Repo(fork_repo).active_branch.name == "main" and _layers(fork_repo) == before


def test_worktree_run_leaves_checkout_alone(fork_repo: Path, fake_trainer: Path, tmp_path: Path) -> None:
    before = _layers(fork_repo)
    wt = tmp_path / "wt"
    record = execute(plan_run(_request(fork_repo, tmp_path, "linear_hifp8", worktree=wt)))
    manifest = json.loads((record.run_dir / "manifest.json").read_text())
    assert manifest["checkout"] == str(wt) and manifest["exit_code"] == 0
    assert "fake trainer sees linear values [\"'hifp8'\"]" in (record.run_dir / "train.log").read_text()
    assert _layers(fork_repo) == before and not wt.exists()


def test_role_without_sites_is_refused_and_restored(
    fork_repo: Path, fake_trainer: Path, tmp_path: Path
) -> None:
    repo = git.Repo(fork_repo)
    repo.index.remove(["megatron/core/transformer/dot_product_attention.py"], working_tree=True)
    repo.index.commit("no attention sites")
    head = repo.head.commit.hexsha
    with pytest.raises(RoleError, match="no qk GEMM"):  # refused by `set`, before anything is written
        execute(plan_run(_request(fork_repo, tmp_path, "FA_mxfp8")))
    assert not (tmp_path / "runs" / "FA_mxfp8" / "manifest.json").exists()
    assert repo.active_branch.name == "main" and repo.head.commit.hexsha == head
    assert [b.name for b in repo.branches] == ["main"]


def test_existing_run_dir_is_refused(fork_repo: Path, fake_trainer: Path, tmp_path: Path) -> None:
    execute(plan_run(_request(fork_repo, tmp_path, "bf16")))
    with pytest.raises(LaunchError, match="already holds a run"):
        execute(plan_run(_request(fork_repo, tmp_path, "bf16")))


def test_train_through_launcher_with_overrides(fork_repo: Path, fake_trainer: Path, tmp_path: Path) -> None:
    import io

    out = io.StringIO()
    request = _request(fork_repo, tmp_path, "FA_mxfp8", linear="mxfp8", parallel=Parallel())
    assert train(request, out=out, validate=False) == 0
    manifest = json.loads((tmp_path / "runs" / "FA_mxfp8" / "manifest.json").read_text())
    assert manifest["values"] == {
        "linear_fwd": "mxfp8",
        "linear_dgrad": "mxfp8",
        "linear_wgrad": "mxfp8",
        "qk": "mxfp8",
        "pv": "none",
    }
    assert manifest["mode"] == "FA_linear_mxfp8"  # the overrides landed on a registry mode
    assert "exit code 0" in out.getvalue()
    custom = plan_run(_request(fork_repo, tmp_path, "FA_mxfp8", linear="hifp8"))
    assert custom.mode == "FA_mxfp8+overrides" and custom.values["linear_wgrad"] == "hifp8"


def test_not_a_megatron_tree_is_refused(tmp_path: Path) -> None:
    request = TrainRequest(model="tiny", dataset=None, megatron=tmp_path)
    with pytest.raises(LaunchError, match="not a Megatron-LM tree"):
        plan_run(request)


def test_deepseek_is_allowed_once_the_tree_takes_mla_channels(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    attention = tree / "megatron/core/transformer/dot_product_attention.py"
    attention.parent.mkdir(parents=True)
    attention.write_text(
        "class DotProductAttention:\n    def __init__(self, config, layer_number):\n        pass\n"
    )
    request = TrainRequest(model="deepseek2_lite", dataset="wikipedia", mode="FA_mxfp8", megatron=tree)
    with pytest.raises(LaunchError, match="k_channels.*megaquant instrument"):
        plan_run(request)
    attention.write_text(
        "class DotProductAttention:\n    def __init__(self, config, layer_number,\n"
        "        k_channels: Optional[int] = None, v_channels: Optional[int] = None):\n        pass\n"
    )
    plan = plan_run(request)
    assert "--multi-latent-attention" in plan.megatron_args and plan.values["qk"] == "mxfp8"


def test_real_sigint_to_the_launcher_process(fork_repo: Path, fake_trainer: Path, tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the `megaquant train` process while the trainer runs."""
    import os
    import signal
    import subprocess

    run_dir = tmp_path / "sigint"
    env = {**os.environ, "FAKE_STEPS": "1000", "FAKE_SLEEP": "0.05", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "megaquant", "train", "--model", "tiny", "--mock-data", "-q", "linear_mxfp8",
         "--training-config", "smoke", "--megatron", str(fork_repo), "--run-dir", str(run_dir),
         "--no-validate"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert launcher.stdout is not None
    for line in launcher.stdout:
        if "iteration        3/" in line:
            launcher.send_signal(signal.SIGINT)
            break
    launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert "iteration     1000/" not in (run_dir / "train.log").read_text()
    assert git.Repo(fork_repo).active_branch.name == "main"
    assert [b.name for b in git.Repo(fork_repo).branches] == ["main"]


def test_experiments_started_together_from_worktrees_wait_for_the_lock(
    fork_repo: Path, fake_trainer: Path, tmp_path: Path
) -> None:
    # `megaquant train --worktree A & megaquant train --worktree B &`: each holds the repository lock for its
    # set and restore; a run finding it held by a live process waits instead of failing (a third process
    # holds it here for a second, so both runs meet a held lock at their start)
    import os
    import subprocess
    import time

    before = _layers(fork_repo)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, git\nfrom megaquant.branch import repo_lock\n"
         "with repo_lock(git.Repo(sys.argv[1]), 'set'):\n"
         "    print('held', flush=True)\n    time.sleep(1.5)\n",
         str(fork_repo)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    runs = {}
    for mode in ("linear_hifp8", "linear_mxfp4"):
        argv = [sys.executable, "-m", "megaquant", "train", "--megatron", str(fork_repo), "--model", "tiny",
                "--mock-data", "--training-config", "smoke", "-q", mode, "--no-validate",
                "--worktree", str(tmp_path / f"wt-{mode}"),
                "--run-dir", str(tmp_path / "runs" / mode)]  # fmt: skip
        runs[mode] = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "FAKE_SLEEP": "0.3"},
        )  # fmt: skip
    start = time.monotonic()
    outputs = {mode: proc.communicate(timeout=120)[0] for mode, proc in runs.items()}
    holder.wait(timeout=30)
    for mode, proc in runs.items():
        assert proc.returncode == 0, outputs[mode]
        manifest = json.loads((tmp_path / "runs" / mode / "manifest.json").read_text())
        assert manifest["status"] == "succeeded" and manifest["checkout"] == str(tmp_path / f"wt-{mode}")
        value = mode.split("_")[1]
        assert (
            f"fake trainer sees linear values [\"'{value}'\"]"
            in (tmp_path / "runs" / mode / "train.log").read_text()
        )
        assert not (tmp_path / f"wt-{mode}").exists()
    assert time.monotonic() - start < 100
    assert _layers(fork_repo) == before and git.Repo(fork_repo).active_branch.name == "main"
    assert not (Path(git.Repo(fork_repo).common_dir) / "megaquant.lock").exists()


def test_a_worktree_set_waits_out_another_runs_restore_in_flight(fork_repo: Path, tmp_path: Path) -> None:
    # a worktree run restoring (lock held, its "restore-worktree" journal on the main checkout for the
    # moment between removing the worktree and deleting its branch) while another run starts its set: the
    # journal of a live lock holder is work in flight, not an interrupted operation (CI saw this race fail
    # the EP run of the two-GPU kit)
    import subprocess

    from megaquant.branch import describe_state

    script = (
        "import os, sys, time, git\n"
        "from megaquant.branch import Journal, current_base, repo_lock\n"
        "from megaquant.branch.journal import drop_journal, write_journal\n"
        "repo = git.Repo(sys.argv[1])\n"
        "with repo_lock(repo, 'restore'):\n"
        "    base = current_base(repo)\n"
        "    write_journal(repo, Journal('restore-worktree', base, 'megaquant/main--x', (), 'restore',"
        " os.getpid()))\n"
        "    print('held', flush=True)\n"
        "    time.sleep(1.5)\n"
        "    drop_journal(repo)\n"
    )
    argv = [sys.executable, "-c", script, str(fork_repo)]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert "megaquant restore in progress" in " ".join(describe_state(git.Repo(fork_repo)))
    applied = api.apply(fork_repo, values={"linear": "mxfp4"}, worktree=tmp_path / "wt", lock_wait_s=60)
    assert holder.wait(timeout=30) == 0
    assert applied.commit is not None and Path(applied.repo) == (tmp_path / "wt").resolve()
    assert api.restore(applied.repo).restored
    assert git.Repo(fork_repo).active_branch.name == "main"


def test_an_interrupted_journal_still_refuses_a_worktree_set(fork_repo: Path, tmp_path: Path) -> None:
    # the same journal with no live lock holder is what a killed restore leaves: refused, restore first
    from megaquant.branch import Journal, current_base
    from megaquant.branch.journal import write_journal
    from megaquant.errors import GitStateError

    repo = git.Repo(fork_repo)
    journal = Journal("restore-worktree", current_base(repo), "megaquant/main--x", (), "restore", 1)
    write_journal(repo, journal)
    with pytest.raises(GitStateError, match="megaquant restore"):
        api.apply(fork_repo, values={"linear": "mxfp4"}, worktree=tmp_path / "wt", lock_wait_s=5)
    assert not (tmp_path / "wt").exists()


def test_a_run_refused_at_set_leaves_no_run_directory(
    fork_repo: Path, fake_trainer: Path, tmp_path: Path
) -> None:
    from megaquant.errors import GitStateError

    applied = api.apply(
        fork_repo, values={"linear": "mxfp4"}
    )  # on the throwaway branch: a worktree run fails
    assert applied.commit is not None
    plan = plan_run(_request(fork_repo, tmp_path, "linear_mxfp4", worktree=tmp_path / "wt"))
    with pytest.raises(GitStateError, match="restore"):
        execute(plan)
    assert not plan.run_dir.exists()
    api.restore(fork_repo)


def test_a_second_run_on_a_checkout_being_trained_is_refused(
    fork_repo: Path, fake_trainer: Path, tmp_path: Path
) -> None:
    """Issue 12's kit started two runs at once on one checkout (no --worktree): the second set its roles on
    the first one's throwaway branch, or failed half-way ("changed while megaquant was planning"). A run now
    holds a lease on the checkout it trains, and a second one is refused before anything is set."""
    import subprocess

    from megaquant.launch.run import TRAINING_LEASE

    lease = Path(git.Repo(fork_repo).git_dir) / TRAINING_LEASE
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lease.write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "run_dir": "elsewhere"})
        )
        plan = plan_run(_request(fork_repo, tmp_path, "linear_mxfp4"))
        with pytest.raises(LaunchError, match="is training this checkout.*own `--worktree DIR`"):
            execute(plan)
        assert not plan.run_dir.exists() and git.Repo(fork_repo).active_branch.name == "main"
        worktree = plan_run(_request(fork_repo, tmp_path, "linear_hifp8", worktree=tmp_path / "wt"))
        assert execute(worktree).exit_code == 0  # a run in its own worktree is not held up
    finally:
        holder.kill()
        holder.wait()
    record = execute(plan)  # the holder is gone: a stale lease does not block
    assert record.exit_code == 0 and not lease.exists()
    assert git.Repo(fork_repo).active_branch.name == "main"


def test_of_two_runs_taking_the_lease_at_once_one_gets_it(fork_repo: Path, tmp_path: Path) -> None:
    """The lease is created exclusively (check-then-write let two runs starting together both pass); the
    second of two runs starting together finds the first one's file, empty until it writes its record."""
    import os

    from megaquant.launch.run import TRAINING_LEASE, release_training_lease, take_training_lease

    lease = Path(git.Repo(fork_repo).git_dir) / TRAINING_LEASE
    lease.write_text("")  # a lease being written this instant by another run: not taken over
    with pytest.raises(LaunchError, match="another megaquant train is starting"):
        take_training_lease(fork_repo, tmp_path / "a")
    os.utime(lease, (1.0, 1.0))  # the same empty file, long ago: a leftover, taken over
    release_training_lease(take_training_lease(fork_repo, tmp_path / "a"))
    assert not lease.exists()


def test_the_megaquant_source_digest_follows_the_code(tmp_path: Path) -> None:
    """A digest of the package's .py files: the same files give the same digest, an edited or an added
    file another; other files do not count."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    first = megaquant_source.__wrapped__(package)
    assert len(first) == 16 and int(first, 16) >= 0
    (package / "notes.txt").write_text("not code")
    assert megaquant_source.__wrapped__(package) == first
    (package / "sub" / "b.py").write_text("y = 3\n")
    edited = megaquant_source.__wrapped__(package)
    (package / "c.py").write_text("")
    assert len({first, edited, megaquant_source.__wrapped__(package)}) == 3
    assert megaquant_source() == megaquant_source()  # the installed package's, once per process


def test_host_gpus_lists_what_nvidia_smi_names_and_none_without_it(tmp_path: Path) -> None:
    """The manifest records the card a run's step times come from: nvidia-smi's names, one per GPU; None
    where nvidia-smi is missing, fails, or lists nothing (never an exception)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "--query-gpu=name --format=csv,noheader" ] || exit 9\n'
        "printf 'NVIDIA H200\\nNVIDIA H200 \\n\\n'\n"
    )
    smi.chmod(0o755)
    assert host_gpus(str(smi)) == ["NVIDIA H200", "NVIDIA H200"]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed'; exit 9\n")
    assert host_gpus(str(smi)) is None
    smi.write_text("#!/bin/sh\nexit 0\n")
    assert host_gpus(str(smi)) is None
    assert host_gpus(str(tmp_path / "absent")) is None
