"""GPU benchmark of quant_attention: Triton kernels vs torch SDPA flash vs the unfused local path.

Run on a CUDA machine from the repo root: `PYTHONPATH=. python3 benchmarks/attention.py --out DIR`.
One table: forward and forward + backward time (triton.testing.do_bench median) and extra peak memory
(max_memory_allocated during forward + backward minus what the inputs hold) for the Llama-3.1-8B heads
(32 q / 8 kv / 128), Llama-3.2-1B heads (32 / 8 / 64) and DeepSeek-V2-Lite MLA (16 heads, qk 192, v 128)
at (seq 2048, batch 4) and (seq 8192, batch 1), qk / pv in none or mxfp8. Inputs are in Megatron's
[s, b, h, d] layout and every path ends with Megatron's [s, b, h * d] context, as in training.
`--sweep` first times candidate block sizes of each kernel (MEGAQUANT_ATTENTION_CONFIG); `--heads`,
`--seqs`, `--sites`, `--paths` pick the table's rows; `--variant-sites` adds, for those sites, the paths
`triton_soft` (P's element rounding by integer bit tricks instead of the float8 conversion,
MEGAQUANT_ATTENTION_PQUANT=soft) and `triton_ou2` (the unquantized P V in the second forward pass,
MEGAQUANT_ATTENTION_OU_PASS=2).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megaquant.ops import quant_attention, quant_baddbmm, quant_bmm

HEADS = {"8b": (32, 8, 128, 128), "1b": (32, 8, 64, 64), "mla": (16, 16, 192, 128)}
SEQS = ((2048, 4), (8192, 1))
SITES = {
    "none": ("none", "none"),
    "qk": ("mxfp8", "none"),
    "pv": ("none", "mxfp8"),
    "both": ("mxfp8", "mxfp8"),
}


def _inputs(heads: str, s: int, b: int) -> list[torch.Tensor]:
    hq, hkv, dk, dv = HEADS[heads]
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(s, b, hq, dk), (s, b, hkv, dk), (s, b, hkv, dv)]
    out = [
        torch.randn(sh, generator=g, device="cuda").to(torch.bfloat16).requires_grad_(True) for sh in shapes
    ]
    out.append(torch.randn((s, b, hq * dv), generator=g, device="cuda").to(torch.bfloat16))
    return out


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: str, pv: str, backend: str) -> torch.Tensor:
    """quant_attention on [s, b, h, d] views, context [s, b, h * dv] (what the instrumented core does)."""
    s, b = q.shape[0], q.shape[1]
    out = quant_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), qk=qk, pv=pv, backend=backend
    )
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def unfused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: str, pv: str, backend: str
) -> torch.Tensor:
    """Megatron's local DotProductAttention.forward as instrumented (repeat K/V, baddbmm, softmax, bmm)."""
    sq, b, hq, d = q.shape
    g = hq // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    q3 = q.reshape(sq, b * hq, -1)
    k3 = k.view(sq, b * hq, -1)
    buf = torch.empty((b * hq, sq, sq), dtype=q.dtype, device=q.device)
    scores = quant_baddbmm(buf, q3.transpose(0, 1), k3.transpose(0, 1).transpose(1, 2), qk, beta=0.0,
                           alpha=d**-0.5).view(b, hq, sq, sq)  # fmt: skip
    mask = torch.ones((sq, sq), dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.float().masked_fill(mask, -10000.0), dim=-1).to(q.dtype)
    ctx = quant_bmm(probs.view(b * hq, sq, sq), v.reshape(sq, b * hq, -1).transpose(0, 1), pv)
    return ctx.view(b, hq, sq, -1).permute(2, 0, 1, 3).contiguous().view(sq, b, -1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: str, pv: str, backend: str) -> torch.Tensor:
    """torch SDPA, flash backend only (memory-efficient for MLA, whose qk and v head dims differ)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s, b = q.shape[0], q.shape[1]
    kind = SDPBackend.FLASH_ATTENTION if q.shape[-1] == v.shape[-1] else SDPBackend.EFFICIENT_ATTENTION
    qb, kb, vb = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
    if kind == SDPBackend.EFFICIENT_ATTENTION and qb.shape[1] != kb.shape[1]:
        kb = kb.repeat_interleave(qb.shape[1] // kb.shape[1], dim=1)
        vb = vb.repeat_interleave(qb.shape[1] // vb.shape[1], dim=1)
    with sdpa_kernel([kind]):
        out = torch.nn.functional.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True, enable_gqa=qb.shape[1] != kb.shape[1]
        )
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": sdpa,
    "triton": fused,
    "triton_soft": fused,
    "triton_ou2": fused,
    "unfused": unfused,
}


def _time(fn: Callable[[], object], params: list[torch.Tensor]) -> float:
    from triton.testing import do_bench

    ms: float = do_bench(fn, warmup=10, rep=60, grad_to_none=params)
    return ms


def measure(heads: str, s: int, b: int, path: str, site: str) -> dict[str, object]:
    q, k, v, do = _inputs(heads, s, b)
    qk, pv = SITES[site]
    fn = PATHS[path]
    backend = "triton" if path.startswith("triton") else "auto"
    os.environ["MEGAQUANT_ATTENTION_PQUANT"] = "soft" if path == "triton_soft" else "auto"
    os.environ["MEGAQUANT_ATTENTION_OU_PASS"] = "2" if path == "triton_ou2" else "1"

    def fwd() -> None:
        with torch.no_grad():
            fn(q, k, v, qk, pv, backend)

    def fwd_bwd() -> None:
        fn(q, k, v, qk, pv, backend).backward(do)

    fwd_bwd()
    torch.cuda.synchronize()
    for t in (q, k, v):
        t.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in (q, k, v):
        t.grad = None
    row: dict[str, object] = dict(
        heads=heads, seq=s, batch=b, path=path, site=site,
        fwd_ms=_time(fwd, [q, k, v]), fwd_bwd_ms=_time(fwd_bwd, [q, k, v]), extra_gib=peak / 2**30,
    )  # fmt: skip
    torch.cuda.empty_cache()
    os.environ.pop("MEGAQUANT_ATTENTION_PQUANT", None)
    os.environ.pop("MEGAQUANT_ATTENTION_OU_PASS", None)
    return row


SWEEP = {  # candidate (BM, BN, warps, stages) per kernel, by padded QK head dim
    128: {
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
        "fwd2": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
        "dkdv": [(64, 64, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
        "dq": [(64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
    },
    64: {
        "fwd": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
        "fwd2": [(128, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
        "dkdv": [(64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (128, 64, 8, 3)],
        "dq": [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3)],
    },
    192: {  # MLA's 128 + 64 (two dots); pruned by a local sm_90 compile: no spills, shared memory fits
        "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 2), (128, 32, 8, 3)],
        "fwd2": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 8, 3)],
        "dkdv": [(32, 64, 8, 2), (32, 128, 8, 2), (32, 64, 8, 3), (64, 64, 8, 2)],
        "dq": [(64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 3)],
    },
    256: {
        "fwd": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
        "fwd2": [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2)],
        "dkdv": [(32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 8, 2)],
        "dq": [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2)],
    },
}


def _padded(dk: int) -> int:
    from megaquant.ops import _attention_triton as kernels

    return kernels._key(dk)


def sweep(heads: str, only: list[str] | None = None) -> list[dict[str, object]]:
    """Time each candidate block configuration of each kernel alone (seq 8192, batch 1). The backward
    kernels are timed with and without quantized Q, K (QK_QUANT loads the unquantized Q, K as well: more
    shared memory) and ranked by the sum, so the chosen configuration serves both."""
    from megaquant.ops import _attention_triton as kernels
    from megaquant.ops.config import quant_config

    hq, hkv, dk, dv = HEADS[heads]
    q, k, v, do = _inputs(heads, 8192, 1)
    qv, kv_, vv = (t.detach().permute(1, 2, 0, 3) for t in (q, k, v))
    dov = do.view(8192, 1, hq, dv).permute(1, 2, 0, 3)
    cfg_none, cfg_mx = quant_config("none"), quant_config("mxfp8")
    rows: list[dict[str, object]] = []
    for kernel, candidates in SWEEP[_padded(dk)].items():
        if only and kernel not in only:
            continue
        for cand in candidates:
            os.environ[kernels.CONFIG_ENV] = json.dumps({kernel: list(cand)})
            try:
                if kernel in ("fwd", "fwd2"):
                    cfg = cfg_mx if kernel == "fwd2" else cfg_none
                    vq = vv if kernel == "fwd2" else None

                    def run(cfg=cfg, vq=vq) -> object:  # type: ignore[no-untyped-def]
                        return kernels.forward(qv, kv_, vv, vq, cfg, True, dk**-0.5)
                else:
                    o, ou, lse = kernels.forward(qv, kv_, vv, None, cfg_none, True, dk**-0.5)
                    qc, kc = qv.clone(), kv_.clone()  # distinct pointers: the QK_QUANT variant

                    def run(o=o, lse=lse) -> object:  # type: ignore[no-untyped-def]
                        return kernels.backward(dov, qv, kv_, vv, qv, kv_, o, lse, True, dk**-0.5)

                    def run_q(o=o, lse=lse, qc=qc, kc=kc) -> object:  # type: ignore[no-untyped-def]
                        return kernels.backward(dov, qv, kv_, vv, qc, kc, o, lse, True, dk**-0.5)

                ms = _time(run, [])
                if kernel in ("dkdv", "dq"):
                    ms += _time(run_q, [])
            except Exception as exc:  # a configuration that does not compile (registers, shared memory)
                ms = float("nan")
                print(f"  {kernel} {cand}: {type(exc).__name__}: {str(exc)[:120]}")
            rows.append(dict(heads=heads, kernel=kernel, config=list(cand), ms=ms))
            print(f"sweep {heads} {kernel} {cand}: {ms:.3f} ms", flush=True)
    os.environ.pop(kernels.CONFIG_ENV, None)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| heads | seq x batch | path | sites | fwd ms | fwd+bwd ms | extra GiB | fwd+bwd vs SDPA |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    ref: dict[tuple[object, object], float] = {}
    for r in rows:
        if r["path"] == "sdpa":
            ref[(r["heads"], r["seq"])] = float(r["fwd_bwd_ms"])  # type: ignore[arg-type]
    for r in rows:
        base = ref.get((r["heads"], r["seq"]))
        ratio = f"{float(r['fwd_bwd_ms']) / base:.2f}x" if base else ""  # type: ignore[arg-type]
        lines.append(
            f"| {r['heads']} | {r['seq']} x {r['batch']} | {r['path']} | {r['site']} | {r['fwd_ms']:.2f} | "
            f"{r['fwd_bwd_ms']:.2f} | {r['extra_gib']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sweep", action="store_true", help="time candidate block sizes first")
    parser.add_argument("--heads", nargs="*", default=list(HEADS))
    parser.add_argument("--sweep-heads", nargs="*", default=["8b"])
    parser.add_argument("--sweep-kernels", nargs="*", default=None, help="head:kernel pairs, e.g. 8b:fwd2")
    parser.add_argument("--sweep-only", action="store_true", help="no table")
    parser.add_argument("--seqs", nargs="*", default=[f"{s}x{b}" for s, b in SEQS], help="e.g. 8192x1")
    parser.add_argument("--sites", nargs="*", default=list(SITES))
    parser.add_argument("--paths", nargs="*", default=["sdpa", "triton", "unfused"], choices=list(PATHS))
    parser.add_argument(
        "--variant-sites", nargs="*", default=[], help="sites also run as triton_soft and triton_ou2"
    )
    parser.add_argument("--variant-seqs", nargs="*", default=["8192x1"])
    parser.add_argument(
        "--no-unfused", action="store_true", help="skip the unfused path (slow, s x s memory)"
    )
    args = parser.parse_args()
    start = time.time()
    device = torch.cuda.get_device_name()
    print(f"{device}; torch {torch.__version__}", flush=True)
    picks: dict[str, list[str]] = {}
    for pair in args.sweep_kernels or []:
        head, _, kernel = pair.partition(":")
        picks.setdefault(head, []).append(kernel)
    swept = [r for h in args.sweep_heads for r in sweep(h, picks.get(h))] if args.sweep else []
    if swept:  # the table runs with the fastest configuration of each kernel found for each head shape
        from megaquant.ops import _attention_triton as kernels

        best: dict[str, tuple[float, list[int]]] = {}
        for r in swept:
            key = f"{r['kernel']}:{_padded(HEADS[str(r['heads'])][2])}"
            ms = float(r["ms"])  # type: ignore[arg-type]
            if ms == ms and (key not in best or ms < best[key][0]):
                best[key] = (ms, r["config"])  # type: ignore[assignment]
        os.environ[kernels.CONFIG_ENV] = json.dumps({key: cfg for key, (_, cfg) in best.items()})
        print(f"configurations: {os.environ[kernels.CONFIG_ENV]}", flush=True)
    rows: list[dict[str, object]] = []
    for heads in [] if args.sweep_only else args.heads:
        for s, b in (tuple(int(x) for x in sb.split("x")) for sb in args.seqs):
            plan = [("sdpa", "none")] if "sdpa" in args.paths else []
            plan += [("triton", site) for site in args.sites if "triton" in args.paths]
            if f"{s}x{b}" in args.variant_seqs:
                plan += [(var, site) for site in args.variant_sites for var in ("triton_soft", "triton_ou2")]
            if not args.no_unfused and "unfused" in args.paths:
                plan += [("unfused", site) for site in args.sites]
            for path, site in plan:
                try:
                    row = measure(heads, s, b, path, site)
                except Exception as exc:
                    print(f"{heads} {s}x{b} {path} {site}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                rows.append(row)
                print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    print(f"total {time.time() - start:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = dict(device=device, torch=torch.__version__, rows=rows, sweep=swept,
                       configs=os.environ.get("MEGAQUANT_ATTENTION_CONFIG", ""))  # fmt: skip
        (args.out / "attention.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "attention.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
