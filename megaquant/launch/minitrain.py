"""A single-process training loop on megatron-core's own GPT model (local spec), on CPU or one GPU.

Run as `python -m megaquant.launch.minitrain --out DIR ...` with the Megatron tree to train first on
PYTHONPATH (`run_minitrain` does that), so an instrumented tree is the code that trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megaquant.errors import LaunchError, MegaquantError
from megaquant.megatron_src import quiet_megatron_import

if TYPE_CHECKING:
    import torch

__all__ = ["MinitrainConfig", "MinitrainResult", "build_argv", "main", "read_metrics", "run_minitrain"]


@dataclass(frozen=True, kw_only=True)
class MinitrainConfig:
    """A tiny Llama-shaped GPT (RMSNorm, SwiGLU, RoPE, no bias, tied embeddings) and its training run."""

    out: Path
    """Run directory: metrics.jsonl, train.log, minitrain.json."""
    data: Path | None = None
    """Megatron indexed dataset prefix (`<prefix>.bin/.idx`); None: `tokens` must be given."""
    tokens: Path | None = None
    """A .npy file of token ids (alternative to `data`)."""
    vocab_size: int = 0
    """0: one more than the largest token id in the data."""
    layers: int = 2
    hidden: int = 128
    ffn: int = 384
    heads: int = 4
    query_groups: int = 2
    seq_len: int = 128
    micro_batch: int = 4
    steps: int = 50
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 5
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    init_std: float = 0.02
    rope_base: float = 500000.0
    seed: int = 1234
    recipe: str = "default"
    """megaquant.recipes name: `megaquant.ops.configure(recipe=...)` in the training process."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    dtype: str = "auto"
    """"auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32"."""
    log_interval: int = 10
    progress: bool = True


@dataclass(frozen=True)
class MinitrainResult:
    out: Path
    returncode: int
    metrics: tuple[dict[str, float], ...]  # final loss, step time: `megaquant.report.final_loss`, `step_time`


def build_argv(config: MinitrainConfig, python: str = sys.executable) -> list[str]:
    argv = [python, "-m", "megaquant.launch.minitrain"]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def run_minitrain(
    config: MinitrainConfig, megatron_tree: Path, *, timeout_s: float | None = None
) -> MinitrainResult:
    """Train in a subprocess whose `megatron` is imported from `megatron_tree`; stream its output."""
    config.out.mkdir(parents=True, exist_ok=True)
    megaquant_root = Path(__file__).resolve().parents[2]
    paths = [str(Path(megatron_tree).resolve()), str(megaquant_root), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    env.setdefault("PYTHONWARNINGS", "ignore")
    done = subprocess.run(build_argv(config), env=env, timeout=timeout_s, check=False)
    metrics = read_metrics(config.out / "metrics.jsonl")
    if done.returncode != 0:
        log = config.out / "train.log"
        errors = (
            [line for line in log.read_text().splitlines() if line.startswith("error:")]
            if log.is_file()
            else []
        )
        cause = errors[-1] if errors else f"see {log} and the output above"
        raise LaunchError(f"minitrain failed (exit {done.returncode}): {cause}")
    return MinitrainResult(config.out, done.returncode, metrics)


def read_metrics(path: Path) -> tuple[dict[str, float], ...]:
    if not path.is_file():
        return ()
    return tuple(json.loads(line) for line in path.read_text().splitlines() if line.strip())


# ---------------------------------------------------------------- inside the training subprocess


def _parse(argv: Sequence[str]) -> MinitrainConfig:
    parser = argparse.ArgumentParser(prog="python -m megaquant.launch.minitrain", description=__doc__)
    for f in dataclasses.fields(MinitrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        kind: Any = {"int": int, "float": float, "str": str}.get(str(f.type), Path)
        required = f.default is dataclasses.MISSING
        parser.add_argument(flag, type=kind, required=required, default=None if required else f.default)
    ns = parser.parse_args(list(argv))
    return MinitrainConfig(**vars(ns))


def _load_tokens(config: MinitrainConfig) -> Any:
    import numpy as np

    if config.tokens is not None:
        return np.load(config.tokens).astype(np.int64).ravel()
    if config.data is None:
        raise LaunchError("minitrain needs --data PREFIX (Megatron indexed dataset) or --tokens FILE.npy")
    with quiet_megatron_import():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(config.data))
    return np.concatenate([np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset))])


def _cpu_adjustments() -> None:
    """What megatron-core's model code needs to run without CUDA (it otherwise asks for CUDA devices)."""
    import contextlib

    import torch

    with quiet_megatron_import():
        from megatron.core import tensor_parallel, utils
        from megatron.core.tensor_parallel import random as tp_random

    class _NoCudaRngTracker:
        def fork(self, name: str = "") -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext()  # dropout is 0: no random state is consumed in the fork

    tracker = _NoCudaRngTracker()
    for module in (tensor_parallel, tp_random):
        module.get_cuda_rng_tracker = lambda *a, **k: tracker

    def cpu_buffer(self: Any, tensor_shape: Any, dtype: Any, name: str, mem_alloc_context: Any = None) -> Any:
        return torch.empty(tuple(tensor_shape), dtype=dtype)  # baddbmm uses beta=0: contents never read

    utils.GlobalMemoryBuffer.get_tensor = cpu_buffer
    # model code places tensors on `torch.cuda.current_device()` (RoPE frequencies, buffers): the CPU here
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]


def _build_model(config: MinitrainConfig, vocab_size: int, on_cuda: bool) -> torch.nn.Module:
    import torch
    import torch.nn.functional as F

    with quiet_megatron_import():
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig

    tconfig = TransformerConfig(
        num_layers=config.layers,
        hidden_size=config.hidden,
        ffn_hidden_size=config.ffn,
        num_attention_heads=config.heads,
        num_query_groups=config.query_groups,
        kv_channels=config.hidden // config.heads,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=config.init_std,
        use_cpu_initialization=not on_cuda,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=config.seq_len,
        position_embedding_type="rope",
        rotary_base=int(config.rope_base),
        share_embeddings_and_output_weights=True,
        parallel_output=True,
    )


def _log_line(
    step: int, steps: int, samples: int, ms: float, lr: float, batch: int, loss: float, gnorm: float
) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        f" [{stamp}] iteration {step:8d}/{steps:8d} | consumed samples: {samples:12d} | "
        f"elapsed time per iteration (ms): {ms:.1f} | learning rate: {lr:.6E} | "
        f"global batch size: {batch:5d} | "
        f"lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: {gnorm:.3f} | "
        "number of skipped iterations:   0 | number of nan iterations:   0 |"
    )


def train(config: MinitrainConfig) -> int:
    import math
    import socket

    import numpy as np
    import torch

    from megaquant import ops
    from megaquant.ops.layers import install_recipe_bf16_layers

    ops.configure(**{**ops.environment_defaults(), "recipe": config.recipe})  # unknown: fails here, first
    ops.reset_state(seed=config.seed)  # stochastic rounding / Hadamard seeds: reproducible per run
    # CPU: arithmetic on denormals is up to ~50x slower (measured: 1.8 s vs 0.03 s per step). Set before torch
    # starts worker threads, which inherit the flag.
    torch.set_flush_denormal(True)
    on_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if on_cuda and not torch.cuda.is_available():
        raise LaunchError("--device cuda asked for but torch sees no CUDA device")
    device = torch.device("cuda", 0) if on_cuda else torch.device("cpu")
    dtype = config.dtype if config.dtype != "auto" else ("bf16" if on_cuda else "fp32")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    with quiet_megatron_import():
        import megatron.core
        from megatron.core import parallel_state, tensor_parallel

    with socket.socket() as sock:  # a free port for the single-rank process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if on_cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        "nccl" if on_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    parallel_state.initialize_model_parallel()
    if on_cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(config.seed)
    else:
        _cpu_adjustments()

    tokens = _load_tokens(config)
    vocab = config.vocab_size or int(tokens.max()) + 1
    window = config.seq_len + 1
    starts = np.arange(0, len(tokens) - window, config.seq_len)
    if len(starts) < config.micro_batch:
        raise LaunchError(
            f"only {len(tokens)} tokens: too few for batches of {config.micro_batch} × {window}"
        )
    order = np.random.RandomState(config.seed).permutation(len(starts))  # fixed data order for every mode

    torch.manual_seed(config.seed)
    model = _build_model(config, vocab, on_cuda).to(device)
    bf16_layers, _ = install_recipe_bf16_layers(model, config.layers)  # the recipe's BF16 layers, if any
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    mask = torch.triu(torch.ones(config.seq_len, config.seq_len, dtype=torch.bool, device=device), 1)[
        None, None
    ]
    positions = torch.arange(config.seq_len, device=device)[None].expand(config.micro_batch, -1)

    def lr_at(step: int) -> float:
        if step <= config.warmup:
            return config.lr * step / max(1, config.warmup)
        frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))

    config.out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    manifest = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        "megatron_path": str(Path(megatron.core.__file__).resolve().parents[1]),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "dtype": dtype,
        "recipe": config.recipe,
        "bf16_layers": list(bf16_layers),  # the recipe's layers kept unquantized (1-based)
        "vocab_size": vocab,
        "parameters": n_params,
        "tokens": len(tokens),
    }
    (config.out / "minitrain.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log = (config.out / "train.log").open("w")
    metrics = (config.out / "metrics.jsonl").open("w")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(
        f"megatron from {manifest['megatron_path']}; {n_params:,} parameters; "
        f"device {manifest['device']}; {dtype}"
    )
    progress = _progress(config.steps) if config.progress else None
    model.train()
    for step in range(1, config.steps + 1):
        picks = [order[((step - 1) * config.micro_batch + i) % len(order)] for i in range(config.micro_batch)]
        batch = np.stack([tokens[starts[j] : starts[j] + window] for j in picks])
        batch_t = torch.from_numpy(batch).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ops.next_step()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            per_token = model(batch_t[:, :-1], positions, mask, labels=batch_t[:, 1:])
        loss = per_token.float().mean()
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad))
        optimizer.step()
        loss_value = float(loss.detach())
        if on_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if on_cuda else _peak_rss()
        record = {"step": step, "loss": loss_value, "step_time_s": elapsed, "peak_mem_bytes": peak}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if not math.isfinite(loss_value):
            say(f"loss is {loss_value} at step {step}: stopping")
            return 3
        if step % config.log_interval == 0 or step == config.steps:
            line = _log_line(
                step,
                config.steps,
                step * config.micro_batch,
                elapsed * 1e3,
                lr_at(step),
                config.micro_batch,
                loss_value,
                gnorm,
            )
            if progress is not None:
                progress.console.print(line, highlight=False, soft_wrap=True)
                log.write(line + "\n")
                log.flush()
            else:
                say(line)
        if progress is not None:
            progress.update(progress.task_ids[0], advance=1, description=f"loss {loss_value:.3f}")
    if progress is not None:
        progress.stop()
    metrics.close()
    log.close()
    torch.distributed.destroy_process_group()
    return 0


def _progress(total: int) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    progress.add_task("", total=total)
    progress.start()
    return progress


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; process peak on CPU


def main(argv: Sequence[str] | None = None) -> int:
    config = _parse(sys.argv[1:] if argv is None else argv)
    try:
        return train(config)
    except MegaquantError as exc:  # a LaunchError, or an unknown/refused recipe
        print(f"error: {exc}", file=sys.stderr)
        config.out.mkdir(parents=True, exist_ok=True)
        with (config.out / "train.log").open("a") as log:
            log.write(f"error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
