"""The fused core of an instrumented Megatron DotProductAttention: decide per call, run quant_attention.

`megaquant instrument` (megaquant/instrument/attention.py) makes DotProductAttention.forward ask
`fused_core(self, query, key, value, attention_mask)` first. A `FusedCore` means the call is one that
quant_attention computes exactly (causal or no mask, no dropout in effect, plain softmax, no extra
scaling, [s, b, heads, dim] inputs); the forward then skips the unfused scores/softmax/PV statements and
returns `core(qk_value, pv_value)` with the values of its qk and pv sites. `None` keeps the unfused path.
Each distinct decision is printed once per process (`megaquant: attention core: ...`, on stderr), so
train.log and, through megaquant.attention_cores.cores_in_log, the run's manifest say which core ran.
MEGAQUANT_ATTENTION=unfused forces the unfused path, =fused refuses to fall back (an error says why).
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from megaquant.attention_cores import ATTENTION_MARK
from megaquant.errors import ValueNameError
from megaquant.megatron_src import quiet_megatron_import
from megaquant.ops.attention import attention_backend, quant_attention

__all__ = ["ATTENTION_ENV", "FusedCore", "fused_core"]

ATTENTION_ENV = "MEGAQUANT_ATTENTION"
"""auto (default): fused when supported; unfused: always the unfused path; fused: error when unsupported."""
_SEEN: set[str] = set()
_CAUSAL_MASKS: dict[tuple[int, int, str], torch.Tensor] = {}
_CHECKED: list[tuple[weakref.ref[torch.Tensor], int, bool]] = []
"""The last mask tensor checked (the same live object at the same version: a new mask at a reused address is
another object) and the verdict: every layer of a forward gets the same mask, so its values are read back
to the host once per microbatch, not once per layer."""


@dataclass(frozen=True)
class FusedCore:
    """One supported attention call: the inputs in Megatron's [s, b, heads, dim] layout, and how to mask."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    causal: bool
    softmax_scale: float

    def __call__(self, qk: str, pv: str) -> torch.Tensor:
        """The context layer [s, b, heads * v_dim], as the unfused path returns it."""
        sq, b = self.query.shape[0], self.query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (self.query, self.key, self.value))
        _note("fused", _backend_label(q, k, v, qk, pv, self.causal), f"qk={qk} pv={pv}")
        out = quant_attention(q, k, v, qk=qk, pv=pv, causal=self.causal, softmax_scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _backend_label(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: str, pv: str, causal: bool) -> str:
    return attention_backend(q, k, v, qk=qk, pv=pv, causal=causal)


def _note(path: str, detail: str, extra: str = "") -> None:
    line = f"{ATTENTION_MARK} {path} ({detail}){' ' + extra if extra else ''}"
    if line not in _SEEN:
        _SEEN.add(line)
        print(line, file=sys.stderr, flush=True)


def _is_causal_mask(mask: torch.Tensor, sq: int, sk: int) -> bool:
    """Whether a boolean mask (True = masked) is Megatron's causal mask for every batch element and head."""
    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[-2:]) != (sq, sk):
        return False
    key = (sq, sk, str(mask.device))
    causal = _CAUSAL_MASKS.get(key)
    if causal is None:
        causal = torch.ones((sq, sk), dtype=torch.bool, device=mask.device).triu(1)
        _CAUSAL_MASKS.clear()  # one shape at a time in training
        _CAUSAL_MASKS[key] = causal
    if _CHECKED and _CHECKED[0][0]() is mask and _CHECKED[0][1] == mask._version:
        return _CHECKED[0][2]
    verdict = bool(torch.equal(mask, causal.expand_as(mask)))
    _CHECKED[:] = [(weakref.ref(mask), mask._version, verdict)]
    return verdict


def _unsupported(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None) -> str | None:  # fmt: skip
    """Why the fused core cannot compute this call exactly (None: it can)."""
    with quiet_megatron_import():
        from megatron.core.transformer.enums import AttnMaskType

    softmax = module.scale_mask_softmax
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs are not [s, b, heads, dim]"
    sq, sk = query.shape[0], key.shape[0]
    if query.shape[2] % key.shape[2] or value.shape[2] != key.shape[2]:
        return "query heads are not a multiple of the key/value heads"
    if module.training and module.attention_dropout.p > 0:
        return f"attention dropout {module.attention_dropout.p}"
    if getattr(module, "softmax_offset", None) is not None:
        return "softmax with an offset (off-by-one / learnable)"
    if getattr(softmax, "window_size", None) is not None:
        return "sliding-window attention"
    if getattr(softmax, "scale", None) is not None:
        return "query-key layer scaling (apply_query_key_layer_scaling)"
    if mask is None:
        if softmax.attn_mask_type == AttnMaskType.causal and sq != sk:
            return "causal attention with different query and key lengths"
        return None
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        # checking the mask's values needs a device-to-host read, which capture forbids: the unfused path
        # applies the mask as given (megaquant.launch.pretrain passes no dataloader mask, so this is rare)
        return "an attention mask tensor under CUDA-graph capture (its values cannot be checked)"
    if not _is_causal_mask(mask, sq, sk):
        return "an attention mask other than the causal one"
    return None


def fused_core(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> FusedCore | None:
    """The fused core for this DotProductAttention call, or None for the unfused path (see module doc)."""
    with quiet_megatron_import():
        from megatron.core.transformer.enums import AttnMaskType

    choice = os.environ.get(ATTENTION_ENV, "auto")
    if choice not in ("auto", "fused", "unfused"):
        raise ValueNameError(f"{ATTENTION_ENV}={choice!r}: expected auto, fused or unfused")
    if choice == "unfused":
        _note("unfused", f"{ATTENTION_ENV}=unfused")
        return None
    reason = _unsupported(module, query, key, value, attention_mask)
    if reason is None and query.is_cuda:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if _backend_label(q, k, v, "mxfp8", "mxfp8", True) == "reference":
            reason = "the Triton kernels do not cover these shapes/dtypes"
    if reason is not None:
        if choice == "fused":
            raise ValueNameError(f"{ATTENTION_ENV}=fused but this attention call is not supported: {reason}")
        _note("unfused", reason)
        return None
    causal = attention_mask is not None or module.scale_mask_softmax.attn_mask_type == AttnMaskType.causal
    return FusedCore(query, key, value, causal and query.shape[0] > 1, float(module.softmax_scale))
