"""The layer specs megaquant trains with: megatron-core's local (non-TE) GPT block, with multi-latent
attention fixed for the DeepSeek-V2-Lite shape (no q-LoRA, `--qk-layernorm`: a KV norm and no Q norm).

Why: the local spec puts the QK norm in both the `q_layernorm` and `kv_layernorm` slots of MLA. Without
q-LoRA there is nothing for a Q norm to normalise (DeepSeek-V2-Lite has only `kv_a_layernorm`), and
megatron-core >= 0.19 refuses such a spec ("q_layernorm=... is non-trivial, but q_lora_rank is None") and
then asks for a fused norm+linear Q projection, which only Transformer Engine has. So for that shape the Q
slot is emptied and `LocalMLASelfAttention` resolves the modules itself: a plain linear Q projection (its
input is already normalised by the layer's input norm), the KV norm kept on the compressed KV. Older
megatron-core (0.16) builds the same modules from the same spec. Megatron is imported inside functions only.
"""

from __future__ import annotations

import functools
from typing import Any

from megaquant.megatron_src import quiet_megatron_import

__all__ = ["gpt_block_spec", "local_mla_attention"]


@functools.cache
def local_mla_attention() -> type:
    """MLASelfAttention that resolves the no-q-LoRA, KV-norm-only shape on the local implementation."""
    with quiet_megatron_import():
        import megatron.core.transformer.multi_latent_attention as mla
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    if not isinstance(getattr(mla, "TELinear", type), type):
        # megatron-core 0.16 without Transformer Engine leaves a MagicMock here, and MLASelfAttention's
        # `isinstance(..., TELinear)` then raises; a class no module is an instance of says "not TE".
        mla.TELinear = type("NoTransformerEngine", (), {})

    class LocalMLASelfAttention(MLASelfAttention):
        """DeepSeek-V2-Lite's attention on local modules: Q = linear(x), KV = norm(compressed KV)."""

        def _resolve_qk_norm_config(self, submodules: Any) -> dict[str, Any]:
            if self.config.q_lora_rank is None and self.config.qk_layernorm:
                return {
                    "linear_q_proj": submodules.linear_q_proj,
                    "linear_q_up_proj": IdentityOp,
                    "linear_kv_up_proj": submodules.linear_kv_up_proj,
                    "q_layernorm": IdentityOp,
                    "kv_layernorm": submodules.kv_layernorm,
                }
            resolved: dict[str, Any] = super()._resolve_qk_norm_config(submodules)
            return resolved

    return LocalMLASelfAttention


def _fix_mla(layer: Any) -> None:
    with quiet_megatron_import():
        from megatron.core.transformer.identity_op import IdentityOp

    attention = layer.submodules.self_attention
    if getattr(attention.submodules, "kv_layernorm", None) is None:  # not MLA
        return
    attention.module = local_mla_attention()
    attention.submodules.q_layernorm = IdentityOp  # no Q norm without q-LoRA (the KV norm stays)


def gpt_block_spec(config: Any, *, normalization: str | None, vp_stage: int | None = None) -> Any:
    """The decoder block spec on local modules (dense and MoE layers as `--moe-layer-freq` says, as
    pretrain_gpt.py builds them), with MLA fixed for configs without q-LoRA."""
    with quiet_megatron_import():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=normalization, vp_stage=vp_stage
    )
    if getattr(config, "multi_latent_attention", False) and getattr(config, "q_lora_rank", None) is None:
        for layer in block.layer_specs:
            _fix_mla(layer)
    return block
