"""GPU benchmark of the quantization kernels: Triton vs the eager and compiled torch reference, quant GEMMs.

Run on a CUDA machine from the repo root: `PYTHONPATH=. python3 benchmarks/quant_kernels.py --out DIR`.
Checks bit-exactness on the benchmark inputs, then prints tables (time, GB/s, fraction of copy bandwidth).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

L2_BYTES = 60 * 2**20
ROTATE_BYTES = 4 * L2_BYTES
"""Inputs rotate over at least this many bytes, so no timed call finds its input in L2."""
MM_FORMATS = {"mxfp8": "mxfp8_e4m3", "mxfp4": "mxfp4_e2m1", "hifp8": "hifp8"}
COMPILED_FORMATS = ("mxfp8_e4m3", "mxfp4_e2m1", "hifp8")


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    axis: int


CASES = (
    Case("act 16384x8192", (16384, 8192), -1),
    Case("act 16384x2048", (16384, 2048), -1),
    Case("weight 8192x2048", (8192, 2048), -1),
    Case("B 2048x8192 ax-2", (1, 2048, 8192), -2),
    Case("attn 32x2048x64", (32, 2048, 64), -1),
    Case("attn V 32x2048x64 ax-2", (32, 2048, 64), -2),
)


@dataclass(frozen=True)
class Row:
    fmt: str
    case: str
    path: str
    us: float
    gbps: float
    frac_copy: float
    exact: str


def _never(*args: object, **kwargs: object) -> bool:
    return False


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values with a per-row power-of-two spread (never zeros), on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
    rows = x.shape[-2] if x.dim() > 1 else 1
    spread = torch.randint(-6, 7, (rows, 1), generator=g, device="cuda").float()
    return (x * torch.exp2(spread)).to(dtype)


def _rotation(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    copies = max(1, min(16, math.ceil(ROTATE_BYTES / nbytes)))
    return [_random(shape, dtype, seed + i) for i in range(copies)]


def _bench(fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], rep_ms: int = 60) -> float:
    """Median microseconds of fn over rotating inputs (triton.testing.do_bench also flushes L2)."""
    from triton.testing import do_bench

    it = itertools.cycle(inputs)
    ms: float = do_bench(lambda: fn(next(it)), warmup=15, rep=rep_ms, return_mode="median")
    return ms * 1e3


def _bench_graph(fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor]) -> float:
    """Median microseconds of fn replayed from a CUDA graph: the kernel without Python launch overhead
    (the captured calls rotate over the inputs like _bench)."""
    from triton.testing import do_bench_cudagraph

    it = itertools.cycle(inputs)
    ms: float = do_bench_cudagraph(lambda: fn(next(it)), rep=40, return_mode="median")
    return ms * 1e3


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Identical bits except NaN payloads (NaN positions must match)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if got.dtype.is_floating_point:
        nan = torch.isnan(want)
        if not torch.equal(torch.isnan(got), nan):
            return False
        got, want = got[~nan], want[~nan]
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    return torch.equal(got.contiguous().view(int_type), want.contiguous().view(int_type))


def copy_bandwidth() -> tuple[float, float]:
    """(GB/s, µs) of a 1 GiB device-to-device copy, counting bytes read plus written."""
    src = _random((2**29,), torch.bfloat16, seed=7)
    dst = torch.empty_like(src)
    us = _bench(lambda s: dst.copy_(s), [src], rep_ms=200)
    return 2 * src.numel() * 2 / us / 1e3, us


def sweep_launch(log: list[str]) -> tuple[int, int]:
    """Time launch configurations (elements per program, warps) and keep the fastest."""
    from megaquant.formats import _triton as kernels
    from megaquant.formats import fake_quant

    configs = [(2048, 4), (4096, 4), (8192, 4), (8192, 8), (16384, 8)]
    probes = [
        ("mxfp8_e4m3", CASES[0]),
        ("mxfp8_e4m3", CASES[3]),
        ("mxfp4_e2m1", CASES[0]),
        ("hifp8", CASES[0]),
    ]
    totals: dict[tuple[int, int], float] = {}
    for elems, warps in configs:
        kernels._ELEMS_PER_PROGRAM, kernels._NUM_WARPS = elems, warps
        times = []
        for fmt, case in probes:
            inputs = _rotation(case.shape, torch.bfloat16, seed=11)
            times.append(_bench_graph(partial(fake_quant, fmt=fmt, axis=case.axis, backend="triton"), inputs))
        totals[(elems, warps)] = sum(times)
        log.append(
            f"launch elems={elems:6d} warps={warps} (graph): " + " ".join(f"{t:8.1f}us" for t in times)
        )
    best = min(totals, key=lambda k: totals[k])
    kernels._ELEMS_PER_PROGRAM, kernels._NUM_WARPS = best
    log.append(f"chosen launch config: elems={best[0]} warps={best[1]}")
    return best


def kernel_rows(copy_gbps: float, compile_budget_s: float, log: list[str]) -> list[Row]:
    from megaquant.formats import FORMATS, fake_quant
    from megaquant.formats.hif8 import fake_quant_hif8
    from megaquant.formats.mx import fake_quant_mx
    from megaquant.formats.registry import resolve_options

    rows: list[Row] = []
    compile_spent = 0.0
    for knob in (
        "cache_size_limit",
        "recompile_limit",
    ):  # one compile per case, never a silent eager fallback
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    for fmt, case in itertools.product(FORMATS, CASES):
        if fmt == "nvfp4":
            continue  # two passes and other byte counts: benchmarks/nvfp4_kernels.py
        if fmt == "hifp8" and case.axis != -1:
            continue  # HiF8 is per element: the axis does not matter
        inputs = _rotation(case.shape, torch.bfloat16, seed=zlib.crc32(case.name.encode()) % 1000)
        nbytes = 2 * 2 * inputs[0].numel()  # bf16 in, bf16 out

        def row(
            path: str, us: float, exact: str, fmt: str = fmt, case: Case = case, nbytes: int = nbytes
        ) -> Row:
            gbps = nbytes / us / 1e3
            return Row(fmt, case.name, path, us, gbps, gbps / copy_gbps, exact)

        got = fake_quant(inputs[0], fmt, axis=case.axis, backend="triton")
        want = fake_quant(inputs[0], fmt, axis=case.axis, backend="reference")
        exact = "yes" if _same_bits(got, want) else "NO"
        del got
        triton_fn = partial(fake_quant, fmt=fmt, axis=case.axis, backend="triton")
        rows.append(row("triton", _bench(triton_fn, inputs), exact))
        rows.append(row("triton (graph)", _bench_graph(triton_fn, inputs), exact))
        rows.append(
            row(
                "eager ref",
                _bench(partial(fake_quant, fmt=fmt, axis=case.axis, backend="reference"), inputs),
                "ref",
            )
        )
        if fmt in COMPILED_FORMATS:
            opts = resolve_options(
                fmt, axis=case.axis, block_size=32, scale="floor", rounding="even", saturate=True, preset=None
            )
            ref_fn = fake_quant_mx if opts.fmt.block_scaled else fake_quant_hif8
            if compile_spent > compile_budget_s:
                log.append(f"compiled reference skipped for {fmt} {case.name}: compile budget spent")
                continue
            try:
                compiled = torch.compile(lambda x, o=opts, f=ref_fn: f(x, o), dynamic=False)
                t0 = time.perf_counter()
                y = compiled(inputs[0])
                torch.cuda.synchronize()
                compile_spent += time.perf_counter() - t0
                c_exact = "yes" if _same_bits(y, want) else "NO"
                del y
                rows.append(row("compiled ref", _bench(compiled, inputs), c_exact))
            except Exception as err:  # a compile failure is a result to report, not a crash
                log.append(f"torch.compile failed for {fmt} {case.name}: {type(err).__name__}: {err}"[:400])
        del want
    log.append(f"torch.compile time spent: {compile_spent:.1f}s")
    return rows


def encode_rows(copy_gbps: float) -> list[Row]:
    from megaquant.formats import FORMATS, encode

    rows = []
    case = CASES[0]
    inputs = _rotation(case.shape, torch.bfloat16, seed=5)
    n = inputs[0].numel()
    for fmt in FORMATS:
        if fmt == "nvfp4":
            continue  # benchmarks/nvfp4_kernels.py
        got = encode(inputs[0], fmt, backend="triton")
        want = encode(inputs[0], fmt, backend="reference")
        exact = torch.equal(got.codes, want.codes) and (
            want.scales is None or (got.scales is not None and torch.equal(got.scales, want.scales))
        )
        code_bytes = n // 2 if fmt == "mxfp4_e2m1" else n
        nbytes = 2 * n + code_bytes + (0 if fmt == "hifp8" else n // 32)
        us = _bench_graph(partial(encode, fmt=fmt, backend="triton"), inputs)
        gbps = nbytes / us / 1e3
        rows.append(
            Row(
                fmt,
                case.name + " encode",
                "triton (graph)",
                us,
                gbps,
                gbps / copy_gbps,
                "yes" if exact else "NO",
            )
        )
    return rows


def matmul_rows(log: list[str]) -> list[dict[str, object]]:
    """quant_matmul forward and forward+backward, 16384x2048 @ 2048x8192 bf16, as ratios to torch.matmul."""
    from megaquant.formats import _triton as kernels
    from megaquant.formats import fake_quant
    from megaquant.ops import quant_matmul

    m, k, n = 16384, 2048, 8192
    sets = [
        (_random((m, k), torch.bfloat16, 20 + i), _random((k, n), torch.bfloat16, 40 + i)) for i in range(3)
    ]
    grad = _random((m, n), torch.bfloat16, 60)
    leaves = [(a.detach().requires_grad_(True), b.detach().requires_grad_(True)) for a, b in sets]

    def fwd(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        it = itertools.cycle(sets)
        return _bench(lambda _: op(*next(it)), [sets[0][0]], rep_ms=200)

    def fwd_bwd(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        it = itertools.cycle(leaves)

        def step(_: torch.Tensor) -> None:
            a, b = next(it)
            a.grad = b.grad = None
            op(a, b).backward(grad)

        return _bench(step, [sets[0][0]], rep_ms=300)

    plain_f, plain_fb = fwd(torch.matmul), fwd_bwd(torch.matmul)
    flops = 2 * m * k * n
    log.append(
        f"plain bf16 matmul: fwd {plain_f:.1f}us ({flops / plain_f / 1e6:.0f} TFLOP/s), "
        f"fwd+bwd {plain_fb:.1f}us"
    )
    out: list[dict[str, object]] = [
        dict(
            value="bf16 (plain)",
            path="torch.matmul",
            fwd_us=plain_f,
            fwd_ratio=1.0,
            fb_us=plain_fb,
            fb_ratio=1.0,
        )
    ]
    real_supports = kernels.supports
    for value, fmt in MM_FORMATS.items():
        a, b = sets[0]
        ref = fake_quant(a, fmt, backend="reference") @ fake_quant(b, fmt, axis=-2, backend="reference")
        exact = torch.equal(quant_matmul(a, b, value), ref)
        log.append(f"quant_matmul {value} (Triton path) == reference composition: {exact}")
        for path in ("triton", "eager ref"):
            # The reference path: the dispatcher asks supports(); answering False sends every call to torch.
            setattr(kernels, "supports", real_supports if path == "triton" else _never)  # noqa: B010
            try:
                f = fwd(partial(quant_matmul, value=value))
                fb = fwd_bwd(partial(quant_matmul, value=value))
            finally:
                setattr(kernels, "supports", real_supports)  # noqa: B010
            out.append(
                dict(
                    value=value, path=path, fwd_us=f, fwd_ratio=f / plain_f, fb_us=fb, fb_ratio=fb / plain_fb
                )
            )
    return out


BOTH_AXES_SHAPES = [(2048, 2048), (2048, 3072), (2048, 16384), (8192, 4096), (8192, 28672)]
"""Incoming gradients of a linear layer: the 1B single-gpu preset's 2048 tokens (proj/fc2, qkv, fc1) and
the 8B shape's 8192 tokens (qkv 4096 + 2 x 1024 wide is near 4096 x 1.5; fc1 28672)."""


_Fn = Callable[[torch.Tensor], torch.Tensor]
BOTH_AXES_CONFIGS = [(4096, 4), (4096, 8), (8192, 8)]
"""Launch configurations of the single-read kernel swept beside its default (2048 elements, 4 warps)."""


def both_axes_rows(copy_gbps: float) -> list[dict[str, object]]:
    """formats.quantizer_both_axes (one read of dy, two blockings) against the two one-axis kernels it
    replaces (megaquant.ops' short path: dy along its last axis, dy along its rows), MXFP8 E5M2 (the
    gradient format), bf16, replayed from CUDA graphs; bytes are counted as dy read once per pass plus
    both outputs written."""
    import megaquant.formats._triton as kernels
    from megaquant.formats import quantizer, quantizer_both_axes
    from megaquant.formats.registry import resolve_options

    opts = resolve_options(
        "mxfp8_e5m2", axis=-1, block_size=None, scale="floor", rounding="even", saturate=True, preset=None
    )
    out = []
    for shape in BOTH_AXES_SHAPES:
        inputs = _rotation(shape, torch.bfloat16, seed=31)
        dual = quantizer_both_axes(inputs[0], "mxfp8_e5m2")
        assert dual is not None and dual[1] == "triton"
        last = quantizer(inputs[0], "mxfp8_e5m2", axis=-1)[0]
        rows = quantizer(inputs[0].view(1, *shape), "mxfp8_e5m2", axis=-2)[0]

        def two(x: torch.Tensor, last: _Fn = last, rows: _Fn = rows) -> tuple[torch.Tensor, torch.Tensor]:
            return last(x), rows(x.view(1, *x.shape))

        got, want = dual[0](inputs[0]), two(inputs[0])
        exact = _same_bits(got[0], want[0]) and _same_bits(got[1], want[1].view(shape))
        t_two, t_one = _bench_graph(two, inputs), _bench_graph(dual[0], inputs)
        nbytes = math.prod(shape) * 2
        sweep = {}  # other launch configurations of the same kernel: (elements per program, warps)
        for elems, warps in BOTH_AXES_CONFIGS:
            fn = kernels.fake_quant_dual_fn(opts, tile_elems=elems, num_warps=warps)
            assert fn is not None
            got_c = fn(inputs[0])
            same = _same_bits(got_c[0], got[0]) and _same_bits(got_c[1], got[1])
            sweep[f"{elems}x{warps}w"] = (round(_bench_graph(fn, inputs), 2), same)
        out.append(dict(
            shape=list(shape), two_pass_us=t_two, single_read_us=t_one, ratio=t_one / t_two, exact=exact,
            two_pass_frac=4 * nbytes / t_two / 1e3 / copy_gbps,
            single_read_frac=3 * nbytes / t_one / 1e3 / copy_gbps, configs=sweep,
        ))  # fmt: skip
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for bench.md, bench.json")
    parser.add_argument(
        "--compile-budget", type=float, default=120.0, help="seconds of torch.compile at most"
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    parser.add_argument(
        "--both-axes", action="store_true", help="only the single-read two-blocking rows (both_axes.json)"
    )
    args = parser.parse_args()
    import triton

    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    header = (
        f"GPU: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    )
    log: list[str] = [header]
    print(header, flush=True)
    copy_gbps, copy_us = copy_bandwidth()
    log.append(f"device-to-device copy, 1 GiB bf16: {copy_us:.1f}us = {copy_gbps:.0f} GB/s (read + written)")
    print(log[-1], flush=True)
    if args.both_axes:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"header": header, "copy": log[-1], "rows": both_axes_rows(copy_gbps)}
        (args.out / "both_axes.json").write_text(json.dumps(result, indent=1))
        return
    if not args.no_sweep:
        sweep_launch(log)
        print("\n".join(log[-6:]), flush=True)
    rows = kernel_rows(copy_gbps, args.compile_budget, log)
    rows += encode_rows(copy_gbps)
    mm = matmul_rows(log)

    lines = [header, log[1], ""]
    lines += [
        "| format | case | path | time (µs) | GB/s | of copy BW | bit-exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.fmt} | {r.case} | {r.path} | {r.us:.1f} | {r.gbps:.0f} | {r.frac_copy:.0%} | {r.exact} |"
        )
    lines += [
        "",
        "quant_matmul 16384x2048 @ 2048x8192 bf16 (ratio to plain torch.matmul; backward straight-through)",
        "",
        "| value | path | fwd (µs) | fwd ratio | fwd+bwd (µs) | fwd+bwd ratio |",
        "|---|---|---|---|---|---|",
    ]
    for d in mm:
        lines.append(
            f"| {d['value']} | {d['path']} | {d['fwd_us']:.1f} | {d['fwd_ratio']:.3f} | {d['fb_us']:.1f} | "
            f"{d['fb_ratio']:.3f} |"
        )
    lines += ["", *log[2:], f"total benchmark time {time.perf_counter() - t_start:.0f}s"]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(text + "\n")
    (args.out / "bench.json").write_text(
        json.dumps({"rows": [asdict(r) for r in rows], "matmul": mm, "log": log})
    )
    print(text, flush=True)


if __name__ == "__main__":
    main()
