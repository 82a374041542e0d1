"""Every model x dataset x mode x preset argv through Megatron's own parse_args() + validate_args().

Megatron runs in one child process (megaquant.launch.validate) over the pinned megatron-core sources
(downloaded once by megaquant.megatron_src); parsing needs no GPU.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from megaquant.errors import MegaquantError
from megaquant.launch.argv import Parallel
from megaquant.launch.datasets import DATASETS
from megaquant.launch.launcher import validate_plan
from megaquant.launch.models import MODELS
from megaquant.launch.modes import MODES
from megaquant.launch.presets import PRESETS
from megaquant.launch.run import TrainRequest, plan_run
from megaquant.launch.validate import Case, megatron_version, source_for, validate

pytest.importorskip("triton", reason="megatron-core 0.19's argument parsing imports triton (megatron extra)")


@pytest.fixture(scope="module")
def source() -> Path:
    try:
        return source_for(None)
    except MegaquantError as exc:
        pytest.skip(f"no Megatron sources with megatron/training available: {exc}")


def _plan_args(
    tmp: Path,
    model: str,
    dataset: str | None,
    mode: str,
    preset: str,
    steps: int | None = None,
    **par: object,
) -> Case:
    request = TrainRequest(
        model=model,
        dataset=dataset,
        mode=mode,
        preset=preset,
        megatron=tmp,
        data_root=Path("/data"),
        parallel=Parallel(**par),  # type: ignore[arg-type]
        run_dir=tmp / "run",
        steps=steps,
        spec="megatron-core",  # declares every value, nvfp4 modes included (the argv does not depend on it)
    )
    plan = plan_run(request, require_tree=False)
    return Case(argv=plan.megatron_args, world_size=request.parallel.world_size)


def _without(argv: tuple[str, ...], flag: str) -> tuple[str, ...]:
    at = argv.index(flag)
    return argv[:at] + argv[at + 2 :]


def test_whole_matrix_is_accepted_by_megatron(source: Path, tmp_path: Path) -> None:
    """One child process: every cell, three multi-GPU layouts, and cases Megatron must reject."""
    cells = {
        cell: _plan_args(tmp_path, *cell)
        for cell in itertools.product(MODELS, [*DATASETS, None], MODES, PRESETS)
    }
    assert len(cells) == len(MODELS) * (len(DATASETS) + 1) * len(MODES) * len(PRESETS)
    layouts = {
        ("llama31-8b", "tp8"): _plan_args(tmp_path, "llama31-8b", "wikipedia", "FA_linear_mxfp8", "standard",
                                          tp=8, nproc_per_node=8),
        ("llama32-1b", "tp2pp2x2nodes"): _plan_args(tmp_path, "llama32-1b", "dolma", "linear_hifp8", "fast",
                                                    tp=2, pp=2, nproc_per_node=4, nnodes=2),
        ("deepseek2_lite", "ep8"): _plan_args(tmp_path, "deepseek2_lite", "wikipedia", "qk_pv_mxfp4", "fast",
                                              ep=8, nproc_per_node=8),
    }  # fmt: skip
    layouts.update(  # --steps rewrites a sample-based preset; Megatron must accept every result
        {
            (preset, f"steps{n}"): _plan_args(tmp_path, "llama32-1b", "sample", "bf16", preset, steps=n)
            for preset in PRESETS
            for n in (1, 30)
        }  # fmt: skip
    )
    tiny = _plan_args(tmp_path, "tiny", None, "bf16", "smoke")
    must_fail = {
        "seq beyond positions": Case(argv=(*tiny.argv, "--seq-length", "16384")),  # tiny: 8192 positions
        "unknown flag": Case(argv=(*tiny.argv, "--no-such-flag")),
        "eval iters without interval": Case(argv=_without(tiny.argv, "--eval-interval")),
        "tp without max connections": Case(argv=(*layouts["llama31-8b", "tp8"].argv,), world_size=8, env=()),
    }
    unique = sorted({*cells.values(), *layouts.values()}, key=lambda c: (c.world_size, c.argv))
    cases = [*unique, *must_fail.values()]
    verdicts = validate(cases, source)
    by_case = dict(zip(unique, verdicts, strict=False))
    every: list[tuple[object, Case]] = [*cells.items(), *layouts.items()]
    rejected = {cell: by_case[case].error for cell, case in every if not by_case[case].ok}
    assert rejected == {}
    failed = dict(zip(must_fail, verdicts[len(unique) :], strict=True))
    assert not failed["seq beyond positions"].ok
    assert "max_position_embeddings" in failed["seq beyond positions"].error
    assert not failed["unknown flag"].ok and "--no-such-flag" in failed["unknown flag"].error
    assert not failed["eval iters without interval"].ok  # parses, but pretrain() would crash at start-up
    assert "NoneType" in failed["eval iters without interval"].error
    assert not failed["tp without max connections"].ok
    assert "CUDA_DEVICE_MAX_CONNECTIONS" in failed["tp without max connections"].error
    assert megatron_version(source) != "?"


def test_validate_plan_refuses_what_megatron_rejects(source: Path, tmp_path: Path) -> None:
    request = TrainRequest(model="tiny", dataset=None, preset="smoke", megatron=tmp_path,
                           extra=("--seq-length", "16384"))  # fmt: skip
    with pytest.raises(MegaquantError, match="rejects the generated arguments.*max_position_embeddings"):
        validate_plan(plan_run(request, require_tree=False))


def test_the_reused_parser_gives_each_parse_fresh_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """reuse_megatron_parser: the parser is built once per environment; a parse that changes a mutable
    default in place (as validate_args may) does not leak into the next parse."""
    import argparse
    import types

    from megaquant.launch.validate import reuse_megatron_parser

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    builds: list[str] = []

    def add_megatron_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        builds.append(os.environ.get("WORLD_SIZE", ""))
        parser.add_argument("--layers", type=int, default=2)
        parser.add_argument("--spec", nargs="*", default=["a", "b"])
        return parser

    arguments = types.SimpleNamespace(add_megatron_arguments=add_megatron_arguments)
    reuse_megatron_parser(arguments)

    def parse(argv: list[str]) -> argparse.Namespace:
        return arguments.add_megatron_arguments(argparse.ArgumentParser()).parse_args(argv)

    first = parse([])
    first.spec.append("changed in place")
    assert parse(["--layers", "4"]) == argparse.Namespace(layers=4, spec=["a", "b"])
    assert parse([]).spec == ["a", "b"] and len(builds) == 1
    monkeypatch.setenv("WORLD_SIZE", "8")  # a default may read the environment: one parser per environment
    parse([])
    assert builds == ["", "8"]
