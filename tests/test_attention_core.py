"""The fused attention core wiring: the libcst rewrite keeps the qk/pv sites as `status` and `set` see them,
and an instrumented megatron-core GPTModel gives the same loss and gradients through the fused and the
unfused attention (and falls back to the unfused path for calls the fused core cannot compute)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megaquant import sites
from megaquant.codemod import plan_rewrite
from megaquant.errors import SourceError
from megaquant.instrument import load_rules, plan_instrument, rules_path
from megaquant.instrument.attention import fuse_attention, load_attention_rule, with_fused_attention
from megaquant.megatron_src import installed_megatron
from megaquant.spec import load_spec

ATTENTION = "megatron/core/transformer/dot_product_attention.py"
ROOT = Path(__file__).resolve().parents[1]

needs_megatron = pytest.mark.skipif(installed_megatron() is None, reason="megatron-core is not installed")


@pytest.fixture(scope="module")
def stock() -> dict[str, bytes]:
    root = installed_megatron()
    if root is None:
        pytest.skip("megatron-core is not installed")
    return {f: (root / f).read_bytes() for f in load_rules().files()}


def _site_view(
    sources: dict[str, bytes],
) -> list[tuple[str, str, str | None, tuple[str, ...], tuple[str, ...]]]:
    scan = sites.scan_sources(sources, load_spec("megatron-core"))
    return [(s.file, s.scope, s.value, s.roles, tuple(g.call for g in s.governs)) for s in scan.sites]


@needs_megatron
def test_rewrite_keeps_sites_and_set_and_is_idempotent(stock: dict[str, bytes]) -> None:
    hooked_plan = plan_instrument(stock, load_rules())
    hooked = {**stock, **hooked_plan.new_sources}
    plan = with_fused_attention(hooked_plan, stock, rules_path())
    fused = {**stock, **plan.new_sources}
    edit = plan.edits[-1]
    assert (edit.file, edit.kind, edit.applied) == (ATTENTION, "fuse", True)
    text = fused[ATTENTION].decode()
    compile(text, ATTENTION, "exec")
    assert text.count("_mq_ops.attention_core.fused_core(self, query, key, value, attention_mask)") == 1
    assert "return _mq_fused(_mq_qk, custom_quant_type)" in text
    assert _site_view(fused) == _site_view(hooked)  # status lists exactly the same sites
    assert not sites.scan_sources(fused, load_spec("megatron-core")).warnings
    rewrite = plan_rewrite(fused, {"qk": "mxfp4", "pv": "hifp8"}, load_spec("megatron-core"))
    new = rewrite.new_sources[ATTENTION].decode()
    assert new.index("custom_quant_type = 'mxfp4'") < new.index("_mq_qk = custom_quant_type")
    assert new.index("_mq_qk = custom_quant_type") < new.index("custom_quant_type = 'hifp8'")
    assert new.index("custom_quant_type = 'hifp8'") < new.index("return _mq_fused(")
    again = with_fused_attention(plan_instrument(fused, load_rules()), fused, rules_path())
    assert not again.new_sources and not again.edits[-1].applied


def test_rewrite_refuses_an_unexpected_forward() -> None:
    rule = load_attention_rule(rules_path())
    assert rule is not None
    source = (
        b"class DotProductAttention:\n    def forward(self, query, key, value, mask):\n        return 1\n"
    )
    with pytest.raises(SourceError, match="hooked `_mq_ops.quant_baddbmm"):
        fuse_attention(source, rule)
    with pytest.raises(SourceError, match="scope DotProductAttention.forward not found"):
        fuse_attention(b"x = 1\n", rule)


def test_cores_in_log_and_manifest_field(tmp_path: Path) -> None:
    from megaquant.attention_cores import ATTENTION_MARK, cores_in_log
    from megaquant.launch.run import _attention_cores

    line = f"{ATTENTION_MARK} fused (triton) qk=mxfp8 pv=none"
    log = f"a\n[rank0]: {line}\nb\n{line}\n{ATTENTION_MARK} unfused (attention dropout 0.1)\n"
    assert cores_in_log(log) == ["fused (triton) qk=mxfp8 pv=none", "unfused (attention dropout 0.1)"]
    (tmp_path / "train.log").write_text(log)
    assert _attention_cores(tmp_path / "train.log") == cores_in_log(log)
    assert _attention_cores(tmp_path / "missing.log") == []


PROBE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.nn.functional as F
    torch.distributed.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megaquant.launch.minitrain import _cpu_adjustments
    parallel_state.initialize_model_parallel()
    _cpu_adjustments()
    config = TransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, persist_layer_norm=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, params_dtype=torch.float32)
    torch.manual_seed(0)
    gpt = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=96, max_sequence_length=48, position_embedding_type="rope")
    s = 45
    ids = torch.randint(0, 96, (2, s), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(s)[None].expand(2, -1)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    window = causal | torch.tril(torch.ones(s, s, dtype=torch.bool), -8)[None, None]
    res = {}
    masks = {"none": None, "causal": causal, "window": window}
    # unfused/none would build Megatron's default causal mask on CUDA: its semantics are unfused/causal
    for mode, name in (("unfused", "causal"), ("unfused", "window"), ("fused", "none"), ("fused", "causal"),
                       ("auto", "none"), ("auto", "causal"), ("auto", "window")):
            mask = masks[name]
            os.environ["MEGAQUANT_ATTENTION"] = mode
            gpt.zero_grad()
            loss = gpt(ids, pos, mask, labels=ids).mean()
            loss.backward()
            res[f"{mode}/{name}"] = {"loss": float(loss),
                                     "grads": {n: p.grad.clone() for n, p in gpt.named_parameters()}}
    torch.save(res, sys.argv[1])
    """
)


PAIRS = [("none", "none"), ("mxfp8", "hifp8"), ("mxfp4", "mxfp8")]  # the last: P in MX blocks along the keys


def _tree(stock: dict[str, bytes], tree: Path, qk: str, pv: str) -> None:
    """The installed megatron-core instrumented with the fused core, qk and pv sites set to qk and pv."""
    root = installed_megatron()
    assert root is not None
    shutil.copytree(root / "megatron", tree / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    plan = with_fused_attention(plan_instrument(stock, load_rules()), stock, rules_path())
    for rel, data in plan.new_sources.items():
        if rel == ATTENTION:  # the qk site comes first, the pv site second
            data = data.replace(b"custom_quant_type = 'none'", f"custom_quant_type = '{qk}'".encode(), 1)
            head, _, tail = data.partition(b"_mq_qk = custom_quant_type")
            tail = tail.replace(b"custom_quant_type = 'none'", f"custom_quant_type = '{pv}'".encode(), 1)
            data = head + b"_mq_qk = custom_quant_type" + tail
        (tree / rel).write_bytes(data)


@pytest.fixture(scope="module")
def gpt_runs(
    stock: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[dict, str]]:
    """Both site pairs' probes, run concurrently: {pair: (results, stderr)}."""
    torch = pytest.importorskip("torch")
    work = tmp_path_factory.mktemp("fused_gpt")
    script = work / "probe.py"
    script.write_text(PROBE)
    procs = {}
    for qk, pv in PAIRS:
        name = f"{qk}-{pv}"
        _tree(stock, work / name, qk, pv)
        env = dict(
            os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([str(work / name), str(ROOT)])
        )
        argv = [sys.executable, str(script), str(work / f"{name}.pt"), str(work / f"{name}.pg")]
        procs[name] = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    out = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        out[name] = (torch.load(work / f"{name}.pt"), err)
    return out


@needs_megatron
@pytest.mark.parametrize(("qk", "pv"), PAIRS)
def test_gpt_model_same_loss_and_gradients_fused_and_unfused(
    gpt_runs: dict[str, tuple[dict, str]], qk: str, pv: str
) -> None:
    res, stderr = gpt_runs[f"{qk}-{pv}"]
    ref = res["unfused/causal"]
    for name in ("none", "causal"):
        fused, auto = res[f"fused/{name}"], res[f"auto/{name}"]
        assert abs(fused["loss"] - ref["loss"]) < 1e-5 and auto["loss"] == fused["loss"]
        for param, grad in ref["grads"].items():
            scale = max(1e-6, grad.abs().max().item())
            assert (fused["grads"][param] - grad).abs().max().item() <= 1e-4 * scale, param
    # the windowed mask is not the causal one: auto falls back to the unfused path, bit for bit
    assert res["auto/window"]["loss"] == res["unfused/window"]["loss"]
    assert res["auto/window"]["loss"] != res["auto/causal"]["loss"]
    cores = [line for line in stderr.splitlines() if "megaquant: attention core:" in line]
    assert f"megaquant: attention core: fused (reference) qk={qk} pv={pv}" in cores
    assert "megaquant: attention core: unfused (an attention mask other than the causal one)" in cores
    assert len(cores) == len(set(cores))  # each decision printed once


def test_a_mask_is_checked_once_per_tensor_not_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    # every layer gets the same mask object: one device-to-host comparison per microbatch; a new mask
    # object (even at a reused address) or an in-place change is checked again
    import torch

    from megaquant.ops import attention_core

    calls: list[int] = []
    real = torch.equal
    monkeypatch.setattr(attention_core.torch, "equal", lambda a, b: calls.append(1) or real(a, b))
    causal = torch.ones(1, 1, 8, 8, dtype=torch.bool).triu(1)
    assert all(attention_core._is_causal_mask(causal, 8, 8) for _ in range(4)) and len(calls) == 1
    causal.fill_(False)  # in place: the version moves on
    assert not attention_core._is_causal_mask(causal, 8, 8) and len(calls) == 2
    window = torch.ones(1, 1, 8, 8, dtype=torch.bool).triu(1)
    window |= torch.ones(8, 8, dtype=torch.bool).tril(-3)
    assert not attention_core._is_causal_mask(window, 8, 8) and len(calls) == 3
