"""Registries against reference/models.md, and the invariants of every generated Megatron argv."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from megaquant.errors import LaunchError, ValueNameError
from megaquant.launch.argv import (
    REFUSED_FLAGS,
    Parallel,
    entry_for,
    megatron_args,
    mla_supported,
    role_values,
    torchrun_argv,
)
from megaquant.launch.datasets import DATASETS
from megaquant.launch.models import MODELS
from megaquant.launch.modes import ATTENTION_MODES, MODES, SEED_MODES, get_mode
from megaquant.launch.presets import PRESETS
from megaquant.spec import ROLES

ROOT = Path("/data")


def _flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} appears {args.count(name)} times"
    return args[args.index(name) + 1]


def _args(model: str, dataset: str | None = "wikipedia", preset: str = "fast", **parallel: int) -> list[str]:
    return megatron_args(
        MODELS[model],
        None if dataset is None else DATASETS[dataset],
        PRESETS[preset],
        Parallel(**parallel),  # type: ignore[arg-type]
        data_root=ROOT,
    )


@pytest.mark.parametrize(
    ("model", "layers", "hidden", "ffn", "heads", "groups", "kv", "eps", "base"),
    [
        ("llama31-8b", 32, 4096, 14336, 32, "8", "128", "1e-05", "500000"),
        ("llama32-1b", 16, 2048, 8192, 32, "8", "64", "1e-05", "500000"),
        ("deepseek2_lite", 27, 2048, 10944, 16, None, None, "1e-06", "10000"),
    ],
)
def test_architectures_match_models_md(
    model: str,
    layers: int,
    hidden: int,
    ffn: int,
    heads: int,
    groups: str | None,
    kv: str | None,
    eps: str,
    base: str,
) -> None:
    args = _args(model)
    assert _flag(args, "--num-layers") == str(layers)
    assert _flag(args, "--hidden-size") == str(hidden)
    assert _flag(args, "--ffn-hidden-size") == str(ffn)
    assert _flag(args, "--num-attention-heads") == str(heads)
    assert (_flag(args, "--num-query-groups") if groups else "--num-query-groups" in args) == (
        groups or False
    )
    assert (_flag(args, "--kv-channels") if kv else "--kv-channels" in args) == (kv or False)
    assert _flag(args, "--norm-epsilon") == eps and _flag(args, "--normalization") == "RMSNorm"
    assert _flag(args, "--rotary-base") == base
    for common in ("--swiglu", "--disable-bias-linear"):
        assert common in args
    assert _flag(args, "--position-embedding-type") == "rope"
    assert _flag(args, "--attention-dropout") == "0" and _flag(args, "--hidden-dropout") == "0"


def test_llama_specifics() -> None:
    one_b, eight_b = _args("llama32-1b"), _args("llama31-8b")
    assert "--untie-embeddings-and-output-weights" not in one_b  # tied
    assert "--untie-embeddings-and-output-weights" in eight_b
    assert "--use-rope-scaling" in one_b and _flag(one_b, "--rope-scaling-factor") == "32"
    assert "--use-rope-scaling" in eight_b and _flag(eight_b, "--rope-scaling-factor") == "8"
    assert _flag(one_b, "--init-method-std") == "0.0134"


def test_deepseek_has_mla_and_moe() -> None:
    args = _args("deepseek2_lite")
    assert "--multi-latent-attention" in args and "--qk-layernorm" in args
    assert _flag(args, "--kv-lora-rank") == "512"  # not Megatron's default 32
    assert _flag(args, "--qk-head-dim") == "128" and _flag(args, "--qk-pos-emb-head-dim") == "64"
    assert _flag(args, "--v-head-dim") == "128" and "--q-lora-rank" not in args
    assert _flag(args, "--rotary-scaling-factor") == "40"
    assert _flag(args, "--mscale") == "0.707" and _flag(args, "--mscale-all-dim") == "0.707"
    assert _flag(args, "--num-experts") == "64" and _flag(args, "--moe-router-topk") == "6"
    assert _flag(args, "--moe-ffn-hidden-size") == "1408"
    assert _flag(args, "--moe-shared-expert-intermediate-size") == "2816"
    assert _flag(args, "--moe-layer-freq") == "([0]+[1]*26)"
    assert eval(_flag(args, "--moe-layer-freq")) == [0] + [1] * 26  # 27 layers, first dense
    assert "--moe-router-pre-softmax" in args
    assert _flag(args, "--moe-router-load-balancing-type") == "seq_aux_loss"
    assert _flag(args, "--moe-aux-loss-coeff") == "1e-3"
    assert _flag(args, "--make-vocab-size-divisible-by") == "3200"
    assert "--moe-grouped-gemm" not in args  # grouped kernels would bypass the hooked linears


def test_modes_cover_the_seed_ten_and_attention_variants() -> None:
    assert len(SEED_MODES) == 10 and SEED_MODES[0] == "bf16"
    assert len(ATTENTION_MODES) == 12  # qk_, pv_, qk_pv_ x mxfp8, mxfp4, hifp8, nvfp4
    nvfp4 = [m for m in MODES if m.endswith("nvfp4")]
    assert nvfp4 == ["FA_nvfp4", "linear_nvfp4", "FA_linear_nvfp4", "qk_nvfp4", "pv_nvfp4", "qk_pv_nvfp4"]
    assert not any(MODES[m].seed for m in nvfp4)  # not one of the original ten
    for mode in MODES.values():
        values = mode.values()
        assert tuple(values) == ROLES  # every mode sets every role
        assert values["linear_fwd"] == values["linear_dgrad"] == values["linear_wgrad"]
    assert set(MODES["bf16"].values().values()) == {"none"}
    assert MODES["FA_mxfp4"].values() == {
        "linear_fwd": "none",
        "linear_dgrad": "none",
        "linear_wgrad": "none",
        "qk": "mxfp4",
        "pv": "none",
    }
    assert MODES["linear_hifp8"].values()["qk"] == "none"
    assert MODES["FA_linear_mxfp8"].values() == {
        "linear_fwd": "mxfp8",
        "linear_dgrad": "mxfp8",
        "linear_wgrad": "mxfp8",
        "qk": "mxfp8",
        "pv": "none",
    }
    assert MODES["pv_hifp8"].values() == {
        "linear_fwd": "none",
        "linear_dgrad": "none",
        "linear_wgrad": "none",
        "qk": "none",
        "pv": "hifp8",
    }
    assert MODES["qk_pv_mxfp4"].values()["qk"] == MODES["qk_pv_mxfp4"].values()["pv"] == "mxfp4"


def test_role_overrides_and_value_names() -> None:
    values = role_values(get_mode("FA_mxfp8"), linear="bf16", pv="hifp8")
    assert values == {
        "linear_fwd": "none",
        "linear_dgrad": "none",
        "linear_wgrad": "none",
        "qk": "mxfp8",
        "pv": "hifp8",
    }
    with pytest.raises(ValueNameError, match="mxfp8"):
        role_values(get_mode("bf16"), qk="fp8")
    with pytest.raises(LaunchError, match="FA_linear_mxfp8"):
        get_mode("FA_linear_fp8")


def test_presets_keep_the_original_values() -> None:
    standard, fast = _args("llama32-1b", preset="standard"), _args("llama32-1b", preset="fast")
    assert (_flag(standard, "--micro-batch-size"), _flag(standard, "--global-batch-size")) == ("1", "128")
    assert _flag(standard, "--seq-length") == "8192" and _flag(standard, "--train-samples") == "47340000"
    assert (_flag(standard, "--lr"), _flag(standard, "--min-lr")) == ("0.00015", "1e-05")
    assert (
        _flag(standard, "--lr-decay-style") == "cosine" and _flag(standard, "--lr-warmup-fraction") == "0.002"
    )
    assert (_flag(fast, "--global-batch-size"), _flag(fast, "--seq-length")) == ("32", "2048")
    assert (_flag(fast, "--train-samples"), _flag(fast, "--lr")) == ("1000", "0.0001")
    for args in (standard, fast):
        assert (_flag(args, "--adam-beta1"), _flag(args, "--adam-beta2")) == ("0.9", "0.95")
        assert (_flag(args, "--weight-decay"), _flag(args, "--clip-grad")) == ("0.1", "1.0")
    assert set(PRESETS) == {"standard", "fast", "smoke", "single-gpu"}


@pytest.mark.parametrize(
    ("model", "dataset", "preset"),
    list(itertools.product(MODELS, [*DATASETS, None], PRESETS)),
)
def test_every_cell_runs_local_bf16_without_refused_flags(
    model: str, dataset: str | None, preset: str
) -> None:
    args = _args(model, dataset, preset)
    assert _flag(args, "--transformer-impl") == "local"
    assert "--bf16" in args and "--fp16" not in args
    assert not [a for a in args if a.startswith("--fp8")]
    for refused in REFUSED_FLAGS:
        assert refused not in args
    assert "--no-gradient-accumulation-fusion" in args  # wgrad GEMM must be the hooked one
    if dataset is None:
        assert "--mock-data" in args
    else:
        assert _flag(args, "--data-path") == str(ROOT / DATASETS[dataset].prefix)


def test_dataset_paths_and_tokenizers() -> None:
    assert DATASETS["wikipedia"].prefix == "dataset/wikipedia_processed/wikipedia_processed_text_document"
    assert DATASETS["dolma"].prefix == "dataset/dolma_processed/dolma_processed_text_document"
    assert DATASETS["dolma"].inputs.endswith(".json.gz")  # the old scripts pointed dolma at wikipedia
    sample = _args("tiny", "sample")
    assert _flag(sample, "--tokenizer-model") == str(ROOT / "tokenizers/megaquant-bpe")
    assert _flag(_args("llama31-8b"), "--tokenizer-type") == "HuggingFaceTokenizer"


@pytest.mark.parametrize("extra", [["--sequence-parallel"], ["--fp8-format", "hybrid"],
                                   ["--transformer-impl", "transformer_engine"],
                                   ["--transformer-impl=transformer_engine"], ["--apply-layernorm-1p"],
                                   ["--moe-grouped-gemm"]])  # fmt: skip
def test_refused_extra_arguments(extra: list[str]) -> None:
    with pytest.raises(LaunchError, match="refused|quantize nothing"):
        megatron_args(MODELS["tiny"], None, PRESETS["smoke"], Parallel(), data_root=ROOT, extra=extra)


def test_parallel_layout() -> None:
    args = _args("deepseek2_lite", tp=2, pp=2, ep=4, nproc_per_node=8, nnodes=2)
    assert _flag(args, "--tensor-model-parallel-size") == "2"
    assert _flag(args, "--expert-model-parallel-size") == "4"
    with pytest.raises(LaunchError, match="no experts"):
        _args("llama32-1b", ep=2, nproc_per_node=2)
    with pytest.raises(LaunchError, match="not divisible"):
        _args("llama32-1b", tp=3, nproc_per_node=4)
    with pytest.raises(LaunchError, match="node-rank"):
        _args("llama32-1b", nnodes=2, node_rank=2)


def test_torchrun_argv(tmp_path: Path) -> None:
    entry = entry_for(tmp_path)  # no pretrain_gpt.py: megaquant's own entry, tree on PYTHONPATH
    assert entry.argv == ("-m", "megaquant.launch.pretrain") and entry.pythonpath == tmp_path
    layout = Parallel(nproc_per_node=8, nnodes=4, node_rank=1, master_addr="node0", master_port=6000)
    argv = torchrun_argv("py", layout, entry, ["--x"])
    assert argv == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "4",
                    "--node-rank", "1", "--master-addr", "node0", "--master-port", "6000",
                    "-m", "megaquant.launch.pretrain", "--x"]  # fmt: skip
    (tmp_path / "pretrain_gpt.py").write_text("")
    rdzv = torchrun_argv("py", Parallel(nnodes=2, master_addr="n0", rdzv_id="42"), entry_for(tmp_path), [])
    assert rdzv[5:] == ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "n0:29500",
                        "--rdzv-id", "42", str(tmp_path / "pretrain_gpt.py")]  # fmt: skip


def test_mla_support_check(tmp_path: Path) -> None:
    attention = tmp_path / "megatron/core/transformer/dot_product_attention.py"
    attention.parent.mkdir(parents=True)
    attention.write_text("class DotProductAttention:\n    def __init__(self, config, layer_number):\n")
    assert not mla_supported(tmp_path)
    attention.write_text(
        "class DotProductAttention:\n    def __init__(\n        self, config,\n"
        "        k_channels: Optional[int] = None,\n        v_channels: Optional[int] = None,\n    ):\n"
    )
    assert mla_supported(tmp_path)


def test_launcher_import_is_cheap() -> None:
    code = (
        "import sys, megaquant.launch.commands, megaquant.launch.launcher, megaquant.data;"
        "print(sorted(m for m in ('torch', 'megatron', 'triton', 'tokenizers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_steps_rewrite_length_schedule_and_eval_interval_together(preset: str) -> None:
    base = PRESETS[preset]
    args = megatron_args(MODELS["tiny"], DATASETS["sample"], base.with_steps(30), Parallel(), data_root=ROOT)
    samples = str(30 * base.global_batch_size)
    assert _flag(args, "--train-samples") == samples and _flag(args, "--lr-decay-samples") == samples
    assert _flag(args, "--eval-interval") == "30" and _flag(args, "--eval-iters") == "0"
    assert _flag(args, "--lr-warmup-fraction") == repr(
        base.lr_warmup_fraction
    )  # a fraction of the new length
    assert _flag(args, "--split") == "100,0,0"  # evaluation off: no validation split to run empty
    assert base.with_steps(30).train_iters == 30 and base.train_samples == PRESETS[preset].train_samples
    with pytest.raises(LaunchError, match="--steps must be >= 1"):
        base.with_steps(0)


@pytest.mark.parametrize("extra", [["--train-iters", "30"], ["--train-samples=100"],
                                   ["--lr-decay-iters", "9"], ["--lr-warmup-iters", "1"]])  # fmt: skip
def test_length_flags_after_double_dash_point_to_steps(extra: list[str]) -> None:
    with pytest.raises(LaunchError, match=r"sample-based.*use `--steps N`"):
        megatron_args(MODELS["tiny"], None, PRESETS["smoke"], Parallel(), data_root=ROOT, extra=extra)
