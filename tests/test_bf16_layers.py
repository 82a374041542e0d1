"""A recipe's BF16 layers: every hooked GEMM of the chosen layers runs plain, forward and backward.

The toy model below is shaped like an instrumented Megatron stack: a block calls numbered layers with
`hidden_states=` by keyword; each layer's linear is an autograd Function whose forward calls the fprop
hook and whose own backward calls the dgrad and wgrad hooks (as LinearWithGradAccumulationAndAsync-
Communication does), outside any forward hook; attention calls quant_baddbmm / quant_bmm. The end-to-end
test at the bottom does the same on megatron-core's real GPTModel, instrumented.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from megaquant import ops
from megaquant.errors import LaunchError
from megaquant.megatron_src import installed_megatron
from megaquant.ops import counters
from megaquant.ops.layers import install_bf16_layers, install_recipe_bf16_layers, numbered_layers
from megaquant.ops.state import PLAIN_SCOPE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    ops.configure()
    ops.reset_state()
    counters.reset()
    yield
    ops.configure()
    ops.reset_state()
    counters.reset()


class _HookedLinear(torch.autograd.Function):
    """Megatron's linear function as `megaquant instrument` leaves it: three hooked GEMMs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, value: str) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.value = value
        return ops.quant_matmul(x, w.t(), value, gemm="fprop")

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, w = ctx.saved_tensors
        dx = ops.quant_matmul(g, w, ctx.value, grad=True, gemm="dgrad")
        dw = ops.quant_matmul(g.t(), x, ctx.value, grad=True, gemm="wgrad")
        return dx, dw, None


class Attention(torch.nn.Module):
    def __init__(self, number: int) -> None:
        super().__init__()
        self.layer_number = number  # as Megatron's SelfAttention: the same number, inside the layer

    def forward(self, x: torch.Tensor, value: str) -> torch.Tensor:
        q = x.unsqueeze(0)
        s = ops.quant_baddbmm(torch.empty(1, x.shape[0], x.shape[0]), q, q.mT, value, beta=0.0)
        return ops.quant_bmm(torch.softmax(s, -1), q, value).squeeze(0)


class Layer(torch.nn.Module):
    def __init__(self, number: int, width: int, value: str) -> None:
        super().__init__()
        self.layer_number = number
        self.value = value
        self.attention = Attention(number)
        self.weight = torch.nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = hidden_states + self.attention(hidden_states, self.value)
        return h + _HookedLinear.apply(h, self.weight, self.value), None


class Block(torch.nn.Module):
    def __init__(
        self, numbers: list[int], width: int = 32, value: str = "mxfp8", recompute: str = ""
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(Layer(n, width, value) for n in numbers)
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.recompute:
                x, _ = checkpoint(
                    lambda h, layer=layer: layer(hidden_states=h),
                    x,
                    use_reentrant=self.recompute == "reentrant",
                )
            else:
                x, _ = layer(hidden_states=x)
        return x


def _gemms() -> dict[str, dict[str, int]]:
    return counters.snapshot()["gemms"]


def _step(model: torch.nn.Module, width: int = 32) -> None:
    x = torch.randn(16, width, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    model(x).square().sum().backward()


def test_numbered_layers_are_the_outermost_modules_with_a_layer_number() -> None:
    block = Block([1, 2, 3])
    assert numbered_layers(block) == list(block.layers)  # not the Attention modules inside them


@pytest.mark.parametrize("recompute", ["", "reentrant", "non-reentrant"])
def test_bf16_layers_run_all_their_gemms_plain_forward_and_backward(recompute: str) -> None:
    block = Block([1, 2, 3, 4], recompute=recompute)
    assert install_bf16_layers(block, [1, 4, 9]) == (1, 4)  # 9: not in this model (another stage's)
    _step(block)
    gemms = _gemms()
    fwd = 2 if recompute else 1  # activation recomputation runs each forward twice
    for role in ("linear_fwd",):
        assert gemms[role] == {"plain": 2 * fwd, "reference": 2 * fwd}, gemms
    for role in ("linear_dgrad", "linear_wgrad"):  # called from the linear's own backward
        assert gemms[role] == {"plain": 2, "reference": 2}, gemms
    for role in ("baddbmm", "bmm"):  # attention GEMMs of the BF16 layers too
        assert gemms[role]["plain"] == 2 * fwd and gemms[role]["reference"] == 2 * fwd, gemms
    assert PLAIN_SCOPE[0] == 0  # nothing left set after the step


def test_a_bf16_layer_output_is_not_a_view() -> None:
    """A pipeline stage's output must be viewless (Megatron frees its .data after sending it)."""
    block = Block([1])
    install_bf16_layers(block, [1])
    out, _ = block.layers[0](hidden_states=torch.randn(16, 32, requires_grad=True))
    assert out._base is None and out.grad_fn is not None


def test_bf16_layers_equal_a_run_whose_layers_are_unquantized() -> None:
    """Layer 1 in BF16 inside an mxfp4 stack gives the gradients of a stack whose layer 1 is `none`."""
    mixed = Block([1, 2], value="mxfp4")
    install_bf16_layers(mixed, [1])
    reference = Block([1, 2], value="mxfp4")
    reference.layers[0].value = "none"
    plain = Block([1, 2], value="mxfp4")  # nothing kept in BF16: differs
    grads = []
    for model in (mixed, reference, plain):
        _step(model)
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))
    assert not torch.equal(grads[0][0], grads[2][0])


def test_attention_can_stay_quantized_in_a_bf16_layer() -> None:
    block = Block([1, 2])
    install_bf16_layers(block, [2], attention=False)
    _step(block)
    gemms = _gemms()
    assert gemms["linear_fwd"] == {"plain": 1, "reference": 1}
    assert "plain" not in gemms["baddbmm"] and "plain" not in gemms["bmm"]


def test_the_recipe_says_which_layers() -> None:
    ops.configure(recipe="nvfp4_paper")
    block = Block(list(range(1, 17)))
    assert install_recipe_bf16_layers(block, 16) == ((1, 15, 16), (1, 15, 16))
    stage = Block([9, 10, 11, 12, 13, 14, 15, 16])  # a later pipeline stage: global layer numbers
    assert install_recipe_bf16_layers(stage, 16) == ((1, 15, 16), (15, 16))
    ops.configure(recipe="sr_gradients")
    assert install_recipe_bf16_layers(Block([1, 2]), 2) == ((), ())


def test_the_scope_does_not_leak_when_a_layer_input_needs_no_gradient() -> None:
    block = Block([1, 2])
    install_bf16_layers(block, [1])
    block(torch.randn(16, 32)).square().sum().backward()  # layer 1's input: no gradient, no _Leave node
    counters.reset()
    _step(block)  # the next micro-batch's forward starts clean (the model's pre-hook)
    assert _gemms()["linear_fwd"] == {"plain": 1, "reference": 1}


def test_per_layer_cuda_graphs_are_refused() -> None:
    block = Block([1, 2])
    block.layers[0].cudagraph_manager = object()
    with pytest.raises(LaunchError, match="per-layer CUDA graphs"):
        install_bf16_layers(block, [1])


# ---------------------------------------------------------------- megatron-core's GPTModel, instrumented

PROBE = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    torch.distributed.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megaquant import ops
    from megaquant.launch.minitrain import _cpu_adjustments
    from megaquant.launch.pretrain import keep_bf16_layers
    from megaquant.ops import counters
    parallel_state.initialize_model_parallel()
    _cpu_adjustments()
    from megatron.core.tensor_parallel import random as tpr  # activation recomputation on the CPU
    tpr._get_all_rng_states = lambda: (torch.get_rng_state(), None, None)
    tpr._set_all_rng_states = lambda cpu, cuda, tracker: torch.set_rng_state(cpu)
    ops.configure(recipe="nvfp4_paper")
    config = TransformerConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, persist_layer_norm=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, params_dtype=torch.float32, recompute_granularity="full",
        recompute_method="uniform", recompute_num_layers=1)
    torch.manual_seed(0)
    gpt = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=96, max_sequence_length=32, position_embedding_type="rope")
    print("hooked", keep_bf16_layers(gpt, 4))
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32)[None].expand(2, -1)
    causal = torch.triu(torch.ones(32, 32, dtype=torch.bool), 1)[None, None]
    gpt(ids, pos, causal, labels=ids).mean().backward()
    print("gemms", counters.snapshot()["gemms"])
    """
)


@pytest.mark.skipif(installed_megatron() is None, reason="megatron-core is not installed")
def test_instrumented_gpt_model_keeps_the_recipe_layers_in_bf16(tmp_path: Path) -> None:
    """nvfp4_paper on a 4-layer GPTModel with full activation recomputation: layer 4 runs plain, its
    four linear layers in all three GEMMs and its attention; layers 1-3 are quantized."""
    from megaquant.instrument import load_rules, plan_instrument

    root = installed_megatron()
    assert root is not None
    tree = tmp_path / "tree"
    shutil.copytree(root / "megatron", tree / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    stock = {f: (root / f).read_bytes() for f in load_rules().files()}
    for rel, data in plan_instrument(stock, load_rules()).new_sources.items():
        (tree / rel).write_bytes(data.replace(b"custom_quant_type = 'none'", b"custom_quant_type = 'nvfp4'"))
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, PYTHONWARNINGS="ignore", MEGAQUANT_ATTENTION="unfused")
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(ROOT)])
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "pg")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "megaquant: BF16 layers (recipe nvfp4_paper): 4 of 4; rank 0 holds 4 of them" in done.stderr
    lines = dict(
        line.split(" ", 1)
        for line in done.stdout.splitlines()
        if line.split(" ", 1)[0] in ("hooked", "gemms")
    )
    assert lines["hooked"] == "(4,)"
    gemms = eval(lines["gemms"])  # a dict literal printed by the probe
    # 4 linear GEMMs per layer; forward runs twice (recomputation): layer 4 plain, layers 1-3 quantized
    assert gemms["linear_fwd"]["plain"] == 2 * 4 and sum(gemms["linear_fwd"].values()) == 2 * 16, gemms
    for role in ("linear_dgrad", "linear_wgrad"):
        assert gemms[role]["plain"] == 4 and sum(gemms[role].values()) == 16, gemms
    for role in ("baddbmm", "bmm"):
        assert gemms[role]["plain"] == 2 and sum(gemms[role].values()) == 8, gemms
