"""Where a training step's time goes, per quantization mode: torch.profiler on the real Megatron trainer.

One process (torchrun, 1 GPU) trains the model through `megaquant.launch.pretrain` on an instrumented tree
whose sites all hold `none`; this script swaps the value each hooked op receives per *variant* (a mode, plus
tensor scaling and the weight cache), so every variant runs in the same process, model and data: W warm-up
steps, one step under torch.profiler, then T timed steps without it. Per profiled step it writes wall
time, GPU busy time (union of kernel intervals), kernel time by kind (quantization kernels, GEMMs, the
rest), kernel launches, CPU and kernel time per role (record_function around each hooked op), peak memory;
for every step the loss (as hex bits), so two processes with the same variants can be compared bit for
bit (`--compare A B`).

    python benchmarks/profile_step.py --tree MQ_MEGATRON --data-root DATA --out OUT/mine.json
    python benchmarks/profile_step.py ... --root BASE_CHECKOUT --out OUT/base.json   # megaquant before
    python benchmarks/profile_step.py --compare OUT/base.json OUT/mine.json
    python benchmarks/profile_step.py --microbench --out OUT/micro.json     # host cost of one op call

Variants: MODE[+ts][+cache] with MODE a registry mode (bf16, FA_linear_mxfp8, ...); +ts: configure(
tensor_scale=True); +cache: megaquant.ops.weights on (megaquant without it: the variant runs uncached).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = (
    "bf16,FA_linear_mxfp8,FA_linear_mxfp8+cache,FA_linear_mxfp4,FA_linear_mxfp4+cache,"
    "FA_linear_hifp8,FA_linear_hifp8+cache,FA_linear_hifp8+ts,FA_linear_hifp8+ts+cache"
)
_LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _hex(x: float) -> str:
    return struct.pack("<d", x).hex()


def megatron_args(ns: argparse.Namespace, steps: int) -> list[str]:
    """megaquant train's own argv for the model x preset (sample data), cut to `steps` steps."""
    sys.path.insert(0, str(ROOT))
    from megaquant.launch.run import TrainRequest, plan_run

    extra_user = ns.extra.split()
    # the data order depends on the run length (--steps): fixed, so processes running different numbers of
    # steps see the same batches; --exit-interval stops after `steps`
    extra = [*extra_user, "--split", "100,0,0", "--exit-interval", str(steps), "--log-interval", "1"]
    request = TrainRequest(
        model=ns.model,
        dataset="sample",
        preset=ns.preset,
        megatron=ns.tree,
        data_root=ns.data_root,
        extra=tuple(extra),
        steps=ns.train_steps,
        cuda_graphs="off",  # the variants swap values between steps: a replayed graph would freeze them
    )
    return list(plan_run(request).megatron_args)


# ------------------------------------------------------------------------------ inside the trainer


def _role_values(mode: str) -> dict[str, str]:
    from megaquant.launch.modes import get_mode

    return get_mode(mode).values()


def _kernel_kind(name: str) -> str:
    low = name.lower()
    if low.startswith(("_mx_", "_hif8", "_amax")):
        return "quant"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")):
        return "gemm"
    return "other"


def analyse(prof: Any, wall_s: float) -> dict[str, Any]:
    from torch.autograd import DeviceType

    kernels: list[tuple[float, float, str]] = []
    launches = 0
    launch_cpu_us = 0.0
    roles: dict[str, dict[str, float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not e.name.startswith("mq."):  # not the GPU-side spans
            kernels.append((e.time_range.start, e.time_range.end, e.name))
        elif e.name in _LAUNCH_NAMES:
            launches += 1
            launch_cpu_us += e.cpu_time_total
        elif e.name.startswith("mq."):
            row = roles.setdefault(e.name[3:], {"calls": 0, "cpu_ms": 0.0, "kernel_ms": 0.0})
            row["calls"] += 1
            row["cpu_ms"] += e.cpu_time_total / 1e3
            row["kernel_ms"] += e.device_time_total / 1e3
    summary = kernel_summary(kernels)
    return {
        "wall_ms": wall_s * 1e3,
        "gpu_busy_ms": summary["gpu_busy_ms"],
        "gpu_busy_fraction": summary["gpu_busy_ms"] / (wall_s * 1e3) if wall_s else None,
        "kernels": summary["kernels"],
        "kernel_ms": summary["kernel_ms"],
        "by_kind": summary["by_kind"],
        "launch_calls": launches,
        "launch_cpu_ms": launch_cpu_us / 1e3,
        "roles": roles,
        "top_kernels_ms": summary["top_kernels_ms"],
    }


def kernel_summary(kernels: list[tuple[float, float, str]], steps: int = 1) -> dict[str, Any]:
    """GPU busy time (union of the intervals), kernel time and count by kind, the top kernels; per step.
    `kernels`: (start µs, end µs, name) of every GPU activity in the `steps` steps covered."""
    by_kind: dict[str, dict[str, float]] = {}
    for start, end, name in kernels:
        row = by_kind.setdefault(_kernel_kind(name), {"count": 0, "ms": 0.0})
        row["count"] += 1 / steps
        row["ms"] += (end - start) / 1e3 / steps
    busy = 0.0
    cur_s = cur_e = None
    for start, end, _ in sorted(kernels):
        if cur_e is None or start > cur_e:
            if cur_e is not None and cur_s is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = start, end
        else:
            cur_e = max(cur_e, end)
    if cur_e is not None and cur_s is not None:
        busy += cur_e - cur_s
    top: dict[str, float] = {}
    for start, end, name in kernels:
        top[name[:80]] = top.get(name[:80], 0.0) + (end - start) / 1e3 / steps
    return {
        "gpu_busy_ms": busy / 1e3 / steps,
        "kernels": len(kernels) / steps,
        "kernel_ms": sum(r["ms"] for r in by_kind.values()),
        "by_kind": by_kind,
        "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:15]),
    }


_TRACE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def analyse_trace(path: Path, steps: int) -> dict[str, Any]:
    """`kernel_summary` of a chrome trace (torch.profiler's export, e.g. Megatron's `--profile
    --use-pytorch-profiler` output `torch_profile/rank-0.json.gz`) covering `steps` training steps: the
    graphed steps that this script's in-process profile cannot run (CUPTI records a replayed graph's
    kernels one by one; the kernel count per step shows whether it did)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        events = json.load(f).get("traceEvents", [])
    kernels = [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e.get("name", "")))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in _TRACE_CATS
    ]
    return kernel_summary(kernels, steps)


GEMM_ROLES = {"fprop": "linear_fwd", "dgrad": "linear_dgrad", "wgrad": "linear_wgrad"}


def linear_role(kw: dict[str, Any]) -> str:
    """The role of an instrumented linear GEMM: its hook names the GEMM; a call without one is fprop."""
    return GEMM_ROLES[kw.get("gemm") or "fprop"]


def wrap_fused_attention(state: dict[str, Any], record_function: Any) -> None:
    """The fused attention core takes the tree's qk / pv values as arguments: run the variant's instead."""
    try:
        from megaquant.ops.attention_core import FusedCore
    except ImportError:  # a tree instrumented before the fused core existed
        return
    call = FusedCore.__call__

    def wrapped(self: Any, qk: str, pv: str) -> Any:
        values = state["values"]
        if state["profiling"]:
            with record_function("mq.attention"):
                return call(self, values["qk"], values["pv"])
        return call(self, values["qk"], values["pv"])

    FusedCore.__call__ = wrapped  # type: ignore[method-assign]


WGRAD_BINDING = "_mq_wgrad_matmul"
"""The name `megaquant instrument` binds the wgrad hook's op to in a hooked module (rewrites/
megatron-core.instrument.toml: `from megaquant.ops import quant_matmul as _mq_wgrad_matmul`)."""


def rebind_wgrad(op: Any, modules: Sequence[Any] | None = None) -> list[str]:
    """Point every hooked module's wgrad binding at `op` (the wrapped quant_matmul); the names rebound.

    The fprop and dgrad hooks look `quant_matmul` up on megaquant.ops at each call, so wrapping the module
    attribute reaches them; the wgrad hook calls a name its module bound at import. Before this (session
    12) the wrapper never saw wgrad, whose GEMMs therefore ran with the tree's own value (bf16 in a tree
    set to none): every quantized variant's profile missed wgrad's casts (benchmarks.md §6g)."""
    done = []
    for module in list(sys.modules.values()) if modules is None else modules:
        found = getattr(module, "__dict__", {}).get(WGRAD_BINDING)
        if found is not None and found is not op:
            setattr(module, WGRAD_BINDING, op)
            done.append(getattr(module, "__name__", "?"))
    return done


def inner(ns: argparse.Namespace, argv: list[str]) -> int:
    import torch
    from megatron.training import training
    from torch.profiler import ProfilerActivity, profile, record_function

    import megaquant.ops as ops
    from megaquant.launch import pretrain

    try:
        from megaquant.ops import weights  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        weights = None
    try:
        from megaquant.ops import counters  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        counters = None
    variants = ns.variants.split(",")
    plan = [(v, k) for v in variants for k in range(ns.warmup + 1 + ns.timed)]
    profiled = set(ns.profile.split(",")) if ns.profile else set(variants)
    state: dict[str, Any] = {"i": 0, "values": _role_values("bf16"), "profiling": False}
    out: dict[str, Any] = {"root": str(Path(ops.__file__).resolve().parents[2]), "steps": [], "profiles": {}}

    def wrap(name: str, value_at: int, role_of: Any) -> None:
        fn = getattr(ops, name)

        def wrapped(*args: Any, **kw: Any) -> Any:
            role = role_of(kw)
            args = (*args[:value_at], state["values"][role], *args[value_at + 1 :])
            if state["profiling"]:
                with record_function("mq." + role):
                    return fn(*args, role=role, **kw)
            return fn(*args, role=role, **kw)

        setattr(ops, name, wrapped)

    wrap("quant_matmul", 2, linear_role)
    wrap("quant_baddbmm", 3, lambda kw: "qk")
    wrap("quant_bmm", 2, lambda kw: "pv")
    wrap_fused_attention(state, record_function)
    original = training.train_step

    def save() -> None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(out, indent=1) + "\n")

    def train_step(*args: Any, **kwargs: Any) -> Any:
        i = state["i"]
        if i == 0:  # the model is built: every hooked module is imported
            out["wgrad_rebound"] = rebind_wgrad(ops.quant_matmul)
            if not out["wgrad_rebound"]:
                print(f"profile_step: no {WGRAD_BINDING} found: wgrad runs unwrapped", flush=True)
        variant, k = plan[min(i, len(plan) - 1)]
        parts = variant.split("+")
        state["values"] = _role_values(parts[0])
        ops.configure(tensor_scale=True) if "ts" in parts else ops.configure()
        if weights is not None:
            weights.enable_weight_cache() if "cache" in parts else weights.disable_weight_cache()
        prof_now = k == ns.warmup and variant in profiled and i < len(plan)
        before = counters.snapshot() if counters is not None else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        prof = None
        if prof_now:
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.__enter__()
            state["profiling"] = True
        start = time.perf_counter()
        result = original(*args, **kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        loss = pretrain.loss_from_reduced(result[0])
        row: dict[str, Any] = {"i": i, "variant": variant, "k": k, "wall_ms": wall * 1e3, "peak_bytes": peak}
        row["loss"] = loss
        row["loss_hex"] = None if loss is None else _hex(loss)
        if counters is not None and before is not None:
            after = counters.snapshot()
            row["operands"] = {
                role: {p: n - before["operands"].get(role, {}).get(p, 0) for p, n in paths.items()}
                for role, paths in after["operands"].items()
            }
        if weights is not None:
            row["weight_cache"] = weights.stats()
        if prof is not None:
            state["profiling"] = False
            prof.__exit__(None, None, None)
            t0 = time.perf_counter()
            summary = analyse(prof, wall)
            summary["peak_bytes"] = peak
            summary["analyse_s"] = time.perf_counter() - t0
            out["profiles"][variant] = summary
            if ns.table_dir is not None:
                ns.table_dir.mkdir(parents=True, exist_ok=True)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                (ns.table_dir / f"{ns.label}-{variant}.txt").write_text(table)
        out["steps"].append(row)
        print(f"profile_step: {ns.label} {variant} step {k}: {wall * 1e3:.1f} ms loss {loss}", flush=True)
        save()
        state["i"] += 1
        return result

    training.train_step = train_step
    code = pretrain.main(argv)
    save()
    return code


# ------------------------------------------------------------------------------ host cost per call


def _stub_kernels() -> str:
    """CPU only (--stub): every Triton launch a no-op and CPU tensors served as if on CUDA, so that what is
    timed is megaquant's own Python per call plus the launch path up to the C launcher: this tree's direct
    path (formats._launch) with its final C call replaced, or, in a tree without it, the kernels'
    `kernel[grid](...)` replaced (Triton's own launcher, ~13 us of Python per launch on the 2-core dev VM
    with triton 3.6, then excluded)."""
    import megaquant.formats as formats
    import megaquant.formats._triton as kernels

    formats._triton_module = lambda x, fmt, backend, opts: kernels  # type: ignore[assignment]
    keys = kernels._DEFAULTS  # type: ignore[attr-defined]
    kernels._options = lambda x, fmt, **o: kernels._resolve(  # type: ignore[attr-defined]
        fmt, *(o.get(k, d) for k, d in keys), o.get("tensor_scale", False)
    )
    try:
        from megaquant.formats import _launch
    except ImportError:

        class Stub:
            def __getitem__(self, grid: object) -> Any:
                return lambda *a, **k: None

        for name in ("_mx_lastaxis_kernel", "_mx_inner_kernel", "_hif8_kernel", "_amax_bits_kernel",
                     "_hif8_scaled_kernel"):  # fmt: skip
            setattr(kernels, name, Stub())
        return "kernel[grid] stubbed (Triton's launcher excluded)"

    class Chain:
        calls: list[object] = []

    class Knobs:
        debug = False
        instrumentation_mode = ""
        launch_enter_hook = launch_exit_hook = Chain()

    proto = object.__new__(_launch._Protocol)
    proto.runtime = proto.compilation = Knobs()  # type: ignore[assignment]
    proto.enter = proto.exit = Knobs.launch_enter_hook
    proto.device = lambda: 0  # type: ignore[method-assign]
    proto.stream = lambda device: 0  # type: ignore[method-assign]

    class Driver:
        active: Any = None

    proto.config = Driver()  # type: ignore[assignment]
    proto.active = None
    _launch._STATE["protocol"] = proto

    class Compiled:
        function = 0
        packed_metadata = (4, 1, 0)

        @staticmethod
        def run(*args: object) -> None:
            return None

    def normal(self: Any, grid: Any, ptrs: Any, ints: Any, key: Any) -> None:
        self.entries[key] = (Compiled.run, Compiled.function, Compiled.packed_metadata)

    _launch.Launcher._normal = normal  # type: ignore[method-assign]
    return "direct path, C launcher stubbed"


def microbench(ns: argparse.Namespace) -> int:
    """Host time per call (no profiler): the public fake_quant, the ops' GEMMs as Megatron's hooks call
    them (no autograd graph), plain matmul and one allocation; in a tree with formats._launch each row
    also with the direct launch path off (MEGAQUANT_DIRECT_LAUNCH=0's switch, in-process)."""
    import torch

    import megaquant.ops as ops
    from megaquant.formats import fake_quant

    stub = _stub_kernels() if ns.stub else None
    dev = torch.device("cpu" if ns.stub else "cuda")
    try:
        from megaquant.formats import _launch

        switch: Any = _launch.set_direct
    except ImportError:
        switch = None
    out: dict[str, Any] = {"root": str(Path(ops.__file__).resolve().parents[2]), "stub": stub, "rows": []}
    if not ns.stub:
        import triton

        out["torch"], out["triton"] = torch.__version__, triton.__version__
    if ns.stub:  # tiny CPU GEMMs on one thread: the host path is what is timed
        torch.set_num_threads(1)
        cases = {"stub 2-D 8x64": ((8, 64), (16, 64)), "stub megatron 4x2x64": ((4, 2, 64), (16, 64))}
    else:
        cases = {
            "act 2048x2048": ((2048, 2048), (2048, 2048)),
            "megatron 1024x2x2048": ((1024, 2, 2048), (2048, 2048)),
            "small 64x2048": ((64, 2048), (2048, 2048)),
        }
    sync = torch.cuda.synchronize if not ns.stub else (lambda: None)
    for case, (xshape, wshape) in cases.items():
        x = torch.randn(xshape, device=dev, dtype=torch.bfloat16)
        w = torch.randn(wshape, device=dev, dtype=torch.bfloat16)
        g = torch.randn(*xshape[:-1], wshape[0], device=dev, dtype=torch.bfloat16)
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        calls: dict[str, Any] = {
            "fake_quant mxfp8_e4m3": lambda x=x: fake_quant(x, "mxfp8_e4m3"),
            "fake_quant hifp8": lambda x=x: fake_quant(x, "hifp8"),
            "fake_quant hifp8 tensor_scale": lambda x=x: fake_quant(x, "hifp8", tensor_scale=True),
            "quant_matmul fprop x @ w.t() mxfp8": lambda x=x, w=w: ops.quant_matmul(
                x, w.t(), "mxfp8", gemm="fprop"
            ),
            "quant_matmul dgrad g @ w mxfp8": lambda g=g, w=w: ops.quant_matmul(
                g, w, "mxfp8", grad=True, gemm="dgrad"
            ),
            "quant_matmul wgrad g.t() @ x mxfp8": lambda g2=g2, x2=x2: ops.quant_matmul(
                g2.t(), x2, "mxfp8", grad=True, gemm="wgrad"
            ),
            "quant_matmul fprop hifp8": lambda x=x, w=w: ops.quant_matmul(x, w.t(), "hifp8", gemm="fprop"),
            "plain matmul x @ w.t()": lambda x=x, w=w: torch.matmul(x, w.t()),
            "torch.empty_like(x)": lambda x=x: torch.empty_like(x),
        }
        for (name, fn), direct in itertools.product(calls.items(), (True, False) if switch else (None,)):
            if switch is not None and not ns.stub:
                switch(direct)
            elif direct is False:
                continue  # the stub replaces the direct path's last call: no Triton path to compare
            with torch.no_grad():
                for _ in range(5):
                    fn()
                sync()
                n, best, total = ns.calls, float("inf"), 0.0
                for _ in range(ns.repeats):
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    t1 = time.perf_counter()
                    sync()
                    t2 = time.perf_counter()
                    best, total = min(best, (t1 - t0) / n), total + (t2 - t0) / n
            row = {
                "case": case,
                "call": name,
                "direct": direct,
                "host_us": best * 1e6,
                "total_us": total / ns.repeats * 1e6,
            }
            out["rows"].append(row)
            label = {True: "direct", False: "triton", None: ""}[direct]
            print(f"microbench: {case:20s} {name:38s} {label:6s} host {row['host_us']:7.1f} us/call, "
                  f"with GPU {row['total_us']:7.1f} us/call", flush=True)  # fmt: skip
    if ns.cprofile:  # where the host time of one quantized GEMM goes (the last case's fprop, direct path)
        import cProfile
        import io
        import pstats

        if switch is not None and not ns.stub:
            switch(True)
        fn = calls["quant_matmul fprop x @ w.t() mxfp8"]
        prof = cProfile.Profile()
        with torch.no_grad():
            prof.enable()
            for _ in range(ns.calls):
                fn()
            prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        out["cprofile"] = text.getvalue()
        print(f"microbench: cProfile of {ns.calls} fprop mxfp8 calls, {case}:\n{text.getvalue()}", flush=True)
    if switch is not None:
        switch(None)
        out["launch_stats"] = _launch.stats()
    if ns.out is not None:  # optional here: the rows are printed as they come
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


# ------------------------------------------------------------------------------ comparison


def compare(a: Path, b: Path) -> int:
    """Same losses bit for bit at every step both ran (same variants in the same order)?"""
    sa, sb = (json.loads(p.read_text())["steps"] for p in (a, b))
    same = differ = 0
    for ra, rb in zip(sa, sb, strict=False):
        if ra["variant"].split("+cache")[0] != rb["variant"].split("+cache")[0]:
            print(f"step {ra['i']}: variants differ ({ra['variant']} vs {rb['variant']}): stop")
            break
        if ra["loss_hex"] == rb["loss_hex"]:
            same += 1
        else:
            differ += 1
            print(f"step {ra['i']} {ra['variant']} vs {rb['variant']}: {ra['loss']!r} != {rb['loss']!r}")
    print(f"compare: {same} steps bit-identical, {differ} differ ({len(sa)} vs {len(sb)} steps)")
    return 0 if differ == 0 and same > 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, help="instrumented Megatron tree (all sites none)")
    parser.add_argument("--data-root", type=Path, help="`megaquant data prepare --dataset sample` output")
    parser.add_argument("--root", type=Path, default=ROOT, help="the megaquant checkout to profile")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--table-dir", type=Path, default=None, help="key_averages tables here")
    parser.add_argument("--label", default="mine")
    parser.add_argument("--model", default="llama32-1b")
    parser.add_argument("--preset", default="single-gpu")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument(
        "--extra", default="", help="Megatron arguments, e.g. '--num-layers 2 --global-batch-size 2'"
    )
    parser.add_argument("--profile", default="", help="variants to profile (default: all)")
    parser.add_argument("--warmup", type=int, default=1, help="steps per variant before the profiled one")
    parser.add_argument("--timed", type=int, default=1, help="unprofiled steps per variant after it")
    parser.add_argument("--timeout-s", type=float, default=400.0)
    parser.add_argument(
        "--train-steps", type=int, default=64, help="--train-samples / global batch (>= steps)"
    )
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--microbench", action="store_true", help="host time per op call (see microbench)")
    parser.add_argument("--stub", action="store_true", help="--microbench on CPU with the kernels stubbed")
    parser.add_argument("--calls", type=int, default=200, help="--microbench: calls per timing")
    parser.add_argument(
        "--cprofile", action="store_true", help="--microbench: cProfile one quantized GEMM's host path too"
    )
    parser.add_argument("--repeats", type=int, default=5, help="--microbench: timings per row (min taken)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ns = parser.parse_args(argv[:cut])  # Megatron's own arguments (inner only) follow "--"
    if ns.compare:
        return compare(*ns.compare)
    if ns.microbench:
        return microbench(ns)
    if ns.out is None:
        parser.error("--out is required (except with --microbench or --compare)")
    if ns.inner:
        return inner(ns, argv[cut + 1 :])
    steps = len(ns.variants.split(",")) * (ns.warmup + 1 + ns.timed)
    args = megatron_args(ns, steps)
    tree = ns.tree.resolve()
    paths = (str(tree), str(ns.root.resolve()), os.environ.get("PYTHONPATH", ""))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    }
    own = ["--out", str(ns.out.resolve()), "--label", ns.label, "--variants", ns.variants]
    own += ["--warmup", str(ns.warmup), "--timed", str(ns.timed), "--profile", ns.profile]
    if ns.table_dir is not None:
        own += ["--table-dir", str(ns.table_dir.resolve())]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd += [str(Path(__file__).resolve()), "--inner", *own, "--", *args]
    print("profile_step:", " ".join(cmd[:12]), "...", flush=True)
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, timeout=ns.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        print(f"profile_step: {ns.label}: killed after {ns.timeout_s:.0f} s", flush=True)
        return 124
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
