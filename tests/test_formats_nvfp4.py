"""NVFP4: bit-exact with torchao's two-level NVFP4, formats.md §8.3 vectors, 2-D tiles, encode/decode."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from megaquant.errors import ValueNameError  # noqa: E402
from megaquant.formats import decode, encode, fake_quant  # noqa: E402


def _wide(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values with a per-row and a per-element power-of-two spread (scales of every size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.exp2(torch.randint(-12, 12, (*shape[:-1], 1), generator=g).float())
    x = x * torch.exp2(torch.randint(-6, 6, shape, generator=g).float())
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    bad = _bits(got) != _bits(want)
    assert not bad.any(), f"{int(bad.sum())} differ: {got[bad][:4].tolist()} vs {want[bad][:4].tolist()}"


# --- formats.md §8.3 (independent of torchao) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("amax", "block", "want"),
    [
        (2688.0, [3.0, 1.0, 0.2, -2.2], [3.0, 1.0, 0.25, -2.0]),
        (2688.0, [1.3, 0.7, -0.05], [1.3125, 0.65625, -0.0]),
        (10.0, [10.0, 2.0, -5.0], None),
    ],
)
def test_formats_md_vectors(amax: float, block: list[float], want: list[float] | None) -> None:
    x = torch.zeros(2, 16)
    x[0, : len(block)] = torch.tensor(block)
    x[1, 0] = amax  # the tensor amax lives in another block
    y = fake_quant(x, "nvfp4")
    if want is None:  # s_global = 10/2688, block scale 448: [6, 1, -3] * 10/6
        ts = torch.tensor(10.0) / 2688.0
        want = [v * float(ts * 448.0) for v in (6.0, 1.0, -3.0)]
        assert y[0, :3].tolist() == pytest.approx(want, rel=1e-6)
    else:
        assert y[0, : len(block)].tolist() == want
    assert torch.signbit(fake_quant(torch.tensor([-0.01, 5.0] + [0.0] * 14), "nvfp4"))[0]


def test_encoded_layout() -> None:
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([3.0, 1.0, 0.2, -2.2])
    x[0, 16] = 2688.0
    enc = encode(x, "nvfp4")
    assert enc.fmt == "nvfp4" and enc.block_size == 16 and enc.codes.shape == (1, 16)
    assert enc.scales is not None and enc.scales.shape == (1, 2)
    assert enc.scales.tolist() == [[0x30, 0x7E]]  # E4M3 0.5 and 448
    assert enc.tensor_scale is not None and enc.tensor_scale.item() == 1.0
    assert enc.codes[0, :2].tolist() == [0x7 | (0x4 << 4), 0x1 | (0xE << 4)]  # 6, 2 | 0.5, -4 (low first)


def test_zero_tensor_stays_zero_and_nan_spreads() -> None:
    z = torch.zeros(3, 32)
    assert fake_quant(z, "nvfp4").eq(0).all()
    x = torch.randn(2, 32)
    x[0, 3] = float("nan")
    assert fake_quant(x, "nvfp4").isnan().all()  # the tensor scale is NaN, as in torchao


def test_axis_ragged_and_dtype() -> None:
    x = _wide((5, 40), torch.bfloat16, seed=1)
    y = fake_quant(x, "nvfp4", axis=0)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    _assert_bit_equal(y, fake_quant(x.t().contiguous(), "nvfp4").t())
    padded = torch.nn.functional.pad(x, (0, 8))  # ragged block = zero-padded block
    _assert_bit_equal(fake_quant(x, "nvfp4"), fake_quant(padded, "nvfp4")[:, :40])
    with pytest.raises(ValueNameError):
        fake_quant(x, "nvfp4", amax=1.0, block_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_encode_decode_roundtrip(dtype: torch.dtype) -> None:
    x = _wide((6, 3, 48), dtype, seed=2)
    for axis, block_2d in [(-1, False), (1, False), (0, False), (-1, True)]:
        enc = encode(x, "nvfp4", axis=axis, block_2d=block_2d)
        _assert_bit_equal(decode(enc, dtype), fake_quant(x, "nvfp4", axis=axis, block_2d=block_2d))


# --- 2-D tiles ------------------------------------------------------------------------------------------


def test_block_2d_is_transpose_invariant_and_tile_amax() -> None:
    x = _wide((40, 56), torch.float32, seed=3)
    y = fake_quant(x, "nvfp4", block_2d=True)
    _assert_bit_equal(fake_quant(x.t().contiguous(), "nvfp4", block_2d=True, axis=-2).t(), y)
    # one tile equals a 1-d block of 256 over the same elements under the same tensor scale
    amax = x.abs().amax()
    tile = x[16:32, 32:48]
    flat = fake_quant(tile.reshape(1, 256), "nvfp4", block_size=256, amax=amax).reshape(16, 16)
    _assert_bit_equal(y[16:32, 32:48], flat)
    enc = encode(x, "nvfp4", block_2d=True)
    assert enc.scales is not None and enc.scales.shape == (3, 4) and enc.block_2d
    with pytest.raises(ValueNameError, match="block_2d"):
        fake_quant(torch.randn(3, 5, 32), "nvfp4", block_2d=True, axis=0)


def test_mx_block_2d() -> None:
    x = _wide((70, 64), torch.bfloat16, seed=4)
    y = fake_quant(x, "mxfp8_e4m3", block_2d=True)
    _assert_bit_equal(fake_quant(x.t().contiguous(), "mxfp8_e4m3", block_2d=True).t(), y)
    tile = x[32:64, 32:64]
    flat = fake_quant(tile.reshape(1, 1024), "mxfp8_e4m3", block_size=1024).reshape(32, 32)
    _assert_bit_equal(y[32:64, 32:64], flat)
    enc = encode(x, "mxfp4_e2m1", block_2d=True)
    _assert_bit_equal(decode(enc, x.dtype), fake_quant(x, "mxfp4_e2m1", block_2d=True))
    with pytest.raises(ValueNameError, match="block-scaled"):
        fake_quant(x, "hifp8", block_2d=True)


# --- torchao ----------------------------------------------------------------------------------------------


def _torchao():
    return pytest.importorskip(
        "torchao.prototype.mx_formats.nvfp4_tensor", reason="torchao (dev extra) is the NVFP4 reference"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 256), (3, 32, 64), (1, 16)])
def test_bit_exact_with_torchao(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    ao = _torchao()
    for seed in range(4):
        x = _wide(shape, dtype, seed=seed)
        amax = x.abs().amax()
        t = ao.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=ao.per_tensor_amax_to_scale(amax))
        _assert_bit_equal(fake_quant(x, "nvfp4"), t.dequantize(dtype))
        enc = encode(x, "nvfp4")
        assert enc.scales is not None
        assert torch.equal(enc.codes.reshape(-1), t.qdata.view(torch.uint8).reshape(-1))
        assert torch.equal(enc.scales.reshape(-1), t.scale.view(torch.uint8).reshape(-1))
        # along axis -2: torchao on the transposed copy
        if x.shape[-2] % 16 == 0:
            xt = x.transpose(-2, -1).contiguous()
            tt = ao.NVFP4Tensor.to_nvfp4(xt, per_tensor_scale=ao.per_tensor_amax_to_scale(amax))
            _assert_bit_equal(fake_quant(x, "nvfp4", axis=-2), tt.dequantize(dtype).transpose(-2, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_given_amax_and_edge_values_match_torchao(dtype: torch.dtype) -> None:
    """An external amax (delayed scaling: smaller or larger than the real one), E4M3 scale ties and
    clamps (block scales below 2^-6 and above 448), E2M1 ties."""
    ao = _torchao()
    g = torch.Generator().manual_seed(7)
    ties = torch.randint(-12, 13, (32, 64), generator=g).float() * 0.25
    tiny = torch.randn(32, 64, generator=g) * 1e-5
    x = torch.cat([_wide((32, 64), torch.float32, seed=5), ties, tiny]).to(dtype)
    for amax in (x.abs().amax(), x.abs().amax() * 0.3, x.abs().amax() * 7.0, torch.tensor(1e-3)):
        t = ao.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=ao.per_tensor_amax_to_scale(amax))
        _assert_bit_equal(fake_quant(x, "nvfp4", amax=amax), t.dequantize(dtype))
        _assert_bit_equal(fake_quant(x, "nvfp4", amax=float(amax)), t.dequantize(dtype))


def test_amax_keyword_for_hif8_tensor_scale_and_errors() -> None:
    x = _wide((8, 64), torch.float32, seed=9)
    amax = x.abs().amax()
    same = fake_quant(x, "hifp8", tensor_scale=True, amax=amax)
    _assert_bit_equal(same, fake_quant(x, "hifp8", tensor_scale=True))
    enc = encode(x, "hifp8", tensor_scale=True, amax=amax * 16)  # delayed scaling: an older, larger amax
    ref = encode(x, "hifp8", tensor_scale=True)
    assert enc.tensor_scale_exp is not None and ref.tensor_scale_exp is not None
    assert int(enc.tensor_scale_exp) == int(ref.tensor_scale_exp) - 4
    with pytest.raises(ValueNameError, match="amax"):
        fake_quant(x, "mxfp8_e4m3", amax=amax)
    with pytest.raises(ValueNameError, match="amax"):
        fake_quant(x, "hifp8", amax=amax)  # no tensor scale to set
