"""Every test vector of formats.md §8.1 (E2M1/E4M3/E5M2/E8M0), §8.2 (MX blocks) and §8.5 (HiF8)."""

from __future__ import annotations

import pytest
import torch

from megaquant.errors import ValueNameError  # noqa: E402
from megaquant.formats import decode, element_format, encode, fake_quant  # noqa: E402
from megaquant.formats.mx import element_codes, quantize_elements  # noqa: E402
from megaquant.formats.registry import Encoded  # noqa: E402

NAN = float("nan")
INF = float("inf")


def _elements(values: list[float], fmt: str, *, saturate: bool = True, rounding: str = "even"):
    spec = element_format(fmt)
    x = torch.tensor(values, dtype=torch.float32)
    q = quantize_elements(x, spec, rounding, saturate)
    return q, element_codes(q, spec)


def _scales(enc: Encoded) -> list[int]:
    assert enc.scales is not None
    return [int(b) for b in enc.scales.tolist()]


def _same(actual: torch.Tensor, expected: list[float]) -> None:
    exp = torch.tensor(expected, dtype=torch.float32)
    assert torch.equal(torch.isnan(actual), torch.isnan(exp)), (actual, exp)
    ok = ~torch.isnan(exp)
    assert torch.equal(actual[ok].float(), exp[ok]), (actual.tolist(), expected)


# §8.1 element casts (scale 1)
def test_e2m1_casts() -> None:
    q, _ = _elements([0.1, 0.25, 0.4, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 6.1, 7.0], "mxfp4_e2m1")
    _same(q, [0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0])


def test_e2m1_codes() -> None:
    _, codes = _elements([0.5, 6.0, -0.5, -6.0], "mxfp4_e2m1")
    assert codes.tolist() == [0b0001, 0b0111, 0b1001, 0b1111]


def test_e4m3_casts() -> None:
    q, codes = _elements([17, 19, 464, 480, 2.0**-10, 1.5 * 2.0**-10], "mxfp8_e4m3")
    _same(q, [16, 20, 448, 448, 0, 2.0**-9])
    assert codes[2].item() == 0x7E and codes[5].item() == 0x01
    q, codes = _elements([480.0, -480.0], "mxfp8_e4m3", saturate=False)
    assert torch.isnan(q).all() and codes.tolist() == [0x7F, 0xFF]


def test_e5m2_casts() -> None:
    q, codes = _elements([61439, 61440, 2.0**-17, 1.5 * 2.0**-17], "mxfp8_e5m2")
    _same(q, [57344, 57344, 0, 2.0**-16])
    assert codes[0].item() == 0x7B
    q, codes = _elements([61440.0, -61440.0], "mxfp8_e5m2", saturate=False)
    _same(q, [INF, -INF])
    assert codes.tolist() == [0x7C, 0xFC]


def test_e8m0_bytes() -> None:
    # E8M0: 1.0 -> 127, 2^-127 -> 0, 2^127 -> 254, NaN -> 255 (a block whose max sets the scale)
    for amax, byte in [(256.0, 127), (2.0**127, 254 - 8 + 0), (NAN, 255)]:
        x = torch.tensor([amax, 1.0])
        assert _scales(encode(x, "mxfp8_e4m3")) == [byte]
    assert _scales(encode(torch.zeros(4), "mxfp8_e4m3")) == [0]
    enc = encode(torch.tensor([2.0**127 * 1.5]), "mxfp4_e2m1")  # floor(log2) = 127, emax 2 -> 125
    assert _scales(enc) == [252]


def test_e8m0_decode_vectors() -> None:
    """Scale bytes 127, 0, 254, 255 over the E4M3 code for 1.0 (0x38) -> 1, 2^-127, 2^127, NaN."""
    codes = torch.full((4,), 0x38, dtype=torch.uint8)
    scales = torch.tensor([127, 0, 254, 255], dtype=torch.uint8)
    enc = Encoded(codes=codes, scales=scales, shape=(4,), axis=0, fmt="mxfp8_e4m3", block_size=1)
    _same(decode(enc), [1.0, 2.0**-127, 2.0**127, NAN])


# §8.2 MX blocks
def _block(lanes: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.zeros(32, dtype=dtype)
    x[: len(lanes)] = torch.tensor(lanes, dtype=torch.float32).to(dtype)
    return x


def _check_block(lanes, fmt, scale, byte, dequant, codes=None, rounding="even", dtype=torch.float32):
    x = _block(lanes, dtype) if len(lanes) < 32 else torch.tensor(lanes, dtype=torch.float32).to(dtype)
    enc = encode(x, fmt, scale=scale, rounding=rounding)
    assert _scales(enc) == [byte]
    y = fake_quant(x, fmt, scale=scale, rounding=rounding)
    _same(y[: len(dequant)], dequant)
    assert torch.equal(decode(enc, x.dtype).nan_to_num(7.0), y.nan_to_num(7.0))
    if codes is not None:
        assert enc.codes[: len(codes)].tolist() == codes


@pytest.mark.parametrize("scale", ["floor", "rceil"])
def test_row1_e4m3(scale: str) -> None:
    _check_block(
        [1.0, 0.3, -0.5, 1e-4], "mxfp8_e4m3", scale, 119,
        [1.0, 0.3125, -0.5, 9.918212890625e-05], [0x78, 0x6A, 0xF0, 0x0D],
    )  # fmt: skip


def test_rows2_3_saturation_vs_rceil() -> None:
    _check_block([480, 1.0], "mxfp8_e4m3", "floor", 127, [448, 1.0], [0x7E, 0x38])
    _check_block([480, 1.0], "mxfp8_e4m3", "rceil", 128, [480, 1.0], [0x77, 0x30])


@pytest.mark.parametrize("scale", ["floor", "rceil"])
def test_rows4_5_max_and_zero(scale: str) -> None:
    _check_block([448, -448], "mxfp8_e4m3", scale, 127, [448, -448], [0x7E, 0xFE])
    _check_block([], "mxfp8_e4m3", scale, 0, [0.0] * 32, [0] * 32)


def test_row6_fp32_min_normal() -> None:
    _check_block([2.0**-126] * 32, "mxfp8_e4m3", "floor", 0, [2.0**-126] * 32, [0x40] * 32)


def test_row7_bf16_max() -> None:
    bmax = torch.finfo(torch.bfloat16).max
    _check_block([bmax] * 32, "mxfp8_e4m3", "floor", 246, [448 * 2.0**119] * 32, [0x7E] * 32)
    # RCEIL: element 256 at scale 2^120 = 2^128, which is past the fp32 maximum: dequantizes to Inf.
    _check_block([bmax] * 32, "mxfp8_e4m3", "rceil", 247, [INF] * 32, [0x78] * 32, dtype=torch.bfloat16)


@pytest.mark.parametrize("scale", ["floor", "rceil"])
@pytest.mark.parametrize("special", [NAN, INF, -INF])
def test_rows8_9_nan_and_inf_blocks(scale: str, special: float) -> None:
    x = torch.ones(64)
    x[3] = special
    enc = encode(x, "mxfp8_e4m3", scale=scale)
    assert _scales(enc) == [255, 119]
    assert enc.codes[:32].tolist() == [0x7F] * 32
    y = fake_quant(x, "mxfp8_e4m3", scale=scale)
    assert torch.isnan(y[:32]).all() and torch.equal(y[32:], torch.ones(32))


def test_row10_rceil_uses_fp32_bits() -> None:
    v = torch.tensor([0x40600001], dtype=torch.int32).view(torch.float32).item()
    _check_block([v] * 32, "mxfp8_e4m3", "rceil", 121, [224 * 2.0**-6] * 32, [0x76] * 32)
    _check_block([v] * 32, "mxfp8_e4m3", "rceil", 120, [3.5] * 32, [0x7E] * 32, dtype=torch.bfloat16)


def test_row11_floor_uses_fp32_bits() -> None:
    v = torch.tensor([0x43FFFFFF], dtype=torch.int32).view(torch.float32).item()
    _check_block([v] * 32, "mxfp8_e4m3", "floor", 127, [448.0] * 32, [0x7E] * 32)


def test_row12_e5m2() -> None:
    _check_block([1.0, 0.3, 1e-6], "mxfp8_e5m2", "floor", 112, [1.0, 0.3125, 9.5367431640625e-07])


def test_rows13_14_mxfp4() -> None:
    lanes = [7.0, 0.9, -3.1, 0.2, 2.5, 0.25]
    _check_block(lanes, "mxfp4_e2m1", "floor", 127, [6.0, 1.0, -3.0, 0.0, 2.0, 0.0])
    _check_block(lanes, "mxfp4_e2m1", "rceil", 128, [8.0, 1.0, -3.0, 0.0, 2.0, 0.0])


def test_row16_mxfp4_floor() -> None:
    _check_block([3.0, 1.25, 0.7, 0.25], "mxfp4_e2m1", "floor", 126, [3.0, 1.0, 0.75, 0.25])


def test_row17_ties_away() -> None:
    _check_block([4.0, 2.5], "mxfp4_e2m1", "floor", 127, [4.0, 3.0], rounding="away")
    _check_block([4.0, 2.5], "mxfp4_e2m1", "floor", 127, [4.0, 2.0], rounding="even")
    y = fake_quant(_block([4.0, 2.5]), "mxfp4_e2m1", preset="fork")
    _same(y[:2], [4.0, 3.0])


def test_e2m1_packing_low_nibble_first() -> None:
    enc = encode(torch.tensor([0.0, 0.5, 4.0, -0.0, 6.0]), "mxfp4_e2m1")
    assert _scales(enc) == [127]
    assert enc.codes.tolist() == [0b00010000, 0b10000110, 0b0111]


# §8.5 HiF8
HIF8 = [
    (1.0, 0x08, 1.0), (-1.0, 0x88, -1.0), (1.5, 0x0C, 1.5), (2.0, 0x10, 2.0), (0.5, 0x18, 0.5),
    (4.0, 0x20, 4.0), (8.0, 0x28, 8.0), (16.0, 0x40, 16.0), (0.3, 0x32, 0.3125), (1.0625, 0x09, 1.125),
    (1.0624, 0x08, 1.0), (17.0, 0x40, 16.0), (18.0, 0x41, 20.0), (30.0, 0x44, 32.0),
    (32768.0, 0x6E, 32768.0), (40959.0, 0x6E, 32768.0), (40960.0, 0x6F, INF), (2.0**-15, 0x7E, 2.0**-15),
    (2.0**-16, 0x07, 2.0**-16), (1e-6, 0x03, 9.5367431640625e-07), (2.0**-22, 0x01, 2.0**-22),
    (2.0**-23, 0x01, 2.0**-22), (0.99 * 2.0**-23, 0x00, 0.0), (0.0, 0x00, 0.0), (-0.0, 0x00, 0.0),
    (NAN, 0x80, NAN), (INF, 0x6F, INF), (-INF, 0xEF, -INF),
]  # fmt: skip


def test_hif8_vectors() -> None:
    x = torch.tensor([v for v, _, _ in HIF8])
    enc = encode(x, "hifp8", saturate=False)
    assert enc.codes.tolist() == [c for _, c, _ in HIF8]
    y = fake_quant(x, "hifp8", saturate=False)
    _same(y, [d for _, _, d in HIF8])
    assert not torch.signbit(y[x == 0]).any()  # single zero: -0.0 -> +0.0
    assert torch.equal(decode(enc).nan_to_num(7.0), y.nan_to_num(7.0))


def test_hif8_saturating_and_fork() -> None:
    x = torch.tensor([40960.0, -1e30, INF, 1e-30, -1e-30, 0.0, 3e4, NAN])
    _same(fake_quant(x, "hifp8"), [32768, -32768, 32768, 0, 0, 0, 32768, NAN])
    enc = encode(x, "hifp8")
    assert enc.codes.tolist() == [0x6E, 0xEE, 0x6E, 0, 0, 0, 0x6E, 0x80]
    _same(fake_quant(x, "hifp8", preset="fork"), [32768, -32768, 32768, 2.0**-22, -(2.0**-22), 0, 32768, NAN])


def test_bad_options_raise_actionable_errors() -> None:
    x = torch.ones(4)
    with pytest.raises(ValueNameError, match="mxfp8_e4m3"):
        fake_quant(x, "fp8")
    with pytest.raises(ValueNameError, match="rceil"):
        fake_quant(x, "mxfp8_e4m3", scale="ceil")
    with pytest.raises(ValueNameError, match="saturate=True"):
        fake_quant(x, "mxfp4_e2m1", saturate=False)
    with pytest.raises(ValueNameError, match="out of range"):
        fake_quant(x, "mxfp8_e4m3", axis=1)
    with pytest.raises(ValueNameError, match="floating-point"):
        fake_quant(torch.ones(4, dtype=torch.int32), "hifp8")


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "hifp8"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (2, 0, 5)])
def test_empty_tensors_keep_their_shape(fmt: str, shape: tuple[int, ...]) -> None:
    x = torch.zeros(shape)
    assert fake_quant(x, fmt, axis=-1).shape == x.shape
    assert decode(encode(x, fmt, axis=0)).shape == x.shape


def test_fake_quant_has_no_autograd_history() -> None:
    x = torch.randn(4, 32, requires_grad=True)
    assert not fake_quant(x, "mxfp8_e4m3").requires_grad
