"""Stochastic rounding: unbiased (a bound derived from the variance), neighbours only, fixed points,
reproducible per seed, different seeds differ; the counter-based hash against a pure-Python copy."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from megaquant.errors import ValueNameError  # noqa: E402
from megaquant.formats import fake_quant  # noqa: E402
from megaquant.formats._random import _hash32_int, hash32, seed_key, uniform24  # noqa: E402

SR_FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp4_e2m1", "nvfp4", "hifp8"]
BLOCK = {"nvfp4": 16}
SEEDS = 48


def _blocks_with_exact_max(rows: int, cols: int, block: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, w): every block's first lane is +-2^k (k random per block) and the others lie strictly inside
    (-2^k, 2^k), so no element saturates or is clipped (the scale's top grid point is the block max);
    w = 2^-k per element puts every block on one footing in the statistics."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-10, 10, (rows, cols // block, 1), generator=g).float()
    lanes = (torch.rand(rows, cols // block, block, generator=g) * 2 - 1) * 0.999
    lanes[..., 0] = torch.where(torch.rand(rows, cols // block, generator=g) < 0.5, 1.0, -1.0)
    x = (lanes * torch.exp2(k)).reshape(rows, cols)
    w = torch.exp2(-k).expand(rows, cols // block, block).reshape(rows, cols)
    return x, w


def _samples(x: torch.Tensor, fmt: str, seeds: range) -> torch.Tensor:
    return torch.stack([fake_quant(x, fmt, rounding="stochastic", seed=s).double() for s in seeds])


def _bias_z(q: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """z = sum w (q - x) / sqrt(sum w^2 (q - x)^2). Each term has mean 0 under unbiased rounding and
    E[(q - x)^2] = Var(q) exactly (q is x's low or high neighbour), so the denominator estimates the
    standard deviation of the numerator: z is approximately N(0, 1) and |z| > 5 has probability < 1e-6."""
    err = (q - x.double()) * w.double()
    return float(err.sum() / err.square().sum().sqrt())


@pytest.mark.parametrize("fmt", SR_FORMATS)
def test_unbiased(fmt: str) -> None:
    x, w = _blocks_with_exact_max(32, 256, BLOCK.get(fmt, 32), seed=1)
    q = _samples(x, fmt, range(SEEDS))
    assert abs(_bias_z(q, x, w)) < 5.0
    # the same statistic does detect a biased rounding: always taking the lower neighbour seen
    assert _bias_z(q.amin(0).expand_as(q), x, w) < -50.0


@pytest.mark.parametrize("fmt", SR_FORMATS)
def test_unbiased_across_elements_of_one_call(fmt: str) -> None:
    """One seed, 65,536 copies of one value: the fraction rounded up is p = (x - lo) / (hi - lo)."""
    bs = BLOCK.get(fmt, 32)
    x = torch.full((2048, bs), 0.3)
    x[:, 0] = 1.0  # fixes each block's scale; the 0.3 lanes are the sample
    q = fake_quant(x, fmt, rounding="stochastic", seed=123)[:, 1:].double()
    lo, hi = float(q.min()), float(q.max())
    assert lo < 0.3 < hi
    p = (0.3 - lo) / (hi - lo)
    n = q.numel()
    frac_up = float((q == hi).double().mean())
    assert abs(frac_up - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert float(fake_quant(x, fmt)[:, 1:].double().mean()) != pytest.approx(0.3, abs=1e-4)  # RNE is biased


@pytest.mark.parametrize("fmt", SR_FORMATS)
def test_neighbours_only_and_fixed_points(fmt: str) -> None:
    """Every result is the round-to-nearest result or the neighbour on x's other side; values the format
    represents (round-to-nearest gives them back) never move."""
    x, _ = _blocks_with_exact_max(8, 128, BLOCK.get(fmt, 32), seed=2)
    ties = torch.randint(-12, 13, x.shape).float() * 0.125 * torch.exp2(torch.randint(-3, 3, x.shape).float())
    x = torch.where(torch.rand(x.shape) < 0.3, ties * x.abs().amax(-1, keepdim=True) / 4, x)
    rne = fake_quant(x, fmt).double()
    q = _samples(x, fmt, range(24))
    xd = x.double()
    other = q != rne
    # a result that is not round-to-nearest's lies on the other side of x, and it is always the same one
    assert (torch.sign(q - xd) == -torch.sign(rne - xd))[other].all()
    alt = torch.where(other, q, torch.nan).nan_to_num(0.0).abs().amax(0) * torch.sign(xd)
    assert (q == rne).logical_or(q == alt).all()
    exact = rne == xd
    assert exact.any() and (q == xd).all(0)[exact].all()
    assert (other.any(0) & ~exact).sum() > 0.5 * (~exact).sum()  # inexact values do move


@pytest.mark.parametrize("fmt", SR_FORMATS)
def test_reproducible_and_seeds_differ(fmt: str) -> None:
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    a = fake_quant(x, fmt, rounding="stochastic", seed=7)
    b = fake_quant(x, fmt, rounding="stochastic", seed=7)
    c = fake_quant(x, fmt, rounding="stochastic", seed=8)
    d = fake_quant(x, fmt, rounding="stochastic", seed=7 + (1 << 32))  # the high half of the seed counts
    assert a.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_seed_is_required_and_checked() -> None:
    x = torch.randn(4, 32)
    with pytest.raises(ValueNameError, match="seed"):
        fake_quant(x, "mxfp4_e2m1", rounding="stochastic")
    with pytest.raises(ValueNameError, match="seed"):
        fake_quant(x, "nvfp4", rounding="stochastic", seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueNameError, match="rounding"):
        fake_quant(x, "nvfp4", rounding="dither", seed=1)


def test_fork_preset_keeps_stochastic_rounding() -> None:
    x = torch.randn(8, 64)
    a = fake_quant(x, "mxfp4_e2m1", preset="fork", rounding="stochastic", seed=3)
    assert torch.equal(a, fake_quant(x, "mxfp4_e2m1", rounding="stochastic", seed=3))


def test_hash_matches_pure_python() -> None:
    idx = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    assert hash32(idx).tolist() == [_hash32_int(int(i)) for i in idx]
    assert _hash32_int(0) == 0 and _hash32_int(1) != 1
    key = seed_key(42)
    u = uniform24(idx, 42)
    assert u.tolist() == [(_hash32_int(int(i) ^ key) >> 8) * 2.0**-24 for i in idx]
    assert (u >= 0).all() and (u < 1).all()
    big = uniform24(torch.arange(8, dtype=torch.int64), 5)
    assert len(set(big.tolist())) == 8
