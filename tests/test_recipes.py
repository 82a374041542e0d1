"""Recipes: the registry, configure(recipe=...), and what each recipe makes the quantized GEMMs do.

Formats that are not in this tree yet (nvfp4, stochastic rounding, 2-D blocks, the Hadamard transform)
are exercised through a recording fake_quant and a reference Hadamard module injected for the test: what is
tested here is that the ops pass the right options to the right operands, with the right seeds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from megaquant import ops
from megaquant.errors import ValueNameError
from megaquant.formats import fake_quant
from megaquant.formats._random import mixed_key
from megaquant.ops import configure, quant_config, quant_linear, quant_matmul
from megaquant.ops import gemm as gemm_mod
from megaquant.ops import operands as operands_mod
from megaquant.recipes import RECIPES, bf16_layers_for_args, check_recipe, get_recipe, layer_count


@pytest.fixture(autouse=True)
def _clean_defaults() -> Iterator[None]:
    configure()
    ops.reset_state()
    yield
    configure()
    ops.reset_state()


def _rand(*shape: int, scale: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


class Recorder:
    """Stands in for fake_quant: records each call's format, options and input; returns the input."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, fmt: str, **kw: Any) -> torch.Tensor:
        self.calls.append((fmt, kw, x.detach().clone()))
        return x.detach().clone()

    def quantizer(self, x: torch.Tensor, fmt: str, **kw: Any) -> tuple[Any, str, None]:
        """Stands in for formats.quantizer (the ops' launch path): each quantized tensor is one call."""
        return (lambda y: self(y, fmt, **kw)), "reference", None


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(operands_mod, "fake_quant", rec)
    monkeypatch.setattr(operands_mod, "quantizer", rec.quantizer)
    monkeypatch.setattr(operands_mod, "_QUANTIZERS", {})  # resolved quantizers of earlier tests: none
    return rec


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


class FakeRHT:
    """A reference blockwise random Hadamard transform (signs from the seed), as a module."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def random_hadamard(
        self, x: torch.Tensor, *, axis: int, block: int, seed: int, device_seed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Records the stream's key: the seed, or mixed with the device word's value now (per-GEMM signs)."""
        if device_seed is not None:
            seed = mixed_key(seed, int(device_seed))
        self.calls.append((axis, block, seed))
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (block,), generator=g).to(torch.float64) * 2 - 1
        m = signs[:, None] * _hadamard(block)  # orthogonal
        moved = x.movedim(axis, -1).to(torch.float64)
        shape = moved.shape
        out = (moved.reshape(*shape[:-1], shape[-1] // block, block) @ m).reshape(shape)
        return out.movedim(-1, axis).to(x.dtype)


@pytest.fixture
def rht(monkeypatch: pytest.MonkeyPatch) -> FakeRHT:
    fake = FakeRHT()
    module = types.ModuleType("megaquant_test_rht")
    module.random_hadamard = fake.random_hadamard  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "megaquant_test_rht", module)
    monkeypatch.setattr(operands_mod, "_HADAMARD_MODULES", ("megaquant_test_rht",))
    return fake


# ---------------------------------------------------------------- registry


def test_registry_has_the_issue_recipes_each_with_a_source() -> None:
    for name in (
        "default",
        "fork",
        "hifp8_scaled",
        "hifp8_delayed",
        "sr_gradients",
        "nvfp4_paper",
        "mxfp4_tseng",
    ):
        recipe = get_recipe(name)
        assert recipe.name == name and recipe.title and recipe.source
        described = recipe.per_role(ops.ROLES)
        assert set(described) == set(ops.ROLES) and all(described.values())
    assert "arXiv:2509.25149" in RECIPES["nvfp4_paper"].source
    assert "Tseng" in RECIPES["mxfp4_tseng"].source
    assert "random Hadamard" in RECIPES["nvfp4_paper"].per_gemm()["wgrad"]
    assert "random Hadamard" not in RECIPES["nvfp4_paper"].per_gemm()["dgrad"]


def test_unknown_recipe_lists_every_recipe() -> None:
    with pytest.raises(
        ValueNameError, match="unknown recipe 'nope'; choose one of: default, fork, hifp8_scaled"
    ):
        get_recipe("nope")
    with pytest.raises(ValueNameError, match="unknown recipe 'nope'"):
        configure(recipe="nope")


def test_fork_trees_run_only_fork_numerics_and_fork_has_no_nvfp4() -> None:
    assert check_recipe("fork", spec="fork").name == "fork"
    assert check_recipe("default", spec="fork").name == "default"
    with pytest.raises(ValueNameError, match="fork's own ops do only fork numerics"):
        check_recipe("hifp8_scaled", spec="fork")
    with pytest.raises(ValueNameError, match="cannot express linear_fwd = nvfp4"):
        check_recipe("fork", {"linear_fwd": "nvfp4"})
    configure(recipe="fork")
    assert quant_config("mxfp8").preset == "fork"
    assert quant_config("mxfp8", role="qk").fmt == "mxfp8_e5m2"
    with pytest.raises(ValueNameError, match="no nvfp4"):
        quant_config("nvfp4")
    with pytest.raises(ValueNameError, match="implies preset 'fork'"):
        quant_config("mxfp8", preset="spec")


def test_recipe_resolves_into_config_fields() -> None:
    assert quant_config("nvfp4").fmt == quant_config("nvfp4", grad=True).fmt == "nvfp4"
    cfg = quant_config("hifp8", recipe="hifp8_delayed")
    assert (cfg.recipe, cfg.tensor_scaling, cfg.amax_history) == ("hifp8_delayed", "delayed", 64)
    assert quant_config("mxfp8", recipe="hifp8_scaled").tensor_scaling == "none"  # HiF8 operands only
    assert quant_config("hifp8", tensor_scale=True).tensor_scaling == "current"  # the old keyword
    assert quant_config("hifp8", recipe="sr_gradients").stochastic == "none"  # HiF8: ties away only
    paper = quant_config("nvfp4", recipe="nvfp4_paper", gemm="wgrad")
    assert (paper.grad, paper.stochastic, paper.hadamard, paper.weight_block_2d) == (
        True,
        "gradients",
        "wgrad",
        True,
    )
    assert not quant_config("mxfp4", recipe="nvfp4_paper").weight_block_2d  # 2-D blocks: NVFP4 only
    with pytest.raises(ValueNameError, match="unknown GEMM kind"):
        quant_config("mxfp8", gemm="fwd")


def test_recipe_environment_variable_is_the_process_default() -> None:
    code = (
        "from megaquant.ops import quant_config; c = quant_config('hifp8'); print(c.recipe, c.tensor_scaling)"
    )
    env = {**os.environ, "MEGAQUANT_RECIPE": "hifp8_scaled"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["hifp8_scaled", "current"]


# ---------------------------------------------------------------- HiF8 tensor scaling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-7, 1e-2, 300.0])
def test_current_scaling_equals_fake_quant_tensor_scale(dtype: torch.dtype, magnitude: float) -> None:
    a, w = _rand(6, 64, scale=magnitude, dtype=dtype), _rand(32, 64, seed=1, dtype=dtype)
    out = quant_matmul(a, w.t(), "hifp8", recipe="hifp8_scaled")
    ref = fake_quant(a, "hifp8", tensor_scale=True) @ fake_quant(w.t(), "hifp8", tensor_scale=True)
    assert torch.equal(out, ref)
    unscaled = quant_matmul(a, w.t(), "hifp8")
    assert not torch.equal(out, unscaled)  # the scale matters at every one of these magnitudes


def test_delayed_scaling_uses_the_slot_history_and_acts_as_current_before_the_first_step() -> None:
    big, small = _rand(4, 64), _rand(4, 64, scale=1e-3, seed=2)
    w = _rand(64, 8, seed=3)
    current = quant_matmul(small, w, "hifp8", recipe="hifp8_scaled")
    assert torch.equal(quant_matmul(small, w, "hifp8", recipe="hifp8_delayed"), current)  # step 0
    ops.next_step()
    quant_matmul(big, w, "hifp8", recipe="hifp8_delayed")  # step 1 records amax(big) ~ 3
    ops.next_step()
    out = quant_matmul(small, w, "hifp8", recipe="hifp8_delayed")  # step 2: scaled by the history max
    s = 3 - math.floor(math.log2(float(big.abs().max())))
    expected = (fake_quant(small * 2.0**s, "hifp8") * 2.0**-s) @ fake_quant(
        w, "hifp8", tensor_scale=True
    )  # w's slot saw the same w both steps: its history amax is its own
    assert torch.equal(out, expected)
    assert not torch.equal(out, current)


def test_quantizer_amax_takes_the_amax_per_call() -> None:
    """formats.quantizer_amax (delayed scaling's launch path): the amax an argument of each call, the bits
    of fake_quant(..., amax=); formats.finite_amax: max |x| over the finite elements."""
    from megaquant.formats import finite_amax, quantizer_amax

    x = _rand(8, 64, seed=5).to(torch.bfloat16)
    fn, path, reason = quantizer_amax(x, "hifp8", tensor_scale=True)
    assert path == "reference" and reason is not None and "CUDA" in reason
    for a in (0.5, 40.0, 0.0, -3.0, float("inf")):
        amax = torch.tensor(a)
        assert torch.equal(fn(x, amax), fake_quant(x, "hifp8", tensor_scale=True, amax=amax))
    assert not torch.equal(fn(x, torch.tensor(0.5)), fn(x, torch.tensor(40.0)))  # the amax matters
    with pytest.raises(ValueNameError, match="tensor_scale"):
        quantizer_amax(x, "hifp8")  # an amax sets a tensor scale: HiF8 needs tensor_scale=True
    nv = _rand(4, 64, seed=6)
    nv_fn, _, _ = quantizer_amax(nv, "nvfp4")  # NVFP4 takes its amax as is (no tensor_scale needed)
    for a in (0.5, 9.0):
        assert torch.equal(nv_fn(nv, torch.tensor(a)), fake_quant(nv, "nvfp4", amax=torch.tensor(a)))
    assert not torch.equal(nv_fn(nv, torch.tensor(0.5)), nv_fn(nv, torch.tensor(9.0)))
    y = torch.tensor([1.0, -7.5, float("inf"), float("nan"), 2.0])
    assert finite_amax(y).item() == 7.5 and finite_amax(y).shape == () and finite_amax(y[:0]).item() == 0.0


def test_evaluation_scales_by_the_current_amax_and_leaves_the_training_histories_alone() -> None:
    """Inside state.evaluation() delayed scaling is current scaling, and the next training step scales as
    it would have without the evaluation: the validation batch's amax joins no history."""
    from megaquant.ops import state

    big, small = _rand(4, 64), _rand(4, 64, scale=1e-3, seed=2)
    huge = _rand(4, 64, scale=1e3, seed=4)
    w = _rand(64, 8, seed=3)
    ops.next_step()
    quant_matmul(big, w, "hifp8", recipe="hifp8_delayed")  # step 1 records amax(big)
    ops.next_step()
    histories = {k: v.clone() for k, v in state._STATE.histories.items()}
    with state.evaluation():
        for _ in range(3):  # three validation batches, as Megatron's evaluate runs them
            got = quant_matmul(huge, w, "hifp8", recipe="hifp8_delayed")
            assert torch.equal(got, quant_matmul(huge, w, "hifp8", recipe="hifp8_scaled"))
    assert not state._STATE.evaluating and state._STATE.histories.keys() == histories.keys()
    assert all(torch.equal(state._STATE.histories[k], v) for k, v in histories.items())
    out = quant_matmul(small, w, "hifp8", recipe="hifp8_delayed")  # step 2: big's history, not huge's
    s = 3 - math.floor(math.log2(float(big.abs().max())))
    expected = (fake_quant(small * 2.0**s, "hifp8") * 2.0**-s) @ fake_quant(w, "hifp8", tensor_scale=True)
    assert torch.equal(out, expected)


def test_megatrons_evaluate_runs_inside_the_evaluation_state() -> None:
    from megaquant.launch import pretrain
    from megaquant.ops import state

    seen: list[bool] = []
    wrapped = pretrain._counted_evaluate(lambda *a, **k: seen.append(state._STATE.evaluating) or "loss")
    assert wrapped(1, key=2) == "loss" and seen == [True] and not state._STATE.evaluating


# ---------------------------------------------------------------- stochastic rounding and seeds


def _roundings(rec: Recorder) -> list[str]:
    return [kw["rounding"] for _, kw, _ in rec.calls]


def test_sr_gradients_rounds_only_the_gradient_operand_of_backward_gemms(recorder: Recorder) -> None:
    configure(recipe="sr_gradients")
    x, w, g = _rand(8, 32), _rand(16, 32, seed=1), _rand(8, 16, seed=2)
    quant_matmul(x, w.t(), "mxfp8", gemm="fprop")
    quant_matmul(g, w, "mxfp8", grad=True, gemm="dgrad")
    quant_matmul(g.t(), x, "mxfp8", grad=True, gemm="wgrad")
    assert _roundings(recorder) == ["even", "even", "stochastic", "even", "stochastic", "even"]
    seeds = [kw["seed"] for _, kw, _ in recorder.calls if "seed" in kw]
    assert len(set(seeds)) == 2 and all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds)


def test_seeds_advance_per_step_and_gemm_and_repeat_for_the_same_run(recorder: Recorder) -> None:
    """The stream key of a draw (its host seed mixed with the step's device word) is new per GEMM and step
    and the same for the same run; the host seed itself repeats every step (what a CUDA graph replays)."""
    configure(recipe="sr_gradients")
    g, w = _rand(8, 16), _rand(16, 32, seed=1)

    def run(seed: int) -> tuple[list[int], list[int]]:
        recorder.calls.clear()
        ops.reset_state(seed=seed)
        keys, seeds = [], []
        for _ in range(3):
            ops.next_step()
            recorder.calls.clear()
            quant_matmul(g, w, "mxfp4", grad=True, gemm="dgrad")
            quant_matmul(g, w, "mxfp4", grad=True, gemm="dgrad")
            drawn = [kw for _, kw, _ in recorder.calls if "seed" in kw]
            seeds += [kw["seed"] for kw in drawn]
            keys += [mixed_key(kw["seed"], int(kw["device_seed"])) for kw in drawn]  # the word of this step
        return keys, seeds

    first, host_seeds = run(1234)
    assert len(first) == 6 and len(set(first)) == 6
    assert host_seeds[:2] == host_seeds[2:4] == host_seeds[4:] and len(set(host_seeds)) == 2
    assert run(1234)[0] == first
    assert set(run(1235)[0]).isdisjoint(first)


def test_mxfp4_tseng_rounds_both_backward_operands_prescaled_by_three_quarters(recorder: Recorder) -> None:
    configure(recipe="mxfp4_tseng")
    g, w = _rand(8, 64, dtype=torch.bfloat16), _rand(64, 32, seed=1, dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemm_mod, "hadamard_pair", lambda a, b, cfg: (a, b))  # RHT tested below
        out = quant_matmul(g, w, "mxfp4", grad=True, gemm="dgrad")
    assert _roundings(recorder) == ["stochastic", "stochastic"]
    (_, kwa, qa), (_, kwb, qb) = recorder.calls
    assert kwa["prescale"] == kwb["prescale"] == 0.75  # quantize 3/4 x and divide back (formats.fake_quant)
    assert qa.dtype == torch.bfloat16 and torch.equal(qa.reshape(g.shape), g)
    assert torch.equal(qb.reshape(w.shape), w)
    assert out.dtype == torch.bfloat16


def test_prescaled_fake_quant_is_the_quantization_of_three_quarters_x_divided_back() -> None:
    """fake_quant(x, prescale=p) = (fake_quant(p x in fp32) / p in fp32) in x's dtype: the reference (the
    kernels are compared with it under the interpreter, tests/test_triton_interpret.py)."""
    x = _rand(16, 64, dtype=torch.bfloat16) * 7
    kw: dict[str, Any] = dict(rounding="stochastic", seed=3)
    got = fake_quant(x, "mxfp4_e2m1", prescale=0.75, **kw)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (fake_quant(x.float() * 0.75, "mxfp4_e2m1", **kw) / 0.75).to(torch.bfloat16))
    assert not torch.equal(got, fake_quant(x, "mxfp4_e2m1", **kw))
    assert torch.equal(fake_quant(x, "mxfp4_e2m1", prescale=1.0, **kw), fake_quant(x, "mxfp4_e2m1", **kw))
    for bad in (0, -0.75, float("inf"), float("nan"), True, "0.75"):
        with pytest.raises(ValueNameError, match="prescale"):
            fake_quant(x, "mxfp4_e2m1", prescale=bad, **kw)  # type: ignore[arg-type]


def test_ops_own_backward_applies_the_recipe_to_its_gradient_gemms(recorder: Recorder, rht: FakeRHT) -> None:
    x = _rand(4, 16, 32).requires_grad_(True)
    w = _rand(24, 32, seed=1).requires_grad_(True)
    quant_linear(x, w, "mxfp8", quantize_grads=True, recipe="nvfp4_paper").sum().backward()
    # forward x, w (nearest); dgrad g (SR), w; wgrad g^T (SR), x^T, both after one RHT along the tokens
    assert _roundings(recorder) == ["even", "even", "stochastic", "even", "stochastic", "even"]
    assert [c[:2] for c in rht.calls] == [(-1, 16), (-2, 16)] and rht.calls[0][2] == rht.calls[1][2]


# ---------------------------------------------------------------- Hadamard transforms and 2-D weights


def test_rht_on_wgrad_keeps_the_product_and_shares_one_seed(recorder: Recorder, rht: FakeRHT) -> None:
    configure(recipe="nvfp4_paper")
    g, x = _rand(64, 24), _rand(64, 40, seed=1)
    out = quant_matmul(g.t(), x, "nvfp4", grad=True, gemm="wgrad")  # fake_quant is the identity here
    torch.testing.assert_close(out, g.t() @ x, rtol=1e-5, atol=1e-5)
    assert [c[:2] for c in rht.calls] == [(-1, 16), (-2, 16)] and rht.calls[0][2] == rht.calls[1][2]
    (_, _, qa), _ = recorder.calls
    assert not torch.allclose(qa, g.t())  # the quantizer saw the transformed operand
    quant_matmul(g, _rand(24, 8), "nvfp4", grad=True, gemm="dgrad")
    assert len(rht.calls) == 2  # nvfp4_paper: wgrad only


def test_rht_needs_the_gemm_kind(recorder: Recorder, rht: FakeRHT) -> None:
    with pytest.raises(ValueNameError, match="gemm='dgrad' or gemm='wgrad'"):
        quant_matmul(_rand(8, 24), _rand(24, 8), "nvfp4", grad=True, recipe="nvfp4_paper")


def test_rht_zero_pads_a_reduction_not_a_multiple_of_the_block(recorder: Recorder, rht: FakeRHT) -> None:
    """An MoE expert's wgrad reduces over its routed tokens (419 in a DeepSeek run): both operands are padded
    with zeros to the next multiple of the Hadamard block, so the product is unchanged."""
    configure(recipe="mxfp4_tseng")
    g, x = _rand(7, 45), _rand(45, 5, seed=1)
    out = quant_matmul(g, x, "mxfp4", grad=True, gemm="wgrad")  # fake_quant is the identity here
    torch.testing.assert_close(out, g @ x, rtol=1e-5, atol=1e-5)
    (_, _, qa), (_, _, qb) = recorder.calls
    assert qa.shape == (7, 64) and sorted(qb.shape) == [5, 64]  # the quantizers saw the padded operands
    assert [c[:2] for c in rht.calls] == [(-1, 64), (-2, 64)]
    batched = quant_matmul(_rand(2, 7, 45), _rand(2, 45, 5, seed=1), "mxfp4", grad=True, gemm="wgrad")
    torch.testing.assert_close(batched, _rand(2, 7, 45) @ _rand(2, 45, 5, seed=1), rtol=1e-5, atol=1e-5)


def test_missing_hadamard_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operands_mod, "_HADAMARD_MODULES", ("megaquant_no_such_module",))
    with pytest.raises(ValueNameError, match="random Hadamard transforms.*megaquant_no_such_module"):
        quant_matmul(_rand(8, 64), _rand(64, 8), "mxfp4", grad=True, gemm="dgrad", recipe="mxfp4_tseng")


def test_nvfp4_paper_quantizes_weights_in_2d_blocks_in_fprop_and_dgrad(recorder: Recorder) -> None:
    configure(recipe="nvfp4_paper")
    x, w, g = _rand(8, 32), _rand(16, 32, seed=1), _rand(8, 16, seed=2)
    quant_matmul(x, w.t(), "nvfp4", gemm="fprop")
    quant_matmul(g, w, "nvfp4", grad=True, gemm="dgrad")
    quant_linear(x, w, "nvfp4")
    blocks = [bool(kw.get("block_2d")) for _, kw, _ in recorder.calls]
    assert blocks == [False, True, False, True, False, True]
    assert all(fmt == "nvfp4" for fmt, _, _ in recorder.calls)


def test_trainers_keep_an_environment_preset_when_they_configure_a_recipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEGAQUANT_PRESET", "fork")
    monkeypatch.setenv("MEGAQUANT_RECIPE", "sr_gradients")
    assert ops.environment_defaults() == {"preset": "fork", "recipe": "sr_gradients"}
    configure(**{**ops.environment_defaults(), "recipe": "hifp8_scaled"})  # what minitrain does
    cfg = quant_config("hifp8")
    assert (cfg.preset, cfg.recipe, cfg.tensor_scaling) == ("fork", "hifp8_scaled", "current")


# ---------------------------------------------------------------- BF16 layers (resolution and the CLI)


def test_nvfp4_paper_keeps_the_papers_bf16_layers() -> None:
    """The paper's 12B model (62 blocks) keeps its first two and last eight blocks in BF16 (~16 %); the
    same rule resolves against any layer count, most of the layers at the end, one layer at least."""
    paper = get_recipe("nvfp4_paper")
    assert paper.bf16_layer_numbers(62) == (1, 2, *range(55, 63))
    assert paper.bf16_layer_numbers(16) == (1, 15, 16)  # Llama-3.2-1B
    assert paper.bf16_layer_numbers(32) == (1, 28, 29, 30, 31, 32)
    assert paper.bf16_layer_numbers(4) == (4,)
    assert paper.bf16_layer_numbers(1) == ()  # one layer stays quantized
    for name in ("default", "fork", "hifp8_scaled", "hifp8_delayed", "sr_gradients", "mxfp4_tseng"):
        assert get_recipe(name).bf16_layer_numbers(62) == ()
    assert "BF16 layers: 16% of the transformer layers" in paper.listing()
    with pytest.raises(ValueNameError, match="bf16_layers must be in"):
        dataclasses.replace(paper, bf16_layers=1.0)


def test_bf16_layers_of_a_megatron_argv() -> None:
    assert layer_count(["--num-layers", "16", "--hidden-size", "64", "--num-layers=28"]) == 28
    assert layer_count(["--hidden-size", "64"]) is None
    assert bf16_layers_for_args("nvfp4_paper", ["--num-layers", "16"]) == (1, 15, 16)
    assert bf16_layers_for_args("default", ["--num-layers", "16"]) == ()
    assert bf16_layers_for_args("nvfp4_paper", []) == ()


def _cli() -> tuple[Any, Any]:
    from typer.testing import CliRunner

    from megaquant.cli import build_app

    return build_app(("megaquant.launch.commands",)), CliRunner()


DRY = ["train", "--model", "tiny", "--mock-data", "--training-config", "smoke", "--dry-run", "--no-validate"]


def test_list_and_dry_run_show_the_bf16_layers() -> None:
    app, runner = _cli()
    listing = runner.invoke(app, ["train", "--list"]).output
    line = next(x for x in listing.splitlines() if x.startswith("  nvfp4_paper "))
    assert "one fixed sign vector" in line and "BF16 layers: 16% of the transformer layers" in line
    args = [*DRY, "-q", "linear_nvfp4", "--spec", "megatron-core", "--recipe", "nvfp4_paper"]
    dry = runner.invoke(app, args)
    assert dry.exit_code == 0, dry.output
    assert "BF16 layers: 4 of 4 (recipe nvfp4_paper: 16% of the transformer layers" in dry.output  # tiny
    wider = runner.invoke(app, [*args, "--", "--num-layers", "16"])
    assert "BF16 layers: 1, 15, 16 of 16" in wider.output
    assert json.loads(runner.invoke(app, [*args, "--json"]).output)["bf16_layers"] == [4]
    plain = runner.invoke(app, [*DRY, "-q", "linear_nvfp4", "--spec", "megatron-core"])
    assert "BF16 layers" not in plain.output


HOOKED_LAYERS = """class LinearWithGradAccumulationAndAsyncCommunication:
    def forward(ctx, total_input, weight):
        custom_quant_type = 'none'
        return _mq_ops.quant_matmul(total_input, weight.t(), custom_quant_type, gemm='fprop')

    def backward(ctx, grad_output):
        custom_quant_type = 'none'
        grad_input = _mq_ops.quant_matmul(grad_output, weight, custom_quant_type, grad=True, gemm='dgrad')
        custom_quant_type = 'none'
        grad_weight = _mq_wgrad_matmul(grad_output.t(), total_input, custom_quant_type, gemm='wgrad')
        return grad_input, grad_weight
"""
HOOKED_ATTENTION = """class DotProductAttention:
    def forward(self, query, key, value):
        custom_quant_type = 'none'
        scores = _mq_ops.quant_baddbmm(buffer, query, key, custom_quant_type, beta=0.0)
        custom_quant_type = 'none'
        return _mq_ops.quant_bmm(scores, value, custom_quant_type)
"""


def test_manifest_records_the_bf16_layers(tmp_path: Any) -> None:
    import shlex

    import git
    from test_recipes_cli import _instrumented_repo

    from megaquant.launch.run import TRAIN_COMMAND_ENV

    repo = _instrumented_repo(tmp_path)  # spec megatron-core; then every role gets its hooked GEMM
    (repo / "megatron" / "core" / "tensor_parallel" / "layers.py").write_text(HOOKED_LAYERS)
    attention = repo / "megatron" / "core" / "transformer" / "dot_product_attention.py"
    attention.parent.mkdir(parents=True)
    attention.write_text(HOOKED_ATTENTION)
    rep = git.Repo(repo)
    rep.git.add(A=True)
    rep.index.commit("every role hooked")
    fake = tmp_path / "fake.py"
    fake.write_text("print(' iteration        1/       1 | lm loss: 2.5E+00 |')\n")
    app, runner = _cli()
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", "--model", "tiny", "--mock-data", "-q", "linear_nvfp4", "--training-config", "smoke",
         "--megatron", str(repo), "--run-dir", str(run_dir), "--no-validate", "--recipe", "nvfp4_paper",
         "--", "--num-layers", "16"],
        env={TRAIN_COMMAND_ENV: shlex.join([sys.executable, str(fake)])},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["recipe"] == "nvfp4_paper" and manifest["bf16_layers"] == [1, 15, 16]


# ---------------------------------------------------------------- the RHT sign schedule


def _wgrad_seeds(recipe: str, seed: int, steps: int = 3) -> list[list[int]]:
    """The Hadamard seeds of two wgrad GEMMs (two layers) per step, for a run seeded `seed`."""
    fake, rec = FakeRHT(), Recorder()  # the recorder: no real quantization, only the seeds matter here
    module = types.ModuleType("megaquant_test_rht_schedule")
    module.random_hadamard = fake.random_hadamard  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(operands_mod, "fake_quant", rec)
        mp.setattr(operands_mod, "quantizer", rec.quantizer)
        mp.setattr(operands_mod, "_QUANTIZERS", {})
        mp.setitem(sys.modules, "megaquant_test_rht_schedule", module)
        mp.setattr(operands_mod, "_HADAMARD_MODULES", ("megaquant_test_rht_schedule",))
        configure(recipe=recipe)
        ops.reset_state(seed=seed)
        value = "nvfp4" if recipe == "nvfp4_paper" else "mxfp4"
        out = []
        for _ in range(steps):
            ops.next_step()
            fake.calls.clear()
            for layer in range(2):
                g, x = _rand(64, 24, seed=layer), _rand(64, 40, seed=layer + 7)
                quant_matmul(g.t(), x, value, grad=True, gemm="wgrad")
            out.append([s for _, _, s in fake.calls])
    return out


def test_nvfp4_paper_uses_one_fixed_sign_vector_for_the_whole_run() -> None:
    """NVIDIA's recipe: a 16x16 RHT with one random sign vector, the same for every wgrad GEMM, layer and
    step; here drawn from the run's seed (reproducible for a seed, another seed gives another vector)."""
    steps = _wgrad_seeds("nvfp4_paper", 1234)
    seeds = {s for step in steps for s in step}
    assert len(seeds) == 1 and sum(map(len, steps)) == 3 * 2 * 2  # both operands, 2 layers, 3 steps
    assert _wgrad_seeds("nvfp4_paper", 1234) == steps
    assert {s for step in _wgrad_seeds("nvfp4_paper", 1235) for s in step} != seeds
    # the fixed vector draws nothing: stochastic rounding seeds are those of the same run without RHT
    assert get_recipe("nvfp4_paper").hadamard_signs == "fixed"
    assert quant_config("nvfp4", recipe="nvfp4_paper", gemm="wgrad").hadamard_signs == "fixed"


def test_mxfp4_tseng_draws_a_sign_vector_per_gemm_and_step() -> None:
    steps = _wgrad_seeds("mxfp4_tseng", 1234)
    per_gemm = [step[i] for step in steps for i in (0, 2)]  # each GEMM's two operands share its vector
    assert all(step[0] == step[1] and step[2] == step[3] for step in steps)
    assert len(set(per_gemm)) == len(per_gemm) == 6
    assert _wgrad_seeds("mxfp4_tseng", 1234) == steps


def test_fixed_signs_leave_the_stochastic_rounding_seeds_alone(recorder: Recorder, rht: FakeRHT) -> None:
    configure(recipe="nvfp4_paper")
    ops.reset_state(seed=7)
    ops.next_step()
    g, x = _rand(64, 24), _rand(64, 40, seed=1)
    quant_matmul(g.t(), x, "nvfp4", grad=True, gemm="wgrad")
    sr = [kw["seed"] for _, kw, _ in recorder.calls if "seed" in kw]
    ops.reset_state(seed=7)
    ops.next_step()
    assert sr == [ops.state.draw_seed()]  # the RHT took no draw
    assert rht.calls[0][2] == ops.state.fixed_seed() != sr[0]


def test_real_fixed_sign_transform_is_orthogonal_and_the_wgrad_product_is_unchanged() -> None:
    from megaquant.formats.hadamard import hadamard_matrix, random_hadamard

    ops.reset_state(seed=1234)
    seed = ops.state.fixed_seed()
    r = hadamard_matrix(16, seed).double()
    assert torch.allclose(r @ r.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    g, x = _rand(64, 24, dtype=torch.float64), _rand(64, 40, seed=1, dtype=torch.float64)
    product = random_hadamard(g.t(), -1, block=16, seed=seed) @ random_hadamard(x, -2, block=16, seed=seed)
    torch.testing.assert_close(product, g.t() @ x, rtol=1e-5, atol=1e-5)  # the transform runs in fp32


def test_rht_with_real_kernels_on_an_unaligned_reduction_stays_near_the_product() -> None:
    """The same padding through the real random Hadamard transform and MXFP4 quantizer (CPU reference)."""
    configure(recipe="mxfp4_tseng")
    g, x = _rand(16, 419), _rand(419, 32, seed=1)
    out = quant_matmul(g, x, "mxfp4", grad=True, gemm="wgrad")
    exact = g @ x
    assert out.shape == exact.shape
    assert ((out - exact).norm() / exact.norm()).item() < 0.3
