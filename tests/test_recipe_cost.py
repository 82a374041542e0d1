"""benchmarks/recipe_cost.py on the CPU: it runs the hooks' GEMM calls per recipe, finds the Hadamard
transform exactly where the recipe applies it, and sums a step (its times are CPU wall times: not checked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipe_cost  # noqa: E402


def test_smoke_run_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    variants = "mxfp4+default,mxfp4+mxfp4_tseng,nvfp4+nvfp4_paper"
    argv = ["--device", "cpu", "--tokens", "64", "--scale", "64", "--layers", "2", "--variants", variants]
    assert recipe_cost.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "recipe_cost.json").read_text())
    rows = result["rows"]
    assert len(rows) == 3 * 4 * 3  # variants x layers x (fprop, dgrad, wgrad)
    rht = {(r["recipe"], r["gemm"]) for r in rows if r["rht_us"] is not None}
    # tseng transforms both backward GEMMs, the NVFP4 paper's recipe wgrad only, plain MXFP4 nothing
    assert rht == {("mxfp4_tseng", "dgrad"), ("mxfp4_tseng", "wgrad"), ("nvfp4_paper", "wgrad")}
    steps = {(t["value"], t["recipe"]): t for t in result["step"]}
    assert steps[("mxfp4", "default")]["rht_ms"] == 0
    assert steps[("mxfp4", "mxfp4_tseng")]["rht_ms"] > 0
    assert all(t["gemms_ms"] > 0 and t["bf16_ms"] > 0 and t["matmul_ms"] > 0 for t in steps.values())
    assert all(r["matmul_us"] > 0 for r in rows)
    assert "not a GPU number" in result["device"] and "mxfp4_tseng" in capsys.readouterr().out


@pytest.mark.parametrize("gemm", ["fprop", "dgrad", "wgrad"])
@pytest.mark.parametrize("value, recipe", [("mxfp4", "default"), ("nvfp4", "default"), ("mxfp8", "default")])
def test_the_timed_operands_are_the_ones_quant_matmul_multiplies(gemm: str, value: str, recipe: str) -> None:
    """matmul_us times torch.matmul on recipe_operands' pair: that pair must give quant_matmul's result bit
    for bit (round-to-nearest recipes: a stochastic one draws anew per call), and be quantized at all."""
    from megaquant.ops import quant_matmul

    a, b = recipe_cost._operands(gemm, 64, 128, 96, "cpu")
    kw = {"recipe": recipe, "gemm": gemm, "grad": gemm != "fprop", "role": "linear_fwd"}
    qa, qb = recipe_cost.recipe_operands(a, b, value, **kw)
    assert qa.shape == a.shape and qb.shape == b.shape and not recipe_cost.torch.equal(qa, a)
    assert recipe_cost.torch.equal(recipe_cost.torch.matmul(qa, qb), quant_matmul(a, b, value, **kw))


def test_an_ablation_overrides_the_recipes_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """tseng with its transform, stochastic rounding and pre-scale all taken out multiplies what plain mxfp4
    multiplies (bit for bit: round-to-nearest both); with one part out it differs from tseng itself."""
    v = recipe_cost.parse_variant("mxfp4+mxfp4_tseng:hadamard=none:stochastic=none:sr_prescale=1")
    assert v.overrides == (("hadamard", "none"), ("stochastic", "none"), ("sr_prescale", 1.0))
    assert v.label == "mxfp4_tseng[hadamard=none,stochastic=none,sr_prescale=1.0]"
    torch = recipe_cost.torch
    for gemm in ("dgrad", "wgrad"):
        a, b = recipe_cost._operands(gemm, 64, 128, 96, "cpu")
        kw = {"recipe": "mxfp4_tseng", "gemm": gemm, "grad": True, "role": f"linear_{gemm}"}
        bare = torch.matmul(*recipe_cost.recipe_operands(a, b, "mxfp4", v.overrides, **kw))
        plain = torch.matmul(*recipe_cost.recipe_operands(a, b, "mxfp4", **{**kw, "recipe": "default"}))
        assert torch.equal(bare, plain)
        no_rht = recipe_cost.parse_variant("mxfp4+mxfp4_tseng:hadamard=none:stochastic=none").overrides
        rht_only = torch.matmul(*recipe_cost.recipe_operands(a, b, "mxfp4", (("stochastic", "none"),), **kw))
        assert not torch.equal(rht_only, plain)  # the transform is still there: other roundings
        assert torch.equal(torch.matmul(*recipe_cost.recipe_operands(a, b, "mxfp4", no_rht, **kw)), plain)
    argv = ["--device", "cpu", "--tokens", "64", "--scale", "64", "--layers", "1", "--out", str(tmp_path)]
    assert recipe_cost.main([*argv, "--variants", "mxfp4+mxfp4_tseng,mxfp4+mxfp4_tseng:hadamard=none"]) == 0
    result = json.loads((tmp_path / "recipe_cost.json").read_text())
    labels = [t["recipe"] for t in result["step"]]
    assert labels == ["mxfp4_tseng", "mxfp4_tseng[hadamard=none]"]
    assert result["step"][1]["rht_ms"] == 0 and result["step"][0]["rht_ms"] > 0
    assert "mxfp4_tseng[hadamard=none]" in capsys.readouterr().out


def test_bad_variants_and_missing_cuda_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="VALUE\\+RECIPE"):
        recipe_cost.main(["--device", "cpu", "--variants", "mxfp4", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not FIELD=X with FIELD one of .*sr_prescale"):
        recipe_cost.parse_variant("mxfp4+mxfp4_tseng:no_such_field=1")
    with pytest.raises(SystemExit, match="sr_prescale takes a float, got 'x'"):
        recipe_cost.parse_variant("mxfp4+mxfp4_tseng:sr_prescale=x")
    if not recipe_cost.torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            recipe_cost.main(["--device", "cuda", "--out", str(tmp_path)])
