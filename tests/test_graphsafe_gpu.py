"""The graph-safe recipe state on a GPU: a quantized GEMM's forward and backward under each recipe feature
(stochastic rounding, per-GEMM random Hadamard signs, delayed scaling), captured once in a CUDA graph and
replayed with `next_step()` between replays, equals the same steps run eagerly bit for bit, and its results
move on from step to step; the kernels with a device word equal the torch reference on CUDA.
(skipped without CUDA/triton; `pytest -m gpu tests/test_graphsafe_gpu.py`)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from megaquant import ops
from megaquant.formats import fake_quant
from megaquant.ops import quant_matmul

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("triton", reason="needs triton")

RECIPES = {
    "sr_gradients": "mxfp8",  # stochastic rounding of the gradient operands
    "nvfp4_paper": "nvfp4",  # stochastic rounding, one fixed sign vector, 16x16 weight tiles
    "mxfp4_tseng": "mxfp4",  # stochastic rounding of both backward operands, per-GEMM random signs
    "hifp8_delayed": "hifp8",  # delayed scaling (amax histories)
}
STEPS = 4
"""Step 1 eager (the warm-up that makes the step word and the histories), steps 2-4 graph replays."""


def _inputs(recipe: str, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step `step`'s (a, b, grad_out), bf16, 256x512 @ 512x256: the same every step, except under delayed
    scaling, whose inputs shrink by 2^-3 a step (the history's max then scales them, not their own)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b, go = (torch.randn(*s, generator=g, device="cuda") for s in ((256, 512), (512, 256), (256, 256)))
    scale = 2.0 ** (-3 * step) if recipe == "hifp8_delayed" else 1.0
    return (a * scale).bfloat16(), b.bfloat16(), (go * scale).bfloat16()


class _Step:
    """The step's static buffers and its function (what a full-iteration graph captures)."""

    def __init__(self, recipe: str) -> None:
        self.recipe = recipe
        a, b, go = _inputs(recipe, 1)
        self.a, self.b, self.go = a.clone().requires_grad_(), b.clone().requires_grad_(), go.clone()

    def load(self, step: int) -> None:
        a, b, go = _inputs(self.recipe, step)
        with torch.no_grad():
            self.a.copy_(a)
            self.b.copy_(b)
            self.go.copy_(go)

    def __call__(self) -> list[torch.Tensor]:
        out = quant_matmul(
            self.a, self.b, RECIPES[self.recipe], recipe=self.recipe, quantize_grads=True, gemm="fprop"
        )
        da, db = torch.autograd.grad(out, (self.a, self.b), self.go)
        return [out.detach(), da, db]


def _side_stream(fn: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """Run eagerly on a side stream (torch.cuda.graph's warm-up advice for autograd), then join."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = [t.clone() for t in fn()]
    torch.cuda.current_stream().wait_stream(side)
    return out


def _eager(recipe: str) -> list[list[torch.Tensor]]:
    ops.reset_state(seed=7)
    step, results = _Step(recipe), []
    for k in range(1, STEPS + 1):
        ops.next_step()
        step.load(k)
        results.append([t.clone() for t in step()])
    torch.cuda.synchronize()
    return results


def _graphed(recipe: str) -> list[list[torch.Tensor]]:
    ops.reset_state(seed=7)
    step, results = _Step(recipe), []
    ops.next_step()
    step.load(1)
    results.append(_side_stream(step))  # the eager warm-up step
    graph = torch.cuda.CUDAGraph()
    static: list[torch.Tensor] = []
    for k in range(2, STEPS + 1):
        ops.next_step()  # eager, outside the graph: overwrites the step word
        step.load(k)
        if k == 2:
            with torch.cuda.graph(graph):
                static = step()
        graph.replay()
        results.append([t.clone() for t in static])
    torch.cuda.synchronize()
    return results


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_graph_replay_equals_eager_steps_bit_for_bit(recipe: str) -> None:
    eager, graphed = _eager(recipe), _graphed(recipe)
    for k, (want, got) in enumerate(zip(eager, graphed, strict=True), start=1):
        for name, w, g in zip(("out", "grad_a", "grad_b"), want, got, strict=True):
            assert torch.equal(_bits(g), _bits(w)), f"{recipe} step {k} {name}: the replay differs from eager"
    # the random bits (same inputs every step) or the history move on: step 3 is not step 2
    assert any(not torch.equal(p, q) for p, q in zip(graphed[1][1:], graphed[2][1:], strict=True))
    if recipe == "sr_gradients":  # a replay that froze step 2's seeds would repeat its gradients
        assert not torch.equal(graphed[2][1], graphed[3][1])


def test_delayed_scaling_under_the_graph_scales_from_the_history() -> None:
    """Step 3 of shrinking inputs is scaled from step 1's larger amax in the replay too: it differs from
    current scaling of the same inputs."""
    graphed = _graphed("hifp8_delayed")
    a, b, _ = _inputs("hifp8_delayed", 3)
    current = quant_matmul(a, b, "hifp8", recipe="hifp8_scaled", gemm="fprop")
    assert not torch.equal(graphed[2][0], current)


@pytest.mark.parametrize(
    ("fmt", "axis", "block_2d"),
    [("nvfp4", -1, False), ("nvfp4", -2, False), ("mxfp4_e2m1", -1, False), ("mxfp8_e5m2", -2, False),
     ("nvfp4", -1, True), ("hifp8", -1, False)],
)  # fmt: skip
def test_kernels_with_a_device_word_equal_the_reference_on_cuda(fmt: str, axis: int, block_2d: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(256, 512, generator=g, device="cuda") * 3).bfloat16()
    for value in (0, 12345, 2**31 - 1):
        word = torch.tensor(value, dtype=torch.int64, device="cuda")
        kw = dict(axis=axis, rounding="stochastic", seed=99, device_seed=word, block_2d=block_2d)
        got = fake_quant(x, fmt, backend="triton", **kw)  # type: ignore[arg-type]
        want = fake_quant(x, fmt, backend="reference", **kw)  # type: ignore[arg-type]
        assert torch.equal(_bits(got), _bits(want)), (fmt, axis, block_2d, value)


def test_sign_matrix_kernel_equals_the_torch_form_on_cuda() -> None:
    from megaquant.formats.hadamard import hadamard_matrix, rht_signs

    for block in (16, 64, 128):
        for word in (None, torch.tensor(77, device="cuda")):
            got = hadamard_matrix(block, 5, device="cuda", device_seed=word)  # the kernel on CUDA
            h = hadamard_matrix(block, None, device="cuda")
            want = rht_signs(block, 5, "cuda", word).unsqueeze(1) * h
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (block, word)
