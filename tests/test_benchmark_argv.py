"""The benchmark drivers' `megaquant train` requests pass the launcher's own checks (they once passed
--train-samples after `--`, which `megaquant train` refuses since `--steps` sets the run length): built
against a fake tree, no GPU, no training."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_script

from megaquant.argvalues import flag_values
from megaquant.launch.run import TrainRequest, plan_run

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    return load_script(BENCH / f"{name}.py", f"bench_{name}")


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


def test_profile_step_gives_every_instrumented_gemm_a_role_of_the_mode() -> None:
    """The 8B-cut profile died on KeyError 'linear_bwd': the dgrad hook's GEMM took a role no mode has."""
    from megaquant.launch.modes import get_mode

    profile_step = _load("profile_step")
    values = get_mode("FA_linear_mxfp8").values()
    for kw, role in (({"gemm": "fprop"}, "linear_fwd"), ({"grad": True, "gemm": "dgrad"}, "linear_dgrad"),
                     ({"grad": True, "gemm": "wgrad"}, "linear_wgrad"), ({}, "linear_fwd")):  # fmt: skip
        assert profile_step.linear_role(kw) == role and role in values


def test_profile_step_runs_the_fused_attention_with_the_variant_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from megaquant.ops import attention_core

    profile_step = _load("profile_step")
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(attention_core.FusedCore, "__call__", lambda self, qk, pv: seen.append((qk, pv)))
    profile_step.wrap_fused_attention({"values": {"qk": "mxfp8", "pv": "hifp8"}, "profiling": False}, None)
    attention_core.FusedCore.__call__(object(), "none", "none")  # type: ignore[arg-type]
    assert seen == [("mxfp8", "hifp8")]


def test_profile_step_rebinds_the_wgrad_hooks_name_to_its_wrapper() -> None:
    # the wgrad hook calls a name bound at its module's import; the wrapper must reach it (session 12: it
    # did not, so every profiled quantized variant ran wgrad unquantized)
    prof = _load("profile_step")
    import tomllib

    toml = tomllib.loads((BENCH.parent / "rewrites" / "megatron-core.instrument.toml").read_text())
    assert any(prof.WGRAD_BINDING in line for line in toml["imports"]), "the rewrite's wgrad binding moved"
    stock, wrapped = object(), object()
    hooked, other = ModuleType("hooked"), ModuleType("other")
    hooked._mq_wgrad_matmul = stock  # type: ignore[attr-defined]
    assert prof.rebind_wgrad(wrapped, [hooked, other]) == ["hooked"]
    assert hooked._mq_wgrad_matmul is wrapped  # type: ignore[attr-defined]
    assert prof.rebind_wgrad(wrapped, [hooked, other]) == []  # already the wrapper


def test_profile_step_without_out_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    prof = _load("profile_step")
    with pytest.raises(SystemExit) as done:
        prof.main(["--tree", "t", "--data-root", "d"])
    assert done.value.code == 2 and "--out is required" in capsys.readouterr().err


def test_profile_step_microbench_cprofiles_one_quantized_gemm_on_the_cpu_stub() -> None:
    # a subprocess: the stub replaces megaquant.formats' kernel dispatch for the rest of its process
    import subprocess
    import sys

    pytest.importorskip("triton", reason="the stub times megaquant's launch path up to the C launcher")
    cmd = [sys.executable, str(BENCH / "profile_step.py"), "--microbench", "--stub", "--calls", "3"]
    done = subprocess.run([*cmd, "--repeats", "1", "--cprofile"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cProfile of 3 fprop mxfp8 calls" in done.stdout and "quant_path" in done.stdout
