"""megaquant compare on hand-made run directories, and the CPU-testable parts of megaquant.launch.pretrain."""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from megaquant.errors import LaunchError
from megaquant.launch import pretrain
from megaquant.report import (
    FINAL_LOSS_TAIL,
    ReportError,
    Run,
    comparability_warnings,
    compare,
    final_loss,
    load_run,
    load_runs,
    loss_figure,
    markdown_table,
    pairing_note,
    parse_megatron_log,
    plot_losses,
    plot_style,
    print_table,
    register,
    step_time,
)

MEGATRON_LINE = (
    " [2026-11-28 15:00:00] iteration {it:8d}/{total:8d} | consumed samples: {s:12d} | "
    "elapsed time per iteration (ms): {ms:.1f} | learning rate: 1.000000E-04 | global batch size:     4 | "
    "lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 |"
)


def write_metrics_run(
    root: Path, mode: str, losses: list[float], times: list[float], peak: int, manifest: bool = True
) -> Path:
    run = root / mode
    run.mkdir(parents=True)
    lines = [
        json.dumps({"step": i + 1, "loss": loss, "step_time_s": t, "peak_mem_bytes": peak})
        for i, (loss, t) in enumerate(zip(losses, times, strict=True))
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if manifest:
        values = {
            "linear_fwd": "none",
            "linear_dgrad": "none",
            "linear_wgrad": "none",
            "qk": "none",
            "pv": "none",
        }
        (run / "manifest.json").write_text(json.dumps({"mode": mode, "values": values}))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    bf16 = write_metrics_run(
        tmp_path, "bf16", [5.0, 4.0, 3.0, 2.5, 2.0], [9.0, 0.10, 0.12, 0.11, 0.10], 10 * 2**30
    )
    quant = write_metrics_run(
        tmp_path, "FA_linear_mxfp8", [5.0, 4.1, 3.2, 2.7, 2.3], [20.0, 0.25, 0.20, 0.22, 0.30], 12 * 2**30
    )
    return [bf16, quant]


def test_compare_gaps_and_ratios_against_bf16(runs: list[Path]) -> None:
    rows = compare([load_run(p) for p in runs], tail=2)
    base, quant = rows
    assert base.mode == "bf16" and base.loss_gap == pytest.approx(0.0)
    assert base.final_loss == pytest.approx((2.5 + 2.0) / 2)
    assert quant.final_loss == pytest.approx((2.7 + 2.3) / 2)
    assert quant.loss_gap == pytest.approx(0.25)
    # the first step (compilation, warm-up) is left out of the median: 0.11 and 0.225
    assert base.step_time_s == pytest.approx(0.105)
    assert quant.step_time_s == pytest.approx(0.235)
    assert quant.time_ratio == pytest.approx(0.235 / 0.105)
    assert quant.mem_ratio == pytest.approx(1.2)
    assert quant.steps == 5


def test_compare_without_bf16_has_no_gaps(tmp_path: Path) -> None:
    run = write_metrics_run(tmp_path, "linear_hifp8", [3.0, 2.0, 1.0], [1.0, 1.0, 1.0], 0)
    (row,) = compare([load_run(run)])
    assert row.loss_gap is None and row.time_ratio is None
    assert "—" in markdown_table([row])


def test_mode_falls_back_to_directory_name(tmp_path: Path) -> None:
    run = write_metrics_run(tmp_path, "FA_mxfp4", [1.0], [1.0], 0, manifest=False)
    assert load_run(run).mode == "FA_mxfp4"


def test_megatron_log_parsed(tmp_path: Path) -> None:
    run = tmp_path / "bf16"
    run.mkdir()
    lines = ["building GPT model ...", "[Rank 0] (after 1 iterations) memory (MB) | allocated: 10.0 | "]
    lines[-1] += "max allocated: 2048.0 | reserved: 3000.0 | max reserved: 3000.0"
    for it, (loss, ms) in enumerate([(6.5, 900.0), (5.25, 101.0), (4.0, 99.0)], 1):
        lines.append(MEGATRON_LINE.format(it=it, total=3, s=it * 4, ms=ms, loss=loss))
    (run / "train.log").write_text("\n".join(lines) + "\n")
    loaded = load_run(run)
    assert loaded.source == "train.log"
    assert loaded.steps == (1, 2, 3)
    assert loaded.losses == (6.5, 5.25, 4.0)
    assert loaded.step_times_s == pytest.approx((0.9, 0.101, 0.099))
    assert loaded.peak_mem_bytes == 2048 * 2**20
    assert parse_megatron_log("iteration 1/2 | no loss here") == []


def test_bad_inputs_raise_actionable_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="not a directory"):
        load_run(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="neither metrics.jsonl nor train.log"):
        load_run(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "step_time_s": 0.1}\n{"step": 2}\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: expected a JSON object"):
        load_run(broken)
    with pytest.raises(ReportError, match="no runs"):
        compare([])


def test_markdown_table_shape(runs: list[Path]) -> None:
    text = markdown_table(compare([load_run(p) for p in runs], tail=2))
    lines = text.strip().splitlines()
    assert lines[0].startswith("| mode | steps | final loss | gap vs bf16 |")
    assert len(lines) == 4
    assert "| FA_linear_mxfp8 | 5 | 2.5000 | +0.2500 | 235.0 | 2.24× | 12.00 | 1.20× |" in lines


def test_plot_writes_png(runs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = plot_losses([load_run(p) for p in runs], tmp_path / "out" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_command(runs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer from collapsing the app into `compare` alone
        pass

    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["compare", *map(str, runs), "--out", str(out), "--tail", "2"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "FA_linear_mxfp8" in result.output and "+0.2500" in result.output
    assert (out / "compare.md").read_text().count("\n") == 4
    assert (out / "loss_curves.png").is_file()


def write_manifest(run: Path, **fields: object) -> Path:
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}
    (run / "manifest.json").write_text(json.dumps(manifest | fields))
    return run


def test_final_loss_is_one_definition() -> None:
    losses = [float(i) for i in range(1, 21)]
    assert final_loss(losses) == statistics.fmean(losses[-FINAL_LOSS_TAIL:]) == 15.5
    assert final_loss([3.0, 1.0]) == 2.0 and final_loss(losses, tail=1) == 20.0
    with pytest.raises(ReportError, match="no losses"):
        final_loss([])
    assert step_time([9.0, 0.1, 0.3, 0.2]) == pytest.approx(0.2) and step_time([]) is None


def test_bf16_first_and_repeated_modes_stay_distinguishable(tmp_path: Path) -> None:
    quant = write_metrics_run(tmp_path, "FA_mxfp8", [3.0, 2.0], [1.0, 1.0], 0)
    base = write_metrics_run(tmp_path, "bf16", [3.0, 1.0], [1.0, 1.0], 0)
    again = write_manifest(
        write_metrics_run(tmp_path / "other", "bf16", [3.0, 1.5], [1.0, 1.0], 0), mode="bf16"
    )
    rows = compare([load_run(p) for p in (quant, base, again)])
    assert [r.mode for r in rows] == [f"bf16 ({base})", "FA_mxfp8", f"bf16 ({again})"]
    assert rows[0].loss_gap == 0.0 and rows[1].loss_gap == pytest.approx(0.5)
    assert rows[2].loss_gap == pytest.approx(0.25)  # gaps are against the first bf16 run given


def test_gaps_are_paired_by_seed_when_bf16_has_that_seed(tmp_path: Path) -> None:
    def run(name: str, mode: str, final: float, seed: int | None) -> Path:
        path = write_metrics_run(tmp_path / name, mode, [9.0, final], [1.0, 1.0], 0)
        args = [] if seed is None else ["--num-layers", "2", "--seed", "1", "--seed", str(seed)]  # last wins
        return write_manifest(path, megatron_args=args)

    paths = [
        run("b1", "bf16", 3.0, 1234), run("b2", "bf16", 3.4, 1235),  # seed 1235 is the harder one
        run("q1", "FA_mxfp8", 3.1, 1234), run("q2", "FA_mxfp8", 3.5, 1235),
        run("q3", "FA_mxfp8", 3.2, 99),  # no bf16 run of its seed: the first bf16 run
    ]  # fmt: skip
    loaded = [load_run(p) for p in paths]
    assert [r.seed for r in loaded] == [1234, 1235, 1234, 1235, 99]
    gaps = [r.loss_gap for r in compare(loaded, tail=1)]
    assert gaps == pytest.approx([0.0, 0.4, 0.1, 0.1, 0.2])  # unpaired, q2 would read +0.5
    note = pairing_note(loaded)
    assert note is not None and "1234, 1235" in note
    assert pairing_note(loaded[:1] + loaded[2:3]) is None  # one bf16 run: nothing to pair
    pytest.importorskip("matplotlib")
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer from collapsing the app
    result = CliRunner().invoke(app, ["compare", *map(str, paths), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "paired by seed" in (tmp_path / "out" / "compare.md").read_text()


def test_non_comparable_runs_are_warned_of(tmp_path: Path) -> None:
    base = write_manifest(
        write_metrics_run(tmp_path, "bf16", [3.0, 2.0], [1.0, 1.0], 0),
        model="llama32-1b",
        megatron_args=["--num-layers", "16", "--lr=3e-4", "--hidden-size", "2048"],
        device="NVIDIA H200",
    )
    same = write_manifest(
        write_metrics_run(tmp_path, "FA_mxfp8", [3.0, 2.1], [1.0, 1.0], 0),
        model="llama32-1b",
        megatron_args=["--hidden-size", "2048", "--lr", "0.0003", "--num-layers", "16"],
        device="NVIDIA H200",
        recipe="default",
        shape={"seed": 7},  # a different seed is a noise measurement, not a different experiment
    )
    assert comparability_warnings([load_run(base), load_run(same)]) == ()
    other = write_manifest(
        write_metrics_run(tmp_path, "linear_mxfp8", [3.0, 2.0, 1.0], [1.0, 1.0, 1.0], 0),
        model="qwen3-0.6b",
        megatron_args=["--num-layers", "2", "--hidden-size", "2048"],
        device="NVIDIA H100",
        recipe="fork",
    )
    warnings = comparability_warnings([load_run(base), load_run(same), load_run(other)])
    text = "\n".join(warnings)
    for key in ("model", "layers", "device", "recipe", "steps"):
        assert f"not comparable: {key} differs" in text, text
    assert "recipe differs (default: bf16, FA_mxfp8; fork: linear_mxfp8)" in text  # missing = default
    assert "steps differs (2: bf16, FA_mxfp8; 3: linear_mxfp8)" in text
    assert "hidden" not in text and "lr" not in text


def test_runs_of_different_attention_cores_are_warned_of(tmp_path: Path) -> None:
    """Fused and unfused attention drift apart under MX quantization (docs/benchmarks.md section 8)."""
    fused = write_manifest(
        write_metrics_run(tmp_path, "bf16", [3.0, 2.0], [1.0, 1.0], 0),
        attention_core=["fused (sdpa) qk=none pv=none"],
    )
    also_fused = write_manifest(
        write_metrics_run(tmp_path, "FA_mxfp8", [3.0, 2.1], [1.0, 1.0], 0),
        attention_core=["fused (triton) qk=mxfp8 pv=none"],  # other values, the same path: comparable
    )
    assert comparability_warnings([load_run(fused), load_run(also_fused)]) == ()
    unfused = write_manifest(
        write_metrics_run(tmp_path, "linear_mxfp8", [3.0, 2.2], [1.0, 1.0], 0),
        attention_core=["unfused (MEGAQUANT_ATTENTION=unfused)"],
    )
    text = "\n".join(comparability_warnings([load_run(fused), load_run(also_fused), load_run(unfused)]))
    assert "not comparable: attention_core differs (fused: bf16, FA_mxfp8; unfused: linear_mxfp8)" in text


def test_old_and_new_manifests_describe_the_shape_alike(tmp_path: Path) -> None:
    old = write_manifest(
        write_metrics_run(tmp_path, "bf16", [1.0], [1.0], 0),
        shape={"layers": 4, "hidden": 2048, "lr": 0.0003},
    )
    new = write_manifest(
        write_metrics_run(tmp_path, "FA_mxfp8", [1.0], [1.0], 0),
        megatron_args=["--num-layers", "4", "--hidden-size", "2048", "--lr", "3e-4"],
    )
    assert (
        dict(load_run(old).setup)
        == dict(load_run(new).setup)
        == {
            "recipe": "default",
            "layers": "4.0",
            "hidden": "2048.0",
            "lr": "0.0003",
        }
    )


def test_failed_and_empty_runs_are_skipped_with_a_note(runs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from megaquant.cli import app

    failed = write_manifest(
        write_metrics_run(tmp_path, "linear_mxfp4", [5.0, 9.0], [1.0, 1.0], 0), status="failed", exit_code=1
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    blank = write_metrics_run(tmp_path, "FA_hifp8", [], [], 0)
    loaded, skipped = load_runs([runs[0], failed, empty, tmp_path / "nope", blank, runs[1]])
    assert [r.mode for r in loaded] == ["bf16", "FA_linear_mxfp8"]
    reasons = [s.reason for s in skipped]
    assert "failed (manifest.json)" in reasons[0] and "neither metrics.jsonl nor train.log" in reasons[1]
    assert "not a directory" in reasons[2] and "logged no steps" in reasons[3]

    out = tmp_path / "o"
    args = ["compare", str(failed), *map(str, runs), str(tmp_path / "nope"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("note: skipped") == 2 and "FA_linear_mxfp8" in result.stdout
    assert "linear_mxfp4" not in result.stdout and "note: skipped" in (out / "compare.md").read_text()
    none_left = CliRunner().invoke(app, ["compare", str(failed), str(empty)])
    assert none_left.exit_code == 1
    assert none_left.stderr.splitlines()[-1] == (
        "error: no run to compare: every run given was skipped (see the notes above)"
    )


def test_table_shows_full_names_at_any_width(tmp_path: Path) -> None:
    from rich.console import Console

    names = ["bf16", "FA_linear_mxfp8", "FA_linear_mxfp8_recipe_fork_delayed_scaling", "linear_[hifp8]"]
    paths = [write_metrics_run(tmp_path, n, [2.0, 1.0], [1.0, 1.0], 2**30) for n in names]
    rows = compare([load_run(p) for p in paths])
    for width in (30, 60, 80, 250):
        console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
        print_table(console, rows, "title")
        text = console.file.getvalue()  # type: ignore[attr-defined]
        lines = text.splitlines()
        for name in names:  # the whole name, on one line (the terminal wraps it, nothing cuts it)
            assert any(name in line for line in lines), (width, name, text)
        assert "…" not in text
    plain = Console(file=io.StringIO(), width=40)  # not a terminal: the markdown table, whatever the width
    print_table(plain, rows, "title")
    assert plain.file.getvalue() == "title\n" + markdown_table(rows)  # type: ignore[attr-defined]


def test_plot_styles_never_repeat_for_forty_runs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    assert len({plot_style(i) for i in range(280)}) == 280
    runs = [
        Run(tmp_path / f"r{i}", "bf16" if i == 7 else f"mode{i}", (1, 2, 3), (3.0, 2.0, 1.0), (), None, "x")
        for i in range(41)
    ]
    fig = loss_figure(runs)
    curves = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert curves[0].get_label() == "bf16" and curves[0].get_color() == "black"  # the baseline first
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in curves}
    assert len(curves) == len(styles) == 41
    gaps = [line for line in fig.axes[1].get_lines() if not line.get_label().startswith("_")]
    assert [(g.get_color(), g.get_linestyle(), g.get_marker()) for g in gaps] == [
        (c.get_color(), c.get_linestyle(), c.get_marker()) for c in curves[1:]
    ]  # a run looks the same in both panels
    plt.close(fig)


# ---------------------------------------------------------------- megaquant.launch.pretrain (pure parts)


def test_prepare_argv_forces_local_and_unfused() -> None:
    argv = pretrain.prepare_argv(["--num-layers", "2", "--bf16"])
    assert argv[:3] == ["--num-layers", "2", "--bf16"]
    assert argv[argv.index("--transformer-impl") + 1] == "local"
    assert "--no-gradient-accumulation-fusion" in argv and "--no-rope-fusion" in argv
    again = pretrain.prepare_argv(argv)
    assert again == argv  # idempotent: nothing doubled
    assert pretrain.prepare_argv(["--transformer-impl=local"]).count("--transformer-impl=local") == 1


def test_prepare_argv_drops_the_dataloader_mask_unless_documents_reset_it() -> None:
    # GPT's mask is causal: no mask tensor means no per-layer device-to-host check in the fused core
    assert "--no-create-attention-mask-in-dataloader" in pretrain.prepare_argv(["--bf16"])
    assert "--no-create-attention-mask-in-dataloader" not in pretrain.prepare_argv(["--reset-attention-mask"])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--transformer-impl", "transformer_engine"], "quantize nothing"),
        (["--transformer-impl=transformer_engine"], "quantize nothing"),
        (["--sequence-parallel"], r"argv\[0\] '--sequence-parallel': refused"),
        (["--bf16", "--fp8-format", "e4m3"], "fake-quant modes run with --bf16"),
    ],
)
def test_prepare_argv_refuses_paths_that_skip_the_hooks(argv: list[str], match: str) -> None:
    with pytest.raises(LaunchError, match=match):
        pretrain.prepare_argv(argv)


def test_megaquant_args_parse(tmp_path: Path) -> None:
    parser = pretrain.add_megaquant_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--mq-metrics", str(tmp_path / "m.jsonl")])
    assert ns.mq_metrics == tmp_path / "m.jsonl"
    assert parser.parse_args([]).mq_metrics is None
    assert parser.parse_args(["--mq-validation-seed", "7"]).mq_validation_seed == 7
    assert parser.parse_args([]).mq_validation_seed is None


def test_step_records_from_reduced_losses() -> None:
    assert pretrain.loss_from_reduced({}) is None
    assert pretrain.loss_from_reduced({"lm loss": 2.5}) == 2.5
    record = pretrain.step_record(3, {"lm loss": 1.75}, 0.5, 1024)
    assert record is not None
    assert json.loads(record.to_json()) == {
        "step": 3,
        "loss": 1.75,
        "step_time_s": 0.5,
        "peak_mem_bytes": 1024,
    }
    assert pretrain.step_record(1, {"other": 1.0}, 0.1, 0) is None


def test_masked_lm_loss_matches_megatron_contract() -> None:
    torch = pytest.importorskip("torch")
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    total, tokens, report = pretrain.masked_lm_loss(mask, per_token)
    assert float(total) == 1 + 2 + 4 + 6
    assert int(tokens) == 4
    assert report["lm loss"].tolist() == [13.0, 4.0]
    # what train_step reduces: [sum, count] -> mean loss per token
    assert pretrain.loss_from_reduced(report) == pytest.approx(13 / 4)
    assert math.isclose(pretrain.loss_from_reduced({"lm loss": torch.tensor([2.0])}) or 0.0, 2.0)


def test_prebuilt_dataset_helpers_skip_make(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pip megatron-core has no Makefile; Megatron's initialize would `make` and exit (seen on the H200)."""
    pytest.importorskip("torch")
    utils = pytest.importorskip("megatron.core.datasets.utils")
    pytest.importorskip("megatron.core.datasets.helpers_cpp")
    calls: list[str] = []
    monkeypatch.setattr(utils, "compile_helpers", lambda: calls.append("make"))
    pretrain._use_prebuilt_dataset_helpers()
    utils.compile_helpers()
    assert calls == []  # the wheel's compiled helpers import, so make is never run


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
TEN_MODES = [
    "bf16",
    "FA_linear_mxfp8",
    "FA_linear_hifp8",
    "FA_linear_mxfp4",
    "linear_mxfp8",
    "linear_hifp8",
    "linear_mxfp4",
    "FA_mxfp8",
    "FA_hifp8",
    "FA_mxfp4",
    "bf16_seed1235",
    "bf16_rerun",
]


@pytest.mark.skipif(not (RESULTS / "runs").is_dir(), reason="docs/results/runs not present")
def test_published_tables_match_the_stored_runs() -> None:
    """docs/results/*.md is exactly what `megaquant compare` makes of the stored per-step records."""
    minitrain = [load_run(RESULTS / "runs" / "minitrain" / m) for m in TEN_MODES]
    assert markdown_table(compare(minitrain)) == (RESULTS / "modes.md").read_text()
    pretrain_runs = [load_run(RESULTS / "runs" / "pretrain" / m) for m in TEN_MODES[:3]]
    assert markdown_table(compare(pretrain_runs)) == (RESULTS / "pretrain.md").read_text()
    readme = (RESULTS / "smoke.md").read_text()  # the smoke page; README.md: real-text results
    for line in (RESULTS / "modes.md").read_text().splitlines()[2:]:
        assert line in readme  # the page shows the measured rows, not edited ones


def test_real_cli_compare(tmp_path: Path, runs: list[Path]) -> None:
    pytest.importorskip("matplotlib")
    from megaquant.cli import app

    result = CliRunner().invoke(
        app, ["compare", *map(str, runs), "--out", str(tmp_path / "o")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "compare.md").is_file()
    missing = CliRunner().invoke(app, ["compare", str(tmp_path / "nope")])
    assert missing.exit_code == 1
    assert "not a directory" in missing.output


def test_recipe_from_the_manifest_becomes_a_column(tmp_path: Path, runs: list[Path]) -> None:
    scaled = write_metrics_run(tmp_path, "linear_hifp8_scaled", [5.0, 3.0, 2.0], [1.0, 0.2, 0.2], 2**30)
    manifest = json.loads((scaled / "manifest.json").read_text())
    (scaled / "manifest.json").write_text(json.dumps({**manifest, "recipe": "hifp8_scaled"}))
    loaded = [load_run(p) for p in (*runs, scaled)]
    assert [r.recipe for r in loaded] == ["default", "default", "hifp8_scaled"]  # no key: default
    lines = markdown_table(compare(loaded, tail=2)).splitlines()
    assert lines[0].startswith("| mode | recipe | steps | final loss |")
    assert lines[1].startswith("| --- | --- | ---: |")
    assert lines[-1].startswith("| linear_hifp8_scaled | hifp8_scaled | 3 | 2.5000 | +0.2500 |")
    assert "recipe" not in markdown_table(compare(loaded[:2]))  # all default: the published tables stay
    from megaquant.cli import app

    result = CliRunner().invoke(
        app, ["compare", *map(str, (*runs, scaled)), "--out", str(tmp_path / "o")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "hifp8_scaled" in result.output.replace("linear_hifp8_scaled", "")
