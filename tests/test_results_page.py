"""benchmarks/results_page.py: the docs/results builder on synthetic run directories in the real formats."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results_page as rp  # noqa: E402

VALID_LINE = " validation loss at iteration {it} | lm loss value: {loss:.6E} | lm loss PPL: 2.000000E+01 | "
FINAL_LINE = (
    " validation loss at iteration {it} on validation set | lm loss value: {loss:.6E} | "
    "lm loss PPL: 2.000000E+01 | "
)


def test_parse_validation_reads_megatrons_lines_and_the_final_evaluation() -> None:
    text = "\n".join(
        [
            "-" * 40,
            VALID_LINE.format(it=10, loss=5.5),
            " [2026-12-01 18:00:00] iteration       11/      20 | lm loss: 5.000000E+00 |",
            VALID_LINE.format(it=20, loss=5.25),
            FINAL_LINE.format(it=20, loss=5.125),
        ]
    )
    points = rp.parse_validation(text)
    assert points == [rp.ValPoint(10, 5.5), rp.ValPoint(20, 5.25), rp.ValPoint(20, 5.125, final=True)]
    assert rp.final_validation(points) == 5.125  # the evaluation after training wins
    assert rp.final_validation(points[:2]) == 5.25  # else the last in-loop one
    assert rp.final_validation([]) is None


def _manifest(
    mode: str, recipe: str, seed: int, *, dataset: str = "realtext", status: str = "succeeded"
) -> dict:
    args = ["--num-layers", "16", "--seq-length", "1024", "--global-batch-size", "16", "--seed", "1234"]
    args += [
        "--seq-length",
        "2048",
        "--global-batch-size",
        "4",
        "--seed",
        str(seed),
    ]  # the driver's extras win
    return {
        "schema": 1,
        "mode": mode,
        "model": "llama32-1b",
        "dataset": dataset,
        "preset": "single-gpu",
        "recipe": recipe,
        "values": {
            "linear_fwd": "none",
            "linear_dgrad": "none",
            "linear_wgrad": "none",
            "qk": "none",
            "pv": "none",
        },
        "megatron_args": args,
        "commit": "0123456789abcdef",
        "environment": {"python": "3.12.3", "megaquant_source": "feedc0de12345678"},
        "status": status,
        "exit_code": 0 if status == "succeeded" else 1,
        "attention_core": ["fused (sdpa) qk=none pv=none"],
        "cuda_graphs": {"enabled": recipe == "default", "reason": "auto"},
        "path_counts": {
            "gemms": {"linear_fwd": {"triton": 40, "plain": 8}, "linear_dgrad": {"triton": 40}},
            "operands": {},
            "fallbacks": [],
            "steps": 4,
        },
    }


def write_run(
    root: Path,
    name: str,
    mode: str,
    recipe: str,
    seed: int,
    val_final: float,
    *,
    train_loss: float = 4.0,
    step_s: float = 0.2,
    peak: int = 10 * 2**30,
    dataset: str = "realtext",
    status: str = "succeeded",
    log_only: bool = False,
    overlapped: bool = False,
    batch: str = "batch1",
    wall_s: float = 30.0,
    gpus: list[str] | None = None,
) -> Path:
    run = root / batch / name
    run.mkdir(parents=True)
    manifest = _manifest(mode, recipe, seed, dataset=dataset, status=status)
    if gpus is not None:
        manifest["environment"]["gpus"] = gpus
    (run / "manifest.json").write_text(json.dumps(manifest))
    lines = [
        json.dumps({"step": i, "loss": train_loss + 1.0 / i, "step_time_s": step_s, "peak_mem_bytes": peak})
        for i in range(1, 21)
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    points = [
        rp.ValPoint(10, val_final + 0.5),
        rp.ValPoint(20, val_final + 0.01),
        rp.ValPoint(20, val_final, True),
    ]
    if log_only:  # a run directory as `megaquant train` leaves it: the evaluations only in train.log
        log = [VALID_LINE.format(it=p.step, loss=p.loss) for p in points[:2]]
        (run / "train.log").write_text("\n".join([*log, FINAL_LINE.format(it=20, loss=val_final)]) + "\n")
    else:
        (run / "validation.jsonl").write_text("".join(json.dumps(p.as_json()) + "\n" for p in points))
        (run / "train_tail.log").write_text("...\n")
    record = {"batch": batch, "run": name, "overlapped": ["other"] if overlapped else [], "wall_s": wall_s}
    record["shape_title"] = "Llama-3.2-1B, full depth"
    (run / "results_run.json").write_text(json.dumps(record))
    return run


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # bf16 over three seeds: mean 3.04, min-max band [-0.04, +0.06] (mean +- std would be +-0.0529)
    for seed, val in ((1234, 3.00), (1235, 3.02), (1236, 3.10)):
        write_run(root, f"bf16-s{seed}", "bf16", "default", seed, val, step_s=0.2)
    # a headline cell clearly worse: 3.30 3.35 3.40 -> paired gaps +0.30 +0.33 +0.30: gap +0.31 [+0.30, +0.33]
    for seed, val in ((1234, 3.30), (1235, 3.35), (1236, 3.40)):
        write_run(root, f"mx8-s{seed}", "FA_linear_mxfp8", "default", seed, val, step_s=0.3, overlapped=True)
    write_run(root, "fa-s1234", "FA_mxfp8", "default", 1234, 3.05, step_s=0.22, log_only=True)
    write_run(root, "hif8-s1234", "FA_linear_hifp8", "hifp8_scaled", 1234, 3.20, peak=12 * 2**30)
    write_run(root, "broken", "FA_linear_mxfp4", "default", 1234, 9.0, status="failed")
    write_run(root, "smoke", "bf16", "default", 1234, 1.0, dataset="sample")  # another page's run
    write_run(root, "cal-bf16", "bf16", "default", 1234, 3.5, batch="calib", step_s=0.25, wall_s=65.0)
    return root


def _cell(grouped: dict[str, list[rp.Cell]], mode: str, recipe: str = "default") -> rp.Cell:
    (family,) = grouped
    return next(c for c in grouped[family] if (c.mode, c.recipe) == (mode, recipe))


def test_gaps_are_paired_by_seed_and_bf16_shows_its_seed_spread(store: Path) -> None:
    runs, notes = rp.load_store(store)
    runs = [r for r in runs if r.batch != "calib"]
    assert sorted(r.name for r in runs) == sorted(
        [f"batch1/{n}" for n in ("bf16-s1234", "bf16-s1235", "bf16-s1236", "mx8-s1234", "mx8-s1235")]
        + ["batch1/mx8-s1236", "batch1/fa-s1234", "batch1/hif8-s1234"]
    )
    assert any("broken" in n and "failed" in n for n in notes)  # failed runs are named, not averaged in
    grouped = rp.cells(runs)
    assert list(grouped) == ["llama32-1b, 16 layers, seq 2048, 4 seq/step, 20 steps"]
    (family,) = grouped
    order = [(c.mode, c.recipe) for c in grouped[family]]  # bf16, then the registries' order, not the names'
    assert order == [
        ("bf16", "default"),
        ("FA_mxfp8", "default"),
        ("FA_linear_mxfp8", "default"),
        ("FA_linear_hifp8", "hifp8_scaled"),
    ]
    base = _cell(grouped, "bf16")
    assert base.val is not None and base.seeds == (1234, 1235, 1236)
    assert base.val.mean == pytest.approx(3.04)
    assert (base.val.gap, base.val.low, base.val.high) == pytest.approx((0.0, -0.04, 0.06))
    mx8 = _cell(grouped, "FA_linear_mxfp8")
    assert mx8.val is not None
    assert (mx8.val.gap, mx8.val.low, mx8.val.high) == pytest.approx((0.31, 0.30, 0.33))
    assert (mx8.val.seeds, mx8.val.agree) == (3, 3) and mx8.val.mean == pytest.approx(3.35)
    fa = _cell(grouped, "FA_mxfp8")  # validation parsed from train.log; seed 1234 only: 3.05 - 3.00
    assert fa.val is not None and fa.val.gap == pytest.approx(0.05) and fa.val.seeds == 1
    # only shared runs: their time, marked; bf16 had the GPU alone
    assert mx8.step_time_s == pytest.approx(0.3) and mx8.time_shared
    assert base.step_time_s == pytest.approx(0.2) and not base.time_shared
    hif8 = _cell(grouped, "FA_linear_hifp8", "hifp8_scaled")
    assert hif8.peak_mem_bytes == 12 * 2**30


def test_step_times_compare_on_one_card(tmp_path: Path) -> None:
    """A family's card is its bf16 runs'; a cell's time comes from its runs on that card; a cell with
    runs on another card only shows that card's time, named, and no ratio to bf16 (an H100 step is not
    an H200 step). Runs without the manifest field count as the lent H200."""
    root = tmp_path / "runs"
    write_run(root, "bf16-s1234", "bf16", "default", 1234, 3.0, step_s=0.2)  # unrecorded: the H200
    write_run(root, "bf16-s1235", "bf16", "default", 1235, 3.0, step_s=0.2, gpus=["NVIDIA H200"])
    h100 = ["NVIDIA H100 80GB HBM3"]
    write_run(root, "mx8-s1234", "FA_linear_mxfp8", "default", 1234, 3.1, step_s=0.3, gpus=["NVIDIA H200"])
    write_run(root, "mx8-s1235", "FA_linear_mxfp8", "default", 1235, 3.1, step_s=0.5, gpus=h100)
    write_run(root, "mx4-s1234", "FA_linear_mxfp4", "default", 1234, 3.2, step_s=0.4, gpus=h100)
    runs, _ = rp.load_store(root)
    grouped = rp.cells(runs)
    mx8, mx4 = _cell(grouped, "FA_linear_mxfp8"), _cell(grouped, "FA_linear_mxfp4")
    assert mx8.step_time_s == pytest.approx(0.3) and mx8.time_gpu is None  # the H100 run left out
    assert mx4.step_time_s == pytest.approx(0.4) and mx4.time_gpu == h100[0]
    assert mx4.val is not None and mx4.val.gap == pytest.approx(0.2)  # losses still compare
    (family,) = grouped
    text = rp.family_section(family, grouped[family], {})
    assert "| FA_linear_mxfp8 | default | 300.0 | 1.50× |" in text
    assert f"| FA_linear_mxfp4 | default | 400.0 (on {h100[0]}) | — |" in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| batch1/")}
    assert f" | {h100[0]} | " in rows["batch1/mx8-s1235"] and " | NVIDIA H200 | " in rows["batch1/bf16-s1234"]


def test_page_tables_and_figures(store: Path, tmp_path: Path) -> None:
    page = tmp_path / "README.md"
    page.write_text(f"# Results\n\nhand-written intro\n\n{rp.BEGIN}\nold\n{rp.END}\n\nhand-written end\n")
    text = rp.build(store, page)
    assert text.startswith("# Results\n\nhand-written intro\n\n") and text.endswith("\n\nhand-written end\n")
    assert "old" not in text
    assert "Llama-3.2-1B, full depth (`results_runs.py`)." in text
    assert "| bf16 | default | 3 | 3.0400 | +0.0000 [-0.0400, +0.0600] | (spread of 3 seeds) |" in text
    assert "| FA_linear_mxfp8 | default | 3 | 3.3500 | +0.3100 [+0.3000, +0.3300] | 3 of 3 |" in text
    assert "| FA_mxfp8 | default | 1 | 3.0500 | +0.0500 [+0.0500, +0.0500] | 1 seed |" in text
    # no ratio with a shared time: the other runs slowed it by an amount nobody measured
    assert "| FA_linear_mxfp8 | default | 300.0 (shared) | — | 10.00 | 1.00× | 3 of 3 |" in text
    assert "| FA_linear_hifp8 | hifp8_scaled | 200.0 | 1.00× | 12.00 | 1.20× | 0 of 1 |" in text
    assert "| batch1/bf16-s1234 | 1234 | 20 | " in text
    # which card and which megaquant ran (runs stored before manifests named the card: the lent H200)
    assert "| 20 / 0 / 2 | fused | on | NVIDIA H200 | 0123456789 | feedc0de12345678 |" in text
    # each run's own step time beside the cell's median, a shared run's marked
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| batch1/")}
    assert " | 200.0 | " in rows["batch1/bf16-s1234"] and " | 300.0 (shared) | " in rows["batch1/mx8-s1235"]
    assert "batch1/broken: failed (exit 1); left out" in text
    assert "smoke" not in text  # a sample-dataset run belongs to the smoke page
    # the calibration run: its own table, start-up + evaluation = wall 65 s - 20 steps x 0.25 s
    calibration = text[text.index("### Step time and memory, one run at a time") :]
    assert "| bf16 | default | 20 | 250.0 | 10.00 | no | 60 |" in calibration
    assert "cal-bf16" not in text[: text.index("### Step time and memory")]  # not averaged into bf16
    slug = "llama32-1b-16-layers-seq-2048-4-seq-step-20-steps"
    assert f"![loss curves]({slug}-loss.png)" in text and f"![gap vs bf16]({slug}-gap.png)" in text
    assert (tmp_path / f"{slug}-loss.png").stat().st_size > 0
    assert (tmp_path / f"{slug}-gap.png").stat().st_size > 0
    page.write_text(text)
    assert rp.build(store, page, figures=False) == text  # --check draws nothing and gives the same page


def test_check_fails_on_a_stale_page(store: Path, tmp_path: Path) -> None:
    page = tmp_path / "README.md"
    page.write_text(f"{rp.BEGIN}\n{rp.END}\n")
    assert rp.main(["--runs", str(store), "--page", str(page), "--check"]) == 1
    assert rp.main(["--runs", str(store), "--page", str(page)]) == 0
    assert rp.main(["--runs", str(store), "--page", str(page), "--check"]) == 0


def test_a_page_without_the_generated_block_is_refused(store: Path, tmp_path: Path) -> None:
    page = tmp_path / "README.md"
    page.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="results:begin"):
        rp.build(store, page, figures=False)


def test_the_committed_results_page_is_what_the_stored_runs_give() -> None:
    """docs/results/README.md's generated block is rebuilt from docs/results/runs: run the builder after
    unpacking a batch, or this fails."""
    assert rp.main(["--check"]) == 0


def test_a_cell_on_one_easy_seed_is_compared_with_that_seed_of_bf16(tmp_path: Path) -> None:
    # Megatron draws the validation samples from the seed: seed 1234's are easy for every mode. Against the
    # mean of bf16's seeds this one-seed cell would look 0.10 better than bf16; paired, it is 0.02 worse.
    root = tmp_path / "runs"
    for seed, val in ((1234, 2.90), (1235, 3.10), (1236, 3.30)):
        write_run(root, f"bf16-s{seed}", "bf16", "default", seed, val)
    write_run(root, "mx4-s1234", "FA_linear_mxfp4", "default", 1234, 2.92)
    runs, _ = rp.load_store(root)
    cell = _cell(rp.cells(runs), "FA_linear_mxfp4")
    assert cell.val is not None and cell.val.gap == pytest.approx(0.02) and cell.val.seeds == 1
    write_run(root, "mx4-s99", "FA_linear_mxfp8", "default", 99, 2.0)  # no bf16 run with its seed
    runs, _ = rp.load_store(root)
    assert _cell(rp.cells(runs), "FA_linear_mxfp8").val is None


def test_full_validation_runs_form_their_own_family() -> None:
    args = ["--num-layers", "16", "--seq-length", "2048"]
    plain = rp.family_of({"model": "llama32-1b", "megatron_args": args}, 1000)
    full = rp.family_of({"model": "llama32-1b", "megatron_args": [*args, "--full-validation"]}, 1000)
    assert full == plain + ", full validation"
    fixed = rp.family_of({"model": "llama32-1b", "megatron_args": args, "validation_seed": 1234}, 1000)
    assert fixed == plain + ", validation seed 1234"


def test_a_prestarted_successor_ends_the_step_time_where_it_began(tmp_path: Path) -> None:
    """results_runs.py --prestart-s: the ending run's steps from `prestart.from_step` on ran beside the next
    run's start-up, so its step time is taken over the steps before; a run without the record uses all."""
    run = write_run(tmp_path, "bf16-s1234", "bf16", "default", 1234, 3.0)
    rows = [
        {"step": i, "loss": 4.0, "step_time_s": 0.2 if i < 9 else 0.9, "peak_mem_bytes": 1}
        for i in range(1, 21)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stored,), _ = rp.load_store(tmp_path)
    assert stored.step_time_s == pytest.approx(0.9)  # the median after warm-up: 12 of 18 steps slow
    record = json.loads((run / "results_run.json").read_text())
    record["prestart"] = {"successor": "next", "from_step": 9}
    (run / "results_run.json").write_text(json.dumps(record))
    (stored,), _ = rp.load_store(tmp_path)
    assert stored.step_time_s == pytest.approx(0.2) and not stored.shared_gpu
