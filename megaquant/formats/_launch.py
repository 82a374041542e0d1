"""Launch compiled Triton kernels without Triton's Python launcher on the hot path.

`JITFunction.run` costs tens of microseconds of Python per launch (binding ~30 keyword arguments,
building the specialization and its string cache key, the kernel-cache lookup, the global-value check,
launch metadata and the launch hooks) against a few microseconds for the C launcher it ends in. A
`Launcher` holds one kernel with fixed constexprs and options; the first launch of each *specialization*
goes through Triton's normal path (which compiles if needed) and remembers the compiled kernel; later
launches with the same specialization call that kernel's C launcher directly, with the same arguments
Triton itself would pass it (pointers as integers: the launcher takes an int as the device address).

The specialization key holds everything Triton 3.6 specializes a launch on that can change between
launches of one Launcher: the current CUDA device, every pointer argument's dtype and whether its address
is a multiple of 16, every integer argument's Triton type (i32 / i64 / u64), whether it equals 1 (Triton
turns it into a constexpr) and whether it is a multiple of 16, and Triton's runtime knobs that enter its
options (`debug`, `instrumentation_mode`). Constexprs and options are fixed per Launcher.

The direct path is taken only on Triton versions whose launch protocol was checked on a GPU
(`DIRECT_VERSIONS`), with no launch hooks installed (a profiler such as proton adds them: Triton's own
path then runs), no pre-run hooks, and unless MEGAQUANT_DIRECT_LAUNCH=0. Everything else takes Triton's
normal path, so the results are the same kernels on the same arguments either way. Nothing here
synchronizes with the device or creates a tensor: a launch is as CUDA-graph-capture safe as Triton's.
Not checked per call (Triton checks it): that the global values a kernel read at compile time are
unchanged; megaquant's kernels read only constants.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

__all__ = [
    "DIRECT_ENV",
    "DIRECT_VERSIONS",
    "Launcher",
    "direct_supported",
    "int_spec",
    "set_direct",
    "spec_key",
    "stats",
]

DIRECT_ENV = "MEGAQUANT_DIRECT_LAUNCH"
"""Set to 0 to launch every kernel through Triton's own launcher (JITFunction.run)."""
DIRECT_VERSIONS = ("3.6.",)
"""Triton versions whose JITFunction.run -> CompiledKernel.run protocol the direct path replicates and
that were checked bit for bit on a GPU (H200, triton 3.6.0). Other versions take the normal path."""
_MAX_ENTRIES = 256
"""Specializations remembered per Launcher (a new shape class past this starts the table over)."""

_STATS = {"direct": 0, "normal": 0}


def stats() -> dict[str, int]:
    """Launches so far through the direct path and through Triton's normal path (all Launchers)."""
    return dict(_STATS)


def int_spec(v: int) -> int:
    """An int argument's key: bit 0 = multiple of 16, bit 1 = equal to 1 (Triton makes it a constexpr),
    the bits above = v >> 31, which is 0 for every non-negative int32 and -1 for every negative one, so
    that Triton's types i32 / i64 / u64 (by range) never share a key; finer than Triton for large ints."""
    return v >> 31 << 2 | (v == 1) << 1 | (not v & 15)


def spec_key(ptrs: Sequence[torch.Tensor], addrs: Sequence[int], ints: Sequence[int]) -> list[object]:
    """What Triton specializes a launch's runtime arguments on (pointers: dtype, address a multiple of 16;
    ints: int_spec), at least as finely as Triton does (tests/test_launch.py checks it against Triton's
    own binder)."""
    return [
        *[t.dtype for t in ptrs],
        *[not a & 15 for a in addrs],
        *[v >> 31 << 2 | (v == 1) << 1 | (not v & 15) for v in ints],  # int_spec, inlined
    ]


class _Protocol:
    """What the direct path calls, bound once: the current device, its raw stream, Triton's knobs."""

    __slots__ = ("active", "compilation", "config", "device", "enter", "exit", "runtime", "stream")

    def __init__(self) -> None:
        from triton import knobs
        from triton.runtime import driver

        self.config, self.active = driver, driver.active
        get_stream = driver.active.get_current_stream
        get_device = driver.active.get_current_device
        raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        raw_device = getattr(torch._C, "_cuda_getDevice", None)
        if raw_stream is None or raw_device is None or get_stream is not raw_stream:
            raise LookupError("Triton's driver takes its stream from elsewhere")
        if get_device is not torch.cuda.current_device:
            raise LookupError("Triton's driver takes its device from elsewhere")
        self.runtime, self.compilation = knobs.runtime, knobs.compilation
        if self.runtime.interpret:
            raise LookupError("the CPU interpreter launches no compiled kernels")
        self.enter, self.exit = self.runtime.launch_enter_hook, self.runtime.launch_exit_hook
        if not (
            isinstance(getattr(self.enter, "calls", None), list)
            and isinstance(getattr(self.exit, "calls", None), list)
        ):
            raise LookupError("Triton's launch hooks are not hook chains")
        self.device: Callable[[], int] = raw_device
        self.stream: Callable[[int], int] = raw_stream

    def hooks_idle(self) -> bool:
        """No launch hooks installed (the chains are the ones bound, and empty), the same active driver."""
        rt = self.runtime
        return (
            self.config.active is self.active
            and rt.launch_enter_hook is self.enter
            and rt.launch_exit_hook is self.exit
            and not (self.enter.calls or self.exit.calls)
        )


_UNSET = object()
_STATE: dict[str, Any] = {"protocol": _UNSET}


def _protocol() -> _Protocol | None:
    proto: _Protocol | None = _STATE["protocol"]
    if proto is _UNSET:
        proto = None
        if os.environ.get(DIRECT_ENV, "1") != "0" and triton.__version__.startswith(DIRECT_VERSIONS):
            try:
                proto = _Protocol()
            except (ImportError, AttributeError, RuntimeError, LookupError):
                proto = None
        _STATE["protocol"] = proto
    return proto


def direct_supported() -> bool:
    """True when launches take the direct path (a checked Triton, MEGAQUANT_DIRECT_LAUNCH not 0)."""
    return _protocol() is not None


def set_direct(enabled: bool | None) -> None:
    """Turn the direct path off (False), or decide again from the Triton version and the environment
    (True / None), e.g. to compare both paths in one process."""
    _STATE["protocol"] = None if enabled is False else _UNSET


class Launcher:
    """`kernel[grid](*ptrs, *ints, **meta)` with fixed constexprs and options `meta`, for kernels whose
    signature is the pointer parameters, then the int parameters, then constexprs only.

    `views`: per pointer, a dtype the tensor is viewed as for the kernel (the bf16 output stored as int16
    bits), or None; a function of the given tensor's dtype, which the key holds. The direct path passes
    the address, so no view is made there.
    """

    __slots__ = ("entries", "kernel", "meta", "n_ints", "n_ptrs", "tail", "views")

    def __init__(
        self,
        kernel: Any,
        n_ptrs: int,
        n_ints: int,
        views: Sequence[torch.dtype | None] = (),
        **meta: Any,
    ) -> None:
        self.kernel = kernel
        self.n_ptrs, self.n_ints = n_ptrs, n_ints
        self.meta = meta
        self.views = (*views, *(None,) * (n_ptrs - len(views)))
        self.entries: dict[tuple[object, ...], tuple[Any, Any, Any]] = {}
        self.tail: tuple[Any, ...] | None = None
        params = getattr(kernel, "params", None)
        if params is None:  # the CPU interpreter's function: Triton's own path only
            return
        n_run = n_ptrs + n_ints
        if (
            len(params) < n_run
            or any(p.is_constexpr for p in params[:n_run])
            or not all(p.is_constexpr for p in params[n_run:])
        ):
            raise TypeError(f"{kernel.__name__}: expected {n_run} runtime parameters, then constexprs only")
        empty = inspect.Parameter.empty
        missing = [p.name for p in params[n_run:] if p.name not in meta and p.default is empty]
        if missing:
            raise TypeError(f"{kernel.__name__}: constexprs {missing} not given")
        # the constexpr values in signature order, as Triton's bound arguments hand them to the launcher
        self.tail = tuple(meta.get(p.name, p.default) for p in params[n_run:])

    def __call__(self, grid: tuple[int, int, int], ptrs: Sequence[torch.Tensor], ints: Sequence[int]) -> None:
        proto = _STATE["protocol"]
        if proto is _UNSET:
            proto = _protocol()
        if proto is None or self.tail is None:
            self._normal(grid, ptrs, ints, None)
            return
        addrs = [t.data_ptr() for t in ptrs]
        key = (  # spec_key, inlined
            proto.device(),
            proto.runtime.debug,
            proto.compilation.instrumentation_mode,
            *[t.dtype for t in ptrs],
            *[not a & 15 for a in addrs],
            *[v >> 31 << 2 | (v == 1) << 1 | (not v & 15) for v in ints],
        )
        entry = self.entries.get(key)
        if entry is None or self.kernel.pre_run_hooks or not proto.hooks_idle():
            self._normal(grid, ptrs, ints, key)
            return
        _STATS["direct"] += 1
        entry[0](*grid, proto.stream(key[0]), entry[1], entry[2], None, None, None, *addrs, *ints, *self.tail)

    def _normal(
        self,
        grid: tuple[int, int, int],
        ptrs: Sequence[torch.Tensor],
        ints: Sequence[int],
        key: tuple[object, ...] | None,
    ) -> None:
        """Triton's own launch; remembers the compiled kernel under `key` for the direct path."""
        _STATS["normal"] += 1
        args = [t if v is None else t.view(v) for t, v in zip(ptrs, self.views, strict=True)]
        kernel = self.kernel[grid](*args, *ints, **self.meta)
        if key is None or kernel is None:
            return
        if hasattr(kernel, "result"):  # an asynchronous compile's future
            kernel = kernel.result()
        if len(self.entries) >= _MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (kernel.run, kernel.function, kernel.packed_metadata)
