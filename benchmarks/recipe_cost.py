"""What a recipe adds to a training step, GEMM by GEMM: the RHT, stochastic rounding, 2-D weight tiles.

The results runs measured the step-state recipes far above their predictions under the CUDA graph
(docs/benchmarks.md §6i: `mxfp4_tseng` 1.73x bf16 at the 8B cut, `nvfp4_paper` 1.58x at the 1B shape,
where MXFP8 costs 1.02-1.06x). This script splits that cost (its session-17 run, §6j, led to the one-pass
transform and pre-scale kernels; it times whatever the library runs now): for each
linear layer of a model cut (default: the 8B cut of docs/results, 2 x 8192 tokens per step) it times the
three GEMMs a hooked linear layer runs (fprop, dgrad, wgrad) through `megaquant.ops.quant_matmul` as the
hooks call it (value, grad, gemm, role; the recipe passed as a keyword where training configures it once
from MEGAQUANT_RECIPE), and, for the recipes with a Hadamard transform, the
transform alone (`megaquant.ops.operands.hadamard_pair`), and (since session 18) the matmul alone on the
operands the recipe hands it (`recipe_operands`): what is left is the operands' preparation, so the split
says whether an extra sits in the quantizers or in the GEMM reading their output. Per variant it sums a
step: the layer's GEMMs times the layers, against the plain bf16 matmuls of the same shapes.

    PYTHONPATH=. python3 benchmarks/recipe_cost.py --out DIR            # GPU: CUDA-graph replay timing
    PYTHONPATH=. python3 benchmarks/recipe_cost.py --device cpu --tokens 64 --scale 64 --out DIR   # smoke

On CUDA every call is timed as a CUDA-graph replay (triton's do_bench_cudagraph, median), as the results
runs train under Megatron's full-iteration graph: kernel time, no launch overhead. On the CPU the numbers
are wall times of the reference path and mean nothing for the GPU; the CPU run exists so the script is
tested. Writes DIR/recipe_cost.json and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megaquant.ops.config import QuantConfig

VARIANTS: tuple[str, ...] = (
    "mxfp8+default",
    "mxfp4+default",
    "mxfp4+sr_gradients",
    "mxfp4+mxfp4_tseng",
    "mxfp4+mxfp4_tseng:sr_prescale=1.0",
    "mxfp4+mxfp4_tseng:hadamard=none",
    "mxfp4+mxfp4_tseng:stochastic=none:sr_prescale=1.0",
    "nvfp4+default",
    "nvfp4+nvfp4_paper",
)
"""VALUE+RECIPE[:FIELD=X...]: the headline MX / NVFP4 cells and their recipes (HiF8's recipes add scaling
only), and `mxfp4_tseng` with one part at a time taken out (its pre-scale, its transform, its stochastic
rounding): an ablation overrides fields of the recipe's resolved QuantConfig, so it splits the recipe's
cost by part (session 18: ~22 ms of tseng's 35.6 ms extra at the 8B cut sat outside the transform)."""


@dataclass(frozen=True)
class Variant:
    value: str
    recipe: str
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        """The recipe column: the recipe's name, with its overrides in brackets."""
        if not self.overrides:
            return self.recipe
        return f"{self.recipe}[{','.join(f'{k}={v}' for k, v in self.overrides)}]"


def parse_variant(text: str) -> Variant:
    """VALUE+RECIPE[:FIELD=X...]; X takes the type of the QuantConfig field it overrides."""
    from megaquant.ops.config import QuantConfig

    head, *fields = text.split(":")
    pair = head.split("+", 1)
    if len(pair) != 2 or not all(pair):
        raise SystemExit(f"--variants: each is VALUE+RECIPE[:FIELD=X...], got {text!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
    overrides: list[tuple[str, object]] = []
    for item in fields:
        key, eq, raw = item.partition("=")
        if not eq or key not in defaults or isinstance(defaults[key], bool) or defaults[key] is None:
            settable = sorted(
                k for k, v in defaults.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
            )
            raise SystemExit(
                f"--variants: {item!r} in {text!r} is not FIELD=X with FIELD one of {', '.join(settable)}"
            )
        kind = type(defaults[key])
        try:
            overrides.append((key, kind(raw)))
        except ValueError:
            raise SystemExit(f"--variants: {key} takes a {kind.__name__}, got {raw!r}") from None
    return Variant(pair[0], pair[1], tuple(overrides))


LAYERS_8B: tuple[tuple[str, int, int], ...] = (
    ("qkv", 4096, 6144),  # 32 query heads + 2 x 8 KV heads of 128
    ("proj", 4096, 4096),
    ("fc1", 4096, 2 * 14336),  # SwiGLU: gate and up in one GEMM
    ("fc2", 14336, 4096),
)
"""(name, in features, out features) of one Llama-3.1-8B layer's linear GEMMs (docs/reference/models.md)."""


@dataclass(frozen=True)
class Row:
    value: str
    recipe: str
    layer: str
    gemm: str
    us: float
    bf16_us: float
    rht_us: float | None
    """The Hadamard transform of this GEMM's two operands alone (None: the recipe has none here)."""
    matmul_us: float | None = None
    """torch.matmul alone on the two operands this recipe hands the GEMM (transformed, quantized, in the
    layout the kernels left them): `us - matmul_us` is the operands' preparation, `matmul_us - bf16_us`
    what their values and layout cost the GEMM itself."""


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        from triton.testing import do_bench_cudagraph

        def cuda_us(fn: Callable[[], object]) -> float:
            ms: float = do_bench_cudagraph(fn, rep=40, return_mode="median")
            return ms * 1e3

        return cuda_us

    def cpu_us(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    return cpu_us


def _operands(
    gemm: str, tokens: int, n_in: int, n_out: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two operands as Megatron's linear layer hands them to the hook: fprop x @ W^T, dgrad dy @ W,
    wgrad dy^T @ x (the reduction over the tokens)."""
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{gemm} {n_in} {n_out}".encode()))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=torch.bfloat16)

    if gemm == "fprop":
        return rand(tokens, n_in), rand(n_out, n_in).t()
    if gemm == "dgrad":
        return rand(tokens, n_out), rand(n_out, n_in)
    return rand(tokens, n_out).t(), rand(tokens, n_in)


def _config(value: str, overrides: Sequence[tuple[str, object]] = (), **kw: Any) -> QuantConfig:
    from megaquant.ops.config import quant_config

    cfg = quant_config(value, **kw)
    return dataclasses.replace(cfg, **dict(overrides)) if overrides else cfg


def recipe_operands(
    a: torch.Tensor, b: torch.Tensor, value: str, overrides: Sequence[tuple[str, object]] = (), **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair quant_matmul(a, b, value, **kw) multiplies, as that call builds it for operands that need no
    autograd node (the hooks' case, and this script's): megaquant.ops.gemm's own transform-and-quantize
    step, so the pair has the values and the layout the real GEMM reads (tests/test_recipe_cost.py).
    `overrides` replace fields of the resolved config (an ablation)."""
    from megaquant.ops import gemm

    cfg = _config(value, overrides, **kw)
    assert cfg.fmt is not None
    return gemm._quant_pair(a, b, cfg.fmt, -2, cfg, gemm._role("matmul", kw), gemm._operands(cfg))


def _ablated_matmul(
    a: torch.Tensor, b: torch.Tensor, value: str, overrides: Sequence[tuple[str, object]], **kw: Any
) -> torch.Tensor:
    """quant_matmul's path (recipe_operands, then the matmul) under an ablated config."""
    return torch.matmul(*recipe_operands(a, b, value, overrides, **kw))


def measure(
    variants: Sequence[Variant],
    layers: Sequence[tuple[str, int, int]],
    tokens: int,
    device: str,
) -> list[Row]:
    from megaquant.ops import quant_matmul, state
    from megaquant.ops.operands import hadamard_pair

    state.reset_state(1234)
    time_us = _timer(device)
    rows: list[Row] = []
    for name, n_in, n_out in layers:
        for gemm in ("fprop", "dgrad", "wgrad"):
            a, b = _operands(gemm, tokens, n_in, n_out, device)
            bf16_us = time_us(partial(torch.matmul, a, b))
            for v in variants:
                role = "linear_fwd" if gemm == "fprop" else f"linear_{gemm}"
                kw: dict[str, object] = {
                    "recipe": v.recipe,
                    "gemm": gemm,
                    "grad": gemm != "fprop",
                    "role": role,
                }
                cfg = _config(v.value, v.overrides, **kw)
                call = (
                    partial(_ablated_matmul, a, b, v.value, v.overrides, **kw)
                    if v.overrides
                    else partial(quant_matmul, a, b, v.value, **kw)
                )
                us = time_us(call)
                rht = None
                if cfg.grad and cfg.hadamard != "none" and (cfg.hadamard != "wgrad" or gemm == "wgrad"):
                    rht = time_us(partial(hadamard_pair, a, b, cfg))
                qa, qb = recipe_operands(a, b, v.value, v.overrides, **kw)
                mm = time_us(partial(torch.matmul, qa, qb))
                rows.append(Row(v.value, v.label, name, gemm, us, bf16_us, rht, mm))
    return rows


def step_table(rows: Sequence[Row], num_layers: int) -> list[dict[str, object]]:
    """Per variant: the step's linear GEMMs (ms) with and without quantization, and the transform's part."""
    out = []
    for value, recipe in dict.fromkeys((r.value, r.recipe) for r in rows):
        mine = [r for r in rows if (r.value, r.recipe) == (value, recipe)]
        quant = sum(r.us for r in mine) * num_layers / 1e3
        bf16 = sum(r.bf16_us for r in mine) * num_layers / 1e3
        rht = sum(r.rht_us or 0.0 for r in mine) * num_layers / 1e3
        matmul = sum(r.matmul_us or 0.0 for r in mine) * num_layers / 1e3
        out.append(
            {
                "value": value,
                "recipe": recipe,
                "gemms_ms": round(quant, 3),
                "bf16_ms": round(bf16, 3),
                "extra_ms": round(quant - bf16, 3),
                "rht_ms": round(rht, 3),
                "matmul_ms": round(matmul, 3),
                "prepare_ms": round(quant - matmul, 3),
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2 * 8192, help="tokens per step (the 8B cut: 2 x 8192)")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers per step (the 8B cut: 4)")
    parser.add_argument(
        "--scale", type=int, default=1, help="divide every feature size by this (CPU smoke runs)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="VALUE+RECIPE[:FIELD=X...], comma-separated (FIELD=X overrides a field of the resolved config)",
    )
    ns = parser.parse_args(argv)
    if ns.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    variants = [parse_variant(v) for v in ns.variants.split(",") if v]
    layers = [(n, i // ns.scale, o // ns.scale) for n, i, o in LAYERS_8B]
    rows = measure(variants, layers, ns.tokens, ns.device)
    table = step_table(rows, ns.layers)
    device = torch.cuda.get_device_name() if ns.device == "cuda" else "cpu (reference path; not a GPU number)"
    ns.out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": device,
        "tokens": ns.tokens,
        "layers": ns.layers,
        "scale": ns.scale,
        "rows": [asdict(r) for r in rows],
        "step": table,
    }
    (ns.out / "recipe_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{device}; {ns.tokens} tokens, {ns.layers} layers; linear GEMMs per step (ms)")
    w = max(13, *(len(str(t["recipe"])) for t in table))
    print(
        f"{'value':6s} {'recipe':{w}s} {'quantized':>10s} {'bf16':>8s} {'extra':>8s} {'of it RHT':>10s} "
        f"{'matmul alone':>13s} {'operands':>9s}"
    )
    for t in table:
        print(
            f"{t['value']!s:6s} {t['recipe']!s:{w}s} {t['gemms_ms']:10.2f} {t['bf16_ms']:8.2f} "
            f"{t['extra_ms']:8.2f} {t['rht_ms']:10.2f} {t['matmul_ms']:13.2f} {t['prepare_ms']:9.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
