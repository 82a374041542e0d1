"""The seed-compatible front end `python train_config.py ...` (run as a script, as users do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_git_repo

from megaquant.launch.models import MODELS
from megaquant.launch.modes import MODES
from megaquant.launch.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "train_config.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


def test_list_shows_every_registry() -> None:
    done = _run("--list")
    assert done.returncode == 0, done.stderr
    for name in [*MODELS, *MODES, *PRESETS, "wikipedia", "dolma", "sample"]:
        assert f"  {name} " in done.stdout
    assert "quantization modes (linear_fwd, linear_dgrad, linear_wgrad, qk, pv):" in done.stdout
    assert "FA_linear_mxfp8  mxfp8, mxfp8, mxfp8, mxfp8, none" in done.stdout


def test_done_when_dry_run_prints_a_command_megatron_accepts(tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="Megatron's argument parsing imports triton (megatron extra)")
    done = _run(
        "--model", "llama32-1b", "--dataset", "wikipedia", "--quantization", "FA_linear_mxfp8", "--dry-run",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "role values: linear_fwd=mxfp8 linear_dgrad=mxfp8 linear_wgrad=mxfp8 qk=mxfp8 pv=none" in out
    assert "validation: accepted by Megatron 0.19" in out
    from megaquant.launch.preflight import training_megatron

    if training_megatron(None) is None:  # no Megatron here that trains: the note says whose parser it was
        assert "(the pinned megatron-core sources" in out and "NOT the Megatron that would train" in out
        assert "problem: " in out and "cannot train" in out  # shown; not a tree, so not refused
    command = out.split("command:\n", 1)[1]
    assert "-m torch.distributed.run" in command and "--transformer-impl local" in command
    assert "--bf16" in command and "--fp8" not in command and "--sequence-parallel" not in command
    assert not list(tmp_path.iterdir())  # a dry run touches nothing


def test_fa_quantization_variants_and_conflicts() -> None:
    done = _run("--fa-quantization", "pv_hifp8", "--dry-run", "--training-config", "smoke", "--model", "tiny")
    assert done.returncode == 0, done.stderr
    assert "role values: linear_fwd=none linear_dgrad=none linear_wgrad=none qk=none pv=hifp8" in done.stdout
    both = _run("--quantization", "bf16", "--fa-quantization", "qk_mxfp8", "--dry-run")
    assert both.returncode == 2 and "not both" in both.stderr
    bad = _run("--quantization", "mxfp8_everything")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_extra_megatron_arguments_after_double_dash() -> None:
    done = _run("--model", "tiny", "--training-config", "smoke", "--dry-run", "--", "--log-interval", "7")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("--log-interval 7") or "--log-interval 7 --mq-metrics" in done.stdout
    refused = _run("--model", "tiny", "--dry-run", "--", "--fp8-format", "hybrid")
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "refused" in refused.stderr


def test_deepseek_on_a_tree_without_mla_hooks_is_refused(tmp_path: Path) -> None:
    repo = make_git_repo(tmp_path, "v1_three")  # a fork tree: local DotProductAttention lacks k/v_channels
    done = _run(
        "--model", "deepseek2_lite", "--quantization", "FA_mxfp8", "--megatron", str(repo), "--dry-run"
    )
    assert done.returncode == 1
    assert "k_channels" in done.stderr and "megaquant instrument" in done.stderr
    assert "Traceback" not in done.stderr
