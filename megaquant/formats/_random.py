"""Counter-based random bits for stochastic rounding: a hash of (seed, element index), no state.

The same integer function runs in torch (int64 arithmetic, any device) and in the Triton kernels
(uint32 arithmetic), so a seed gives the same rounding decisions on the CPU, in the torch reference on a
GPU and in the kernels. The hash is Wellons' improved "lowbias32" (hash-prospector; both multipliers
below 2^31, so the torch products fit int64 without overflow).

A seed may come with a device word (`device_seed`: a 0-d int64 tensor on the tensor's device, e.g. the step
word of megaquant.ops.state): the stream's key is then mixed_key(seed, word), computed on the device (in the
kernels from a pointer, in torch from the tensor), so a CUDA graph that captured the call draws new bits
when the word changes while every host argument stays the same.
"""

from __future__ import annotations

import torch

__all__ = ["M1", "M2", "SEED_SALT", "device_key", "hash32", "mixed_key", "seed_key", "uniform24"]

M1 = 0x21F0AAAD
M2 = 0x735A2D97
SEED_SALT = 0x9E3779B9
_MASK = 0xFFFFFFFF


def _hash32_int(x: int) -> int:
    x &= _MASK
    x ^= x >> 16
    x = (x * M1) & _MASK
    x ^= x >> 15
    x = (x * M2) & _MASK
    x ^= x >> 15
    return x


def seed_key(seed: int) -> int:
    """The 32-bit key of a 64-bit seed (both halves mixed in): what the kernels receive."""
    seed &= (1 << 64) - 1
    return _hash32_int((seed & _MASK) ^ _hash32_int((seed >> 32) ^ SEED_SALT))


def mixed_key(seed: int, word: int) -> int:
    """The 32-bit key of `seed` under device word `word`: lowbias32(word mod 2^32 ^ seed_key(seed))."""
    return _hash32_int((word & _MASK) ^ seed_key(seed))


def device_key(seed: int, word: torch.Tensor | None) -> int | torch.Tensor:
    """seed_key(seed) without a word; with one, mixed_key(seed, word) as a 0-d int64 tensor on its device."""
    if word is None:
        return seed_key(seed)
    return hash32((word.to(torch.int64) & _MASK) ^ seed_key(seed))


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of an int64 tensor holding values in [0, 2^32); int64 result in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * M2) & _MASK
    return x ^ (x >> 15)


def uniform24(index: torch.Tensor, seed: int, word: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values j * 2^-24, j in [0, 2^24), one per element of the int64 `index` tensor.

    bits = hash32((index mod 2^32) ^ key) ^ (index >> 32), hashed once more when the index has high bits
    (tensors of 2^32 elements or more); j is the top 24 bits. Exact multiples of 2^-24, so stochastic
    rounding that rounds up when u < frac is exactly unbiased for every frac that is a multiple of 2^-24.
    The key is device_key(seed, word) (`word`: the optional device word, module docstring).
    """
    key = device_key(seed, word if word is None else word.to(index.device))
    h = hash32((index & _MASK) ^ key)
    if index.numel() >= 1 << 32:  # decided from the size, so no device sync
        high = index >> 32
        h = torch.where(high != 0, hash32(h ^ (high & _MASK)), h)
    return (h >> 8).to(torch.float32) * 2.0**-24
