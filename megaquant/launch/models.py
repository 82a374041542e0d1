"""Model registry: the exact architectures of reference/models.md as Megatron arguments, one table."""

from __future__ import annotations

from dataclasses import dataclass

from megaquant.errors import LaunchError

__all__ = ["MODELS", "Model", "get_model"]


@dataclass(frozen=True, kw_only=True)
class Model:
    """One architecture. Fields are the numbers a reader checks against the model card."""

    name: str
    title: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None
    """GQA groups; None for multi-latent attention."""
    kv_channels: int | None
    """Head dim; None where MLA sets its own head dims."""
    norm_epsilon: float
    rotary_base: int
    tied_embeddings: bool
    vocab_size: int
    max_position_embeddings: int
    init_method_std: float
    tokenizer: str
    """Hugging Face tokenizer (hub name or local directory) for `--tokenizer-model`."""
    make_vocab_size_divisible_by: int = 128
    mla: bool = False
    moe: bool = False
    extra: tuple[str, ...] = ()
    """Architecture flags beyond the common fields (RoPE scaling, MLA, MoE)."""

    def megatron_args(self) -> list[str]:
        args = [
            "--num-layers", str(self.num_layers),
            "--hidden-size", str(self.hidden_size),
            "--ffn-hidden-size", str(self.ffn_hidden_size),
            "--num-attention-heads", str(self.num_attention_heads),
        ]  # fmt: skip
        if self.num_query_groups is not None:
            args += ["--group-query-attention", "--num-query-groups", str(self.num_query_groups)]
        if self.kv_channels is not None:
            args += ["--kv-channels", str(self.kv_channels)]
        args += [
            "--normalization", "RMSNorm",
            "--norm-epsilon", repr(self.norm_epsilon),
            "--swiglu",
            "--disable-bias-linear",
            "--position-embedding-type", "rope",
            "--rotary-percent", "1.0",
            "--rotary-base", str(self.rotary_base),
            "--attention-dropout", "0",
            "--hidden-dropout", "0",
            "--max-position-embeddings", str(self.max_position_embeddings),
            "--make-vocab-size-divisible-by", str(self.make_vocab_size_divisible_by),
            "--init-method-std", repr(self.init_method_std),
        ]  # fmt: skip
        if not self.tied_embeddings:
            args.append("--untie-embeddings-and-output-weights")
        return args + list(self.extra)


_DEEPSEEK_MLA = (
    "--multi-latent-attention",
    "--kv-lora-rank", "512",  # Megatron's CLI default is 32
    "--qk-head-dim", "128",
    "--qk-pos-emb-head-dim", "64",
    "--v-head-dim", "128",
    "--qk-layernorm",
    "--rotary-scaling-factor", "40",
    "--mscale", "0.707",
    "--mscale-all-dim", "0.707",
)  # fmt: skip
# No --moe-grouped-gemm: the grouped kernels bypass the local linear layers, so expert GEMMs would run
# unquantized; SequentialMLP keeps every expert on the hooked ColumnParallel/RowParallel linears.
_DEEPSEEK_MOE = (
    "--num-experts", "64",
    "--moe-router-topk", "6",
    "--moe-ffn-hidden-size", "1408",
    "--moe-shared-expert-intermediate-size", "2816",
    "--moe-layer-freq", "([0]+[1]*26)",
    "--moe-router-pre-softmax",
    "--moe-router-load-balancing-type", "seq_aux_loss",
    "--moe-aux-loss-coeff", "1e-3",
    "--moe-token-dispatcher-type", "alltoall",
)  # fmt: skip

MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model(
            name="llama31-8b",
            title="Llama-3.1-8B",
            num_layers=32,
            hidden_size=4096,
            ffn_hidden_size=14336,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=128,
            norm_epsilon=1e-5,
            rotary_base=500000,
            tied_embeddings=False,
            vocab_size=128256,
            max_position_embeddings=131072,
            init_method_std=0.02,
            tokenizer="meta-llama/Llama-3.1-8B",
            extra=("--use-rope-scaling", "--rope-scaling-factor", "8"),
        ),
        Model(
            name="llama32-1b",
            title="Llama-3.2-1B",
            num_layers=16,
            hidden_size=2048,
            ffn_hidden_size=8192,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=64,
            norm_epsilon=1e-5,
            rotary_base=500000,
            tied_embeddings=True,
            vocab_size=128256,
            max_position_embeddings=131072,
            init_method_std=0.0134,
            tokenizer="meta-llama/Llama-3.2-1B",
            extra=("--use-rope-scaling", "--rope-scaling-factor", "32"),
        ),
        Model(
            name="deepseek2_lite",
            title="DeepSeek-V2-Lite (MLA + MoE)",
            num_layers=27,
            hidden_size=2048,
            ffn_hidden_size=10944,
            num_attention_heads=16,
            num_query_groups=None,
            kv_channels=None,
            norm_epsilon=1e-6,
            rotary_base=10000,
            tied_embeddings=False,
            vocab_size=102400,
            max_position_embeddings=163840,
            init_method_std=0.02,
            tokenizer="deepseek-ai/DeepSeek-V2-Lite",
            make_vocab_size_divisible_by=3200,
            mla=True,
            moe=True,
            extra=_DEEPSEEK_MLA + _DEEPSEEK_MOE,
        ),
        Model(
            name="tiny",
            title="tiny Llama-shaped smoke model (~5 M parameters + embeddings)",
            num_layers=4,
            hidden_size=256,
            ffn_hidden_size=704,
            num_attention_heads=4,
            num_query_groups=2,
            kv_channels=64,
            norm_epsilon=1e-5,
            rotary_base=10000,
            tied_embeddings=True,
            vocab_size=128256,
            max_position_embeddings=8192,
            init_method_std=0.02,
            tokenizer="meta-llama/Llama-3.2-1B",
        ),
    )
}
"""Every model the launcher knows, by name; `--list`, CLI choices, docs and scripts read this."""


def get_model(name: str) -> Model:
    try:
        return MODELS[name]
    except KeyError:
        raise LaunchError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None
