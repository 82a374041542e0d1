"""The recipes' per-step state is CUDA-graph safe: every host argument of a step's torch ops and kernel
launches is the same every step (what a replayed graph repeats), while the random bits and the amax
histories move on through device tensors that `next_step()` updates. On the CPU (torch reference) and under
the Triton interpreter; the graph-versus-eager replay itself is tests/test_graphsafe_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megaquant import ops
from megaquant.errors import ValueNameError
from megaquant.formats import fake_quant, random_hadamard
from megaquant.formats._random import device_key, mixed_key, seed_key, uniform24
from megaquant.ops import configure, quant_matmul
from megaquant.ops import state as state_mod


@pytest.fixture(autouse=True)
def _fresh_state() -> Any:
    ops.reset_state(seed=1234)
    yield
    configure()
    ops.reset_state()


def _describe(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.device.type)
    if isinstance(value, (list, tuple)):
        return type(value)(_describe(v) for v in value)
    if isinstance(value, float):
        return repr(value)  # NaN compares unequal to itself
    return value


class _HostArgs(TorchDispatchMode):
    """Records every aten op with its non-tensor arguments (tensors by dtype/shape only), and the values of
    tensors made from host data (lift_fresh: torch.tensor(...) of a Python value)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, ...]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        record: tuple[object, ...] = (str(func), _describe(args), _describe(sorted(kwargs.items())))
        if "lift_fresh" in str(func):
            record += (args[0].tolist(),)
        self.calls.append(record)
        return out


_VALUE = {"sr_gradients": "mxfp8", "nvfp4_paper": "nvfp4", "mxfp4_tseng": "mxfp4", "hifp8_delayed": "hifp8"}


def _inputs(recipe: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step k's inputs (the same every step, except under delayed scaling: a magnitude that shrinks every
    step, so that the history's max matters)."""
    g = torch.Generator().manual_seed(0)
    a0, b0, go = (torch.randn(*shape, generator=g) for shape in ((64, 128), (128, 64), (64, 64)))
    scale = 2.0 ** (-3 * k) if recipe == "hifp8_delayed" else 1.0
    return (a0 * scale).requires_grad_(), b0.requires_grad_(), go * scale


def _step(recipe: str, a: torch.Tensor, b: torch.Tensor, go: torch.Tensor) -> list[torch.Tensor]:
    """One training step of a quantized GEMM under `recipe`: the forward and both gradient GEMMs."""
    out = quant_matmul(a, b, _VALUE[recipe], recipe=recipe, quantize_grads=True)
    da, db = torch.autograd.grad(out, (a, b), go)
    return [out.detach(), da, db]


@pytest.mark.parametrize("recipe", list(_VALUE))
def test_a_step_passes_the_same_host_arguments_every_step_while_its_results_move_on(recipe: str) -> None:
    ops.next_step()
    _step(recipe, *_inputs(recipe, 1))  # makes the step word and the histories (a graph's warm-up step)
    records, outputs = [], []
    for k in (2, 3):
        ops.next_step()
        inputs = _inputs(recipe, k)
        with _HostArgs() as rec:
            outputs.append(_step(recipe, *inputs))
        records.append(rec.calls)
    assert len(records[0]) > 20
    assert records[0] == records[1]
    # the random bits (same inputs) or the history (delayed scaling) move on: the gradients differ
    assert any(not torch.equal(p, q) for p, q in zip(outputs[0][1:], outputs[1][1:], strict=True))
    if recipe == "hifp8_delayed":
        assert state_mod._STATE.histories and all(
            h.shape == (64,) for h in state_mod._STATE.histories.values()
        )


def test_delayed_scaling_step_uses_the_history_not_the_current_amax() -> None:
    """Through the shifted history, step 3 of shrinking inputs is scaled from the slot's largest recorded
    amax (step 1's), as the semantics say; the weight's slot saw the same weight every step."""
    for k in (1, 2, 3):
        ops.next_step()
        out = _step("hifp8_delayed", *_inputs("hifp8_delayed", k))[0]
    a0, b0, _ = (t.detach() for t in _inputs("hifp8_delayed", 0))
    s = 3 - int(torch.floor(torch.log2((a0 * 2.0**-3).abs().max())))
    a3 = a0 * 2.0**-9
    expected = (fake_quant(a3 * 2.0**s, "hifp8") * 2.0**-s) @ fake_quant(b0, "hifp8", tensor_scale=True)
    assert torch.equal(out, expected)
    assert not torch.equal(out, quant_matmul(a3, b0, "hifp8", recipe="hifp8_scaled"))


def test_history_keeps_the_last_length_amaxes() -> None:
    """max over the last `length` recorded amaxes (newest first after the shift); the oldest drops out."""
    ops.next_step()
    key = ("slot",)
    assert float(state_mod.history(key, 3, torch.tensor(5.0))) == 5.0  # no history yet: its own
    got = []
    for amax in (1.0, 2.0, 0.5, 0.25, 0.125):
        ops.next_step()
        got.append(float(state_mod.history(key, 3, torch.tensor(amax))))
    # histories before each call: [5], [1,5], [2,1,5], [0.5,2,1], [0.25,0.5,2]
    assert got == [5.0, 5.0, 5.0, 2.0, 2.0]


def test_step_word_is_one_tensor_updated_in_place_and_reproducible() -> None:
    cpu = torch.device("cpu")
    ops.next_step()
    word = state_mod.step_word(cpu)
    first = int(word)
    ops.next_step()
    assert state_mod.step_word(cpu) is word and int(word) != first
    ops.reset_state(seed=1234)
    ops.next_step()
    assert int(state_mod.step_word(cpu)) == first
    ops.reset_state(seed=99)
    ops.next_step()
    assert int(state_mod.step_word(cpu)) != first


def test_device_key_equals_the_host_mix_and_sets_the_uniforms() -> None:
    for seed, word in ((0, 0), (5, 2**31 - 1), ((1 << 40) + 3, 12345)):
        assert int(device_key(seed, torch.tensor(word))) == mixed_key(seed, word)
        assert device_key(seed, None) == seed_key(seed)
    index = torch.arange(1000, dtype=torch.int64)
    u = uniform24(index, 7, torch.tensor(11))
    assert not torch.equal(u, uniform24(index, 7, torch.tensor(12)))
    assert not torch.equal(u, uniform24(index, 7))


def test_fake_quant_device_seed_changes_the_bits_and_is_checked() -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    w1, w2 = torch.tensor(1, dtype=torch.int64), torch.tensor(2, dtype=torch.int64)
    for fmt in ("mxfp4_e2m1", "nvfp4", "hifp8"):
        a = fake_quant(x, fmt, rounding="stochastic", seed=3, device_seed=w1)
        assert torch.equal(a, fake_quant(x, fmt, rounding="stochastic", seed=3, device_seed=w1.clone()))
        assert not torch.equal(a, fake_quant(x, fmt, rounding="stochastic", seed=3, device_seed=w2))
        assert not torch.equal(a, fake_quant(x, fmt, rounding="stochastic", seed=3))
    with pytest.raises(ValueNameError, match="stochastic"):
        fake_quant(x, "mxfp4_e2m1", device_seed=w1)
    with pytest.raises(ValueNameError, match="0-d"):
        fake_quant(
            x, "mxfp4_e2m1", rounding="stochastic", seed=1, device_seed=torch.ones(2, dtype=torch.int64)
        )
    h = random_hadamard(x, -1, block=16, seed=3, device_seed=w1)
    assert not torch.equal(h, random_hadamard(x, -1, block=16, seed=3, device_seed=w2))


# ------------------------------------------------------------------------ the kernels, interpreted


def _check_kernels() -> int:
    """In a child process with TRITON_INTERPRET=1: the kernels with a device word equal the reference bit
    for bit, and their launch arguments do not depend on the step."""
    from megaquant.formats import _triton_nvfp4 as kernels
    from megaquant.formats import encode
    from megaquant.formats.registry import resolve_options

    g = torch.Generator().manual_seed(0)
    n = 0
    cases = [
        ("nvfp4", dict(rounding="stochastic", seed=5)),
        ("mxfp4_e2m1", dict(rounding="stochastic", seed=9)),
        ("mxfp8_e5m2", dict(rounding="stochastic", seed=(1 << 40) + 1)),
        ("hifp8", dict(rounding="stochastic", seed=6)),
    ]
    for (shape, axis), dtype in [(((6, 48), -1), torch.float32), (((3, 40, 5), -2), torch.bfloat16)]:
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        for fmt, kw in cases:
            for word_value in (0, 77, 2**31 - 5):
                word = torch.tensor(word_value, dtype=torch.int64)
                d: dict[str, Any] = dict(
                    axis=axis, block_size=None, scale="floor", saturate=True, preset=None
                )
                d.update(kw)
                opts = resolve_options(fmt, **d)
                want = fake_quant(x, fmt, axis=axis, device_seed=word, **kw)
                got = kernels._run(x, opts, False, None, word)
                as_bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
                assert torch.equal(got.view(as_bits), want.view(as_bits)), (fmt, shape, word_value)
                enc_got = kernels._run(x, opts, True, None, word)
                enc_want = encode(x, fmt, axis=axis, device_seed=word, **kw)
                assert torch.equal(enc_got.codes, enc_want.codes), (fmt, shape)  # type: ignore[union-attr]
                n += 1
    for fmt in ("nvfp4", "mxfp4_e2m1"):  # 2-D tiles
        x = torch.randn(40, 56, generator=g) * 4
        word = torch.tensor(31, dtype=torch.int64)
        opts = resolve_options(
            fmt, axis=-1, block_size=None, scale="floor", rounding="stochastic", saturate=True, preset=None,
            seed=4, block_2d=True,
        )  # fmt: skip
        want = fake_quant(x, fmt, rounding="stochastic", seed=4, block_2d=True, device_seed=word)
        assert torch.equal(kernels._run(x, opts, False, None, word), want), fmt
        n += 1

    from megaquant.formats import _triton_rht
    from megaquant.formats.hadamard import _entry, hadamard_matrix

    for block in (2, 16, 32, 64, 256):  # the sign-matrix kernel: the torch form's bits
        for seed, word in ((3, None), (3, torch.tensor(5)), ((1 << 33) + 1, torch.tensor(2**31 - 1))):
            got = _triton_rht.rht_matrix(block, seed, word, torch.device("cpu"), _entry(block))
            want = hadamard_matrix(block, seed, device_seed=word)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (block, seed, word)
            n += 1

    # launch arguments over two steps: identical; the results differ
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[object] = []
    original = InterpretedFunction.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        launches.append((self.fn.__name__, _describe(args), _describe(sorted(kwargs.items()))))
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run  # type: ignore[method-assign]
    x = torch.randn(16, 64, generator=g)
    ops.reset_state(seed=3)
    seen, outs = [], []
    for _ in range(2):
        ops.next_step()
        launches.clear()
        word = state_mod.step_word(x.device)
        y = []
        for fmt in ("nvfp4", "mxfp4_e2m1", "hifp8"):  # the ops' arguments: a draw's seed, the step word
            d = dict(
                axis=-1, block_size=None, scale="floor", rounding="stochastic", saturate=True, preset=None
            )
            opts = resolve_options(fmt, seed=state_mod.draw_seed(), **d)  # type: ignore[arg-type]
            y.append(kernels._run(x, opts, False, None, word))
        y.append(_triton_rht.rht_matrix(64, state_mod.draw_seed(), word, x.device, _entry(64)))
        seen.append(list(launches))
        outs.append(y)
    InterpretedFunction.run = original  # type: ignore[method-assign]
    assert len(seen[0]) >= 4 and seen[0] == seen[1], (seen[0], seen[1])
    assert all(not torch.equal(p, q) for p, q in zip(*outs, strict=True))
    return n


def test_kernels_with_a_device_word_equal_the_reference_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cases ok" in proc.stdout


if __name__ == "__main__":
    print(f"{_check_kernels()} cases ok")
