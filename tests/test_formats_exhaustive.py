"""All 65,536 bf16 bit patterns through every element format, against ml_dtypes / en_dtypes."""

from __future__ import annotations

import en_dtypes
import ml_dtypes
import numpy as np
import pytest
import torch

from megaquant.formats import decode, element_format, encode, fake_quant  # noqa: E402
from megaquant.formats.hif8 import hif8_values  # noqa: E402
from megaquant.formats.mx import element_codes, element_values, quantize_elements  # noqa: E402
from megaquant.formats.registry import Encoded  # noqa: E402

ML = {
    "mxfp8_e4m3": ml_dtypes.float8_e4m3fn,
    "mxfp8_e5m2": ml_dtypes.float8_e5m2,
    "mxfp4_e2m1": ml_dtypes.float4_e2m1fn,
}
MX = list(ML)


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy casts of NaN/Inf


@pytest.fixture(scope="module")
def bf16_all() -> torch.Tensor:
    """Every bf16 value (as fp32), including +-0, subnormals, +-Inf and NaNs."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()


def _assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    actual = np.asarray(actual, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    assert np.array_equal(np.isnan(actual), np.isnan(expected))
    ok = ~np.isnan(expected)
    bad = np.nonzero(actual[ok].view(np.uint32) != expected[ok].view(np.uint32))[0]
    assert bad.size == 0, f"{bad.size} mismatches, first: {actual[ok][bad[:5]]} vs {expected[ok][bad[:5]]}"


def _ties_away_numpy(x: np.ndarray, emin: int, man_bits: int, max_normal: float) -> np.ndarray:
    """Independent float64 re-derivation: nearest grid point, ties away from zero, saturate."""
    x = x.astype(np.float64)
    a = np.abs(x)
    _, e = np.frexp(a)  # a = m 2^e, m in [0.5, 1)
    step = np.ldexp(1.0, np.maximum(e - 1, emin) - man_bits)
    q = np.minimum(np.floor(a / step + 0.5) * step, max_normal)
    return np.copysign(q, x).astype(np.float32)


@pytest.mark.parametrize("fmt", MX)
def test_element_rne_saturating_matches_ml_dtypes(fmt: str, bf16_all: torch.Tensor) -> None:
    spec = element_format(fmt)
    q = quantize_elements(bf16_all, spec, "even", True)
    x = bf16_all.numpy()
    clipped = np.clip(x, -spec.max_normal, spec.max_normal)  # ml_dtypes casts do not saturate
    ref = clipped.astype(ML[fmt])
    keep = np.ones_like(x, dtype=bool) if spec.has_nan else ~np.isnan(x)  # ml_dtypes: E2M1 NaN -> -0
    _assert_same(q.numpy()[keep], ref.astype(np.float32)[keep])
    finite = np.isfinite(x)
    codes = element_codes(q, spec).numpy()
    assert np.array_equal(codes[finite], ref.view(np.uint8)[finite])


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp8_e5m2"])
def test_element_rne_nonsaturating_matches_ml_dtypes(fmt: str, bf16_all: torch.Tensor) -> None:
    spec = element_format(fmt)
    q = quantize_elements(bf16_all, spec, "even", False)
    ref = bf16_all.numpy().astype(ML[fmt])
    _assert_same(q.numpy(), ref.astype(np.float32))
    ok = ~np.isnan(bf16_all.numpy())
    assert np.array_equal(element_codes(q, spec).numpy()[ok], ref.view(np.uint8)[ok])


@pytest.mark.parametrize("fmt", MX)
def test_element_ties_away_matches_numpy(fmt: str, bf16_all: torch.Tensor) -> None:
    spec = element_format(fmt)
    q = quantize_elements(bf16_all, spec, "away", True)
    _assert_same(q.numpy(), _ties_away_numpy(bf16_all.numpy(), spec.emin, spec.man_bits, spec.max_normal))


@pytest.mark.parametrize("fmt", MX)
def test_element_code_table_matches_ml_dtypes(fmt: str) -> None:
    spec = element_format(fmt)
    codes = np.arange(1 << spec.bits, dtype=np.uint8)
    _assert_same(element_values(spec).numpy(), codes.view(ML[fmt]).astype(np.float32))


def _mx_single_element_reference(x: np.ndarray, fmt: str, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """Each value as its own block: (E8M0 byte, dequantized fp32) from numpy + ml_dtypes."""
    spec = element_format(fmt)
    a = np.abs(x.astype(np.float64))
    finite = np.isfinite(a)
    a = np.where(finite, a, 1.0)
    if scale == "floor":
        _, e = np.frexp(a)
        shared = e - 1 - spec.emax
    else:  # ceil(log2(a / max_normal))
        m, e = np.frexp(a / spec.max_normal)
        shared = np.where(m == 0.5, e - 1, e)
    shared = np.where(a == 0, -127, np.maximum(shared, -127))
    scale_value = np.ldexp(1.0, shared).astype(np.float32)
    assert np.array_equal(
        scale_value.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8), (shared + 127).astype(np.uint8)
    )
    scaled = np.clip(x.astype(np.float64) / np.ldexp(1.0, shared), -spec.max_normal, spec.max_normal)
    elem = scaled.astype(np.float32).astype(ML[fmt]).astype(np.float64)
    deq = (elem * np.ldexp(1.0, shared)).astype(np.float32)
    byte = np.where(finite, shared + 127, 255).astype(np.uint8)
    return byte, np.where(finite, deq, np.nan).astype(np.float32)


@pytest.mark.parametrize("scale", ["floor", "rceil"])
@pytest.mark.parametrize("fmt", MX)
def test_mx_blocks_of_one_match_ml_dtypes(fmt: str, scale: str, bf16_all: torch.Tensor) -> None:
    x = bf16_all.to(torch.bfloat16)
    byte, deq = _mx_single_element_reference(bf16_all.numpy(), fmt, scale)
    enc = encode(x, fmt, block_size=1, scale=scale)
    assert enc.scales is not None and np.array_equal(enc.scales.numpy(), byte)
    y = fake_quant(x, fmt, block_size=1, scale=scale)
    expected = torch.from_numpy(deq).to(torch.bfloat16).float().numpy()
    _assert_same(y.float().numpy(), expected)
    _assert_same(decode(enc, torch.bfloat16).float().numpy(), y.float().numpy())


@pytest.mark.parametrize("fmt", MX)
def test_e8m0_scale_bytes_decode_like_ml_dtypes(fmt: str) -> None:
    """Every scale byte 0..255 over the element code for 1.0 decodes to the ml_dtypes E8M0 value."""
    spec = element_format(fmt)
    one = int(element_codes(torch.ones(1), spec).item())
    if spec.bits == 4:
        codes = torch.full((128,), one | (one << 4), dtype=torch.uint8)  # two elements per byte
    else:
        codes = torch.full((256,), one, dtype=torch.uint8)
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    enc = Encoded(codes=codes, scales=scales, shape=(256,), axis=0, fmt=fmt, block_size=1)
    expected = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    _assert_same(decode(enc).numpy(), expected)


def test_hif8_nonsaturating_matches_en_dtypes(bf16_all: torch.Tensor) -> None:
    x = bf16_all.numpy()
    ref = x.astype(en_dtypes.hifloat8)
    enc = encode(bf16_all, "hifp8", saturate=False)
    assert np.array_equal(enc.codes.numpy(), ref.view(np.uint8))
    _assert_same(fake_quant(bf16_all, "hifp8", saturate=False).numpy(), ref.astype(np.float32))


def test_hif8_saturating_clamps_overflow(bf16_all: torch.Tensor) -> None:
    x = bf16_all.numpy()
    ref = x.astype(en_dtypes.hifloat8).astype(np.float32)
    ref = np.where(np.isinf(ref), np.copysign(np.float32(32768.0), ref), ref)
    _assert_same(fake_quant(bf16_all, "hifp8").numpy(), ref)
    _assert_same(fake_quant(bf16_all.to(torch.bfloat16), "hifp8").float().numpy(), ref)


def test_hif8_code_table_matches_en_dtypes() -> None:
    expected = np.arange(256, dtype=np.uint8).view(en_dtypes.hifloat8).astype(np.float32)
    _assert_same(hif8_values().numpy(), expected)


@pytest.mark.parametrize("fmt", [*MX, "hifp8"])
def test_fp16_all_patterns_roundtrip(fmt: str) -> None:
    """Every fp16 value: decode(encode(x)) == fake_quant(x) exactly, blocks of 32 along the axis."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(256, 256)
    for axis in (-1, 0):
        y = fake_quant(x, fmt, axis=axis, scale="rceil")
        d = decode(encode(x, fmt, axis=axis, scale="rceil"), torch.float16)
        _assert_same(d.float().numpy(), y.float().numpy())
