"""megaquant's own GPT pretrain entry on `megatron.training.pretrain`, for trees without pretrain_gpt.py.

Run `torchrun ... -m megaquant.launch.pretrain <megatron args> [--mq-metrics FILE]` with the Megatron tree
first on PYTHONPATH, so an instrumented tree is the code that trains. Megatron is imported in main() only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from megaquant.errors import LaunchError, MegaquantError
from megaquant.launch.argv import REFUSED_FLAGS  # one list for the launcher and this entry
from megaquant.megatron_src import quiet_megatron_import

if TYPE_CHECKING:
    import torch

_PROGRAM_START = time.time()
"""When this entry's module was imported: the worker's start as far as megaquant can see it (torchrun
spawned it; only the interpreter and megaquant's light imports came before). Handed to Megatron's
startup timers in main()."""

__all__ = [
    "REFUSED_FLAGS",
    "WEIGHT_CACHE_DEFAULT_FRACTION",
    "WEIGHT_CACHE_ENV",
    "StepRecord",
    "add_megaquant_args",
    "build_gpt",
    "count_expert_gemms",
    "gpt_datasets",
    "keep_bf16_layers",
    "loss_from_reduced",
    "main",
    "masked_lm_loss",
    "metrics_rank",
    "prepare_argv",
    "step_record",
    "weight_cache_bound",
    "weight_cache_off_reason",
    "weight_cache_pays",
    "weight_cache_saving",
]


_FORCED_OFF = (
    "--no-gradient-accumulation-fusion",  # the wgrad GEMM must be the hooked matmul, not a fused CUDA kernel
    "--no-masked-softmax-fusion",  # no compiled Megatron fused kernels on a pip install
    "--no-rope-fusion",  # the fused RoPE kernel needs Transformer Engine
    "--no-persist-layer-norm",
)


_NO_DATALOADER_MASK = "--no-create-attention-mask-in-dataloader"
"""GPT's mask is causal by construction unless documents reset it: without a dataloader mask the attention
gets `attention_mask=None` with the causal mask type (the unfused softmax builds the same causal mask), so the
fused core needs no per-call check that a mask tensor is causal, a device-to-host sync that stalls the launch
queue at every layer and cannot run under CUDA-graph capture."""


def prepare_argv(argv: Sequence[str]) -> list[str]:
    """The Megatron argv this entry trains with: local transformer implementation, fusions that bypass
    the hooked GEMMs (or need Transformer Engine / apex) turned off, no dataloader attention mask unless
    `--reset-attention-mask` makes the mask per document. Pure.

    Raises LaunchError for `--transformer-impl transformer_engine` (the hooks live in the local modules:
    a TE run would silently quantize nothing) and for the flags in REFUSED_FLAGS.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        flag, _, inline = arg.partition("=")
        if flag in REFUSED_FLAGS:
            raise LaunchError(f"argv[{i}] {arg!r}: refused, {REFUSED_FLAGS[flag]}; remove it")
        if flag == "--transformer-impl":
            value = inline or (out[i + 1] if i + 1 < len(out) else "")
            if value != "local":
                raise LaunchError(
                    f"argv[{i}] --transformer-impl {value or '(missing)'}: megaquant's hooks live in the "
                    "local (non-Transformer-Engine) modules; a TE run would quantize nothing. "
                    "Use --transformer-impl local"
                )
    if not any(a.partition("=")[0] == "--transformer-impl" for a in out):
        out += ["--transformer-impl", "local"]
    out += [flag for flag in _FORCED_OFF if flag not in out]
    flags = {a.partition("=")[0] for a in out}
    if not flags & {"--reset-attention-mask", _NO_DATALOADER_MASK}:
        out.append(_NO_DATALOADER_MASK)
    return out


def add_megaquant_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's `extra_args_provider`: megaquant's own options (kept out of Megatron's namespace clash)."""
    group = parser.add_argument_group("megaquant")
    group.add_argument(
        "--mq-metrics",
        type=Path,
        default=None,
        help="Write one JSON object per step (step, loss, step_time_s, peak_mem_bytes) here (the last "
        "rank, which holds the reported loss).",
    )
    group.add_argument(
        "--mq-validation-seed",
        type=int,
        default=None,
        help="Shuffle the validation split with this seed instead of --seed: runs of different seeds then "
        "evaluate the same validation batches, in the same order (default: --seed, Megatron's behaviour).",
    )
    return parser


@dataclass(frozen=True)
class StepRecord:
    """One line of metrics.jsonl."""

    step: int
    loss: float
    step_time_s: float
    peak_mem_bytes: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "step": self.step,
                "loss": self.loss,
                "step_time_s": self.step_time_s,
                "peak_mem_bytes": self.peak_mem_bytes,
            }
        )


def metrics_rank(environ: Mapping[str, str]) -> bool:
    """Whether this training process writes metrics.jsonl: the last rank (torchrun's RANK = WORLD_SIZE - 1).
    Megatron reduces the loss on the last pipeline stage only (the other stages' train_step returns an
    empty loss dict) and logs it from the last rank; with one stage every rank has it. Rank 0 used to
    write, which left metrics.jsonl empty under pipeline parallelism. Pure."""
    rank = int(environ.get("RANK", "0") or 0)
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    return rank == world - 1


def loss_from_reduced(loss_dict: Mapping[str, Any], key: str = "lm loss") -> float | None:
    """The scalar loss of a step from `train_step`'s reduced loss dict (tensor or float); None if absent."""
    value = loss_dict.get(key)
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().float()
        if value.numel() == 2:  # [sum, count] (per-token reporting not reduced yet)
            return float(value[0] / value[1].clamp(min=1))
        return float(value.mean())
    return float(value)


def step_record(
    step: int, loss_dict: Mapping[str, Any], elapsed_s: float, peak_bytes: int
) -> StepRecord | None:
    loss = loss_from_reduced(loss_dict)
    return None if loss is None else StepRecord(step, loss, elapsed_s, peak_bytes)


def masked_lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple[Any, Any, dict[str, Any]]:
    """Megatron's loss_func contract (3 values: summed loss, token count, reporting [sum, count])."""
    import torch

    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    report = torch.cat([total.detach().view(1), tokens.float().view(1)])
    return total, tokens, {"lm loss": report}


# ---------------------------------------------------------------- inside torchrun (needs megatron + CUDA)


def build_gpt(
    config: Any,
    args: Any,
    *,
    vocab_size: int,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection: Any = None,
) -> Any:
    """A GPTModel on megatron-core's local (non-TE) block spec (`megaquant.launch.layer_spec`), so the
    hooked GEMMs are the ones that run. `args`: Megatron's parsed arguments (a namespace or a mapping)."""
    with quiet_megatron_import():
        from megatron.core.models.gpt import GPTModel

    from megaquant.launch.layer_spec import gpt_block_spec

    def arg(name: str) -> Any:
        return args[name] if isinstance(args, Mapping) else getattr(args, name)

    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, normalization=arg("normalization"), vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=arg("max_position_embeddings"),
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=arg("fp16_lm_cross_entropy"),
        parallel_output=True,
        share_embeddings_and_output_weights=not arg("untie_embeddings_and_output_weights"),
        position_embedding_type=arg("position_embedding_type"),
        rotary_percent=arg("rotary_percent"),
        rotary_base=arg("rotary_base"),
        rope_scaling=arg("use_rope_scaling"),
        rope_scaling_factor=arg("rope_scaling_factor"),
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def _model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
) -> Any:
    """Megatron's model provider: `build_gpt` from the parsed arguments (what `megaquant train` trains)."""
    with quiet_megatron_import():
        from megatron.training import get_args
        from megatron.training.argument_utils import core_transformer_config_from_args

    args = get_args()
    model = build_gpt(
        core_transformer_config_from_args(args),
        args,
        vocab_size=args.padded_vocab_size,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    keep_bf16_layers(model, args.num_layers)
    count_expert_gemms(model)
    return model


def count_expert_gemms(model: Any) -> int:
    """Open megaquant.ops.counters' "experts" scope around the forward of every MoE layer's experts in this
    model chunk (an MoELayer's `experts` module: SequentialMLP on the local spec), so each rank's path
    counts say how many of its own expert GEMMs ran on which path (expert parallelism puts different
    experts on each rank). Returns the number of expert modules hooked."""
    from megaquant.ops import counters

    hooked = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if experts is None or not hasattr(module, "num_local_experts") or not hasattr(experts, "forward"):
            continue
        experts.register_forward_pre_hook(lambda *_: counters.push_scope("experts"))
        experts.register_forward_hook(lambda *_: counters.pop_scope())
        hooked += 1
    return hooked


def keep_bf16_layers(model: Any, num_layers: int) -> tuple[int, ...]:
    """The configured recipe's BF16 layers (megaquant.ops.layers) on this model chunk, and one log line
    saying which: the recipe's set of the model's `num_layers`, and the share this chunk holds (Megatron's
    layer numbers are global, so each pipeline stage and virtual chunk hooks its own)."""
    from megaquant.ops.config import _DEFAULTS
    from megaquant.ops.layers import install_recipe_bf16_layers

    wanted, hooked = install_recipe_bf16_layers(model, num_layers)
    if wanted:
        rank = os.environ.get("RANK", "0")
        print(
            f"megaquant: BF16 layers (recipe {_DEFAULTS.get('recipe')}): {', '.join(map(str, wanted))} of "
            f"{num_layers}; rank {rank} holds {', '.join(map(str, hooked)) or 'none'} of them in this chunk",
            file=sys.stderr,
            flush=True,
        )
    return hooked


def gpt_datasets(
    num_samples: Sequence[int],
    *,
    seed: int,
    validation_seed: int | None,
    make_config: Callable[[int], Any],
    build: Callable[[Any, Sequence[int]], Sequence[Any]],
) -> list[Any]:
    """Megatron's [train, valid, test] datasets: all from `make_config(seed)`, except the validation split
    from `make_config(validation_seed)` when that is given and differs. GPTDataset shuffles each split's
    documents and samples by the config's random seed, so a fixed validation seed gives every run the
    same validation samples in the same order, while training data still follows the run's seed. The
    second build makes the validation split only (its split matrix keeps just the validation documents'
    range, so a large training split is not indexed twice), cached under its config's hash."""
    datasets = list(build(make_config(seed), num_samples))
    if validation_seed is not None and validation_seed != seed:
        config = make_config(validation_seed)
        matrix = getattr(config, "split_matrix", None)
        if isinstance(matrix, list) and len(matrix) == 3:  # None for a split: Megatron skips building it
            config.split_matrix = [None, matrix[1], None]
        datasets[1] = build(config, num_samples)[1]
    return datasets


def _datasets_provider(train_val_test_num_samples: Sequence[int], vp_stage: int | None = None) -> Any:
    """GPTDataset (or MockGPTDataset with --mock-data) over Megatron indexed data, built on every rank;
    the validation split shuffled by --mq-validation-seed when given (`gpt_datasets`)."""
    with quiet_megatron_import():
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
        from megatron.training import get_args, get_tokenizer
        from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    kind = MockGPTDataset if args.mock_data else GPTDataset

    def make_config(seed: int) -> Any:
        return GPTDatasetConfig(
            random_seed=seed,
            sequence_length=args.seq_length,
            blend=blend,
            blend_per_split=blend_per_split,
            split=args.split,
            path_to_cache=args.data_cache_path,
            tokenizer=get_tokenizer(),
            reset_position_ids=args.reset_position_ids,
            reset_attention_mask=args.reset_attention_mask,
            eod_mask_loss=args.eod_mask_loss,
            create_attention_mask=args.create_attention_mask_in_dataloader,
            mmap_bin_files=args.mmap_bin_files,
        )

    def build(config: Any, num_samples: Sequence[int]) -> Sequence[Any]:
        return BlendedMegatronDatasetBuilder(kind, list(num_samples), lambda: True, config).build()

    return gpt_datasets(
        train_val_test_num_samples,
        seed=args.seed,
        validation_seed=getattr(args, "mq_validation_seed", None),
        make_config=make_config,
        build=build,
    )


_datasets_provider.is_distributed = True  # type: ignore[attr-defined]  # every rank reads its own loader


def _forward_step(data_iterator: Any, model: Any, checkpoint_activations_microbatch: Any = None) -> Any:
    import functools

    import torch

    batch = next(data_iterator)
    device = torch.cuda.current_device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    positions = batch["position_ids"].to(device, non_blocking=True)
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = mask.to(device, non_blocking=True)
    output = model(tokens, positions, mask, labels=labels)
    return output, functools.partial(masked_lm_loss, loss_mask)


WEIGHT_CACHE_ENV = "MEGAQUANT_WEIGHT_CACHE"
"""Quantize each weight once per optimizer step (megaquant.ops.weights). Unset (default): on, holding at
most WEIGHT_CACHE_DEFAULT_FRACTION of the GPU's memory; `on`: no bound; `off`: quantize at every use; a
number: on, at most that many MiB."""
WEIGHT_CACHE_DEFAULT_FRACTION = 0.05


def weight_cache_bound(value: str | None, device_bytes: int) -> tuple[bool, int | None]:
    """(enabled, max_bytes) from the MEGAQUANT_WEIGHT_CACHE value and the GPU's memory. Pure."""
    if value is None or not value.strip():
        return True, int(WEIGHT_CACHE_DEFAULT_FRACTION * device_bytes)
    text = value.strip().lower()
    if text in ("on", "1", "true", "yes"):
        return True, None
    if text in ("off", "0", "false", "no"):
        return False, None
    try:
        mib = float(text)
    except ValueError:
        raise LaunchError(f"{WEIGHT_CACHE_ENV}={value!r}: expected on, off or a size in MiB") from None
    if mib < 0:
        raise LaunchError(f"{WEIGHT_CACHE_ENV}={value!r}: a size in MiB must be >= 0")
    return True, int(mib * 2**20)


WEIGHT_CACHE_MIN_SAVING = 0.02
"""The default caches weight copies only where they are predicted to save at least this share of a step."""
_WEIGHT_QUANT_TOKENS = 160
"""One quantization of a weight costs about what the step's GEMMs through it cost for 160 tokens: a weight
element is read and written once per quantization (memory-bound), and takes 6 multiply-adds per token in
the forward and backward GEMMs (compute-bound), so the ratio depends on the tokens only. Measured on one
H200 at the 1B single-gpu preset (8 microbatches of 2048 tokens): the cache saved 21 ms of a 305 ms
step (docs/benchmarks.md §6d), 7/8 x 160 / 2048 = 6.8 %."""


def weight_cache_saving(*, microbatches: int, recompute: bool, tokens_per_microbatch: int) -> float:
    """The predicted share of a step that caching the weight copies saves. A copy is used once per
    microbatch (twice with a recomputed forward); the cache saves all uses but the first, each costing
    `_WEIGHT_QUANT_TOKENS / tokens_per_microbatch` of its microbatch's GEMM time. Pure."""
    uses = max(1, microbatches) * (2 if recompute else 1)
    return (uses - 1) / uses * _WEIGHT_QUANT_TOKENS / max(1, tokens_per_microbatch)


def weight_cache_pays(*, microbatches: int, recompute: bool, tokens_per_microbatch: int) -> bool:
    """Whether the default caches a step's weight copies: only where a copy is used again in one optimizer
    step (several microbatches, or a recomputed forward) *and* that saves at least
    WEIGHT_CACHE_MIN_SAVING of the step, since the cache holds one bf16 copy per cached operand of every
    quantized weight (two for MX and NVFP4 weights, one for HiF8). With long microbatches the saving is
    small: the 8B shape at seq 8192 with 2 microbatches would pay 1.6 GiB of copies (measured on an H200:
    peak 12.60 GiB with them, 10.98 without) for ~1 % of its step. Pure."""
    saving = weight_cache_saving(
        microbatches=microbatches, recompute=recompute, tokens_per_microbatch=tokens_per_microbatch
    )
    return saving >= WEIGHT_CACHE_MIN_SAVING


def weight_cache_off_reason(*, microbatches: int, recompute: bool, tokens: int) -> str:
    """Why the default leaves the weight cache off (for the run log and the manifest). Pure."""
    if microbatches <= 1 and not recompute:
        return "one microbatch per step and no recomputation: each weight copy would be used once"
    saving = weight_cache_saving(microbatches=microbatches, recompute=recompute, tokens_per_microbatch=tokens)
    return (
        f"{microbatches} microbatch(es) of {tokens} tokens per step: caching would save ~{saving:.1%} of a "
        f"step (below {WEIGHT_CACHE_MIN_SAVING:.0%}) for one bf16 copy per quantized weight operand"
    )


def _timed_train_step(original: Callable[..., Any], sink: IO[str] | None) -> Callable[..., Any]:
    """Wrap megatron.training.training.train_step: per-step wall time (synchronized) and peak memory; each
    call is one optimizer step for megaquant.ops (the weight cache starts over, the counters count it)."""
    import torch

    from megaquant import ops
    from megaquant.ops import counters, shared, weights

    state = {"step": 0}

    def train_step(*args: Any, **kwargs: Any) -> Any:
        ops.next_step()  # stochastic rounding / Hadamard seeds and amax histories advance per step
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        weights.next_step()
        try:
            result = original(*args, **kwargs)
        finally:
            weights.next_step()  # the optimizer changed the weights; free the copies until the next step
            shared.clear()  # a gradient copy no wgrad took (memory only: a stale one is never served)
            counters.mark_step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        state["step"] += 1
        record = step_record(state["step"], result[0], elapsed, torch.cuda.max_memory_allocated())
        if sink is not None and record is not None:
            sink.write(record.to_json() + "\n")
            sink.flush()
        return result

    return train_step


def _check_graph_recipe() -> None:
    """Refuse a recipe whose per-step host state a replayed CUDA graph would freeze (launch.graphs)."""
    from megaquant.launch.graphs import recipe_blockers
    from megaquant.recipes import DEFAULT_RECIPE, RECIPE_ENV, get_recipe

    recipe = get_recipe(os.environ.get(RECIPE_ENV) or DEFAULT_RECIPE)
    blockers = recipe_blockers(recipe)
    if blockers:
        raise LaunchError(
            f"--cuda-graph-impl full_iteration with recipe {recipe.name}: {'; '.join(blockers)}, which a "
            "replayed graph would repeat every step; train without it (megaquant train --cuda-graphs off)"
        )


def _counted_evaluate(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap megatron.training.training.evaluate: validation GEMMs are counted apart from the steps', and
    the pass leaves the recipes' training state alone (megaquant.ops.state.evaluation: delayed scaling
    scales by the current amax there and records nothing)."""
    from megaquant.ops import counters, state

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        with counters.evaluation(), state.evaluation():
            return original(*args, **kwargs)

    return evaluate


def _use_prebuilt_dataset_helpers() -> None:
    """Megatron's initialize runs `make` in megatron/core/datasets, which a pip-installed megatron-core
    cannot do (no Makefile) and does not need (the wheel ships the compiled helpers_cpp module)."""
    with quiet_megatron_import():
        from megatron.core.datasets import utils

    original = utils.compile_helpers

    def compile_helpers() -> None:
        try:
            with quiet_megatron_import():
                import megatron.core.datasets.helpers_cpp  # noqa: F401
        except ImportError:
            original()

    utils.compile_helpers = compile_helpers


def _register_startup(training: Any, main_entry: float) -> None:
    """Give Megatron's startup timers (megatron-core >= 0.17's `set_startup_timestamps`) this worker's
    start and the end of main()'s imports, so its log splits the start-up into the library imports
    (torch, Megatron), this entry's own set-up (argument parsing, the weight cache) and Megatron's
    initialization ("startup-*" timer rows and "[before library-setup] datetime:" lines, which the results
    driver keeps in timing.log). Older Megatron has no such hook: nothing is registered."""
    register = getattr(training, "set_startup_timestamps", None)
    if callable(register):
        register(program_start=_PROGRAM_START, main_entry=main_entry)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from megaquant import ops

    ops.configure(**ops.environment_defaults())  # MEGAQUANT_RECIPE (the launcher's --recipe): checked now
    argv = prepare_argv(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *argv]  # Megatron's parser reads sys.argv

    with quiet_megatron_import():
        from megatron.core.enums import ModelType
        from megatron.training import training
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args
    main_entry = time.time()  # the libraries are imported: what follows is this entry's own set-up

    args = parse_and_validate_args(extra_args_provider=add_megaquant_args)
    ops.reset_state(seed=args.seed)
    cfg = pretrain_cfg_container_from_args(args, None)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    sink = None
    if args.mq_metrics is not None and metrics_rank(os.environ):
        args.mq_metrics.parent.mkdir(parents=True, exist_ok=True)
        sink = args.mq_metrics.open("w")
    from megaquant.ops import counters, weights

    device_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    setting = os.environ.get(WEIGHT_CACHE_ENV)
    enabled, max_bytes = weight_cache_bound(setting, device_bytes)
    dp = max(1, int(getattr(args, "data_parallel_size", 1) or 1))
    microbatches = max(1, int(args.global_batch_size) // (int(args.micro_batch_size) * dp))
    recompute = getattr(args, "recompute_granularity", None) is not None
    given = (setting or "").strip()
    reason = f"{WEIGHT_CACHE_ENV}={given}" if given else "default"
    tokens = int(args.micro_batch_size) * int(args.seq_length)
    if (
        enabled
        and not given
        and not weight_cache_pays(
            microbatches=microbatches, recompute=recompute, tokens_per_microbatch=tokens
        )
    ):
        enabled = False
        reason = weight_cache_off_reason(microbatches=microbatches, recompute=recompute, tokens=tokens)
        if rank0:
            print(f"megaquant: weight cache off: {reason} ({WEIGHT_CACHE_ENV}=on caches anyway)", flush=True)
    counters.note_weight_cache(enabled, reason)
    if enabled:
        weights.enable_weight_cache(max_bytes)
    if getattr(args, "cuda_graph_impl", "none") == "full_iteration":
        _check_graph_recipe()
        counters.expect_graph(int(args.cuda_graph_warmup_steps) + 1)
    training.train_step = _timed_train_step(training.train_step, sink)
    training.evaluate = _counted_evaluate(training.evaluate)
    _use_prebuilt_dataset_helpers()
    torch.backends.cuda.matmul.allow_tf32 = False  # bf16 GEMMs either way; keep fp32 paths exact
    _register_startup(training, main_entry)
    try:
        training.pretrain(
            cfg,
            _datasets_provider,
            ModelType.encoder_or_decoder,
            _forward_step,
            model_provider=_model_provider,
        )
    finally:
        counters.write()  # $MEGAQUANT_PATH_COUNTS (set by megaquant train); also written at exit
    if sink is not None:
        sink.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MegaquantError as exc:  # a LaunchError, or a refused recipe
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
