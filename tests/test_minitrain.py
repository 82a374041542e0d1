"""minitrain: a real CPU training run on megatron-core's GPTModel, imported from the tree it is given."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from megaquant.errors import LaunchError
from megaquant.launch.minitrain import MinitrainConfig, _parse, build_argv, read_metrics, run_minitrain
from megaquant.megatron_src import installed_megatron

needs_megatron = pytest.mark.skipif(installed_megatron() is None, reason="megatron-core is not installed")


def _tokens(tmp_path: Path) -> Path:
    np = pytest.importorskip("numpy")
    rng = np.random.RandomState(0)
    phrase = rng.randint(0, 100, size=300)  # a repeated phrase: learnable in a few steps
    path = tmp_path / "tokens.npy"
    np.save(path, np.concatenate([phrase] * 30))
    return path


def _config(out: Path, tokens: Path, **overrides: object) -> MinitrainConfig:
    base: dict[str, object] = dict(
        out=out,
        tokens=tokens,
        layers=2,
        hidden=64,
        ffn=128,
        heads=4,
        query_groups=2,
        seq_len=64,
        micro_batch=4,
        steps=12,
        warmup=2,
        log_interval=4,
        device="cpu",
        progress=False,
    )
    return MinitrainConfig(**{**base, **overrides})  # type: ignore[arg-type]


def test_argv_round_trips_through_the_parser(tmp_path: Path) -> None:
    config = _config(tmp_path / "run", tmp_path / "t.npy", lr=1e-3, progress=True)
    argv = build_argv(config, python="python")
    assert argv[:3] == ["python", "-m", "megaquant.launch.minitrain"]
    assert "--data" not in argv  # None fields are left out
    assert _parse(argv[3:]) == config


@needs_megatron
def test_trains_deterministically_and_writes_metrics_and_log(tmp_path: Path) -> None:
    tokens = _tokens(tmp_path)
    tree = installed_megatron()
    assert tree is not None
    first = run_minitrain(_config(tmp_path / "a", tokens), tree)
    second = run_minitrain(_config(tmp_path / "b", tokens), tree)
    assert [m["step"] for m in first.metrics] == list(range(1, 13))
    for record in first.metrics:
        assert set(record) == {"step", "loss", "step_time_s", "peak_mem_bytes"}
        assert record["step_time_s"] > 0 and record["peak_mem_bytes"] > 0
    losses = [m["loss"] for m in first.metrics]
    assert losses == [m["loss"] for m in second.metrics]  # same seed, same data order: same losses
    assert losses[-1] < losses[0] - 0.5  # it learns
    log = (tmp_path / "a" / "train.log").read_text()
    lines = [line for line in log.splitlines() if "iteration" in line]
    assert len(lines) == 3  # steps 4, 8, 12
    match = re.search(
        r"iteration\s+12/\s+12 \|.*elapsed time per iteration \(ms\): [\d.]+ \|.*lm loss: ([\d.E+-]+)",
        lines[-1],
    )
    assert match and float(match.group(1)) == pytest.approx(losses[-1], rel=1e-6)
    manifest = json.loads((tmp_path / "a" / "minitrain.json").read_text())
    assert manifest["megatron_path"] == str((tree / "megatron").resolve())
    assert manifest["device"] == "cpu" and manifest["vocab_size"] == 100


@needs_megatron
def test_imports_megatron_from_the_given_tree(tmp_path: Path) -> None:
    root = installed_megatron()
    assert root is not None
    tree = tmp_path / "tree"
    shutil.copytree(root / "megatron", tree / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    run = run_minitrain(_config(tmp_path / "run", _tokens(tmp_path), steps=2, log_interval=1), tree)
    manifest = json.loads((run.out / "minitrain.json").read_text())
    assert manifest["megatron_path"] == str((tree / "megatron").resolve())


@needs_megatron
def test_too_little_data_is_a_clear_error(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    tokens = tmp_path / "few.npy"
    np.save(tokens, np.arange(50))
    tree = installed_megatron()
    assert tree is not None
    with pytest.raises(LaunchError, match=r"minitrain failed \(exit 1\): error: only 50 tokens: too few"):
        run_minitrain(_config(tmp_path / "run", tokens), tree)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == ()


@needs_megatron
def test_recipe_is_configured_recorded_and_an_unknown_one_fails_first(tmp_path: Path) -> None:
    tree = installed_megatron()
    assert tree is not None
    tokens = _tokens(tmp_path)
    with pytest.raises(LaunchError, match=r"exit 1\): error: unknown recipe 'nope'; choose one of: default"):
        run_minitrain(_config(tmp_path / "bad", tokens, recipe="nope"), tree)
    assert read_metrics(tmp_path / "bad" / "metrics.jsonl") == ()
    run = run_minitrain(
        _config(tmp_path / "run", tokens, steps=1, log_interval=1, recipe="hifp8_scaled"), tree
    )
    assert json.loads((run.out / "minitrain.json").read_text())["recipe"] == "hifp8_scaled"
