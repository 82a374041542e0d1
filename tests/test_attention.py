"""quant_attention: the reference equals the unfused composition (quant_baddbmm -> fp32 softmax ->
quant_bmm) for every qk x pv pair, with GQA, odd lengths and gradients; the Triton kernels equal the
reference under the Triton interpreter at tiny shapes."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaquant.errors import ValueNameError
from megaquant.ops import QUANT_VALUES, quant_attention, quant_baddbmm, quant_bmm
from megaquant.ops.attention import attention_backend

ROOT = Path(__file__).resolve().parents[1]


def unfused(q, k, v, qk, pv, *, causal=True, softmax_scale=None, **kw):  # type: ignore[no-untyped-def]
    """What the instrumented local DotProductAttention computes (K/V repeated for GQA)."""
    b, hq, s, d = q.shape
    sk, g = k.shape[2], hq // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    buf = torch.empty(b * hq, s, sk, dtype=q.dtype)
    scores = quant_baddbmm(
        buf,
        q.reshape(b * hq, s, d),
        kr.reshape(b * hq, sk, d).transpose(1, 2),
        qk,
        beta=0.0,
        alpha=scale,
        **kw,
    ).view(b, hq, s, sk)
    scores = scores.float()
    if causal:
        scores = scores.masked_fill(torch.ones(s, sk, dtype=torch.bool).triu(1), -10000.0)
    p = torch.softmax(scores, -1).to(q.dtype)
    return quant_bmm(p.view(b * hq, s, sk), vr.reshape(b * hq, sk, -1), pv, **kw).view(b, hq, s, -1)


def _inputs(b=1, hq=4, hkv=2, s=45, d=32, dv=40, seed=0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, dv, generator=g)
    do = torch.randn(b, hq, s, dv, generator=g)
    return q, k, v, do


def _run(fn, q, k, v, do):  # type: ignore[no-untyped-def]
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, do))


def _close(ours, ref, tol=2e-5):  # type: ignore[no-untyped-def]
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize(("qk", "pv"), list(itertools.product(QUANT_VALUES, repeat=2)))
def test_reference_equals_unfused_path(qk: str, pv: str) -> None:
    q, k, v, do = _inputs()
    ours = _run(lambda a, b, c: quant_attention(a, b, c, qk=qk, pv=pv, chunk=32), q, k, v, do)
    ref = _run(lambda a, b, c: unfused(a, b, c, qk, pv), q, k, v, do)
    _close(ours, ref)
    if qk != "none" or pv != "none":  # the quantization really acts
        plain = _run(lambda a, b, c: unfused(a, b, c, "none", "none"), q, k, v, do)
        assert not torch.allclose(ours[0], plain[0], atol=1e-3)


@pytest.mark.parametrize(("qk", "pv"), [("mxfp8", "mxfp4"), ("hifp8", "mxfp8"), ("none", "hifp8")])
def test_non_causal_odd_lengths_and_scale(qk: str, pv: str) -> None:
    q, k, v, do = _inputs(b=1, hq=3, hkv=1, s=33, d=48, dv=24, seed=1)
    kw = dict(qk=qk, pv=pv, causal=False, softmax_scale=0.3)
    ours = _run(lambda a, b, c: quant_attention(a, b, c, chunk=32, **kw), q, k, v, do)  # type: ignore[arg-type]
    ref = _run(lambda a, b, c: unfused(a, b, c, qk, pv, causal=False, softmax_scale=0.3), q, k, v, do)
    _close(ours, ref)


@pytest.mark.parametrize(("qk", "pv"), [("mxfp8", "mxfp8"), ("mxfp4", "hifp8")])
def test_quantized_gradient_gemms_equal_unfused(qk: str, pv: str) -> None:
    """quantize_grads: the backward GEMMs in the gradient format, per query head as on repeated K/V."""
    q, k, v, do = _inputs(s=64, seed=2)
    ours = _run(
        lambda a, b, c: quant_attention(a, b, c, qk=qk, pv=pv, chunk=32, quantize_grads=True), q, k, v, do
    )
    ref = _run(lambda a, b, c: unfused(a, b, c, qk, pv, quantize_grads=True), q, k, v, do)
    plain = _run(lambda a, b, c: quant_attention(a, b, c, qk=qk, pv=pv), q, k, v, do)
    _close(ours, ref, tol=1e-4)
    assert not torch.allclose(ours[1], plain[1], atol=1e-3)


def test_tensor_scaled_hifp8_and_keywords_pass_through() -> None:
    q, k, v, do = _inputs(s=40, seed=3)
    q = q * 1e-3
    for kw in (dict(tensor_scale=True), dict(preset="fork"), dict(scale="rceil", rounding="away")):
        ours = _run(functools.partial(quant_attention, qk="hifp8", pv="mxfp8", chunk=32, **kw), q, k, v, do)
        ref = _run(functools.partial(unfused, qk="hifp8", pv="mxfp8", **kw), q, k, v, do)
        _close(ours, ref)


def test_chunking_does_not_change_the_result() -> None:
    q, k, v, do = _inputs(s=100, seed=4)
    one = _run(lambda a, b, c: quant_attention(a, b, c, qk="mxfp8", pv="mxfp4", chunk=1000), q, k, v, do)
    many = _run(lambda a, b, c: quant_attention(a, b, c, qk="mxfp8", pv="mxfp4", chunk=32), q, k, v, do)
    _close(many, one, tol=1e-6)


def test_bf16_inputs_give_bf16_results_close_to_unfused() -> None:
    q, k, v, do = (t.to(torch.bfloat16) for t in _inputs(seed=5))
    ours = _run(lambda a, b, c: quant_attention(a, b, c, qk="mxfp8", pv="mxfp8"), q, k, v, do)
    ref = _run(lambda a, b, c: unfused(a, b, c, "mxfp8", "mxfp8"), q, k, v, do)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == torch.bfloat16
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 0.03


def test_errors_and_backend_choice() -> None:
    q, k, v, _ = _inputs()
    with pytest.raises(ValueNameError, match="multiple of key/value heads"):
        quant_attention(q[:, :3], k, v)
    with pytest.raises(ValueNameError, match="4-D"):
        quant_attention(q[0], k, v)
    with pytest.raises(ValueNameError, match="unknown quantization value"):
        quant_attention(q, k, v, qk="fp8")
    with pytest.raises(ValueNameError, match="unknown attention backend"):
        quant_attention(q, k, v, backend="flash")
    assert attention_backend(q, k, v, qk="mxfp8") == "reference"  # CPU


_INTERPRETED = r"""
import itertools, torch
from megaquant.ops.attention import quant_attention, _configs
from megaquant.ops import _attention_triton as T
g = torch.Generator().manual_seed(0)
for qk, pv, causal, dk, dv, kw in [("mxfp8", "mxfp8", True, 48, 16, {}), ("none", "hifp8", False, 16, 16, {}),
                                   ("mxfp4", "mxfp8", True, 192, 128, {}),  # 48 = 32 + 16, 192 = 128 + 64
                                   ("hifp8", "none", True, 32, 16, {"tensor_scale": True}),  # Q, K scaled
                                   ("nvfp4", "mxfp8", True, 32, 32, {})]:  # outside the kernels
    q = torch.randn(1, 2, 37, dk, generator=g); k = torch.randn(1, 1, 37, dk, generator=g)
    v = torch.randn(1, 1, 37, dv, generator=g); do = torch.randn(1, 2, 37, dv, generator=g)
    outs = []
    for run in (lambda a, b, c: T.attention(a, b, c, *_configs(qk, pv, kw), causal, dk ** -0.5),
                lambda a, b, c: quant_attention(a, b, c, qk=qk, pv=pv, causal=causal, backend="reference",
                                                **kw)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        o = run(*leaves)
        outs.append((o.detach(), *torch.autograd.grad(o, leaves, do)))
    for a, b in zip(*outs):
        err = (a - b).abs().max().item()
        assert err < 1e-5, (qk, pv, causal, err)
print("ok")
"""


def test_triton_kernels_under_the_interpreter() -> None:
    """Forward and backward kernels (two-pass P quantization, GQA, ragged tiles, QK head dims split in two
    dots) equal the reference."""
    pytest.importorskip("triton")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "MEGAQUANT_ATTENTION_CONFIG": '{"fwd": [16, 32, 4, 1], "fwd2": [16, 32, 4, 1], '
        '"dkdv": [16, 32, 4, 1], "dq": [16, 32, 4, 1]}',
    }
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_kernel_head_dim_split_and_p_rounding_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLA's 192 runs as 128 + 64 (its own block table key); P's E4M3 / E5M2 ties-to-even rounding uses
    the float8 conversion, every other format, rounding or the interpreter the integer bit tricks."""
    kernels = pytest.importorskip("megaquant.ops._attention_triton")
    from megaquant.ops.config import quant_config

    assert kernels._split(192) == (128, 64, 64) and kernels._key(192) == 192
    assert kernels._split(48) == (32, 16, 16) and kernels._split(80) == (64, 16, 16)
    assert kernels._split(128) == (128, 0, 16) and kernels._split(100) == (100, 0, 16)
    assert [kernels._key(d) for d in (16, 64, 96, 128, 160, 256)] == [64, 64, 128, 128, 192, 256]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(kernels.PQUANT_ENV, raising=False)
    cases = [("mxfp8", {}, 1), ("mxfp8", {"grad": True}, 2), ("mxfp8", {"scale": "rceil"}, 1),
             ("mxfp8", {"rounding": "away"}, 0), ("mxfp8", {"preset": "fork"}, 0), ("mxfp4", {}, 0),
             ("hifp8", {}, 0), ("none", {}, 0)]  # fmt: skip
    for value, kw, hw in cases:
        assert kernels._pv_constants(quant_config(value, **kw), 64)["HW"] == hw, (value, kw)
    for env, val in ((kernels.PQUANT_ENV, "soft"), ("TRITON_INTERPRET", "1")):
        monkeypatch.setenv(env, val)
        assert kernels._pv_constants(quant_config("mxfp8"), 64)["HW"] == 0
        monkeypatch.delenv(env)


def test_path_counters_name_the_attention_sites() -> None:
    # the fused core's operands and GEMMs are counted under qk / pv (they were counted under role '')
    from megaquant.ops import counters

    q, k, v, do = _inputs()
    counters.reset()
    try:
        _run(lambda a, b, c: quant_attention(a, b, c, qk="mxfp8", pv="none"), q, k, v, do)
        snap = counters.snapshot()
        assert snap["gemms"] == {"qk": {"reference": 1}, "pv": {"plain": 1}}
        assert set(snap["operands"]) == {"qk"} and snap["operands"]["qk"]["reference"] >= 2
    finally:
        counters.reset()
