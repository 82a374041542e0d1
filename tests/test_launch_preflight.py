"""Refusing up front what would fail at start-up: no megatron/training to import (Python 3.11 +
megatron-core 0.16.1), a megatron-core too new for this Python, a missing dataset prefix or tokenizer; and
the dry run saying truthfully which Megatron's parser accepted the argv."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import fake_sample_files, make_git_repo
from typer.testing import CliRunner

from megaquant import megatron_src
from megaquant.cli import build_app
from megaquant.launch.preflight import TrainingMegatron, data_problems, training_megatron, training_problem
from megaquant.launch.run import TRAIN_COMMAND_ENV

APP = build_app(("megaquant.launch.commands",))
RUNNER = CliRunner()


def _megatron_tree(root: Path, version: str, *, training: bool) -> Path:
    major, minor, patch = version.split(".")
    info = root / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True)
    info.write_text(f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\n")
    if training:
        (root / "megatron" / "training").mkdir()
        (root / "megatron" / "training" / "arguments.py").write_text("")
    return root


def test_which_megatron_trains_and_whether_it_can(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(megatron_src, "installed_megatron", lambda: None)
    bare = _megatron_tree(
        tmp_path / "copy", "0.16.1", training=False
    )  # `instrument --from-installed` of 0.16.1
    assert training_megatron(bare) is None
    problem = training_problem(bare, None, python=(3, 11))
    assert problem is not None and "cannot train" in problem and "no megatron/training" in problem
    assert "megatron-core >= 0.17 needs Python >= 3.12" in problem and "--megatron PATH" in problem
    assert "megatron-core 0.16.1, the newest release for Python 3.11" in problem
    new = _megatron_tree(tmp_path / "new", "0.19.2", training=True)
    found = training_megatron(new)
    assert found == TrainingMegatron(root=new, version="0.19.2", origin="tree")
    too_new = training_problem(new, found, python=(3, 11))
    assert too_new is not None and "megatron-core 0.19.2" in too_new and "needs Python >= 3.12" in too_new
    assert training_problem(new, found, python=(3, 12)) is None
    old = _megatron_tree(tmp_path / "old", "0.16.0", training=True)  # a checkout of that age has training
    assert training_problem(old, training_megatron(old), python=(3, 11)) is None
    monkeypatch.setattr(megatron_src, "installed_megatron", lambda: new)  # training from site-packages
    assert training_megatron(bare) == TrainingMegatron(root=new, version="0.19.2", origin="installed")


def test_train_on_a_tree_that_cannot_train_is_refused_before_anything_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to set the roles and die inside torchrun with ModuleNotFoundError: megatron.training."""
    import git

    monkeypatch.setattr(megatron_src, "installed_megatron", lambda: None)
    monkeypatch.delenv(TRAIN_COMMAND_ENV, raising=False)
    repo = make_git_repo(tmp_path, "v1_three")  # a fork-shaped tree without megatron/training
    run_dir = tmp_path / "run"
    args = ["train", "--model", "tiny", "--mock-data", "-q", "FA_linear_mxfp8", "--training-config", "smoke",
            "--megatron", str(repo), "--run-dir", str(run_dir), "--no-validate"]  # fmt: skip
    for dry in ([], ["--dry-run"]):
        result = RUNNER.invoke(APP, [*args, *dry])
        assert result.exit_code == 1, result.output
        assert "would fail at start-up, nothing was set" in result.output
        assert "cannot train" in result.output and "Python >= 3.12" in result.output
        assert git.Repo(repo).active_branch.name == "main" and not run_dir.exists()
    assert "problem: " in result.output and "command:" in result.output  # the dry run shows the plan first


def test_dry_run_checks_the_data_prefix_and_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing dataset used to pass the dry run and fail inside torchrun on Megatron's assertion."""
    repo = make_git_repo(tmp_path, "v1_three")
    monkeypatch.setenv(TRAIN_COMMAND_ENV, f"{sys.executable} -c pass")  # the hook: trainability not asked
    args = ["train", "--model", "tiny", "--dataset", "sample", "--megatron", str(repo), "--dry-run", "--json",
            "--no-validate", "--training-config", "smoke"]  # fmt: skip
    missing = RUNNER.invoke(APP, args)
    assert missing.exit_code == 1
    problems = json.loads(missing.stdout)["problems"]
    assert len(problems) == 2 and "sample_processed_text_document.bin" in problems[0]
    assert "megaquant data prepare" in problems[0] and "tokenizer" in problems[1]
    fake_sample_files(repo)
    prefix = repo / "dataset/sample_processed/sample_processed_text_document"
    ready = RUNNER.invoke(APP, args)
    assert ready.exit_code == 0, ready.output
    assert json.loads(ready.stdout)["problems"] == []
    Path(f"{prefix}.incomplete").write_text("")  # a prepare killed between its two renames
    half = RUNNER.invoke(APP, args)
    assert half.exit_code == 1 and "interrupted `megaquant data prepare`" in half.output


def test_tokenizer_names_and_blends() -> None:
    hub = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "meta-llama/Llama-3.2-1B"]
    problems, notes = data_problems(["--mock-data", *hub])
    assert problems == [] and "hub name" in notes[0]
    problems, _ = data_problems(["--data-path", "0.3", "/nowhere/a", "0.7", "/nowhere/b", "--mock-data-x"])
    assert [p.split(":")[0] for p in problems] == ["dataset /nowhere/a", "dataset /nowhere/b"]
    problems, _ = data_problems(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "/no/tok"])
    assert problems and "no such directory" in problems[0]


def test_dry_run_names_the_parser_that_accepted_the_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said 'accepted by Megatron 0.19.2' after checking a separately fetched wheel, not the tree that
    trains; now a tree with megatron/training is its own parser and the note names it (Megatron's real
    parser on the pinned sources: tests/test_train_config.py, tests/test_launch_validate.py)."""
    from megaquant.launch import validate

    used: list[Path] = []

    def fake_validate(cases: object, source: Path, **kw: object) -> list[validate.Verdict]:
        used.append(source)
        return [validate.Verdict(ok=True, error="")]

    monkeypatch.setattr(validate, "validate", fake_validate)
    monkeypatch.setattr(megatron_src, "installed_megatron", lambda: None)
    monkeypatch.setattr(megatron_src, "megatron_sources", lambda version="": tmp_path / "pinned")
    tree = _megatron_tree(tmp_path / "checkout", "0.19.2", training=True)
    base = ["train", "--model", "tiny", "--mock-data", "--training-config", "smoke", "--dry-run"]
    result = RUNNER.invoke(APP, [*base, "--megatron", str(tree)])
    assert used == [tree]
    assert f"accepted by Megatron 0.19.2 parse_args + validate_args (the tree that trains, {tree})" in (
        result.output
    )
    if sys.version_info < (3, 12):  # megatron-core 0.19 declares Python >= 3.12: refused, after the plan
        assert result.exit_code == 1 and "needs Python >= 3.12" in result.output
    else:
        assert result.exit_code == 0, result.output
    elsewhere = RUNNER.invoke(APP, [*base, "--megatron", str(tmp_path / "not-a-tree"), "--json"])
    assert used[-1] == tmp_path / "pinned" and elsewhere.exit_code == 0, elsewhere.output
    payload = json.loads(elsewhere.stdout)
    assert payload["validated_source"] == "pinned" and payload["trains_with"] is None


@pytest.mark.parametrize(
    ("python", "expected"), [("3.11", "==0.16.1"), ("3.12", "==0.19.2"), ("3.13", "==0.19.2")]
)
def test_megatron_extra_gives_each_python_the_newest_megatron_core(python: str, expected: str) -> None:
    """The extra pinned 0.16.1 everywhere; 0.17+ (the releases with megatron/training) need Python >= 3.12."""
    import tomllib

    markers = pytest.importorskip("packaging.markers")
    requirements = pytest.importorskip("packaging.requirements")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["megatron"]
    env = {**markers.default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    chosen = [
        str(r.specifier)
        for r in map(requirements.Requirement, extra)
        if r.name == "megatron-core" and (r.marker is None or r.marker.evaluate(env))
    ]
    assert chosen == [expected]
    if python != "3.11":
        assert expected == f"=={megatron_src.PINNED_VERSION}"  # what CI validates against is what 3.12 trains
