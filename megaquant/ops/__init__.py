"""Autograd ops the hook sites call: quantized GEMMs (gemm.py) and attention (attention.py) over one
configuration (config.py)."""

from __future__ import annotations

from megaquant.ops import attention_core
from megaquant.ops.attention import quant_attention
from megaquant.ops.config import QUANT_VALUES, ROLES, QuantConfig, configure, quant_config
from megaquant.ops.gemm import quant_baddbmm, quant_bmm, quant_linear, quant_matmul

__all__ = [
    "QUANT_VALUES",
    "ROLES",
    "QuantConfig",
    "attention_core",
    "configure",
    "quant_baddbmm",
    "quant_bmm",
    "quant_attention",
    "quant_config",
    "quant_linear",
    "quant_matmul",
]
