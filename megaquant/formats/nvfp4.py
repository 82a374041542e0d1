"""Torch reference for NVFP4: E2M1 elements, an E4M3 scale per 16-element block, an FP32 tensor scale.

Two-level scaling as NVIDIA defines it (arXiv:2509.25149) and torchao implements it (`nvfp4_quantize`
with a per-tensor scale), with the same fp32 operations in the same order, so the results are bit-exact
with torchao's `NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(amax)).dequantize()`
(every division is a correctly rounded fp32 division, as torchao's on the CPU; divisors are device tensors,
because CUDA torch turns a division by a Python number into a multiplication by its reciprocal). See
docs/formats.md.
"""

from __future__ import annotations

import torch

from megaquant.formats.mx import (
    block_uniforms,
    blockify,
    check_block_2d,
    codes_along_axis,
    element_codes,
    element_values,
    element_values_of,
    expand_scales,
    quantize_elements,
    scales_layout,
    unblockify,
)
from megaquant.formats.registry import Encoded, Options, element_format

__all__ = ["E4M3_MIN_SCALE", "TENSOR_SCALE_DIVISOR", "decode_nvfp4", "encode_nvfp4", "fake_quant_nvfp4"]

E4M3_MAX = 448.0
E2M1_MAX = 6.0
TENSOR_SCALE_DIVISOR = E4M3_MAX * E2M1_MAX
"""The tensor scale is amax / 2688, so a block holding the tensor amax gets block scale 448."""
E4M3_MIN_SCALE = 2.0**-6
"""Block scales are clamped below at the smallest normal E4M3 value (torchao: finfo(e4m3fn).tiny)."""
_E4M3 = element_format("mxfp8_e4m3")


def tensor_scale(x32: torch.Tensor, amax: torch.Tensor | float | None) -> torch.Tensor:
    """The FP32 per-tensor scale, 0-d: amax / 2688 (amax = max |x| unless given; NaN propagates).

    An amax of 0 (an all-zero tensor) gives 1.0, so zeros stay zeros (torchao would divide 0 by 0 and
    return NaN everywhere; Transformer Engine also uses 1 there).
    """
    if amax is None:
        a = x32.abs().amax() if x32.numel() else x32.new_zeros(())
    else:
        a = torch.as_tensor(amax, device=x32.device).to(torch.float32).reshape(())
    s = a / torch.full((), TENSOR_SCALE_DIVISOR, device=x32.device)  # a tensor: an exact division on GPUs
    return torch.where(a == 0, torch.ones_like(s), s)


def _quantize(
    x: torch.Tensor, opts: Options, amax: torch.Tensor | float | None, device_seed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E2M1 element values in blocked form, E4M3 block scales (fp32), tensor scale (0-d fp32)).

    torchao's order: block_scale = block_amax / 6; e4m3 = E4M3_RNE(clamp(block_scale / ts, 2^-6, 448));
    elements = E2M1(clamp(x * ((1 / ts) / e4m3), -6, 6)), each step rounded to fp32.
    """
    check_block_2d(x, opts)
    x32 = x.to(torch.float32)
    ts = tensor_scale(x32, amax)
    blocks = blockify(x32, opts)
    dev = x32.device
    block_scale = blocks.abs().amax(dim=-1) / torch.full((), E2M1_MAX, device=dev)
    scaled_scale = (block_scale / ts).clamp(E4M3_MIN_SCALE, E4M3_MAX)
    e4m3 = quantize_elements(scaled_scale, _E4M3, "even", True)
    reciprocal = torch.reciprocal(ts) / e4m3
    s = (blocks * reciprocal.unsqueeze(-1)).clamp(-E2M1_MAX, E2M1_MAX)
    q = quantize_elements(s, opts.fmt, opts.rounding, True, block_uniforms(x, opts, device_seed))
    return q, e4m3, ts


def _scale_codes(e4m3: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of the block scales; a NaN scale is 0x7F whatever the NaN's sign (0/0 and Inf/Inf give
    a negative NaN on some CPUs and a positive one on GPUs)."""
    return torch.where(torch.isnan(e4m3), 0x7F, element_codes(e4m3, _E4M3).to(torch.int32)).to(torch.uint8)


def fake_quant_nvfp4(
    x: torch.Tensor,
    opts: Options,
    amax: torch.Tensor | float | None = None,
    device_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize: element * (tensor_scale * e4m3) in fp32 (two roundings, as torchao's
    dequantize), then cast to x.dtype. Same shape and dtype as x."""
    q, e4m3, ts = _quantize(x, opts, amax, device_seed)
    out = q * (ts * e4m3).unsqueeze(-1)
    return unblockify(out, tuple(x.shape), opts).to(x.dtype)


def encode_nvfp4(
    x: torch.Tensor,
    opts: Options,
    amax: torch.Tensor | float | None = None,
    device_seed: torch.Tensor | None = None,
) -> Encoded:
    """Packed E2M1 codes, E4M3 block-scale codes and the fp32 tensor scale (see Encoded)."""
    q, e4m3, ts = _quantize(x, opts, amax, device_seed)
    return Encoded(
        codes=codes_along_axis(element_codes(q, opts.fmt), x, opts, 4),
        scales=scales_layout(_scale_codes(e4m3), x, opts),
        shape=tuple(x.shape),
        axis=opts.axis % x.dim(),
        fmt="nvfp4",
        block_size=opts.block_size,
        tensor_scale=ts,
        block_2d=opts.block_2d,
    )


def decode_nvfp4(enc: Encoded, dtype: torch.dtype) -> torch.Tensor:
    """Values of an NVFP4 Encoded: E2M1 * (tensor_scale * E4M3), fp32, then cast to `dtype`."""
    assert enc.scales is not None and enc.tensor_scale is not None
    values = element_values_of(enc, element_format("nvfp4"))
    e4m3 = element_values(_E4M3).to(enc.scales.device)[enc.scales.to(torch.int64)]
    block = enc.tensor_scale * e4m3
    return (values * expand_scales(block, enc)).to(dtype)
