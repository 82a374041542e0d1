"""GPU benchmark of the NVFP4 and stochastic-rounding Triton kernels against the floor of their passes.

Run on a CUDA machine from the repo root: `PYTHONPATH=. python3 benchmarks/nvfp4_kernels.py --out DIR`.
NVFP4 fake-quant makes two passes over x: the tensor amax (reads x) and the quantize pass (reads x, writes
the result). The floor of a row is the time its bytes take at the measured device-to-device copy
bandwidth; "of floor" = floor / measured time (1.0 = as fast as a copy of the same bytes). Every kernel
result is first checked bit for bit against the torch reference on the benchmark input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_kernels import CASES, _bench, _bench_graph, _rotation, _same_bits, copy_bandwidth  # noqa: E402

NV_CASES = [c for c in CASES if not c.name.startswith("attn")]


@dataclass(frozen=True)
class Row:
    case: str
    dtype: str
    path: str
    us: float
    gbps: float
    floor_us: float
    of_floor: float
    exact: str


def _rows_for(case_name: str, x: list[torch.Tensor], axis: int, copy_gbps: float) -> list[Row]:
    from megaquant.formats import _triton_nvfp4 as kernels
    from megaquant.formats import encode, fake_quant

    n, el = x[0].numel(), x[0].element_size()
    dtype = str(x[0].dtype).removeprefix("torch.")
    amaxes = [t.float().abs().amax() for t in x]
    rows: list[Row] = []

    def add(path: str, us: float, nbytes: float, exact: str) -> None:
        floor = nbytes / copy_gbps / 1e3
        rows.append(Row(case_name, dtype, path, us, nbytes / us / 1e3, floor, floor / us, exact))
        r = rows[-1]
        print(f"{r.case:24s} {r.dtype:8s} {r.path:38s} {r.us:9.1f}us {r.gbps:6.0f} GB/s "
              f"floor {r.floor_us:8.1f}us = {r.of_floor:4.0%}  exact {r.exact}", flush=True)  # fmt: skip

    def exact_fq(**kw: object) -> str:
        got = fake_quant(x[0], "nvfp4", axis=axis, backend="triton", **kw)  # type: ignore[arg-type]
        want = fake_quant(x[0], "nvfp4", axis=axis, backend="reference", **kw)  # type: ignore[arg-type]
        return "yes" if _same_bits(got, want) else "NO"

    ok_amax = "yes" if torch.equal(kernels.tensor_amax(x[0]), amaxes[0]) else "NO"
    add("amax pass (triton)", _bench_graph(kernels.tensor_amax, x), n * el, ok_amax)
    add("amax pass (torch x.abs().amax())", _bench_graph(lambda t: t.abs().amax(), x), n * el, "ref")
    it = iter(range(10**9))

    def quant_given(t: torch.Tensor) -> torch.Tensor:
        return fake_quant(t, "nvfp4", axis=axis, amax=amaxes[next(it) % len(x)], backend="triton")

    add("quantize pass (amax given)", _bench_graph(quant_given, x), 2 * n * el, exact_fq(amax=amaxes[0]))
    fq = partial(fake_quant, fmt="nvfp4", axis=axis, backend="triton")
    exact = exact_fq()
    add("fake_quant = amax + quantize (graph)", _bench_graph(fq, x), 3 * n * el, exact)
    add("fake_quant = amax + quantize (call)", _bench(fq, x), 3 * n * el, exact)
    sr = partial(fq, rounding="stochastic", seed=1)
    add(
        "fake_quant stochastic (graph)",
        _bench_graph(sr, x),
        3 * n * el,
        exact_fq(rounding="stochastic", seed=1),
    )
    enc = partial(encode, fmt="nvfp4", axis=axis, backend="triton")
    got, want = enc(x[0]), encode(x[0], "nvfp4", axis=axis, backend="reference")
    e_ok = torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)  # type: ignore[arg-type]
    add(
        "encode = amax + quantize (graph)",
        _bench_graph(enc, x),
        2 * n * el + n / 2 + n / 16,
        "yes" if e_ok else "NO",
    )
    ref = partial(fake_quant, fmt="nvfp4", axis=axis, backend="reference")
    add("eager torch reference", _bench(ref, x[:1], rep_ms=200), 3 * n * el, "ref")
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except ImportError:
        return rows
    if axis == -1:

        def torchao_fq(t: torch.Tensor) -> torch.Tensor:
            amax = t.abs().amax()
            q = NVFP4Tensor.to_nvfp4(t, per_tensor_scale=per_tensor_amax_to_scale(amax))
            return q.dequantize(t.dtype)

        add("torchao eager to_nvfp4+dequantize", _bench(torchao_fq, x[:1], rep_ms=200), 3 * n * el, "anchor")
    return rows


def _mx_sr_rows(copy_gbps: float) -> list[Row]:
    from megaquant.formats import fake_quant

    case = CASES[0]
    x = _rotation(case.shape, torch.bfloat16, seed=3)
    n = x[0].numel()
    rows = []
    for fmt in ("mxfp4_e2m1", "mxfp8_e4m3"):
        for path, kw in (("round-to-nearest", {}), ("stochastic", dict(rounding="stochastic", seed=2))):
            fn = partial(fake_quant, fmt=fmt, axis=case.axis, backend="triton", **kw)
            got = fn(x[0])
            want = fake_quant(x[0], fmt, axis=case.axis, backend="reference", **kw)  # type: ignore[arg-type]
            us = _bench_graph(fn, x)
            floor = 4 * n / copy_gbps / 1e3
            rows.append(Row(case.name, "bfloat16", f"{fmt} {path} (graph)", us, 4 * n / us / 1e3, floor,
                            floor / us, "yes" if _same_bits(got, want) else "NO"))  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def _tile_rows(copy_gbps: float) -> list[Row]:
    """16x16 2-D weight scaling (block_2d=True), the NVFP4 paper's weight recipe, on the weight case."""
    from megaquant.formats import fake_quant

    case = next(c for c in CASES if c.name.startswith("weight"))
    x = _rotation(case.shape, torch.bfloat16, seed=4)
    n = x[0].numel()
    fn = partial(fake_quant, fmt="nvfp4", block_2d=True, backend="triton")
    got, want = fn(x[0]), fake_quant(x[0], "nvfp4", block_2d=True, backend="reference")
    exact = "yes" if _same_bits(got, want) else "NO"
    rows = []
    ref = partial(fake_quant, fmt="nvfp4", block_2d=True, backend="reference")
    for path, us, ok in (
        ("block_2d fake_quant (graph)", _bench_graph(fn, x), exact),
        ("block_2d eager torch reference", _bench(ref, x[:1]), "ref"),
    ):
        floor = 6 * n / copy_gbps / 1e3
        rows.append(Row(case.name, "bfloat16", path, us, 6 * n / us / 1e3, floor, floor / us, ok))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for nvfp4_bench.md/.json")
    parser.add_argument("--quick", action="store_true", help="one case only (smoke run)")
    args = parser.parse_args()
    import triton

    t0 = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    header = (
        f"GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}"
    )
    print(header, flush=True)
    copy_gbps, copy_us = copy_bandwidth()
    copy_line = f"device-to-device copy, 1 GiB bf16: {copy_us:.1f}us = {copy_gbps:.0f} GB/s (read + written)"
    print(copy_line, flush=True)
    rows: list[Row] = []
    cases: list[tuple[str, tuple[int, ...], int, torch.dtype]] = [
        (c.name, c.shape, c.axis, torch.bfloat16) for c in NV_CASES
    ]
    cases.append((CASES[1].name, CASES[1].shape, CASES[1].axis, torch.float32))
    for name, shape, axis, dtype in cases[:1] if args.quick else cases:
        rows += _rows_for(name, _rotation(shape, dtype, seed=1), axis, copy_gbps)
        torch.cuda.empty_cache()
    rows += _tile_rows(copy_gbps)
    rows += _mx_sr_rows(copy_gbps)
    lines = [
        header,
        copy_line,
        "",
        "Floor = bytes of the row's passes at the copy bandwidth above. NVFP4 fake_quant bytes: amax pass "
        "reads x, quantize pass reads x and writes y (3 x element size per element); encode writes "
        "0.5 B codes + 1/16 B scales instead of y.",
        "",
        "| case | dtype | path | time (µs) | GB/s | floor (µs) | of floor | bit-exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.case} | {r.dtype} | {r.path} | {r.us:.1f} | {r.gbps:.0f} | {r.floor_us:.1f} "
        f"| {r.of_floor:.0%} | {r.exact} |"
        for r in rows
    ]
    lines += ["", f"total benchmark time {time.perf_counter() - t0:.0f}s"]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nvfp4_bench.md").write_text(text + "\n")
    (args.out / "nvfp4_bench.json").write_text(json.dumps({"header": header, "copy": copy_line,
                                                           "rows": [asdict(r) for r in rows]}))  # fmt: skip
    print(text, flush=True)
    bad = [r for r in rows if r.exact == "NO"]
    if bad:
        print(f"NOT BIT-EXACT: {len(bad)} rows", flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
