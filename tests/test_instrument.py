"""`megaquant instrument`: golden results on megatron-core 0.16.1 and 0.19.2, idempotence, errors, git, and
CPU numerics of the instrumented linear function and DotProductAttention (run in subprocesses)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megaquant.errors import GitStateError, MegaquantError
from megaquant.instrument import (
    InstrumentError,
    copy_installed,
    instrument_repo,
    load_rules,
    plan_instrument,
    read_sources,
)
from megaquant.megatron_src import installed_megatron, megatron_sources

LAYERS = "megatron/core/tensor_parallel/layers.py"
ATTENTION = "megatron/core/transformer/dot_product_attention.py"
GPT = "megatron/core/models/gpt/gpt_model.py"
LANGUAGE = "megatron/core/models/common/language_module/language_module.py"
LINEAR = "LinearWithGradAccumulationAndAsyncCommunication"

EXPECTED_HOOKS = {
    (
        LAYERS,
        f"{LINEAR}.forward",
        "linear_fwd",
        "_mq_ops.quant_matmul(total_input, weight.t(), custom_quant_type, gemm='fprop')",
    ),
    (
        LAYERS,
        f"{LINEAR}.backward",
        "linear_dgrad",
        "_mq_ops.quant_matmul(grad_output, weight, custom_quant_type, grad=True, gemm='dgrad')",
    ),
    (
        LAYERS,
        f"{LINEAR}.backward",
        "linear_wgrad",
        "_mq_wgrad_matmul(grad_output.t(), total_input, custom_quant_type, grad=True, gemm='wgrad')",
    ),
    (ATTENTION, "DotProductAttention.forward", "qk", "_mq_ops.quant_baddbmm("),
    (
        ATTENTION,
        "DotProductAttention.forward",
        "pv",
        "_mq_ops.quant_bmm(attention_probs, value.transpose(0, 1), custom_quant_type)",
    ),
}

needs_megatron = pytest.mark.skipif(installed_megatron() is None, reason="megatron-core is not installed")


def _sources(root: Path) -> dict[str, bytes]:
    return read_sources(root, load_rules())


def _version_root(version: str) -> Path:
    if version == "0.16.1":
        root = installed_megatron()
        if root is None:
            pytest.skip("megatron-core is not installed")
        return root
    try:
        return megatron_sources(version)
    except MegaquantError as exc:  # no network and no cache: the 0.19.2 wheel cannot be fetched
        pytest.skip(f"megatron-core {version} sources unavailable: {exc}")


@pytest.fixture(params=["0.16.1", "0.19.2"], scope="module")
def stock(request: pytest.FixtureRequest) -> dict[str, bytes]:
    return _sources(_version_root(request.param))


def test_golden_sites_on_both_versions(stock: dict[str, bytes]) -> None:
    rules = load_rules()
    plan = plan_instrument(stock, rules)
    hooks = {(e.file, e.scope, e.role) for e in plan.edits if e.kind == "hook"}
    assert hooks == {(f, s, r) for f, s, r, _ in EXPECTED_HOOKS}
    assert all(e.applied for e in plan.edits if e.kind not in ("unhooked", "lm_head"))
    assert sorted(plan.new_sources) == sorted([ATTENTION, LANGUAGE, LAYERS])
    layers = plan.new_sources[LAYERS].decode()
    attention = plan.new_sources[ATTENTION].decode()
    assert layers.count("custom_quant_type = 'none'") == 3
    assert attention.count("custom_quant_type = 'none'") == 2
    for file, _, _, call in EXPECTED_HOOKS:
        assert call in plan.new_sources[file].decode(), call
    # stock GEMMs survive only in the LM-head branch of the linear function, and not at all in attention
    assert layers.count("if ctx.megaquant_lm_head:") == 3
    assert "torch.baddbmm(" not in attention and "torch.bmm(" not in attention
    assert "k_channels: Optional[int] = None" in attention
    assert "_mq_weight.megaquant_lm_head = True" in plan.new_sources[LANGUAGE].decode()
    heads = {e.scope for e in plan.edits if e.kind == "lm_head"}
    assert {"GPTModel", "BertModel", "T5Model"} <= heads  # every model class with an output layer
    assert any(e.kind == "unhooked" and "wgrad_gemm_accum_fp32" in e.detail for e in plan.edits)
    for source in plan.new_sources.values():
        compile(source, "<instrumented>", "exec")
    # every other byte is unchanged: only added lines and the replaced GEMM lines differ
    for file, new in plan.new_sources.items():
        removed = set(stock[file].decode().splitlines()) - set(new.decode().splitlines())
        assert all(("matmul" in line or "bmm" in line or line.strip() == "):") for line in removed), removed
        assert len(removed) <= 5


def test_rerun_is_a_no_op(stock: dict[str, bytes]) -> None:
    rules = load_rules()
    once = {**stock, **plan_instrument(stock, rules).new_sources}
    again = plan_instrument(once, rules)
    assert again.new_sources == {}
    assert {(e.scope, e.role) for e in again.edits if e.kind == "hook"} == {
        (s, r) for _, s, r, _ in EXPECTED_HOOKS
    }
    assert not any(e.applied for e in again.edits)


def test_include_lm_head_has_no_guard(stock: dict[str, bytes]) -> None:
    plan = plan_instrument(stock, load_rules(), include_lm_head=True)
    assert "megaquant_lm_head" not in plan.new_sources[LAYERS].decode()
    assert LANGUAGE not in plan.new_sources
    assert plan.new_sources[LAYERS].decode().count("custom_quant_type = 'none'") == 3
    with pytest.raises(InstrumentError, match="already instrumented with the LM head included"):
        plan_instrument({**stock, **plan.new_sources}, load_rules(), include_lm_head=False)


def test_recognised_by_sites_with_roles(stock: dict[str, bytes]) -> None:
    sites = pytest.importorskip("megaquant.sites", reason="megaquant.sites (core-engine) has not landed")
    spec_mod = pytest.importorskip("megaquant.spec", reason="megaquant.spec (core-engine) has not landed")
    spec = spec_mod.load_spec("megatron-core")
    scan = sites.scan_sources({**stock, **plan_instrument(stock, load_rules()).new_sources}, spec)
    found = sorted((s.scope, s.roles, s.value) for s in scan.sites)
    assert found == sorted(
        [
            (f"{LINEAR}.forward", ("linear_fwd",), "none"),
            (f"{LINEAR}.backward", ("linear_dgrad",), "none"),
            (f"{LINEAR}.backward", ("linear_wgrad",), "none"),
            ("DotProductAttention.forward", ("qk",), "none"),
            ("DotProductAttention.forward", ("pv",), "none"),
        ]
    )
    assert not any(s.override for s in scan.sites)


def test_missing_call_names_file_scope_and_expectation(stock: dict[str, bytes]) -> None:
    broken = dict(stock)
    broken[ATTENTION] = stock[ATTENTION].replace(b"context = torch.bmm(", b"context = torch.matmul(")
    with pytest.raises(InstrumentError) as info:
        plan_instrument(broken, load_rules())
    message = str(info.value)
    assert ATTENTION in message and "DotProductAttention.forward" in message
    assert "bmm(attention_probs, value.transpose(0, 1))" in message and "not found" in message
    assert "torch.matmul(attention_probs" in message  # what was found there, with its line


def test_missing_scope_and_file_are_errors(stock: dict[str, bytes]) -> None:
    renamed = {**stock, LAYERS: stock[LAYERS].replace(b"class LinearWithGradAccumulation", b"class Renamed")}
    with pytest.raises(InstrumentError, match=f"{LAYERS}: scope {LINEAR}.forward not found"):
        plan_instrument(renamed, load_rules())
    without = {k: v for k, v in stock.items() if k != LANGUAGE}
    with pytest.raises(InstrumentError, match="language_module.py: not found"):
        plan_instrument(without, load_rules())


@needs_megatron
def test_instrument_repo_commits_on_a_branch(tmp_path: Path) -> None:
    import git

    workspace = copy_installed(tmp_path / "ws")
    repo = git.Repo(workspace)
    stock_head = repo.head.commit.hexsha
    result = instrument_repo(workspace)
    assert result.commit is not None and result.branch == "instrumented"
    assert repo.active_branch.name == "instrumented" and repo.head.commit.parents[0].hexsha == stock_head
    assert sorted(str(f) for f in repo.head.commit.stats.files) == sorted([ATTENTION, LANGUAGE, LAYERS])
    assert "Megaquant-Instrument-LM-Head: excluded" in str(repo.head.commit.message)
    assert not repo.is_dirty()
    assert repo.config_reader().get_value("megaquant", "spec") == "megatron-core"
    again = instrument_repo(workspace)
    assert again.commit is None and repo.head.commit.hexsha == result.commit
    # a dirty stock checkout is refused before anything is written
    repo.git.checkout("stock")
    (workspace / LAYERS).write_text((workspace / LAYERS).read_text() + "\n# local edit\n")
    with pytest.raises(GitStateError, match="uncommitted changes"):
        instrument_repo(workspace, branch="other")
    assert "other" not in repo.heads


# ---------------------------------------------------------------- numerics on CPU (instrumented 0.16.1)

PROBE = textwrap.dedent(
    """
    import sys, inspect
    import torch
    out, pg = sys.argv[1], sys.argv[2]
    torch.distributed.init_process_group("gloo", init_method="file://" + pg, rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import LinearWithGradAccumulationAndAsyncCommunication as Linear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megaquant.launch.minitrain import _cpu_adjustments
    parallel_state.initialize_model_parallel()
    _cpu_adjustments()
    tp = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(0)
    res = {"megatron": inspect.getfile(Linear)}
    # Linear.apply is positional and its parameters grow across releases (0.19 adds gtp_remat_size)
    LINEAR_DEFAULTS = {"bias": None, "gradient_accumulation_fusion": False, "allreduce_dgrad": False,
        "sequence_parallel": False, "grad_output_buffer": None, "wgrad_deferral_limit": 0,
        "gtp_remat_size": 1}
    LINEAR_PARAMS = list(inspect.signature(Linear.forward).parameters)[1:]  # after ctx

    def linear(mark_lm_head):
        x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = torch.randn(96, 64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        if mark_lm_head:
            w.megaquant_lm_head = True
        given = {**LINEAR_DEFAULTS, "input": x, "weight": w, "tp_group": tp}
        y = Linear.apply(*(given[name] for name in LINEAR_PARAMS))
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        return y.detach(), x.grad, w.grad

    res["fwd"], res["dgrad"], res["wgrad"] = linear(False)
    res["lm_fwd"], res["lm_dgrad"], res["lm_wgrad"] = linear(True)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, use_cpu_initialization=True, masked_softmax_fusion=False, attention_dropout=0.0,
        hidden_dropout=0.0)
    attn = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    q = torch.randn(32, 2, 4, 16, generator=g).requires_grad_()
    k = torch.randn(32, 2, 2, 16, generator=g).requires_grad_()
    v = torch.randn(32, 2, 2, 16, generator=g).requires_grad_()
    mask = torch.triu(torch.ones(32, 32, dtype=torch.bool), 1)[None, None]
    ctx = attn(q, k, v, mask)
    ctx.backward(torch.randn(ctx.shape, generator=g))
    res["attn"], res["dq"], res["dv"] = ctx.detach(), q.grad, v.grad
    if "k_channels" in inspect.signature(DotProductAttention.__init__).parameters:  # MLA head dims
        mla_config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
            kv_channels=16, use_cpu_initialization=True, masked_softmax_fusion=False,
            attention_dropout=0.0, hidden_dropout=0.0)
        mla = DotProductAttention(mla_config, 1, AttnMaskType.causal, "self", k_channels=24, v_channels=8)
        qm, km = torch.randn(32, 2, 4, 24, generator=g), torch.randn(32, 2, 4, 24, generator=g)
        res["mla"] = mla(qm, km, torch.randn(32, 2, 4, 8, generator=g), mask).detach()
    # DeepSeek-V2-Lite-shaped (MLA, qk layernorm) GPT on the local spec: builds only with the channel keywords
    import torch.nn.functional as F
    import megatron.core.transformer.multi_latent_attention as mla_module
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    if not isinstance(mla_module.TELinear, type):  # no TE: megatron-core puts a MagicMock here
        mla_module.TELinear = type("NoTransformerEngine", (), {})
    mla_gpt_config = MLATransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
        ffn_hidden_size=128, q_lora_rank=None, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
        v_head_dim=16, qk_layernorm=True, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False, rope_type="rope",
        gradient_accumulation_fusion=False)
    # the spec megaquant trains with: the local block, MLA without a Q norm (megatron-core 0.19 refuses one
    # without q-LoRA)
    from megaquant.launch.layer_spec import gpt_block_spec
    spec = gpt_block_spec(mla_gpt_config, normalization="RMSNorm")
    try:
        torch.manual_seed(0)
        gpt = GPTModel(config=mla_gpt_config, transformer_layer_spec=spec, vocab_size=100,
            max_sequence_length=32, position_embedding_type="rope")
        ids = torch.randint(0, 100, (2, 32), generator=g)
        loss = gpt(ids, torch.arange(32)[None].expand(2, -1), mask, labels=ids).mean()
        loss.backward()
        res["mla_gpt_loss"] = float(loss)
        res["lm_head_marks"] = [n for n, p in gpt.named_parameters() if hasattr(p, "megaquant_lm_head")]
    except TypeError as exc:
        res["mla_gpt_error"] = str(exc)
    torch.save(res, out)
    """
)

VALUES = ("none", "mxfp8", "mxfp4", "hifp8")


def _tree_with_value(instrumented: Path, dest: Path, value: str) -> Path:
    """A copy of an instrumented tree with every site set to `value` (core-git tests `megaquant set`)."""
    shutil.copytree(
        instrumented / "megatron", dest / "megatron", ignore=shutil.ignore_patterns("__pycache__")
    )
    for rel in (LAYERS, ATTENTION):
        path = dest / rel
        text = path.read_text(encoding="utf-8")
        path.write_text(
            text.replace("custom_quant_type = 'none'", f"custom_quant_type = '{value}'"), encoding="utf-8"
        )
    return dest


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    torch = pytest.importorskip("torch")
    root = installed_megatron()
    if root is None:
        pytest.skip("megatron-core is not installed")
    work = tmp_path_factory.mktemp("numerics")
    instrumented = work / "instrumented"
    shutil.copytree(
        root / "megatron", instrumented / "megatron", ignore=shutil.ignore_patterns("__pycache__")
    )
    sources = _sources(instrumented)
    for rel, data in plan_instrument(sources, load_rules()).new_sources.items():
        (instrumented / rel).write_bytes(data)
    script = work / "probe.py"
    script.write_text(PROBE)
    trees: dict[str, Path | None] = {"stock": None}
    for value in VALUES:
        trees[value] = _tree_with_value(instrumented, work / value, value)
    megaquant_root = str(Path(__file__).resolve().parents[1])
    procs = {}
    for name, tree in trees.items():
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        env["PYTHONPATH"] = os.pathsep.join([*([str(tree)] if tree else []), megaquant_root])
        argv = [sys.executable, str(script), str(work / f"{name}.pt"), str(work / f"{name}.pg")]
        procs[name] = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    results: dict[str, dict[str, object]] = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name}: {output[-3000:]}"
        results[name] = torch.load(work / f"{name}.pt")
    return results


def _rel(a: object, b: object) -> float:
    import torch

    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return float((a - b).norm() / b.norm())


@needs_megatron
def test_probes_import_the_tree_they_were_given(probes: dict[str, dict[str, object]]) -> None:
    assert "site-packages" in str(probes["stock"]["megatron"])
    for value in VALUES:
        assert f"/{value}/megatron/" in str(probes[value]["megatron"])


@needs_megatron
def test_none_is_bit_identical_to_stock(probes: dict[str, dict[str, object]]) -> None:
    import torch

    stock, none = probes["stock"], probes["none"]
    for key in ("fwd", "dgrad", "wgrad", "attn", "dq", "dv"):
        assert torch.equal(none[key], stock[key]), key  # type: ignore[arg-type]


@needs_megatron
@pytest.mark.parametrize("value", ["mxfp8", "mxfp4", "hifp8"])
def test_linear_hooks_run_the_quantized_ops(probes: dict[str, dict[str, object]], value: str) -> None:
    import torch

    from megaquant import ops

    got = probes[value]
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(2))
    gy = torch.randn(16, 2, 96, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got["fwd"], ops.quant_matmul(x, w.t(), value))  # type: ignore[arg-type]
    assert torch.equal(got["dgrad"], ops.quant_matmul(gy, w, value, grad=True))  # type: ignore[arg-type]
    wgrad = ops.quant_matmul(gy.reshape(-1, 96).t(), x.reshape(-1, 64), value, grad=True)
    assert torch.equal(got["wgrad"], wgrad)  # type: ignore[arg-type]
    # the LM head stays unquantized: identical to stock
    for key in ("fwd", "dgrad", "wgrad"):
        assert torch.equal(got[f"lm_{key}"], probes["stock"][key]), key  # type: ignore[arg-type]


# relative error of the quantized result vs the unquantized one (fp32 operands; 2-3 bit mantissas for
# E4M3/E5M2/HiF8 near 1 give a few percent, E2M1 tens of percent)
ERROR_BANDS = {"mxfp8": (3e-3, 0.08), "mxfp4": (0.05, 0.5), "hifp8": (3e-3, 0.08)}


@needs_megatron
@pytest.mark.parametrize("value", ["mxfp8", "mxfp4", "hifp8"])
def test_quantized_values_flow_with_the_expected_error(
    probes: dict[str, dict[str, object]], value: str
) -> None:
    low, high = ERROR_BANDS[value]
    for key in ("fwd", "dgrad", "wgrad", "attn"):
        err = _rel(probes[value][key], probes["none"][key])
        assert low < err < high, (key, err)
    # attention gradients are straight-through but see quantized forward activations: they change too
    assert _rel(probes[value]["dq"], probes["none"]["dq"]) > 0
    assert _rel(probes["mxfp4"]["attn"], probes["none"]["attn"]) > _rel(
        probes["mxfp8"]["attn"], probes["none"]["attn"]
    )


@needs_megatron
def test_mla_channel_keywords_build_and_run(probes: dict[str, dict[str, object]]) -> None:
    import torch

    mla = probes["none"]["mla"]
    assert isinstance(mla, torch.Tensor) and mla.shape == (32, 2, 4 * 8)
    assert "mla" not in probes["stock"]  # stock DotProductAttention rejects k_channels / v_channels


@needs_megatron
def test_cli_instrument_from_installed_then_repo(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from megaquant.instrument import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so `instrument` is addressed by name as in the real CLI
    runner = CliRunner()
    first = runner.invoke(app, ["instrument", "--from-installed", str(tmp_path / "ws")])
    assert first.exit_code == 0, first.output
    assert "committed" in first.output and "on branch instrumented" in first.output
    assert f"added    {LAYERS}:" in first.output and "linear_wgrad" in first.output
    assert "unhooked" in first.output and "LM head excluded (stays unquantized) in: " in first.output
    again = runner.invoke(app, ["instrument", "--repo", str(tmp_path / "ws")])
    assert again.exit_code == 0 and "already instrumented" in again.output
    both = runner.invoke(app, ["instrument", "--repo", "a", "--from-installed", "b"])
    assert both.exit_code == 2 and "exactly one of" in both.output


@needs_megatron
def test_mla_gpt_builds_and_trains_only_when_instrumented(probes: dict[str, dict[str, object]]) -> None:
    assert "unexpected keyword argument 'k_channels'" in str(probes["stock"]["mla_gpt_error"])
    losses = {value: probes[value]["mla_gpt_loss"] for value in VALUES}
    assert all(isinstance(loss, float) and 3.0 < loss < 6.0 for loss in losses.values()), losses
    assert losses["mxfp4"] != losses["none"]  # the MLA attention and linears go through the quantized ops
    # the real GPTModel (untied) marks exactly its LM head, through LanguageModule
    assert all(probes[v]["lm_head_marks"] == ["output_layer.weight"] for v in VALUES)
