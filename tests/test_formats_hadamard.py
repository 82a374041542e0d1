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
