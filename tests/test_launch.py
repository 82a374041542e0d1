"""(issue 9) formats._launch: the direct launch path takes a remembered compiled kernel only for a launch
that Triton would specialize the same way; on the GPU its results equal Triton's own launch bit for bit."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton", reason="needs triton")
L = pytest.importorskip("megaquant.formats._launch", reason="needs triton")
T = pytest.importorskip("megaquant.formats._triton", reason="needs triton")

INTS = [0, 1, 2, 15, 16, 17, 32, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**62 + 16, 2**63 - 1]
INTS += [2**63, 2**63 + 16, 2**64 - 16, -1, -16, -17, -(2**31), -(2**31) - 16]


def _binder(kernel: Any) -> Any:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    try:
        backend = make_backend(GPUTarget("cuda", 90, 32))
    except Exception as exc:  # noqa: BLE001  (no CUDA backend in this Triton)
        pytest.skip(f"no CUDA backend: {exc}")
    return create_function_from_signature(kernel.signature, kernel.params, backend)


def _meta(kernel: Any) -> dict[str, Any]:
    """Constexpr values for a kernel's launch (any: the key holds runtime arguments only)."""
    return {p.name: 1 for p in kernel.params if p.is_constexpr}


def test_int_spec_is_at_least_as_fine_as_tritons() -> None:
    """Ints with the same int_spec get the same Triton specialization (type, ==1 constexpr, divisibility)."""
    binder = _binder(T._hif8_kernel)
    x = torch.zeros(64, dtype=torch.bfloat16)
    seen: dict[int, object] = {}
    for v in INTS:
        spec = binder(x, x, v, **_meta(T._hif8_kernel))[1][2]
        assert seen.setdefault(L.int_spec(v), spec) == spec, (v, L.int_spec(v), spec)
    small = {L.int_spec(v) for v in INTS if 0 <= v < 2**31}
    assert len(small) == 3  # and within int32 not finer than Triton: multiple of 16, 1, other


@pytest.mark.parametrize(
    "kernel,n_ptrs,n_ints",
    [
        ("_mx_lastaxis_kernel", 4, 4),
        ("_mx_inner_kernel", 4, 4),
        ("_hif8_kernel", 2, 1),
        ("_amax_bits_kernel", 2, 1),
        ("_hif8_scaled_kernel", 4, 2),
    ],
)
def test_spec_key_determines_tritons_specialization(kernel: str, n_ptrs: int, n_ints: int) -> None:
    """Over pointers of several dtypes and alignments and ints of every class: equal spec_key ->
    equal Triton specialization of the runtime arguments (so a remembered kernel is the one Triton picks)."""
    k = getattr(T, kernel)
    binder = _binder(k)
    base = {
        dt: torch.zeros(64, dtype=dt) for dt in (torch.bfloat16, torch.float16, torch.float32, torch.int16)
    }
    tensors = [base[dt][off:] for dt in base for off in (0, 1, 4, 8)]
    seen: dict[tuple[object, ...], object] = {}
    ints_pool = [0, 1, 2, 16, 17, 2**31 + 16, 2**40 + 1]
    combos = 0
    ptr_step = max(1, len(tensors) ** n_ptrs // 60 + 1)  # about 60 pointer tuples, 40 int tuples
    int_step = max(1, len(ints_pool) ** n_ints // 40 + 1)
    for ptrs in itertools.islice(itertools.product(tensors, repeat=n_ptrs), 0, None, ptr_step):
        for ints in itertools.islice(itertools.product(ints_pool, repeat=n_ints), 0, None, int_step):
            spec = tuple(binder(*ptrs, *ints, **_meta(k))[1][: n_ptrs + n_ints])
            key = tuple(L.spec_key(ptrs, [t.data_ptr() for t in ptrs], ints))
            assert seen.setdefault(key, spec) == spec, (key, spec, seen[key])
            combos += 1
    assert combos >= 60 and len(seen) > 10


class _FakeCompiled:
    def __init__(self, log: list[tuple[object, ...]]) -> None:
        self.log = log
        self.function = "fn"
        self.packed_metadata = ("meta",)

    def run(self, *args: object) -> None:
        self.log.append(("direct", *args))


class _FakeKernel:
    """A JITFunction stand-in: Triton's own launch is logged and returns a compiled kernel."""

    def __init__(self) -> None:
        real = T._hif8_kernel
        self.params = real.params
        self.__name__ = "fake"
        self.pre_run_hooks: list[object] = []
        self.log: list[tuple[object, ...]] = []
        self.compiled = _FakeCompiled(self.log)

    def __getitem__(self, grid: object) -> Any:
        def launch(*args: object, **meta: object) -> _FakeCompiled:
            self.log.append(("normal", grid, args))
            return self.compiled

        return launch


class _Chain:
    def __init__(self) -> None:
        self.calls: list[object] = []


class _Driver:
    """Triton's DriverConfig stand-in: its active driver is itself."""

    @property
    def active(self) -> _Driver:
        return self


class _Knobs:
    debug = False
    instrumentation_mode = ""


def _fake_protocol() -> Any:
    proto = object.__new__(L._Protocol)
    proto.runtime = _Knobs()
    proto.compilation = _Knobs()
    proto.enter, proto.exit = _Chain(), _Chain()
    proto.runtime.launch_enter_hook, proto.runtime.launch_exit_hook = proto.enter, proto.exit  # type: ignore[attr-defined]
    proto.device = lambda: 0
    proto.stream = lambda device: 1234
    proto.config = proto.active = _Driver()
    return proto


@pytest.fixture
def fake_direct(monkeypatch: pytest.MonkeyPatch) -> Any:
    proto = _fake_protocol()
    monkeypatch.setitem(L._STATE, "protocol", proto)
    return proto


def _launch(launcher: Any, x: torch.Tensor, numel: int) -> str:
    kernel = launcher.kernel
    before = len(kernel.log)
    launcher((3, 1, 1), (x, x), (numel,))
    assert len(kernel.log) == before + 1
    return str(kernel.log[-1][0])


def test_same_specialization_launches_directly_others_take_tritons_path(fake_direct: Any) -> None:
    kernel = _FakeKernel()
    launcher = L.Launcher(kernel, 2, 1, **_meta(T._hif8_kernel))
    buf = torch.zeros(256, dtype=torch.bfloat16)
    assert _launch(launcher, buf, 4096) == "normal"  # first of its kind: Triton's path, remembered
    addr = buf.data_ptr()
    assert list(launcher.entries) == [(0, False, "", *L.spec_key((buf, buf), (addr, addr), (4096,)))]
    assert _launch(launcher, buf, 4096) == "direct"
    assert kernel.log[-1][:6] == ("direct", 3, 1, 1, 1234, "fn")  # grid, stream, function
    assert kernel.log[-1][6:10] == (("meta",), None, None, None)  # metadata, no launch hooks
    assert kernel.log[-1][10:13] == (buf.data_ptr(), buf.data_ptr(), 4096)  # addresses, ints
    assert kernel.log[-1][13:] == launcher.tail and len(launcher.tail) == 6  # the constexprs
    assert _launch(launcher, buf, 8192) == "direct"  # another multiple of 16: same specialization
    assert _launch(launcher, buf[1:], 4096) == "normal"  # a misaligned pointer: another entry
    assert _launch(launcher, buf[8:], 4096) == "direct"  # 16 bytes in: aligned again
    assert _launch(launcher, buf, 4097) == "normal"  # not a multiple of 16
    assert _launch(launcher, buf, 1) == "normal"  # 1 is a constexpr to Triton
    assert _launch(launcher, buf, 2**31 + 16) == "normal"  # i64
    assert _launch(launcher, buf.float(), 4096) == "normal"  # another dtype
    assert _launch(launcher, buf, 2**31 + 32) == "direct"
    assert len(launcher.entries) == 6


def test_launch_hooks_knobs_and_pre_run_hooks_take_tritons_path(fake_direct: Any) -> None:
    kernel = _FakeKernel()
    launcher = L.Launcher(kernel, 2, 1, **_meta(T._hif8_kernel))
    buf = torch.zeros(64, dtype=torch.float32)
    assert _launch(launcher, buf, 64) == "normal"
    fake_direct.enter.calls.append(print)  # a profiler's launch hook
    assert _launch(launcher, buf, 64) == "normal"
    fake_direct.enter.calls.clear()
    assert _launch(launcher, buf, 64) == "direct"
    fake_direct.runtime.debug = True  # enters Triton's options: another kernel
    assert _launch(launcher, buf, 64) == "normal"
    fake_direct.runtime.debug = False
    kernel.pre_run_hooks.append(print)
    assert _launch(launcher, buf, 64) == "normal"


def test_other_triton_versions_and_the_switch_take_tritons_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L.triton, "__version__", "3.5.1")
    L.set_direct(True)
    try:
        assert not L.direct_supported()
        kernel = _FakeKernel()
        launcher = L.Launcher(kernel, 2, 1, **_meta(T._hif8_kernel))
        buf = torch.zeros(64)
        assert [_launch(launcher, buf, 64) for _ in range(3)] == ["normal"] * 3
        assert not launcher.entries
        monkeypatch.setattr(L.triton, "__version__", "3.6.0")
        monkeypatch.setenv(L.DIRECT_ENV, "0")
        L.set_direct(True)
        assert not L.direct_supported()
    finally:
        L.set_direct(None)


def test_launcher_checks_the_kernel_signature() -> None:
    with pytest.raises(TypeError, match="runtime parameters"):
        L.Launcher(T._hif8_kernel, 2, 2, **_meta(T._hif8_kernel))
    with pytest.raises(TypeError, match="not given"):
        L.Launcher(T._hif8_kernel, 2, 1, BLOCK=2048)


# ------------------------------------------------------------------------------------------- GPU


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_direct_launches_equal_tritons_own_on_the_gpu() -> None:
    """Every MX/HiF8 option class, both kernel layouts, transposed operands, misaligned inputs: the
    direct path (second call of a specialization) gives the bits of Triton's own launch and of the
    reference; on triton 3.6 the direct path is actually taken."""
    from megaquant.formats import fake_quant, quantizer

    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(3 * 1024 * 1024 + 8, device="cuda", generator=g) * 3
    cases = [("mxfp8_e4m3", {}), ("mxfp8_e5m2", {"scale": "rceil"}), ("mxfp4_e2m1", {"rounding": "away"})]
    cases += [("hifp8", {}), ("hifp8", {"tensor_scale": True})]
    shapes = [((1024, 2048), False), ((2048, 1024), True), ((2, 300, 96), False)]
    before = L.stats()["direct"]
    kinds = ((torch.bfloat16, 0), (torch.bfloat16, 1), (torch.float32, 0))  # offset 1: misaligned
    for (fmt, kw), (shape, transposed), (dtype, offset) in itertools.product(cases, shapes, kinds):
        n = 1
        for s in shape:
            n *= s
        flat = base.to(dtype)[offset : offset + n]
        x = flat.view(shape[::-1]).t() if transposed else flat.view(shape)
        for axis in (-1, -2) if x.dim() > 1 else (-1,):
            if fmt == "hifp8" and axis == -2:
                continue
            want = fake_quant(x, fmt, axis=axis, backend="reference", **kw)
            fn, path, _ = quantizer(x, fmt, axis=axis, **kw)
            assert path == "triton"
            L.set_direct(False)
            normal = fn(x)
            L.set_direct(None)
            first, second = fn(x), fn(x)  # the second takes the remembered kernel
            public = fake_quant(x, fmt, axis=axis, **kw)
            for got in (normal, first, second, public):
                assert torch.equal(_bits(got), _bits(want)), (fmt, kw, shape, transposed, dtype, offset, axis)
            assert second.stride() == x.stride()
    if triton.__version__.startswith(L.DIRECT_VERSIONS):
        assert L.stats()["direct"] > before


# ----------------------------------------------------------------------- ops: layouts without views


def test_ops_hand_dense_operands_to_a_layout_keeping_quantizer_as_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """megaquant.ops gives a contiguous operand or a transposed matrix to a quantizer whose function keeps
    the layout (the Triton one) without views; values, strides and counts equal those of the view path
    (a quantizer without keeps_layout), for every operand layout of the hooked GEMMs."""
    from megaquant.formats import fake_quant
    from megaquant.ops import counters
    from megaquant.ops import operands as gemm  # the operand path (megaquant.ops.operands)
    from megaquant.ops.config import quant_config

    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def fake_quantizer(x: torch.Tensor, fmt: str, **kw: Any) -> Any:
        def fn(y: torch.Tensor) -> torch.Tensor:  # the reference's values in y's own layout
            seen.append((tuple(y.shape), y.stride()))
            return torch.empty_like(y).copy_(fake_quant(y, fmt, **kw))

        fn.keeps_layout = keeps  # type: ignore[attr-defined]
        return fn, "triton", None

    monkeypatch.setattr(gemm, "quantizer", fake_quantizer)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    operands = [
        (torch.randn(6, 2, 64, generator=g), -1),  # Megatron's activation (seq, batch, hidden)
        (torch.randn(6, 2, 64, generator=g), -2),
        (w, -1),
        (w, -2),  # dgrad's weight
        (w.t(), -2),  # fprop's weight.t()
        (w.t(), -1),
        (torch.randn(12, 48, generator=g).t(), -1),  # wgrad's grad_output.t()
        (torch.randn(2, 6, 64, generator=g).transpose(0, 1), -1),  # strided 3-D: the general path
    ]
    cfg = quant_config("mxfp8")
    results = {}
    for keeps in (False, True):
        gemm._QUANTIZERS.clear()
        counters.reset()
        seen.clear()
        results[keeps] = [gemm._quant_path(t, "mxfp8_e4m3", axis, cfg, "r", {}) for t, axis in operands]
        results[keeps, "counts"] = counters.snapshot()
        results[keeps, "seen"] = list(seen)
    gemm._QUANTIZERS.clear()
    for (q0, p0), (q1, p1), (t, _) in zip(results[False], results[True], operands, strict=True):
        assert p0 == p1 == "triton"
        assert torch.equal(q0, q1) and q0.stride() == q1.stride() == t.stride()
    assert results[False, "counts"] == results[True, "counts"]
    # the layout-keeping path passed the operands themselves (no views) except the strided 3-D one
    assert results[True, "seen"][:7] == [(tuple(t.shape), t.stride()) for t, _ in operands[:7]]
    assert results[False, "seen"][:7] != results[True, "seen"][:7]
