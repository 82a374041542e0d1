"""One step past the parser: every registry model is built by megaquant's own model provider (the code
`megaquant train` runs) on the meta device, over instrumented megatron-core 0.16.1 (installed) and 0.19.2
(the pinned sources), so "accepted" means "the model builds". DeepSeek-V2-Lite's shape (MLA without q-LoRA,
`--qk-layernorm`) failed in 0.19.2 on megatron-core's local spec and builds on megaquant's."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megaquant.errors import MegaquantError
from megaquant.instrument import load_rules, plan_instrument
from megaquant.launch.buildcheck import Built, build_args, build_models
from megaquant.launch.models import MODELS
from megaquant.launch.modes import MODES
from megaquant.launch.run import TrainRequest, plan_run
from megaquant.megatron_src import installed_megatron, megatron_sources

pytest.importorskip("torch")
pytest.importorskip("triton", reason="megatron-core 0.19's argument parsing imports triton (megatron extra)")

DEEPSEEK_FREQ = "([0]+[1]*1)"  # two layers: the dense first layer and one MoE layer


def _instrumented(root: Path, dest: Path) -> Path:
    """A copy of `root`'s megatron/, instrumented (MLA needs the channel keywords instrument adds)."""
    shutil.copytree(root / "megatron", dest / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    rules = load_rules()
    plan = plan_instrument({f: (dest / f).read_bytes() for f in rules.files()}, rules)
    for rel, data in plan.new_sources.items():
        (dest / rel).write_bytes(data)
    return dest


def _argv(model: str, mode: str) -> tuple[str, ...]:
    request = TrainRequest(
        model=model, dataset=None, mode=mode, preset="smoke", megatron=Path("/nowhere"), spec="megatron-core"
    )  # an instrumented tree's spec: it declares every value (the nvfp4 modes included)
    return plan_run(request, require_tree=False).megatron_args


def _cases() -> dict[str, list[str]]:
    cases = {}
    for name, model in MODELS.items():
        argvs = {_argv(name, mode) for mode in MODES}
        assert len(argvs) == 1  # the mode lives in the tree's source values, not in the argv: one build each
        layers, freq = (2, DEEPSEEK_FREQ) if model.moe else (1, None)
        cases[name] = build_args(argvs.pop(), layers=layers, moe_layer_freq=freq)
    return cases


@pytest.fixture(scope="module")
def pinned() -> Path:
    try:
        return megatron_sources()
    except MegaquantError as exc:
        pytest.skip(f"no pinned megatron-core sources: {exc}")


@pytest.fixture(scope="module")
def built(pinned: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Built]]:
    work = tmp_path_factory.mktemp("build")
    cases = _cases()
    # each build is a child process over its own tree: the two versions build side by side
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            "0.19.2": pool.submit(
                build_models,
                {**cases, "deepseek2_lite stock spec": cases["deepseek2_lite"]},
                _instrumented(pinned, work / "0.19.2"),
                stock_spec=["deepseek2_lite stock spec"],
            )
        }
        installed = installed_megatron()
        if installed is not None and not (installed / "megatron" / "training").is_dir():
            futures["installed"] = pool.submit(
                build_models, cases, _instrumented(installed, work / "installed"), parser=pinned
            )
        return {version: future.result() for version, future in futures.items()}


def test_every_registry_model_builds(built: dict[str, dict[str, Built]]) -> None:
    for version, results in built.items():
        failed = {name: r.error for name, r in results.items() if not r.ok and "stock" not in name}
        assert failed == {}, version
        for name in MODELS:
            layers = results[name].layers
            assert len(layers) == (2 if MODELS[name].moe else 1), (version, layers)
            assert results[name].parameters > 0


def test_deepseek_builds_dense_then_moe_with_a_kv_norm_and_no_q_norm(
    built: dict[str, dict[str, Built]],
) -> None:
    for version, results in built.items():
        dense, moe = results["deepseek2_lite"].layers
        assert dense.startswith("LocalMLASelfAttention+MLP") and moe.startswith(
            "LocalMLASelfAttention+MoELayer"
        )
        for layer in (dense, moe):
            assert "q norm NoneType" in layer and "kv norm RMSNorm" in layer, (version, layer)


def test_the_experts_of_every_moe_layer_are_counted_per_rank(built: dict[str, dict[str, Built]]) -> None:
    """megaquant.launch.pretrain finds the MoE layer's experts module on both megatron-core versions (the
    path counts' scoped["experts"], which issue 12's EP run reads per rank), and nothing in dense models."""
    for version, results in built.items():
        for name, model in MODELS.items():
            assert results[name].expert_modules == (1 if model.moe else 0), (version, name)


def test_megatron_core_019_refuses_its_own_local_spec_for_this_shape(
    built: dict[str, dict[str, Built]],
) -> None:
    stock = built["0.19.2"]["deepseek2_lite stock spec"]
    assert not stock.ok
    assert "non-trivial, but `q_lora_rank is None`" in stock.error


def test_both_versions_build_the_same_parameters(built: dict[str, dict[str, Built]]) -> None:
    if "installed" not in built:
        pytest.skip("the installed megatron-core has megatron/training: built as 0.19.2 only")
    counts = {
        v: {n: r.parameters for n, r in results.items() if "stock" not in n} for v, results in built.items()
    }
    assert counts["installed"] == counts["0.19.2"]
    assert (
        counts["0.19.2"]["llama32-1b"]
        == 128256 * 2048 + 2048 * (2048 + 2 * 512 + 2048) + 3 * 2048 * 8192 + 3 * 2048
    )
