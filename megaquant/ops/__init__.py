"""Autograd ops the hook sites call: quantized GEMMs (gemm.py) and attention (attention.py) over one
configuration (config.py), each operand quantized by operands.py (with the weight cache, weights.py, and
the shared gradient copies, shared.py), with the run-time state of the recipes (state.py: step, seeds,
amax histories)."""

from __future__ import annotations

from megaquant.ops import attention_core
from megaquant.ops.attention import quant_attention
from megaquant.ops.config import (
    GEMMS,
    QUANT_VALUES,
    ROLES,
    QuantConfig,
    configure,
    environment_defaults,
    quant_config,
)
from megaquant.ops.gemm import quant_baddbmm, quant_bmm, quant_linear, quant_matmul
from megaquant.ops.state import next_step, reset_state

__all__ = [
    "GEMMS",
    "QUANT_VALUES",
    "ROLES",
    "QuantConfig",
    "attention_core",
    "configure",
    "environment_defaults",
    "next_step",
    "quant_baddbmm",
    "quant_bmm",
    "quant_attention",
    "quant_config",
    "quant_linear",
    "quant_matmul",
    "reset_state",
]
