"""Compile quant_attention's Triton kernels for sm_90 on a machine without a GPU; print registers, stack
frame (spills) and shared memory per block-size candidate (benchmarks/NOTES.md, "v2": how the MLA sweep
candidates were pruned before device time was spent).

`PYTHONPATH=. python benchmarks/attention_compile.py KERNEL DK DV [--pv mxfp8] [--quant] CONFIG...`
with KERNEL fwd (pv none: one pass; --pv VALUE: two passes), dkdv or dq (--quant: the quantized-Q/K
variant, which also loads the unquantized tiles), CONFIG as BM,BN,WARPS,STAGES. The head-dim strides are
specialised to 1 and the other strides and pointers to multiples of 16, as the JIT does for
[s, b, h, d] inputs; registers and stack come from the wheel's `cuobjdump -res-usage`. An H200 allows
232,448 bytes of shared memory per block. Numbers are from the local Triton, which may differ from the
GPU machine's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megaquant.ops import _attention_triton as T
from megaquant.ops.config import quant_config

TARGET = GPUTarget("cuda", 90, 128)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile(kernel: Any, consts: dict[str, Any], n_ptr: int, fp32_ptrs: tuple[int, ...], n_float: int,
             warps: int, stages: int) -> dict[str, object]:  # fmt: skip
    names = kernel.arg_names
    consts = {**consts, **{n: 1 for n in names if len(n) == 3 and n[0] == "s" and n[-1] == "d"}}
    n_args = len([n for n in names if n not in consts])
    kinds = ["*bf16"] * n_ptr + ["i32"] * (n_args - n_ptr - n_float) + ["fp32"] * n_float
    for i in fp32_ptrs:
        kinds[i] = "*fp32"
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    it = iter(kinds)
    for idx, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        signature[name] = next(it)
        if signature[name].startswith("*") or name.startswith("s"):
            attrs[(idx,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=TARGET, options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return dict(regs=regs and int(regs.group(1)), stack=stack and int(stack.group(1)),
                shared=compiled.metadata.shared)  # fmt: skip


def compile_kernel(kernel: str, dk: int, dv: int, pv: str, quant: bool, cfg: tuple[int, int, int, int]
                   ) -> dict[str, object]:  # fmt: skip
    bm, bn, warps, stages = cfg
    dims = dict(**T._dims(dk), BDV=T._bd(dv), BM=bm, BN=bn, CAUSAL=True, PREC="tf32")
    if kernel == "fwd":
        consts = dict(dims, DV=dv, OU_PASS=1, **T._pv_constants(quant_config(pv), bn))
        return _compile(T._fwd_kernel, consts, 7, (6,), 1, warps, stages)
    consts = dict(dims, DVD=dv, QK_QUANT=quant)
    if kernel == "dkdv":
        return _compile(T._dkdv_kernel, consts, 9, (5, 6), 2, warps, stages)
    return _compile(T._dq_kernel, consts, 8, (5, 6), 2, warps, stages)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kernel", choices=["fwd", "dkdv", "dq"])
    parser.add_argument("dk", type=int)
    parser.add_argument("dv", type=int)
    parser.add_argument("configs", nargs="+", help="BM,BN,WARPS,STAGES")
    parser.add_argument("--pv", default="none")
    parser.add_argument("--quant", action="store_true")
    args = parser.parse_args()
    for text in args.configs:
        bm, bn, warps, stages = (int(x) for x in text.split(","))
        try:
            res: object = compile_kernel(
                args.kernel, args.dk, args.dv, args.pv, args.quant, (bm, bn, warps, stages)
            )
        except Exception as exc:  # a configuration that does not compile
            res = f"{type(exc).__name__}: {str(exc)[:160]}"
        print(
            f"{args.kernel} dk {args.dk} dv {args.dv} pv {args.pv} quant {args.quant} {text}: {res}",
            flush=True,
        )


if __name__ == "__main__":
    main()
