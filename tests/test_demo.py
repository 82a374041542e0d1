"""`megaquant demo` on CPU with a few steps: workspace, corpus, bf16 vs a mode through api.apply/restore."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megaquant.demo import demo_config, format_table, mode_values, prepare_corpus, register, run_demo
from megaquant.errors import ValueNameError
from megaquant.megatron_src import installed_megatron

needs_megatron = pytest.mark.skipif(installed_megatron() is None, reason="megatron-core is not installed")


def test_mode_values_follow_the_mode_table() -> None:
    assert mode_values("bf16") == {
        "linear_fwd": "none",
        "linear_dgrad": "none",
        "linear_wgrad": "none",
        "qk": "none",
        "pv": "none",
    }
    assert mode_values("FA_mxfp4") == {
        "linear_fwd": "none",
        "linear_dgrad": "none",
        "linear_wgrad": "none",
        "qk": "mxfp4",
        "pv": "none",
    }
    assert mode_values("linear_hifp8") == {
        "linear_fwd": "hifp8",
        "linear_dgrad": "hifp8",
        "linear_wgrad": "hifp8",
        "qk": "none",
        "pv": "none",
    }
    assert mode_values("FA_linear_mxfp8") == {
        "linear_fwd": "mxfp8",
        "linear_dgrad": "mxfp8",
        "linear_wgrad": "mxfp8",
        "qk": "mxfp8",
        "pv": "none",
    }
    assert mode_values("qk_pv_mxfp8")["pv"] == "mxfp8"
    for bad in ("FA_fp8", "attention_mxfp8", "mxfp8", ""):
        with pytest.raises(ValueNameError, match="unknown mode"):
            mode_values(bad)


def test_demo_config_is_llama_shaped_and_small(tmp_path: Path) -> None:
    config = demo_config(tmp_path / "run", tmp_path / "data", steps=150)
    assert config.query_groups < config.heads and config.ffn == 3 * config.hidden
    assert config.hidden // config.heads >= 32  # MX blocks of 32 along the head dim in QK


@needs_megatron
def test_stand_in_corpus_is_real_text_as_an_indexed_dataset(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus = prepare_corpus(tmp_path)
    dataset = IndexedDataset(str(corpus.prefix))
    assert len(dataset) > 100 and corpus.tokens > 100_000
    text = bytes(dataset[0].astype("uint8")).decode("ascii")
    assert " the " in text and "stand-in" in corpus.description
    assert prepare_corpus(tmp_path) == corpus  # reused, not rebuilt


@needs_megatron
def test_demo_smoke_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("megaquant.api", reason="megaquant.api (core-git) has not landed")
    import git

    events: list[str] = []
    corpus, rows = run_demo(tmp_path, steps=3, mode="FA_linear_mxfp8", on_event=events.append)
    assert [r.mode for r in rows] == ["bf16", "FA_linear_mxfp8"]
    assert rows[1].values == mode_values("FA_linear_mxfp8")
    assert rows[0].gap_to_bf16 == 0.0 and all(math.isfinite(r.final_loss) for r in rows)
    assert rows[0].final_loss != rows[1].final_loss  # the quantized ops really ran
    assert all((r.run_dir / "metrics.jsonl").is_file() for r in rows)
    repo = git.Repo(tmp_path / "megatron-core")
    assert repo.active_branch.name == "instrumented" and not repo.is_dirty()  # restored after each mode
    assert not [h.name for h in repo.heads if h.name.startswith("megaquant/")]
    table = format_table(rows)
    assert table[0][0] == "bf16" and table[0][2] == "+0.0000" and table[1][4].endswith("x")
    assert any("stand-in" in e for e in events)


@needs_megatron
def test_cli_rejects_a_bad_mode_before_any_work(tmp_path: Path) -> None:
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so `demo` is addressed by name as in the real CLI
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "w"), "--mode", "FA_fp8"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueNameError)
    assert not (tmp_path / "w").exists()


def test_demo_final_loss_is_compares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo once reported the last step's loss while compare reported the mean of the last ten."""
    import json
    from types import SimpleNamespace

    import megaquant.demo as demo
    from megaquant import api
    from megaquant.launch import minitrain
    from megaquant.report import compare, load_run

    losses = {"bf16": [5.0 - 0.1 * i for i in range(20)], "FA_mxfp8": [5.0 - 0.09 * i for i in range(20)]}

    def fake_train(config: minitrain.MinitrainConfig, tree: Path) -> minitrain.MinitrainResult:
        name = config.out.name
        metrics = tuple(
            {"step": i + 1, "loss": v, "step_time_s": 0.1 + 0.01 * i} for i, v in enumerate(losses[name])
        )
        config.out.mkdir(parents=True)
        (config.out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        return minitrain.MinitrainResult(config.out, 0, metrics)

    monkeypatch.setattr(demo, "ensure_workspace", lambda workdir: workdir)
    monkeypatch.setattr(demo, "prepare_corpus", lambda workdir: demo.Corpus(workdir / "c", "fake", 1))
    monkeypatch.setattr(minitrain, "run_minitrain", fake_train)
    monkeypatch.setattr(api, "apply", lambda *a, **k: SimpleNamespace(branch="b", commit="c" * 40))
    monkeypatch.setattr(api, "restore", lambda *a, **k: None)
    _, rows = run_demo(tmp_path, steps=20, mode="FA_mxfp8")
    compared = compare([load_run(r.run_dir) for r in rows])
    assert [r.final_loss for r in rows] == [c.final_loss for c in compared]
    assert [r.step_time_s for r in rows] == [c.step_time_s for c in compared]
    assert rows[1].gap_to_bf16 == pytest.approx(compared[1].loss_gap)
