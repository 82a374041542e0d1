"""The benchmark drivers' `megaquant train` requests pass the launcher's own checks (they once passed
--train-samples after `--`, which `megaquant train` refuses since `--steps` sets the run length): built
against a fake tree, no GPU, no training."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from megaquant.argvalues import flag_values
from megaquant.launch.run import TrainRequest, plan_run

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "megatron" / "core").mkdir(parents=True)
    (tree / "megatron" / "training").mkdir(parents=True)
    (tree / "megatron" / "training" / "arguments.py").write_text("IMPLS = ['none', 'full_iteration']\n")
    return tree


def test_profile_step_builds_the_8b_cut_eager(tmp_path: Path) -> None:
    profile_step = _load("profile_step")
    ns = argparse.Namespace(
        extra="--num-layers 2 --global-batch-size 2", model="llama31-8b", preset="standard",
        tree=_tree(tmp_path), data_root=tmp_path / "data", train_steps=16,
    )  # fmt: skip
    args = profile_step.megatron_args(ns, 8)
    assert flag_values(args, "--num-layers")[-1] == "2" and flag_values(args, "--exit-interval") == ["8"]
    assert flag_values(args, "--train-samples")[-1] == "32"  # 16 steps x global batch 2, from --steps
    assert "--cuda-graph-impl" not in args  # the variants swap values per step: no graph


def test_attention_train_request_is_accepted(tmp_path: Path) -> None:
    attention_train = _load("attention_train")
    request = TrainRequest(
        model="llama31-8b", dataset="sample", preset="standard", megatron=_tree(tmp_path),
        data_root=tmp_path / "data", extra=attention_train.EXTRA, steps=30,
    )  # fmt: skip
    args = plan_run(request).megatron_args
    assert flag_values(args, "--train-samples")[-1] == "60"
