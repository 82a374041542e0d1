"""Path counters (megaquant.ops.counters, megaquant.pathcounts), the per-step weight cache
(megaquant.ops.weights) and the short launch path: what they count, that results do not change by a bit,
and that `megaquant train` folds the counts of the training process into manifest.json."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_git_repo

from megaquant import pathcounts
from megaquant.errors import LaunchError
from megaquant.formats import fake_quant, quantizer
from megaquant.launch.pretrain import (
    weight_cache_bound,
    weight_cache_off_reason,
    weight_cache_pays,
    weight_cache_saving,
)
from megaquant.launch.run import TRAIN_COMMAND_ENV, RunRecord, TrainRequest, execute, plan_run
from megaquant.ops import configure, counters, quant_baddbmm, quant_bmm, quant_linear, quant_matmul, weights


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    counters.reset()
    weights.disable_weight_cache()
    yield
    counters.reset()
    weights.disable_weight_cache()
    configure()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ counters


def test_counts_per_role_and_path_on_cpu() -> None:
    a, b = _rand(4, 64), _rand(64, 8, seed=1)
    quant_matmul(a, b, "mxfp8", role="linear_fwd")
    quant_matmul(a, b, "mxfp8", role="linear_fwd")
    quant_matmul(a, b, "none", role="linear_fwd")
    quant_matmul(a, b, "hifp8", grad=True)  # no role: keyed by the op
    quant_bmm(a[None], b[None], "mxfp4")
    quant_baddbmm(torch.zeros(1, 4, 8), a[None], b[None], "bf16")
    quant_linear(a, b.t(), "mxfp8", role="pv")  # keyed by whatever role the op gets
    snap = counters.snapshot()
    assert snap["gemms"] == {
        "linear_fwd": {"reference": 2, "plain": 1},
        "matmul.grad": {"reference": 1},
        "bmm": {"reference": 1},
        "baddbmm": {"plain": 1},
        "pv": {"reference": 1},
    }
    assert snap["operands"]["linear_fwd"] == {"reference": 4}
    assert snap["fallbacks"] == []  # CPU tensors: the reference is the path, not a fallback


def test_an_expert_without_tokens_counts_as_empty_not_reference() -> None:
    """An MoE expert that got no tokens quantizes an empty input: no kernel ran, and it is no fallback (the
    DeepSeek smoke run on the H200 counted 96 such GEMMs per linear role as "reference" before)."""
    empty, w = _rand(0, 64), _rand(64, 8, seed=1)
    assert quant_matmul(empty, w, "mxfp8", gemm="fprop").shape == (0, 8)
    quant_matmul(_rand(4, 64), w, "mxfp8", gemm="fprop")
    snap = counters.snapshot()
    assert set(snap["gemms"]) == {"linear_fwd"}  # gemm= names the linear role
    assert snap["operands"]["linear_fwd"] == {"empty": 1, "reference": 3}
    from megaquant.ops.gemm import _gemm_path

    # on CUDA the weight runs the kernels: an empty activation makes the GEMM "empty", not "reference"
    assert _gemm_path("empty", "triton") == "empty" and _gemm_path("empty", "reference") == "reference"


def test_configured_role_keys_the_counts() -> None:
    configure(role="qk")
    quant_matmul(_rand(4, 32), _rand(32, 4), "mxfp8")
    assert counters.snapshot()["gemms"] == {"qk": {"reference": 1}}


def test_quantized_backward_gemms_are_counted() -> None:
    a = _rand(4, 64).requires_grad_(True)
    b = _rand(64, 8, seed=1).requires_grad_(True)
    quant_matmul(a, b, "mxfp8", role="linear_fwd", quantize_grads=True).sum().backward()
    assert counters.snapshot()["gemms"] == {"linear_fwd": {"reference": 3}}  # forward, dgrad, wgrad


def test_fallback_logs_one_line_per_shape(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="megaquant.ops"):
        for _ in range(3):
            counters.note_fallback("qk", (32, 64), torch.float64, "mxfp8_e4m3", "float64 is not covered")
        counters.note_fallback("qk", (16, 64), torch.float64, "mxfp8_e4m3", "float64 is not covered")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "(32, 64)" in lines[0] and "float64 is not covered" in lines[0] and "qk" in lines[0]
    fallbacks = counters.snapshot()["fallbacks"]
    assert [(f["shape"], f["calls"]) for f in fallbacks] == [([32, 64], 3), ([16, 64], 1)]


def test_write_collect_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert counters.write(tmp_path) is None  # nothing counted: no file
    quant_matmul(_rand(4, 32), _rand(32, 4), "mxfp8", role="linear_fwd")
    counters.mark_step()
    monkeypatch.setenv("RANK", "1")
    written = counters.write(tmp_path)
    assert written == tmp_path / "path_counts.rank1.json"
    (tmp_path / "path_counts.rank0.json").write_text(
        json.dumps({"gemms": {"linear_fwd": {"triton": 5}}, "operands": {}, "fallbacks": [], "steps": 2})
    )
    merged = pathcounts.collect(tmp_path)
    assert merged is not None
    assert merged["gemms"] == {"linear_fwd": {"triton": 5, "reference": 1}}
    assert merged["ranks"] == [0, 1] and merged["steps"] == 2
    assert pathcounts.summary(merged) == "triton 5, reference 1, plain 0"
    (tmp_path / "path_counts.rank2.json").write_text("{not json")
    assert pathcounts.collect(tmp_path)["unreadable"] == ["path_counts.rank2.json"]  # type: ignore[index]
    assert pathcounts.collect(tmp_path / "empty") is None


FAKE_TRAINER = r"""
import os, sys, torch
from megaquant import ops
ops.quant_matmul(torch.randn(4, 64), torch.randn(64, 8), "mxfp8", role="linear_fwd")
ops.quant_matmul(torch.randn(4, 64), torch.randn(64, 8), "none", role="linear_fwd")
print("counted into", os.environ.get("MEGAQUANT_PATH_COUNTS"), flush=True)
"""  # no explicit write: the at-exit hook of megaquant.ops.counters stores the counts


def _train_with(trainer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunRecord:
    """`megaquant train` (tiny, smoke, linear_mxfp8) on a fixture repo with `trainer` as the training
    command (the test hook); asserts it exited 0."""
    repo = make_git_repo(tmp_path, "v1_three")
    script = tmp_path / "trainer.py"
    script.write_text(trainer)
    monkeypatch.setenv(TRAIN_COMMAND_ENV, shlex.join([sys.executable, str(script)]))
    run_dir = tmp_path / "run"
    request = TrainRequest(
        model="tiny", dataset=None, mode="linear_mxfp8", preset="smoke", megatron=repo, run_dir=run_dir
    )
    record = execute(plan_run(request))
    assert record.exit_code == 0, (record.run_dir / "train.log").read_text()
    return record


def test_train_folds_the_counts_into_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = _train_with(FAKE_TRAINER, tmp_path, monkeypatch)
    manifest = json.loads((record.run_dir / "manifest.json").read_text())
    assert manifest["env"][pathcounts.PATH_COUNTS_ENV] == str(record.run_dir)
    counts = manifest["path_counts"]
    assert counts["gemms"] == {"linear_fwd": {"reference": 1, "plain": 1}}
    assert counts["ranks"] == [0]


TWO_RANKS = r"""
import os, subprocess, sys
# what torchrun does with --nproc-per-node 2: one process per rank, RANK / WORLD_SIZE in the environment;
# each counts its own GEMMs and writes its own file at exit (rank 1 quantizes, rank 0 runs plain)
child = "import torch; from megaquant import ops; " + \
    "ops.quant_matmul(torch.randn(4, 64), torch.randn(64, 8), sys.argv[1], role='linear_fwd')"
procs = [subprocess.Popen([sys.executable, "-c", "import sys; " + child, value],
                          env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"})
         for rank, value in enumerate(("none", "mxfp8"))]
sys.exit(max(p.wait() for p in procs))
"""


def test_every_rank_writes_its_own_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12 needs "every rank quantizes": each training process's counts reach the run dir apart."""
    record = _train_with(TWO_RANKS, tmp_path, monkeypatch)
    per_rank = {
        r: json.loads((record.run_dir / pathcounts.file_name(r)).read_text())["gemms"] for r in (0, 1)
    }
    assert per_rank == {0: {"linear_fwd": {"plain": 1}}, 1: {"linear_fwd": {"reference": 1}}}
    manifest = json.loads((record.run_dir / "manifest.json").read_text())
    assert manifest["path_counts"]["ranks"] == [0, 1]


def test_gemms_inside_a_scope_are_counted_apart_and_merged() -> None:
    a, b = _rand(4, 64), _rand(64, 8, seed=1)
    quant_matmul(a, b, "mxfp8", role="linear_fwd")
    counters.push_scope("experts")
    quant_matmul(a, b, "mxfp8", role="linear_fwd")
    quant_matmul(a, b, "none", role="linear_fwd")
    counters.pop_scope()
    counters.pop_scope()  # unbalanced pops are harmless
    quant_matmul(a, b, "mxfp8", role="linear_fwd")
    snap = counters.snapshot()
    assert snap["gemms"] == {"linear_fwd": {"reference": 3, "plain": 1}}
    assert snap["scoped"] == {"experts": {"linear_fwd": {"reference": 1, "plain": 1}}}
    with counters.evaluation():  # validation GEMMs stay out of the training scopes too
        counters.push_scope("experts")
        quant_matmul(a, b, "mxfp8", role="linear_fwd")
        counters.pop_scope()
    assert counters.snapshot()["scoped"] == snap["scoped"]
    merged = pathcounts.merge([snap, {"scoped": {"experts": {"linear_fwd": {"reference": 2}}}}])
    assert merged["scoped"] == {"experts": {"linear_fwd": {"reference": 3, "plain": 1}}}
    counters.reset()
    assert "scoped" not in counters.snapshot()


def test_expert_forward_gemms_are_counted_per_rank() -> None:
    """megaquant.launch.pretrain hooks every MoE layer's experts module (an object with `experts` and
    `num_local_experts`, as megatron-core's MoELayer): its forward GEMMs land in scoped["experts"]."""
    from megaquant.launch.pretrain import count_expert_gemms

    class Experts(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return quant_matmul(x, torch.ones(64, 8), "mxfp8", role="linear_fwd")

    class MoE(torch.nn.Module):
        num_local_experts = 2

        def __init__(self) -> None:
            super().__init__()
            self.experts = Experts()
            self.shared = Experts()  # not under the scope: a shared expert runs on every rank anyway

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.experts(x) + self.shared(x)

    model = torch.nn.Sequential(MoE())
    assert count_expert_gemms(model) == 1
    model(_rand(4, 64))
    snap = counters.snapshot()
    assert snap["gemms"] == {"linear_fwd": {"reference": 2}}
    assert snap["scoped"] == {"experts": {"linear_fwd": {"reference": 1}}}


def test_metrics_come_from_the_rank_that_holds_the_loss() -> None:
    """Under --pp 2 the loss exists on the last pipeline stage only; rank 0 used to write metrics.jsonl and
    left it empty."""
    from megaquant.launch.pretrain import metrics_rank

    assert metrics_rank({})  # one process
    assert not metrics_rank({"RANK": "0", "WORLD_SIZE": "2"})
    assert metrics_rank({"RANK": "1", "WORLD_SIZE": "2"})
    assert [metrics_rank({"RANK": str(r), "WORLD_SIZE": "4"}) for r in range(4)] == [False] * 3 + [True]


# ------------------------------------------------------------------------------------- weight cache


def test_weight_cache_reuses_within_a_step_and_never_changes_a_bit() -> None:
    x = _rand(8, 64)
    w = torch.nn.Parameter(_rand(32, 64, seed=2))
    with torch.no_grad():
        fresh = quant_matmul(x, w.t(), "mxfp8")
        weights.enable_weight_cache()
        first = quant_matmul(x, w.t(), "mxfp8")
        again = quant_matmul(x, w.t(), "mxfp8")
        dgrad = quant_matmul(x[:, :32], w, "mxfp8", grad=True)  # another format and axis: its own entry
        dgrad_again = quant_matmul(x[:, :32], w, "mxfp8", grad=True)
    assert torch.equal(_bits(fresh), _bits(first)) and torch.equal(_bits(first), _bits(again))
    assert torch.equal(_bits(dgrad), _bits(dgrad_again))
    assert counters.snapshot()["operands"]["matmul"]["cache"] == 1
    assert counters.snapshot()["operands"]["matmul.grad"]["cache"] == 1
    s = weights.stats()
    assert s["entries"] == 2 and s["bytes"] == 2 * w.numel() * 4 and s["hits"] == 2


@pytest.mark.parametrize("tensor_scale", [False, True])
def test_hif8_weight_serves_forward_and_dgrad_from_one_entry(tensor_scale: bool) -> None:
    # HiF8 is elementwise (tensor scaling: one amax over the same elements), so the forward's W.t() and
    # dgrad's W are one quantized copy and its transpose: one entry, the same bits as without the cache
    x, g = _rand(8, 64), _rand(8, 32, seed=5)
    w = torch.nn.Parameter(_rand(32, 64, seed=4))
    configure(tensor_scale=True) if tensor_scale else configure()
    try:
        with torch.no_grad():
            fresh = (quant_matmul(x, w.t(), "hifp8"), quant_matmul(g, w, "hifp8", grad=True))
            weights.enable_weight_cache()
            first = (quant_matmul(x, w.t(), "hifp8"), quant_matmul(g, w, "hifp8", grad=True))
            again = (quant_matmul(x, w.t(), "hifp8"), quant_matmul(g, w, "hifp8", grad=True))
    finally:
        configure()
    for a, b, c in zip(fresh, first, again, strict=True):
        assert torch.equal(_bits(a), _bits(b)) and torch.equal(_bits(b), _bits(c))
    s = weights.stats()
    assert s["entries"] == 1 and s["bytes"] == w.numel() * 4 and s["hits"] == 3
    assert counters.snapshot()["operands"]["matmul.grad"]["cache"] == 2  # dgrad hit the forward's copy


def test_nvfp4_weight_tiles_come_from_the_cache_too() -> None:
    # nvfp4_paper's 16x16 weight tiles were quantized at every use (the cache was skipped on that path)
    x = _rand(8, 64)
    w = torch.nn.Parameter(_rand(32, 64, seed=6))
    with torch.no_grad():
        fresh = quant_matmul(x, w.t(), "nvfp4", recipe="nvfp4_paper", gemm="fprop")
        weights.enable_weight_cache()
        first = quant_matmul(x, w.t(), "nvfp4", recipe="nvfp4_paper", gemm="fprop")
        again = quant_matmul(x, w.t(), "nvfp4", recipe="nvfp4_paper", gemm="fprop")
    assert torch.equal(_bits(fresh), _bits(first)) and torch.equal(_bits(first), _bits(again))
    assert weights.stats()["entries"] == 1 and weights.stats()["hits"] == 1


def test_weight_cache_sees_in_place_updates_and_steps() -> None:
    x = _rand(8, 64)
    w = torch.nn.Parameter(_rand(32, 64, seed=3))
    weights.enable_weight_cache()
    with torch.no_grad():
        quant_matmul(x, w.t(), "mxfp8")
        w.add_(1.0)  # bumps the version counter: the entry is stale
        after = quant_matmul(x, w.t(), "mxfp8")
        want = torch.matmul(fake_quant(x, "mxfp8_e4m3"), fake_quant(w, "mxfp8_e4m3").t())
        assert torch.equal(_bits(after), _bits(want))
        w.data.mul_(0.5)  # through .data: no version bump, so only the step boundary makes it safe
        weights.next_step()
        stepped = quant_matmul(x, w.t(), "mxfp8")
        want = torch.matmul(fake_quant(x, "mxfp8_e4m3"), fake_quant(w, "mxfp8_e4m3").t())
        assert torch.equal(_bits(stepped), _bits(want))
    assert "cache" not in counters.snapshot()["operands"]["matmul"]


def test_weight_cache_copies_are_used_only_in_the_mode_that_made_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a CUDA-graph capture must not hit a copy made eagerly (the graph would read freed memory at replay:
    # NaN validation losses on the H200), and eager code must not hit a copy made under capture
    x = _rand(8, 64)
    w = torch.nn.Parameter(_rand(32, 64, seed=3))
    capturing = [False]
    monkeypatch.setattr(weights, "_capturing", lambda: capturing[0])
    weights.enable_weight_cache()
    with torch.no_grad():
        quant_matmul(x, w.t(), "mxfp8")  # eager: quantize, store
        quant_matmul(x, w.t(), "mxfp8")  # eager: hit
        capturing[0] = True
        quant_matmul(x, w.t(), "mxfp8")  # capture: the eager copy is not used
        quant_matmul(x, w.t(), "mxfp8")  # capture: hits the copy made in this capture
        capturing[0] = False
        quant_matmul(x, w.t(), "mxfp8")  # eager again: not the captured copy
    s = weights.stats()
    assert (s["hits"], s["misses"]) == (2, 3)
    weights.disable_weight_cache()


def test_weight_cache_holds_parameters_only_and_respects_the_bound() -> None:
    weights.enable_weight_cache(max_bytes=32 * 64 * 4)
    x = _rand(8, 64)
    small = torch.nn.Parameter(_rand(32, 64, seed=4))
    big = torch.nn.Parameter(_rand(64, 64, seed=5))
    with torch.no_grad():
        for _ in range(2):
            quant_matmul(x, x.t(), "mxfp8")  # activations: never cached
            quant_matmul(x, small.t(), "mxfp8")
            quant_matmul(x, big.t(), "mxfp8")  # past the bound: quantized per use
    s = weights.stats()
    assert s["entries"] == 1 and s["hits"] == 1 and s["over_bound"] == 2
    assert counters.snapshot()["operands"]["matmul"] == {"reference": 11, "cache": 1}
    with pytest.raises(ValueError):
        weights.enable_weight_cache(max_bytes=-1)


def test_training_with_the_cache_is_bit_identical() -> None:
    """Several microbatches per optimizer step, quantized forward and gradient GEMMs: the same weights and
    losses at every step with and without the cache."""

    def train(cache: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        w1 = torch.nn.Parameter(torch.randn(48, 64) * 0.1)
        w2 = torch.nn.Parameter(torch.randn(16, 48) * 0.1)
        opt = torch.optim.SGD([w1, w2], lr=0.1)
        data = torch.randn(3, 4, 8, 64, generator=torch.Generator().manual_seed(1))
        if cache:
            weights.enable_weight_cache()
        else:
            weights.disable_weight_cache()
        seen: list[torch.Tensor] = []
        for step in range(3):
            weights.next_step()
            opt.zero_grad()
            for micro in data[step]:
                h = quant_matmul(micro, w1.t(), "mxfp8", quantize_grads=True)
                loss = quant_matmul(torch.relu(h), w2.t(), "hifp8", quantize_grads=True).square().mean()
                loss.backward()
                seen.append(loss.detach())
            opt.step()
        seen += [w1.detach().clone(), w2.detach().clone()]
        return seen

    plain, cached = train(False), train(True)
    assert weights.stats()["hits"] > 0
    assert all(torch.equal(_bits(p), _bits(c)) for p, c in zip(plain, cached, strict=True))


def test_weight_cache_setting() -> None:
    gpu = 140 * 2**30
    assert weight_cache_bound(None, gpu) == (True, int(0.05 * gpu))  # default: bounded by the GPU's memory
    assert weight_cache_bound("on", gpu) == (True, None)
    assert weight_cache_bound("off", gpu) == (False, None)
    assert weight_cache_bound("512", gpu) == (True, 512 * 2**20)
    with pytest.raises(LaunchError, match="MEGAQUANT_WEIGHT_CACHE"):
        weight_cache_bound("lots", gpu)


def test_weight_cache_is_on_by_default_only_where_a_copy_is_used_again_and_that_pays() -> None:
    def pays(m: int, tokens: int, recompute: bool = False) -> bool:
        return weight_cache_pays(microbatches=m, recompute=recompute, tokens_per_microbatch=tokens)

    assert pays(8, 2 * 1024)  # the single-gpu preset: 8 microbatches of 2 x 1024 (measured: 6.9 % saved)
    assert pays(32, 2048) and pays(8, 256)  # the fast and smoke presets
    assert pays(1, 2048, recompute=True)  # the recomputed forward reuses the copy
    assert not pays(1, 256)  # one use per step: memory for nothing
    assert not pays(2, 8192)  # the 8B cut at seq 8192, 2 microbatches: ~1 % for 1.8 GiB of copies
    assert weight_cache_saving(microbatches=8, recompute=False, tokens_per_microbatch=2048) == pytest.approx(
        7 / 8 * 160 / 2048
    )
    assert "~1.0% of a step" in weight_cache_off_reason(microbatches=2, recompute=False, tokens=8192)
    assert "one microbatch" in weight_cache_off_reason(microbatches=1, recompute=False, tokens=8192)


# ------------------------------------------------------------------------------------ launch path


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "hifp8"])
def test_quantizer_equals_fake_quant(fmt: str) -> None:
    x = _rand(6, 96).to(torch.bfloat16)
    fn, path, reason = quantizer(x, fmt, axis=-1, scale="rceil", tensor_scale=fmt == "hifp8")
    assert path == "reference" and reason is not None and "CUDA" in reason
    want = fake_quant(x, fmt, scale="rceil", tensor_scale=fmt == "hifp8")
    other = _rand(3, 96, seed=9).to(torch.bfloat16)  # any tensor of the same kind
    assert torch.equal(_bits(fn(x)), _bits(want))
    assert torch.equal(
        _bits(fn(other)), _bits(fake_quant(other, fmt, scale="rceil", tensor_scale=fmt == "hifp8"))
    )


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("nvfp4", {}),  # the format's own 16-element blocks, its tensor scale from each tensor's amax
        ("nvfp4", {"block_2d": True}),
        ("mxfp8_e5m2", {"rounding": "stochastic", "seed": 7}),
        ("nvfp4", {"rounding": "stochastic", "seed": 7}),
    ],
)
def test_quantizer_equals_fake_quant_for_the_newer_options(fmt: str, kw: dict[str, object]) -> None:
    """The ops' launch path covers NVFP4, 2-D tiles and stochastic rounding exactly as fake_quant does."""
    x, other = _rand(32, 96).to(torch.bfloat16), _rand(16, 96, seed=9).to(torch.bfloat16)
    fn, path, _ = quantizer(x, fmt, axis=-1, **kw)
    assert path == "reference"
    for t in (x, other):
        assert torch.equal(_bits(fn(t)), _bits(fake_quant(t, fmt, axis=-1, **kw)))  # type: ignore[arg-type]


def test_ops_without_autograd_equal_the_autograd_path() -> None:
    """Inside Megatron's autograd functions (grad off) the ops skip their own Function: same bits."""
    a, b = _rand(4, 64, seed=6), _rand(64, 8, seed=7).requires_grad_(True)
    with_graph = quant_matmul(a, b, "mxfp8")
    assert with_graph.requires_grad
    with torch.no_grad():
        without = quant_matmul(a, b, "mxfp8")
    assert not without.requires_grad and torch.equal(_bits(with_graph.detach()), _bits(without))
    inp = torch.zeros(2, 4, 8)
    with torch.no_grad():
        bad = quant_baddbmm(
            inp, a.expand(2, 4, 64), b.detach().expand(2, 64, 8), "hifp8", beta=0.0, alpha=0.5
        )
    qa, qb = fake_quant(a, "hifp8").expand(2, 4, 64), fake_quant(b.detach(), "hifp8").expand(2, 64, 8)
    ref = torch.baddbmm(inp, qa, qb, beta=0.0, alpha=0.5)
    assert torch.equal(_bits(bad), _bits(ref))


def test_the_weight_cache_decision_and_holding_reach_the_counts_file() -> None:
    assert "weight_cache" not in counters.snapshot()  # not decided: nothing said
    counters.note_weight_cache(True, "default")
    weights.enable_weight_cache()
    w = torch.nn.Parameter(_rand(32, 64, seed=7))
    with torch.no_grad():
        quant_matmul(_rand(8, 64), w.t(), "mxfp8")
    snap = counters.snapshot()
    assert snap["weight_cache"] == {
        "enabled": True, "reason": "default", "peak_bytes": w.numel() * 4, "bound": None,
    }  # fmt: skip
    merged = pathcounts.merge([snap, {"weight_cache": {**snap["weight_cache"], "peak_bytes": 1}}])
    assert merged["weight_cache"]["peak_bytes"] == w.numel() * 4  # the largest rank's holding
    counters.reset()
    assert "weight_cache" not in counters.snapshot()
