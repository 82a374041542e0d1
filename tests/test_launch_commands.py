"""`megaquant train`, `megaquant scripts` and the generated Slurm script, through typer's CliRunner."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import git
from conftest import make_git_repo
from typer.testing import CliRunner

from megaquant.cli import build_app
from megaquant.launch.modes import SEED_MODES
from megaquant.launch.run import TRAIN_COMMAND_ENV
from megaquant.launch.scripts import SlurmOptions, combination_scripts, sbatch_script

APP = build_app(("megaquant.launch.commands",))
RUNNER = CliRunner()

FAKE = "import sys\nprint(' iteration        1/       1 | lm loss: 2.5E+00 |', sys.argv[1:3])\n"


def test_train_dry_run_json() -> None:
    result = RUNNER.invoke(
        APP,
        ["train", "--model", "tiny", "--mock-data", "-q", "qk_pv_mxfp4", "--training-config", "smoke",
         "--dry-run", "--json", "--no-validate", "--nproc-per-node", "2", "--", "--log-interval", "5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["values"] == {
        "linear_fwd": "none",
        "linear_dgrad": "none",
        "linear_wgrad": "none",
        "qk": "mxfp4",
        "pv": "mxfp4",
    }
    assert payload["argv"][1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
    assert payload["megatron_args"][-2:] == ["--log-interval", "5"]
    assert "--mock-data" in payload["megatron_args"] and payload["validated_against"] is None
    assert payload["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_train_validation_seed_reaches_megaquants_entry_and_the_fork_refuses_it(tmp_path: Path) -> None:
    base = ["train", "--model", "tiny", "--mock-data", "--training-config", "smoke", "--dry-run",
            "--no-validate", "--validation-seed", "7"]  # fmt: skip
    result = RUNNER.invoke(APP, [*base, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    argv = payload["argv"]
    assert argv[argv.index("--mq-validation-seed") + 1] == "7" and payload["validation_seed"] == 7
    assert "--mq-validation-seed" not in payload["megatron_args"]  # megaquant's flag, not Megatron's
    assert "validation split shuffled by seed 7" in RUNNER.invoke(APP, base).output
    fork = make_git_repo(tmp_path, "v1_three")
    (fork / "pretrain_gpt.py").write_text("# the fork's own entry\n")
    refused = RUNNER.invoke(APP, [*base, "--megatron", str(fork)])
    assert refused.exit_code == 1 and "its own pretrain_gpt.py" in refused.output


def test_train_refuses_full_validation_where_megatron_crashes_on_it(tmp_path: Path) -> None:
    """megatron-core 0.19.2 crashes at the first evaluation of a --full-validation run (after its training
    steps): refused before anything starts, unless the tree's training.py lacks the crashing lines."""
    tree = tmp_path / "tree"
    (tree / "megatron" / "core").mkdir(parents=True)
    training = tree / "megatron" / "training"
    training.mkdir()
    (training / "arguments.py").write_text("# a Megatron with megatron/training\n")
    (training / "training.py").write_text(
        "def evaluate_and_print_results(args, eval_iters):\n"
        "    eval_iters = eval_iters.tolist()\n"
        "    args.eval_iters = eval_iters[0] if not args.multiple_validation_sets else eval_iters\n"
    )
    base = ["train", "--model", "tiny", "--mock-data", "--training-config", "smoke", "--dry-run",
            "--no-validate", "--megatron", str(tree), "--"]  # fmt: skip
    refused = RUNNER.invoke(APP, [*base, "--full-validation"])
    assert refused.exit_code == 1 and "--validation-seed" in refused.output, refused.output
    assert "Traceback" not in refused.output
    both = RUNNER.invoke(APP, [*base, "--full-validation", "--multiple-validation-sets"])
    assert "--full-validation:" not in both.output
    (training / "training.py").write_text("def evaluate_and_print_results(args, eval_iters):\n    pass\n")
    fixed = RUNNER.invoke(APP, [*base, "--full-validation"])
    assert "--full-validation:" not in fixed.output


def test_train_list_and_errors() -> None:
    listing = RUNNER.invoke(APP, ["train", "--list"])
    assert listing.exit_code == 0 and "deepseek2_lite" in listing.output
    bad = RUNNER.invoke(APP, ["train", "--model", "gpt5", "--dry-run", "--no-validate"])
    assert bad.exit_code == 1 and "unknown model 'gpt5'" in bad.output


def test_train_runs_and_restores_through_the_cli(tmp_path: Path) -> None:
    repo = make_git_repo(tmp_path, "v1_three")
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    run_dir = tmp_path / "run"
    result = RUNNER.invoke(
        APP,
        ["train", "--model", "tiny", "--mock-data", "-q", "FA_linear_mxfp4", "--training-config", "smoke",
         "--megatron", str(repo), "--run-dir", str(run_dir), "--no-validate"],
        env={TRAIN_COMMAND_ENV: shlex.join([sys.executable, str(fake)])},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "iteration        1/" in result.output  # streamed to the console
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["exit_code"] == 0 and manifest["values"]["qk"] == "mxfp4"
    assert git.Repo(repo).active_branch.name == "main"


def test_slurm_script_is_written_not_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = RUNNER.invoke(
        APP,
        ["train", "--model", "llama31-8b", "--dataset", "dolma", "-q", "linear_mxfp8", "--slurm",
         "--nnodes", "4", "--nproc-per-node", "8", "--tp", "8", "--partition", "gpu", "--time", "02:00:00",
         "--run-dir", str(run_dir), "--no-validate", "--megatron", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    script = (run_dir / "train.sbatch").read_text()
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=02:00:00" in script
    last = script.rstrip().splitlines()[-1]
    assert last.startswith(f"exec {sys.executable} -m megaquant train --model llama31-8b")
    assert (
        "--nnodes 4" in last and "--tp 8" in last and "--srun" in last and '--rdzv-id "$SLURM_JOB_ID"' in last
    )
    assert not (run_dir / "manifest.json").exists()
    done = subprocess.run(["bash", "-n", str(run_dir / "train.sbatch")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # valid shell syntax


def test_srun_layout_inside_an_allocation(tmp_path: Path) -> None:
    result = RUNNER.invoke(
        APP,
        ["train", "--model", "llama32-1b", "--dry-run", "--json", "--no-validate", "--srun", "--nnodes", "2",
         "--nproc-per-node", "8", "--master-addr", "node17", "--rdzv-id", "991"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    argv = json.loads(result.output)["argv"]
    assert argv[:6] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    at = argv.index("--rdzv-endpoint")
    assert argv[at + 1] == "node17:29500" and argv[argv.index("--rdzv-id") + 1] == "991"
    assert "--node-rank" not in argv


def test_sbatch_script_optional_settings() -> None:
    text = sbatch_script(
        SlurmOptions(account="proj"),
        run_dir=Path("/runs/x"),
        launcher=["python", "-m", "megaquant", "train", "--model", "tiny"],
        nodes=2,
        gpus_per_node=4,
        master_port=6000,
    )
    assert "#SBATCH --account=proj" in text and "--partition" not in text
    assert "#SBATCH --output=/runs/x/slurm-%j.out" in text and "--master-port 6000" in text


def test_sixty_generated_scripts(tmp_path: Path) -> None:
    scripts = combination_scripts()
    assert len(scripts) == 60 == 3 * 2 * len(SEED_MODES)
    assert not [name for name in scripts if "tiny" in name or "sample" in name]
    result = RUNNER.invoke(APP, ["scripts", "--out", str(tmp_path / "s"), "--megatron", "/opt/Megatron-LM"])
    assert result.exit_code == 0 and "wrote 60 scripts" in result.output
    text = (tmp_path / "s" / "train_llama32-1b_dolma_FA_hifp8.sh").read_text()
    assert text.splitlines()[1] == (
        "exec megaquant train --model llama32-1b --dataset dolma --quantization FA_hifp8 "
        '--training-config fast --megatron "/opt/Megatron-LM" "$@"'
    )
    assert (tmp_path / "s" / "train_llama32-1b_dolma_FA_hifp8.sh").stat().st_mode & 0o111


def test_sbatch_passes_each_rendezvous_option_once_and_before_the_megatron_args(tmp_path: Path) -> None:
    """The launcher line once held `--master-port` twice and put `--srun ...` after `--` (Megatron's)."""
    run_dir = tmp_path / "run"
    result = RUNNER.invoke(
        APP,
        ["train", "--model", "llama32-1b", "--mock-data", "-q", "bf16", "--slurm", "--nnodes", "2",
         "--master-port", "6001", "--run-dir", str(run_dir), "--no-validate", "--megatron", str(tmp_path),
         "--", "--log-interval", "5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    argv = shlex.split((run_dir / "train.sbatch").read_text().rstrip().splitlines()[-1])
    assert argv.count("--master-port") == 1 and argv[argv.index("--master-port") + 1] == "6001"
    assert argv.count("--srun") == 1 and argv.count("--rdzv-id") == 1
    separator = argv.index("--")
    assert argv.index("--srun") < separator and argv.index("--master-port") < separator
    assert argv[separator:] == ["--", "--log-interval", "5"]


def test_train_steps_option() -> None:
    result = RUNNER.invoke(
        APP,
        ["train", "--model", "tiny", "--mock-data", "--training-config", "single-gpu", "--steps", "30",
         "--dry-run", "--json", "--no-validate"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    args = json.loads(result.output)["megatron_args"]
    assert args[args.index("--train-samples") + 1] == "480" == args[args.index("--lr-decay-samples") + 1]
    assert args[args.index("--eval-interval") + 1] == "30"
    refused = RUNNER.invoke(
        APP, ["train", "--mock-data", "--dry-run", "--no-validate", "--", "--train-iters", "30"]
    )
    assert refused.exit_code == 1 and "use `--steps N`" in refused.output


def test_steps_follow_a_global_batch_given_after_the_double_dash() -> None:
    # the 8B shape cut to 2 layers runs with `-- --global-batch-size 2`: 12 steps are 24 samples, not 12 x 128
    result = RUNNER.invoke(
        APP,
        ["train", "--model", "tiny", "--mock-data", "--training-config", "standard", "--steps", "12",
         "--dry-run", "--json", "--no-validate", "--", "--global-batch-size=2", "--seq-length", "512"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    args = json.loads(result.output)["megatron_args"]
    assert args[args.index("--train-samples") + 1] == "24" == args[args.index("--lr-decay-samples") + 1]
    assert args[args.index("--eval-interval") + 1] == "12"
    bad = RUNNER.invoke(
        APP, ["train", "--mock-data", "--dry-run", "--no-validate", "--", "--global-batch-size", "two"]
    )
    assert bad.exit_code == 1 and "expected an integer" in bad.output
