"""Random Hadamard transform (RHT): blocks along an axis times an orthogonal H·diag(signs)/sqrt(block).

Recipes apply it to both operands of a GEMM along the reduction axis before quantizing (NVFP4 paper,
arXiv:2509.25149: 16x16 on the wgrad inputs; Tseng et al. 2025, "Training LLMs with MXFP4": in the
backward), so that (x R)(R^T y) = x y while outliers are spread over each block. The random signs come
from the seed through the counter-based hash of formats._random, identical on every device, optionally
mixed with a device word (`device_seed`, formats._random) on the device, so that a CUDA graph replay gets
the word's current signs. Which seed a GEMM gets is the recipe's sign schedule (megaquant.ops.state: one
fixed vector per run for nvfp4_paper, a fresh one per GEMM and step for mxfp4_tseng: a per-draw seed and
the step word).
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType

import torch

from megaquant.errors import ValueNameError
from megaquant.formats._random import device_key, hash32

__all__ = ["hadamard_matrix", "inverse_random_hadamard", "random_hadamard", "rht_signs"]


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1):
        raise ValueNameError(f"Hadamard block must be a power of two >= 2 (16, 32, ...), got {block!r}")


def rht_signs(
    block: int,
    seed: int,
    device: torch.device | str | None = None,
    device_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The +-1 sign vector (fp32, length `block`) of a seed: bit 31 of hash32(i ^ key), key the seed's
    (formats._random.device_key: with `device_seed`, mixed with that device word), computed on `device`
    itself (no host-to-device copy, so it can run inside a CUDA graph capture)."""
    _check_block(block)
    index = torch.arange(block, dtype=torch.int64, device=device)
    word = None if device_seed is None else device_seed.to(index.device)
    bits = hash32(index ^ device_key(seed, word)) >> 31
    return 1.0 - 2.0 * bits.to(torch.float32)


@functools.lru_cache(maxsize=64)
def _sylvester(block: int, device: str) -> torch.Tensor:
    """H / sqrt(block) on `device`, built there (cached: the same few matrices every step)."""
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < block:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(block)


def hadamard_matrix(
    block: int,
    seed: int | None = None,
    *,
    device: torch.device | str | None = None,
    device_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """R = diag(signs(seed)) · H / sqrt(block) (fp32, block x block), H the Sylvester Hadamard matrix;
    seed None: no signs. R is orthogonal (R R^T = I); the transform of a row block v is v @ R."""
    _check_block(block)
    h = _sylvester(block, str(torch.device(device if device is not None else "cpu")))
    if seed is None:
        return h.clone()
    if h.is_cuda and block <= 256:
        kernels = _kernels()
        if kernels is not None:  # one launch instead of ~15 small torch ops; the same bits
            word = None if device_seed is None else device_seed.to(h.device)
            return kernels.rht_matrix(block, seed, word, h.device, _entry(block))
    return rht_signs(block, seed, h.device, device_seed).unsqueeze(1) * h


@functools.lru_cache(maxsize=64)
def _entry(block: int) -> float:
    """The fp32 value of 1/sqrt(block) as _sylvester computes it (the kernel writes +- this)."""
    return float(_sylvester(block, "cpu")[0, 0])


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    """The Triton module (the sign matrix, the one-pass transform), or None when Triton is not installed."""
    try:
        return importlib.import_module("megaquant.formats._triton_rht")
    except ImportError:
        return None


def _apply(x: torch.Tensor, m: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    if x.dim() == 0 or not -x.dim() <= axis < x.dim():
        raise ValueNameError(f"axis {axis} is out of range for a tensor of shape {tuple(x.shape)}")
    n = x.shape[axis]
    if n % block:
        raise ValueNameError(
            f"the Hadamard transform needs the axis length to be a multiple of block={block}; "
            f"axis {axis} of shape {tuple(x.shape)} has {n}"
        )
    if x.is_cuda:
        fast = _kernels()
        if fast is not None and fast.serves(x, block):
            out = fast.transform(x, m, axis, block)  # one pass, contiguous (formats._triton_rht)
            if out is not None:
                return out
    xt = x.movedim(axis, -1)
    shape = xt.shape
    blocks = xt.reshape(*shape[:-1], n // block, block).to(torch.float32)
    out = (blocks @ m).reshape(shape).movedim(-1, axis)
    return out.to(x.dtype)


def random_hadamard(
    x: torch.Tensor,
    axis: int = -1,
    *,
    block: int = 16,
    seed: int = 0,
    device_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x with every `block` consecutive elements along `axis` replaced by v @ R (R = hadamard_matrix(block,
    seed)), computed in fp32 and cast back to x.dtype. The axis length must be a multiple of block. On
    CUDA (blocks 16..128) one Triton pass with a contiguous result (formats._triton_rht); elsewhere torch
    ops, whose result is contiguous along the moved axis (for axis -2 of a matrix: its transpose's layout).

    For a GEMM a @ b: random_hadamard(a, -1, seed=s) @ random_hadamard(b, -2, seed=s) equals a @ b up to
    rounding, because R is orthogonal and the -2 axis of b is transformed by the same R (b^T's rows).
    `device_seed`: a device word mixed into the seed on the device (formats._random).
    """
    _check_block(block)
    return _apply(x, hadamard_matrix(block, seed, device=x.device, device_seed=device_seed), axis, block)


def inverse_random_hadamard(
    x: torch.Tensor,
    axis: int = -1,
    *,
    block: int = 16,
    seed: int = 0,
    device_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The inverse of random_hadamard (v @ R^T per block): inverse(random_hadamard(x)) == x up to fp32
    rounding, exactly so in exact arithmetic."""
    _check_block(block)
    return _apply(x, hadamard_matrix(block, seed, device=x.device, device_seed=device_seed).T, axis, block)
