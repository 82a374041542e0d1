"""Random Hadamard transform: orthogonal, exact inverse, GEMM identity, signs from the seed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from megaquant.errors import ValueNameError  # noqa: E402
from megaquant.formats import hadamard_matrix, inverse_random_hadamard, random_hadamard  # noqa: E402
from megaquant.formats.hadamard import rht_signs  # noqa: E402


@pytest.mark.parametrize("block", [2, 16, 32, 64, 128])
def test_matrix_is_orthogonal_hadamard(block: int) -> None:
    r = hadamard_matrix(block, seed=3).double()
    assert torch.allclose(r @ r.T, torch.eye(block, dtype=torch.float64), atol=1e-6)
    h = hadamard_matrix(block).double() * block**0.5
    assert torch.allclose(h.abs(), torch.ones_like(h), rtol=1e-6)  # +-1/sqrt(block) entries
    h = h.round()
    assert torch.equal(h @ h.T, block * torch.eye(block, dtype=torch.float64))  # exactly, in integers
    signs = rht_signs(block, 3).double()
    assert torch.allclose(r, signs[:, None] * hadamard_matrix(block).double())


def test_signs_come_from_the_seed() -> None:
    a, b, c = rht_signs(64, 1), rht_signs(64, 1), rht_signs(64, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == {-1.0, 1.0}
    assert 16 < int((a > 0).sum()) < 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_and_norm(dtype: torch.dtype) -> None:
    x = torch.randn(6, 4, 96, dtype=dtype)
    for axis, block in [(-1, 16), (-1, 32), (0, 2), (1, 4)]:
        y = random_hadamard(x, axis, block=block, seed=11)
        assert y.dtype == dtype and y.shape == x.shape
        back = inverse_random_hadamard(y, axis, block=block, seed=11)
        assert torch.allclose(back, x, atol=1e-5, rtol=1e-5)
        assert torch.allclose(y.norm(), x.norm(), rtol=1e-5)
        assert not torch.allclose(y, x)


def test_power_of_four_blocks_invert_exactly_on_a_grid() -> None:
    """block 16: entries +-1/4 exactly; on small integers every sum is exact, so the inverse is exact."""
    x = torch.randint(-8, 9, (32, 64)).float()
    y = random_hadamard(x, block=16, seed=5)
    assert torch.equal(inverse_random_hadamard(y, block=16, seed=5), x)


def test_gemm_identity() -> None:
    """(a R)(R^T b) = a b: transforming a along -1 and b along -2 with one seed leaves the product."""
    g = torch.Generator().manual_seed(0)  # fixed inputs: unseeded ones made this test flaky
    a = torch.randn(8, 64, dtype=torch.float64, generator=g)
    b = torch.randn(64, 5, dtype=torch.float64, generator=g)
    ra, rb = random_hadamard(a, -1, block=32, seed=9), random_hadamard(b, -2, block=32, seed=9)
    assert torch.allclose(ra @ rb, a @ b, atol=1e-10)
    assert not torch.allclose(ra @ random_hadamard(b, -2, block=32, seed=10), a @ b, atol=1e-3)


def test_spreads_an_outlier() -> None:
    x = torch.zeros(1, 16)
    x[0, 3] = 8.0
    y = random_hadamard(x, block=16, seed=0)
    assert torch.equal(y.abs(), torch.full_like(y, 2.0))


def test_errors() -> None:
    x = torch.randn(4, 40)
    with pytest.raises(ValueNameError, match="multiple of block"):
        random_hadamard(x, block=16)
    with pytest.raises(ValueNameError, match="power of two"):
        random_hadamard(x, block=20)
    with pytest.raises(ValueNameError, match="out of range"):
        random_hadamard(x, axis=2, block=8)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the one-pass Triton transform)")


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize(
    ("shape", "axis", "transposed"),
    [((512, 384), -1, False), ((512, 384), -2, False), ((384, 512), -1, True), ((2, 256, 64), -1, False)],
)
def test_cuda_transform_equals_the_torch_form(
    dtype: torch.dtype, block: int, shape: tuple[int, ...], axis: int, transposed: bool
) -> None:
    """random_hadamard on CUDA (formats._triton_rht: the native bf16 / fp16 dot for blocks 16 and 64, IEEE
    fp32 otherwise) against the torch form on the CPU: the same bits where R's entries are powers of two
    and the block sums exact in fp32 (data within 8 binades), a rounding apart otherwise; contiguous."""
    g = torch.Generator().manual_seed(block)
    full = shape[::-1] if transposed else shape
    # magnitudes within 2^-4..2^4: every block sum of bf16 / fp16 products fits fp32's 24 bits (8 + 8 + 6)
    base = torch.exp2(torch.rand(full, generator=g) * 8 - 4) * torch.randn(full, generator=g).sign()
    x = (base.t() if transposed else base).to(dtype)
    got = random_hadamard(x.cuda(), axis, block=block, seed=11)
    want = random_hadamard(x, axis, block=block, seed=11)
    assert got.is_contiguous() and got.dtype == dtype and got.shape == x.shape
    if block != 32 and dtype != torch.float32:
        assert torch.equal(got.cpu(), want)
    else:
        torch.testing.assert_close(got.cpu(), want, rtol=2 * torch.finfo(dtype).eps, atol=1e-5)


@CUDA
def test_cuda_transform_inside_a_graph_and_its_inverse() -> None:
    """The kernel path replays in a CUDA graph with the step word's current signs, and inverts."""
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    word = torch.zeros(1, dtype=torch.int64, device="cuda")
    eager = random_hadamard(x, -2, block=64, seed=5, device_seed=word)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = random_hadamard(x, -2, block=64, seed=5, device_seed=word)
    graph.replay()
    assert torch.equal(out, eager)
    word.fill_(9)
    graph.replay()
    assert torch.equal(out, random_hadamard(x, -2, block=64, seed=5, device_seed=word))
    assert not torch.equal(out, eager)
    back = inverse_random_hadamard(out.float(), -2, block=64, seed=5, device_seed=word)
    torch.testing.assert_close(back, x.float(), rtol=1e-2, atol=1e-2)
