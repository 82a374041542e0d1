"""megaquant.ops.shared: wgrad's HiF8 dy.t() reuses dgrad's q(dy), and an MX wgrad's token-blocked dy
comes from dgrad's single read of dy (same bits, one pass over dy fewer), only where that is exact."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megaquant import ops
from megaquant.formats import fake_quant
from megaquant.ops import counters, shared


@pytest.fixture(autouse=True)
def _clean() -> None:
    shared.clear()
    counters.reset()


def _backward(dy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, value: str, **kw: object) -> tuple:
    """Megatron's linear backward: dgrad on dy [s, b, out], then wgrad on the 2-D view's transpose."""
    dgrad = ops.quant_matmul(dy, w, value, grad=True, gemm="dgrad", **kw)
    dy2 = dy.view(-1, dy.shape[-1])
    wgrad = ops.quant_matmul(dy2.t(), x.view(-1, x.shape[-1]), value, grad=True, gemm="wgrad", **kw)
    return dgrad, wgrad


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(6, 2, 48, generator=g).to(torch.bfloat16) * 3
    w = torch.randn(48, 32, generator=g).to(torch.bfloat16)
    x = torch.randn(6, 2, 32, generator=g).to(torch.bfloat16)
    return dy, w, x


@pytest.mark.parametrize("recipe", ["default", "hifp8_scaled"])
def test_wgrad_takes_dgrads_hifp8_gradient_with_the_same_bits(recipe: str) -> None:
    dy, w, x = _data()
    scaled = recipe == "hifp8_scaled"
    dgrad, wgrad = _backward(dy, w, x, "hifp8", recipe=recipe)
    q = lambda t: fake_quant(t, "hifp8", tensor_scale=scaled)  # noqa: E731
    dy2 = dy.view(-1, 48)
    assert torch.equal(dgrad, torch.matmul(q(dy), q(w)))
    assert torch.equal(wgrad, torch.matmul(q(dy2.t()), q(x.view(-1, 32))))
    operands = counters.snapshot()["operands"]
    assert operands["linear_wgrad"].get("shared") == 1  # dy.t() came from dgrad's copy
    assert operands["linear_dgrad"].get("shared") is None


@pytest.mark.parametrize(
    ("value", "recipe", "rows"),
    [("mxfp8", "default", 12), ("mxfp8", "fork", 40), ("mxfp4", "default", 70), ("mxfp8", "default", 64)],
)
def test_wgrad_takes_the_token_blocking_of_dgrads_mx_gradient(value: str, recipe: str, rows: int) -> None:
    # dgrad blocks dy along its features, wgrad along the tokens (a short last block when rows % 32): one
    # read of dy makes both; each GEMM equals its operands quantized on their own
    g = torch.Generator().manual_seed(rows)
    dy = (torch.randn(rows, 1, 96, generator=g) * 3).to(torch.bfloat16)
    w, x = torch.randn(96, 32, generator=g).bfloat16(), torch.randn(rows, 1, 32, generator=g).bfloat16()
    dgrad, wgrad = _backward(dy, w, x, value, recipe=recipe)
    cfg = ops.config.quant_config(value, recipe=recipe, grad=True, gemm="wgrad")
    kw = dict(block_size=cfg.block_size, scale=cfg.scale, rounding=cfg.rounding, preset=cfg.preset)
    q = lambda t, axis: fake_quant(t, cfg.fmt, axis=axis, **kw)  # noqa: E731
    dy2 = dy.view(-1, 96)
    assert torch.equal(dgrad, torch.matmul(q(dy, -1), q(w, -2)))
    assert torch.equal(wgrad, torch.matmul(q(dy2.t(), -1), q(x.view(-1, 32), -2)))
    operands = counters.snapshot()["operands"]
    assert operands["linear_wgrad"].get("shared") == 1 and "shared" not in operands["linear_dgrad"]


def test_autograd_linear_and_matmul_share_the_mx_gradient_with_the_same_bits() -> None:
    # megaquant's own backward (quant_linear; quant_matmul of an fprop GEMM x @ W.T) with quantize_grads:
    # wgrad takes dy.t() or dy; a matmul of unnamed kind (attention's) quantizes each use on its own
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g, requires_grad=True)
    w = torch.randn(96, 64, generator=g, requires_grad=True)
    dy = torch.randn(40, 96, generator=g)
    q = lambda t, axis: fake_quant(t, "mxfp8_e5m2", axis=axis)  # noqa: E731
    ops.quant_linear(x, w, "mxfp8", quantize_grads=True).backward(dy)
    assert torch.equal(w.grad, torch.matmul(q(dy.t(), -1), q(x.detach(), -2)))
    assert torch.equal(x.grad, torch.matmul(q(dy, -1), q(w.detach(), -2)))
    assert counters.snapshot()["operands"]["linear"].get("shared") == 1
    wt = w.detach().t().contiguous().requires_grad_()
    x.grad = None
    ops.quant_matmul(x, wt, "mxfp8", quantize_grads=True, gemm="fprop").backward(dy)
    assert torch.equal(wt.grad, torch.matmul(q(x.detach().t(), -1), q(dy, -2)))
    assert counters.snapshot()["operands"]["linear_fwd"].get("shared") == 1
    ops.quant_matmul(x, wt, "mxfp8", quantize_grads=True).backward(dy)
    assert "shared" not in counters.snapshot()["operands"]["matmul"]


@pytest.mark.parametrize(
    ("value", "recipe"), [("mxfp4", "mxfp4_tseng"), ("nvfp4", "default"), ("hifp8", "hifp8_delayed")]
)
def test_nothing_is_shared_where_the_two_quantizations_differ(value: str, recipe: str) -> None:
    # a Hadamard transform (and SR) per GEMM; NVFP4 (no single-read kernel: each use on its own); delayed
    # scaling keeps an amax history per GEMM
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(64, 1, 128, generator=g).bfloat16()  # reductions: multiples of the Hadamard block
    w, x = torch.randn(128, 64, generator=g).bfloat16(), torch.randn(64, 1, 64, generator=g).bfloat16()
    ops.reset_state(seed=1)
    ops.next_step()
    _backward(dy, w, x, value, recipe=recipe)
    assert "shared" not in counters.snapshot()["operands"]["linear_wgrad"]
    assert shared._SLOT[0] is None or shared._SLOT[0].key[0] != "rows"  # nothing offered either


def test_sr_gradients_leaves_hifp8_deterministic_so_it_shares() -> None:
    # the SR recipes round MX / NVFP4 gradients stochastically; HiF8 values keep round-to-nearest there
    dy, w, x = _data()
    ops.reset_state(seed=1)
    ops.next_step()
    _, wgrad = _backward(dy, w, x, "hifp8", recipe="sr_gradients")
    assert torch.equal(
        wgrad, torch.matmul(fake_quant(dy.view(-1, 48).t(), "hifp8"), fake_quant(x.view(-1, 32), "hifp8"))
    )
    assert counters.snapshot()["operands"]["linear_wgrad"].get("shared") == 1
    _backward(dy, w, x, "mxfp8", recipe="sr_gradients")  # stochastic: drawn anew per GEMM
    assert counters.snapshot()["operands"]["linear_wgrad"].get("shared") == 1


def test_take_matches_only_the_same_unchanged_elements_once() -> None:
    dy = torch.randn(4, 3, 8)
    q = dy * 2
    shared.offer(dy, ("k",), q, "triton")
    assert shared.take(dy, ("other",)) is None  # another key: the entry stays
    got = shared.take(dy.view(-1, 8).t(), ("k",))
    assert got is not None and got[1] == "triton"
    assert torch.equal(got[0], q.view(-1, 8).t()) and got[0].stride() == dy.view(-1, 8).t().stride()
    assert shared.take(dy.view(-1, 8).t(), ("k",)) is None  # one use
    shared.offer(dy, ("k",), q, "triton")
    dy.add_(1)  # an in-place write in between: stale
    assert shared.take(dy, ("k",)) is None
    shared.offer(dy, ("k",), q, "triton")
    assert shared.take(dy[:2], ("k",)) is None  # other elements
    assert shared.take(torch.randn(4, 3, 8), ("k",)) is None  # other storage
    assert shared.take(dy, ("k",)) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("value", "recipe"),
    [("hifp8", "default"), ("hifp8", "hifp8_scaled"), ("mxfp8", "default"), ("mxfp4", "fork")],
)
def test_shared_gradient_under_a_cuda_graph_equals_eager_unshared(value: str, recipe: str) -> None:
    """dgrad + wgrad captured in a CUDA graph (the copy made and taken under capture) and replayed on new
    data equal the same GEMMs with every operand quantized on its own, bit for bit; an entry made
    eagerly before the capture is not served to it."""
    pytest.importorskip("triton", reason="needs triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(512, 2, 256, generator=g, device="cuda").bfloat16()
    w = torch.randn(256, 128, generator=g, device="cuda").bfloat16()
    x = torch.randn(512, 2, 128, generator=g, device="cuda").bfloat16()
    cfg = ops.config.quant_config(value, recipe=recipe, grad=True, gemm="wgrad")
    kw = dict(block_size=cfg.block_size, scale=cfg.scale, rounding=cfg.rounding, preset=cfg.preset)
    if cfg.tensor_scaling == "current":
        kw["tensor_scale"] = True

    def expected() -> tuple[torch.Tensor, torch.Tensor]:
        q = lambda t, axis: fake_quant(t, cfg.fmt, axis=axis, **kw)  # noqa: E731
        dy2 = dy.view(-1, 256)
        return torch.matmul(q(dy, -1), q(w, -2)), torch.matmul(q(dy2.t(), -1), q(x.view(-1, 128), -2))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _backward(dy, w, x, value, recipe=recipe)  # warm-up (compiles), eagerly
        ops.quant_matmul(dy, w, value, grad=True, gemm="dgrad", recipe=recipe)  # an eager entry left over
    torch.cuda.current_stream().wait_stream(side)
    counters.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _backward(dy, w, x, value, recipe=recipe)
    assert counters.snapshot()["operands"]["linear_wgrad"].get("shared") == 1  # taken under capture
    for seed in (1, 2):
        g.manual_seed(seed)
        with torch.no_grad():
            dy.copy_(torch.randn(dy.shape, generator=g, device="cuda"))
            x.copy_(torch.randn(x.shape, generator=g, device="cuda"))
        graph.replay()
        want = expected()
        torch.cuda.synchronize()
        for got, ref in zip(static, want, strict=True):
            assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


def test_the_environment_switch_turns_sharing_off() -> None:
    # read once at import, in the training process: a child process with MEGAQUANT_SHARED_GRADS=off
    code = "from megaquant.ops import shared; print(shared.enabled())"
    for value, want in (("off", "False"), ("on", "True")):
        env = {**os.environ, shared.ENV: value}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == want


def test_a_wgrad_in_another_format_takes_nothing_from_dgrad() -> None:
    # per-GEMM values (a tree may set dgrad and wgrad apart): the copy is keyed by format and options
    dy, w, x = _data()
    dy2 = dy.view(-1, 48)
    for dgrad_value, wgrad_value in (("mxfp8", "mxfp4"), ("hifp8", "mxfp8"), ("mxfp8", "hifp8")):
        shared.clear()
        counters.reset()
        ops.quant_matmul(dy, w, dgrad_value, grad=True, gemm="dgrad")
        got = ops.quant_matmul(dy2.t(), x.view(-1, 32), wgrad_value, grad=True, gemm="wgrad")
        cfg = ops.config.quant_config(wgrad_value, grad=True, gemm="wgrad")
        want = torch.matmul(fake_quant(dy2.t(), cfg.fmt), fake_quant(x.view(-1, 32), cfg.fmt, axis=-2))
        assert torch.equal(got, want), (dgrad_value, wgrad_value)
        assert "shared" not in counters.snapshot()["operands"]["linear_wgrad"]
