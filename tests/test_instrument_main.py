"""`megaquant instrument` on a tree shaped like Megatron-LM main (hand-written fixture `stock_main`): the
forward GEMM in a module-level helper, `return <call>`, the newer wgrad paths, every model's LM head."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megaquant.instrument import InstrumentError, load_rules, plan_instrument
from megaquant.instrument.gemms import gemm_kind
from megaquant.sites import scan_sources
from megaquant.spec import load_spec
from tests.conftest import fixture_root, fixture_sources

LAYERS = "megatron/core/tensor_parallel/layers.py"
LANGUAGE = "megatron/core/models/common/language_module/language_module.py"
LINEAR = "LinearWithGradAccumulationAndAsyncCommunication"


@pytest.fixture(scope="module")
def main_tree() -> dict[str, bytes]:
    return fixture_sources("stock_main")


def _layers(sources: dict[str, bytes], old: bytes, new: bytes) -> dict[str, bytes]:
    assert old in sources[LAYERS]
    return {**sources, LAYERS: sources[LAYERS].replace(old, new)}


def test_forward_gemm_in_a_helper_is_hooked_on_the_trainable_path_only(main_tree: dict[str, bytes]) -> None:
    plan = plan_instrument(main_tree, load_rules())
    layers = plan.new_sources[LAYERS].decode()
    # the helper's GEMM takes the value through a keyword parameter that defaults to the stock GEMM
    assert "    _mq_quant_type: str = 'none',\n) -> torch.Tensor:" in layers
    assert "output = _mq_ops.quant_matmul(input, weight.t(), _mq_quant_type, gemm='fprop')" in layers
    # only the trainable forward passes it, behind its own site and the LM-head guard
    assert (
        "        custom_quant_type = 'none'\n"
        "        if ctx.megaquant_lm_head:  # megaquant: the LM head stays unquantized\n"
        "            return _linear_forward(total_input, weight, bias, output_dtype)\n"
        "        else:\n"
        "            return _linear_forward(total_input, weight, bias, output_dtype, "
        "_mq_quant_type=custom_quant_type)\n"
    ) in layers
    frozen = layers[layers.index("class LinearWithFrozenWeight") : layers.index("def _wgrad_gemm")]
    assert "return _linear_forward(input, weight, bias, output_dtype)\n" in frozen
    assert "custom_quant_type" not in frozen and "_mq_" not in frozen
    wgrad = "_mq_wgrad_matmul(grad_output.t(), total_input, custom_quant_type, grad=True, gemm='wgrad')"
    assert f"grad_weight = {wgrad}" in layers
    edits = {(e.kind, e.scope, e.role) for e in plan.edits}
    assert ("helper", "_linear_forward", "linear_fwd") in edits
    assert ("hook", f"{LINEAR}.forward", "linear_fwd") in edits
    compile(layers, LAYERS, "exec")
    again = plan_instrument({**main_tree, **plan.new_sources}, load_rules())
    assert again.new_sources == {} and not any(e.applied for e in again.edits)


def test_new_wgrad_paths_are_named_not_hooked(main_tree: dict[str, bytes]) -> None:
    plan = plan_instrument(main_tree, load_rules())
    unhooked = [e.detail for e in plan.edits if e.kind == "unhooked"]
    assert any(d.startswith("_wgrad_gemm(weight.main_grad,") and "Megatron-FSDP" in d for d in unhooked)
    assert any(d.startswith("torch.matmul(grad_output.t(), total_input, out=grad_weight)") for d in unhooked)
    assert any("wgrad_gemm_accum_fp32" in d and "--no-gradient-accumulation-fusion" in d for d in unhooked)
    assert any(d.startswith("te_general_gemm(") for d in unhooked)
    layers = plan.new_sources[LAYERS].decode()
    assert "out.copy_(grad_output.t().matmul(total_input))" in layers  # the helper is not followed
    assert "torch.matmul(grad_output.t(), total_input, out=grad_weight)" in layers


def test_status_sees_five_roles_on_instrumented_main(main_tree: dict[str, bytes]) -> None:
    hooked = {**main_tree, **plan_instrument(main_tree, load_rules()).new_sources}
    scan = scan_sources(hooked, load_spec("megatron-core"))
    assert [(s.scope, s.roles, [g.call for g in s.governs]) for s in scan.sites] == [
        (f"{LINEAR}.forward", ("linear_fwd",), ["_linear_forward"]),
        (f"{LINEAR}.backward", ("linear_dgrad",), ["_mq_ops.quant_matmul"]),
        (f"{LINEAR}.backward", ("linear_wgrad",), ["_mq_wgrad_matmul"]),
        ("DotProductAttention.forward", ("qk",), ["_mq_ops.quant_baddbmm"]),
        ("DotProductAttention.forward", ("pv",), ["_mq_ops.quant_bmm"]),
    ]
    assert scan.warnings == ()


def test_gemm_kinds_whatever_the_spelling() -> None:
    assert gemm_kind("torch.matmul") == gemm_kind("grad_output.t().matmul") == "matmul"
    assert gemm_kind("SomethingMatMul.apply") == "matmul" and gemm_kind("x.MatMul") == "matmul"
    assert gemm_kind("torch.mm") == gemm_kind("a.MM") == "mm"
    assert gemm_kind("torch.bmm") == "bmm" and gemm_kind("torch.baddbmm") == "baddbmm"
    assert gemm_kind("F.linear") == gemm_kind("LinearWithFrozenWeight.apply") == "linear"
    assert gemm_kind("te_general_gemm") == "gemm"
    assert gemm_kind("torch.cat") is gemm_kind("self.comm") is gemm_kind("x.summary") is None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            b"grad_weight = grad_output.t().matmul(total_input)",
            b"grad_weight = torch.mm(grad_output.t(), total_input)",
        ),
        (
            b"grad_input = grad_output.matmul(weight)",
            b"grad_input = torch.matmul(\n            grad_output,  # dY\n            weight,\n        )",
        ),
        (
            b"return _linear_forward(total_input, weight, bias, output_dtype)",
            b"return torch.matmul(total_input, weight.t())",
        ),
    ],
    ids=["mm-for-matmul", "function-form-multiline", "return-inline"],
)
def test_spelling_variants_are_hooked(main_tree: dict[str, bytes], old: bytes, new: bytes) -> None:
    plan = plan_instrument(_layers(main_tree, old, new), load_rules())
    layers = plan.new_sources[LAYERS].decode()
    compile(layers, LAYERS, "exec")
    assert layers.count("custom_quant_type = 'none'") == 3
    assert {e.role for e in plan.edits if e.kind == "hook"} >= {"linear_fwd", "linear_dgrad", "linear_wgrad"}
    if b"return torch.matmul" in new:
        assert (
            "return _mq_ops.quant_matmul(total_input, weight.t(), custom_quant_type, gemm='fprop')" in layers
        )


def test_missing_gemm_error_lists_the_calls_found_helpers_included(main_tree: dict[str, bytes]) -> None:
    broken = _layers(main_tree, b"torch.matmul(input, weight.t())", b"torch.matmul(input, weight.mT)")
    with pytest.raises(InstrumentError) as info:
        plan_instrument(broken, load_rules())
    message = str(info.value)
    assert f"in {LINEAR}.forward: expected the linear_fwd GEMM `matmul(total_input, weight.t())`" in message
    assert "not found; GEMM-like calls found there:" in message
    assert "_linear_forward(total_input, weight, bias, output_dtype) -> helper _linear_forward" in message
    assert "torch.matmul(input, weight.mT)" in message and "te_general_gemm(" in message


def test_a_gemm_no_rule_names_is_refused(main_tree: dict[str, bytes]) -> None:
    extra = _layers(
        main_tree,
        b"        grad_bias = grad_output.sum(dim=0)",
        b"        probe = SomethingMatMul.apply(total_input, weight)\n"
        b"        grad_bias = grad_output.sum(dim=0)",
    )
    with pytest.raises(InstrumentError, match=r"no rule hooks or names: line \d+: SomethingMatMul.apply"):
        plan_instrument(extra, load_rules())


def test_a_model_whose_output_layer_is_not_set_up_is_refused(main_tree: dict[str, bytes]) -> None:
    odd = "megatron/core/models/retro/retro_model.py"
    source = b"class RetroModel:\n    def __init__(self):\n        self.output_layer = make_head()\n"
    with pytest.raises(InstrumentError, match=r"retro_model.py:3: RetroModel assigns self.output_layer"):
        plan_instrument({**main_tree, odd: source}, load_rules())
    plan = plan_instrument({**main_tree, odd: source}, load_rules(), include_lm_head=True)
    assert "megaquant_lm_head" not in plan.new_sources[LAYERS].decode() and LANGUAGE not in plan.new_sources


PROBE = textwrap.dedent(
    """
    import sys
    import torch
    from megaquant import ops
    from megatron.core.tensor_parallel import layers
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.models.mamba.mamba_model import MambaModel
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.models.T5.t5_model import T5Model
    value = sys.argv[1]
    Linear = layers.LinearWithGradAccumulationAndAsyncCommunication
    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
    gy = torch.randn(6, 2, 48, generator=torch.Generator().manual_seed(3))
    y = layers.LinearWithGradAccumulationAndAsyncCommunication.apply(x, w, None, False, 1, None)
    y.backward(gy)
    assert torch.equal(y, ops.quant_matmul(x, w.t(), value)), "fwd"
    assert torch.equal(x.grad, ops.quant_matmul(gy, w, value, grad=True)), "dgrad"
    wgrad = ops.quant_matmul(gy.reshape(-1, 48).t(), x.detach().reshape(-1, 32), value, grad=True)
    assert torch.equal(w.grad, wgrad), "wgrad"
    frozen = layers.LinearWithFrozenWeight.apply(x, w, None, None)
    assert torch.equal(frozen, torch.matmul(x, w.t())), "frozen weights run the stock GEMM"
    marked = []
    for cls in (GPTModel, HybridModel, MambaModel, BertModel, T5Model):
        for pre, post, share in ((True, True, True), (True, True, False), (False, True, True)):
            model = cls(pre_process=pre, post_process=post, share=share)
            head = model.output_layer.weight
            head = head if head is not None else model.embedding.weight
            marked.append(getattr(head, "megaquant_lm_head", False))
            if marked[-1]:
                xh = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
                h = Linear.apply(xh, head, None, False, 1, None)
                assert torch.equal(h, torch.matmul(xh, head.t())), "the LM head runs the stock GEMM"
    print("MARKED", marked)
    """
)


@pytest.mark.parametrize("value", ["mxfp8"])
def test_instrumented_main_fixture_runs_hooks_frozen_stock_and_every_lm_head_stock(
    tmp_path: Path, value: str
) -> None:
    pytest.importorskip("torch")
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(fixture_root("stock_main"), tree)
    sources = fixture_sources("stock_main")
    for rel, data in plan_instrument(sources, load_rules()).new_sources.items():
        (tree / rel).write_bytes(
            data.replace(b"custom_quant_type = 'none'", f"custom_quant_type = '{value}'".encode())
        )
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(Path(__file__).resolve().parents[1])]))
    done = subprocess.run(
        [sys.executable, str(script), value],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MARKED [" + ", ".join(["True"] * 15) + "]" in done.stdout


def test_cli_on_a_git_checkout_shaped_like_main(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from megaquant.instrument import register
    from tests.conftest import make_git_repo

    repo = make_git_repo(tmp_path, "stock_main")
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so `instrument` is addressed by name as in the real CLI
    first = CliRunner().invoke(app, ["instrument", "--repo", str(repo)])
    assert first.exit_code == 0, first.output
    assert f"added    {LAYERS}:28 _linear_forward helper linear_fwd" in first.output
    assert f"unhooked {LAYERS}:" in first.output and "GTP zero-copy wgrad" in first.output
    assert "LM head excluded (stays unquantized) in: T5LMHead, T5Model, BertModel, GPTModel, HybridModel" in (
        first.output
    )
    again = CliRunner().invoke(app, ["instrument", "--repo", str(repo)])
    assert again.exit_code == 0 and "already instrumented" in again.output
