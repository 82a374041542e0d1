"""`megaquant train --recipe` through the real CLI: listing, dry run, refusals, manifest, the training env."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import load_script, make_git_repo
from typer.testing import CliRunner

from megaquant.cli import build_app
from megaquant.launch.run import TRAIN_COMMAND_ENV
from megaquant.recipes import RECIPES

APP = build_app(("megaquant.launch.commands",))
RUNNER = CliRunner()
DRY = ["train", "--model", "tiny", "--mock-data", "--training-config", "smoke", "--dry-run", "--no-validate"]
FAKE = (
    "import os\nprint('recipe in the trainer:', os.environ.get('MEGAQUANT_RECIPE'))\n"
    "print(' iteration        1/       1 | lm loss: 2.5E+00 |')\n"
)


def test_list_has_a_recipe_heading_with_every_recipe() -> None:
    result = RUNNER.invoke(APP, ["train", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    heading = next(i for i, line in enumerate(lines) if "recipe" in line and line.endswith(":"))
    listed = [line.split()[0] for line in lines[heading + 1 :] if line.startswith("  ")]
    assert listed[: len(RECIPES)] == list(RECIPES)


def test_dry_run_shows_the_recipe_and_sets_it_for_the_trainer() -> None:
    result = RUNNER.invoke(
        APP, [*DRY, "-q", "linear_hifp8", "--spec", "megatron-core", "--recipe", "hifp8_scaled"]
    )
    assert result.exit_code == 0, result.output
    assert "recipe: hifp8_scaled (HiF8 with per-tensor" in result.output
    assert "MEGAQUANT_RECIPE=hifp8_scaled" in result.output
    payload = json.loads(RUNNER.invoke(APP, [*DRY, "--json", "--spec", "megatron-core"]).output)
    assert payload["recipe"] == "default" and payload["env"]["MEGAQUANT_RECIPE"] == "default"


def test_unknown_recipe_exits_1_with_the_list() -> None:
    result = RUNNER.invoke(APP, [*DRY, "--recipe", "nope"])
    assert result.exit_code == 1
    assert "error: unknown recipe 'nope'; choose one of: " + ", ".join(RECIPES) in result.output


def test_fork_tree_refuses_recipes_its_ops_cannot_run(tmp_path: Path) -> None:
    repo = make_git_repo(tmp_path, "v1_three")
    # a fork checkout trains with its own megatron/training (else the preflight refuses the run itself)
    (repo / "megatron" / "training").mkdir()
    (repo / "megatron" / "training" / "arguments.py").write_text("")
    base = [*DRY, "--megatron", str(repo), "-q", "linear_hifp8"]
    refused = RUNNER.invoke(APP, [*base, "--recipe", "hifp8_scaled"])
    assert refused.exit_code == 1
    assert "recipe 'hifp8_scaled' cannot run on a fork tree: the fork's own ops do only fork numerics" in (
        refused.output
    )
    assert RUNNER.invoke(APP, [*base, "--recipe", "fork"]).exit_code == 0
    assert RUNNER.invoke(APP, [*base, "--recipe", "default"]).exit_code == 0


def test_a_real_run_records_the_recipe_and_the_trainer_gets_it(tmp_path: Path) -> None:
    repo = make_git_repo(tmp_path, "v1_three")
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    run_dir = tmp_path / "run"
    result = RUNNER.invoke(
        APP,
        ["train", "--model", "tiny", "--mock-data", "-q", "FA_linear_mxfp4", "--training-config", "smoke",
         "--megatron", str(repo), "--run-dir", str(run_dir), "--no-validate", "--recipe", "fork"],
        env={TRAIN_COMMAND_ENV: shlex.join([sys.executable, str(fake)])},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "recipe in the trainer: fork" in result.output
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["recipe"] == "fork" and manifest["env"]["MEGAQUANT_RECIPE"] == "fork"


def test_train_config_front_end_takes_the_recipe(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "train_config.py"
    front = load_script(script, "train_config")
    assert front.parser().parse_args(["--recipe", "nvfp4_paper"]).recipe == "nvfp4_paper"
    repo = make_git_repo(tmp_path, "v1_three")
    base = [sys.executable, str(script), "--model", "tiny", "--megatron", str(repo), "--dry-run"]
    refused = subprocess.run([*base, "--recipe", "mxfp4_tseng"], capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "fork's own ops do only fork numerics" in refused.stderr


# ---------------------------------------------------------------- the value nvfp4: modes, specs, set

STOCK_LAYERS = """class LinearWithGradAccumulationAndAsyncCommunication:
    def forward(ctx, total_input, weight):
        custom_quant_type = 'none'
        output = _mq_ops.quant_matmul(total_input, weight.t(), custom_quant_type, gemm='fprop')
        return output
"""


def _instrumented_repo(tmp_path: Path) -> Path:
    import git

    repo = tmp_path / "instrumented"
    path = repo / "megatron" / "core" / "tensor_parallel" / "layers.py"
    path.parent.mkdir(parents=True)
    path.write_text(STOCK_LAYERS)
    rep = git.Repo.init(repo, initial_branch="main")
    with rep.config_writer() as cfg:
        cfg.set_value("user", "name", "t")
        cfg.set_value("user", "email", "t@example.invalid")
        cfg.set_value("megaquant", "spec", "megatron-core")
    rep.index.add([str(path.relative_to(repo))])
    rep.index.commit("instrumented")
    return repo


def test_specs_declare_their_values() -> None:
    import pytest

    from megaquant.errors import SpecError, ValueNameError
    from megaquant.spec import load_spec, parse_spec

    assert "nvfp4" not in load_spec("fork").values
    assert "nvfp4" in load_spec("megatron-core").values
    with pytest.raises(ValueNameError, match="not supported by spec fork.*fork's own ops have no NVFP4"):
        load_spec("fork").literal("nvfp4")
    rule = '[[rules]]\nrole = "qk"\nfile = "a.py"\nscope = "f"\ncalls = ["*bmm"]\n'
    head = 'variable = "v"\nnone_literal = "none"\n'
    assert parse_spec(head + rule, "x", "x.toml").values == ("mxfp8", "mxfp4", "hifp8", "none")  # default
    with pytest.raises(SpecError, match="`values` must list canonical values"):
        parse_spec(head + 'values = ["fp8", "none"]\n' + rule, "x", "x.toml")


def test_set_nvfp4_works_on_an_instrumented_tree_and_is_refused_on_the_fork(tmp_path: Path) -> None:
    app = build_app(())
    repo = _instrumented_repo(tmp_path)
    done = RUNNER.invoke(app, ["set", "--repo", str(repo), "--linear-fwd", "nvfp4"])
    assert done.exit_code == 0, done.output
    assert "'none' -> 'nvfp4'" in done.output and "committed" in done.output
    assert "custom_quant_type = 'nvfp4'" in (repo / "megatron/core/tensor_parallel/layers.py").read_text()
    fork = make_git_repo(tmp_path, "v1_three")
    refused = RUNNER.invoke(app, ["set", "--repo", str(fork), "--linear", "nvfp4"])
    assert refused.exit_code == 1
    assert "error: value 'nvfp4' is not supported by spec fork" in refused.output


def test_nvfp4_modes_launch_only_where_the_spec_has_nvfp4(tmp_path: Path) -> None:
    listing = RUNNER.invoke(APP, ["train", "--list"]).output
    for mode in ("FA_nvfp4", "linear_nvfp4", "FA_linear_nvfp4", "qk_nvfp4", "pv_nvfp4", "qk_pv_nvfp4"):
        assert f"  {mode} " in listing
    assert "linear_nvfp4     nvfp4, nvfp4, nvfp4, none, none\n" in listing  # no attention label
    ok = RUNNER.invoke(
        APP, [*DRY, "-q", "FA_linear_nvfp4", "--spec", "megatron-core", "--recipe", "nvfp4_paper"]
    )
    assert ok.exit_code == 0, ok.output
    assert "linear_fwd=nvfp4 linear_dgrad=nvfp4 linear_wgrad=nvfp4 qk=nvfp4 pv=none" in ok.output
    fork = make_git_repo(tmp_path, "v1_three")
    refused = RUNNER.invoke(APP, [*DRY, "-q", "linear_nvfp4", "--megatron", str(fork)])
    assert refused.exit_code == 1 and "not supported by spec fork" in refused.output
    no_fp4 = RUNNER.invoke(APP, [*DRY, "-q", "linear_nvfp4", "--spec", "megatron-core", "--recipe", "fork"])
    assert no_fp4.exit_code == 1 and "recipe 'fork' cannot express linear_fwd = nvfp4" in no_fp4.output


def test_published_hifp8_scaling_table_matches_the_stored_runs() -> None:
    """docs/results/hifp8_scaling.md is what `megaquant compare` makes of the stored runs, and the results
    page shows those rows."""
    from megaquant.report import compare, load_run, markdown_table

    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    names = ["bf16", "linear_hifp8", "linear_hifp8_rerun", "linear_hifp8_scaled", "FA_linear_hifp8"]
    names += ["FA_linear_hifp8_scaled", "bf16_seed1235"]
    runs = [load_run(results / "runs" / "minitrain" / name) for name in names]
    table = (results / "hifp8_scaling.md").read_text()
    assert markdown_table(compare(runs)) == table
    readme = (results / "smoke.md").read_text()  # the smoke page; README.md: real-text results
    assert all(line in readme for line in table.splitlines())
    assert [r.recipe for r in runs if r.mode.endswith("_scaled")] == ["hifp8_scaled", "hifp8_scaled"]
    assert runs[2].losses == runs[1].losses  # the unscaled rerun: bit-identical to the published run
