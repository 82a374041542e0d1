"""megaquant.ops.shared: wgrad's HiF8 dy.t() reuses dgrad's q(dy) (same bits, one quantization fewer),
only where that is exact."""

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


@pytest.mark.parametrize(("value", "recipe"), [("mxfp8", "default"), ("hifp8", "hifp8_delayed")])
def test_nothing_is_shared_where_the_two_quantizations_differ(value: str, recipe: str) -> None:
    # MX blocks dy along different axes in dgrad and wgrad; delayed scaling keeps an amax history per GEMM
    dy, w, x = _data()
    _backward(dy, w, x, value, recipe=recipe)
    assert "shared" not in counters.snapshot()["operands"]["linear_wgrad"]


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
@pytest.mark.parametrize("recipe", ["default", "hifp8_scaled"])
def test_shared_gradient_under_a_cuda_graph_equals_eager_unshared(recipe: str) -> None:
    """dgrad + wgrad captured in a CUDA graph (the copy made and taken under capture) and replayed on new
    data equal the same GEMMs with every operand quantized on its own, bit for bit; an entry made
    eagerly before the capture is not served to it."""
    pytest.importorskip("triton", reason="needs triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(512, 2, 256, generator=g, device="cuda").bfloat16()
    w = torch.randn(256, 128, generator=g, device="cuda").bfloat16()
    x = torch.randn(512, 2, 128, generator=g, device="cuda").bfloat16()
    scaled = recipe == "hifp8_scaled"

    def expected() -> tuple[torch.Tensor, torch.Tensor]:
        q = lambda t: fake_quant(t, "hifp8", tensor_scale=scaled)  # noqa: E731
        dy2 = dy.view(-1, 256)
        return torch.matmul(q(dy), q(w)), torch.matmul(q(dy2.t()), q(x.view(-1, 128)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _backward(dy, w, x, "hifp8", recipe=recipe)  # warm-up (compiles), eagerly
        ops.quant_matmul(dy, w, "hifp8", grad=True, gemm="dgrad", recipe=recipe)  # an eager entry left over
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _backward(dy, w, x, "hifp8", recipe=recipe)
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
