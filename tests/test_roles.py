"""Roles and groups: linear_dgrad / linear_wgrad, groups that cover the roles a tree has, honest refusals.

Issue 13 items 2 and 3: `--linear` keeps working on a fork revision without a wgrad site (and says so),
a role named on its own that the tree lacks is refused, and `set` exits 1 instead of "nothing to
change" when a role asked for has no GEMM it recognises (the fork's `QuantMatMul.apply(...)` spelling
is recognised).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import git
import pytest
from conftest import fixture_sources, make_git_repo
from typer.testing import CliRunner

from megaquant import api
from megaquant.cli import build_app
from megaquant.errors import RoleError, SpecError, ValueNameError
from megaquant.sites import scan_sources
from megaquant.spec import ROLES, load_spec, parse_spec

LAYERS = "megatron/core/tensor_parallel/layers.py"
ATTENTION = "megatron/core/transformer/dot_product_attention.py"
LINEAR = "CustomLinearWithGradAccumulationAndAsyncCommunication"
FORK = load_spec("fork")
NO_WGRAD = "linear_wgrad: not in this tree, runs bf16"

# A spec whose codebase has no wgrad role at all (only its forward and data-gradient GEMMs have sites).
NO_WGRAD_SPEC = f"""
name = "no-wgrad"
variable = "custom_quant_type"
none_literal = "bf16"
[[rules]]
role = "linear_fwd"
file = "{LAYERS}"
scope = "{LINEAR}.forward"
calls = ["*matmul"]
[[rules]]
role = "linear_dgrad"
file = "{LAYERS}"
scope = "{LINEAR}.backward"
calls = ["*matmul"]
assigns = ["grad_input"]
"""


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(build_app(()), list(args))
    return result.exit_code, result.stdout, result.stderr


def heads(root: Path) -> list[str]:
    return [h.name for h in git.Repo(root).heads]


# ---------------------------------------------------------------- the vocabulary (pure)


def test_groups_cover_the_declared_roles_and_name_the_rest() -> None:
    spec = parse_spec(NO_WGRAD_SPEC, "no-wgrad", "test")
    assert spec.roles() == ("linear_fwd", "linear_dgrad")
    got = spec.targets({"linear": "mxfp8"}, found=spec.roles())
    assert got.values == {"linear_fwd": "mxfp8", "linear_dgrad": "mxfp8"}
    assert got.absent == ("linear_wgrad",)
    got = spec.targets({"linear_bwd": "bf16"}, found=spec.roles())
    assert (got.values, got.absent) == ({"linear_dgrad": "none"}, ("linear_wgrad",))
    with pytest.raises(RoleError, match=r"^role linear_wgrad is not in trees of spec no-wgrad"):
        spec.targets({"linear_wgrad": "mxfp8"}, found=spec.roles())
    with pytest.raises(ValueNameError, match="unknown role 'linear_bwdd'"):
        spec.targets({"linear_bwdd": "mxfp8"}, found=spec.roles())


def test_the_fork_wgrad_role_is_optional_and_groups_follow_the_tree() -> None:
    assert FORK.roles() == ROLES and FORK.optional == ("linear_wgrad",)
    assert FORK.required() == ("linear_fwd", "linear_dgrad", "qk", "pv")
    without = FORK.targets({"linear": "mxfp8"}, found=("linear_fwd", "linear_dgrad"))
    assert (without.values, without.absent) == (
        {"linear_fwd": "mxfp8", "linear_dgrad": "mxfp8"},
        ("linear_wgrad",),
    )
    with_wgrad = FORK.targets({"linear": "mxfp8"}, found=ROLES)
    assert with_wgrad.values == dict.fromkeys(("linear_fwd", "linear_dgrad", "linear_wgrad"), "mxfp8")
    # named on its own it is kept, so that plan_rewrite refuses it on a tree without its GEMM
    assert FORK.targets({"linear_wgrad": "hifp8"}, found=()).values == {"linear_wgrad": "hifp8"}


def test_a_narrower_option_wins_over_a_group() -> None:
    got = FORK.targets({"linear_wgrad": "none", "linear": "mxfp8", "linear_bwd": "hifp8"}, found=ROLES)
    assert got.values == {"linear_fwd": "mxfp8", "linear_dgrad": "hifp8", "linear_wgrad": "none"}


def test_spec_rule_keys_are_checked() -> None:
    bad_assigns = NO_WGRAD_SPEC.replace('assigns = ["grad_input"]', "assigns = []")
    with pytest.raises(SpecError, match="`assigns` must be a non-empty list"):
        parse_spec(bad_assigns.replace("assigns = []", "assigns = [1]"), "x", "x.toml")
    with pytest.raises(SpecError, match="optional role 'linear_wgrad' has no"):
        parse_spec('optional_roles = ["linear_wgrad"]\n' + NO_WGRAD_SPEC, "x", "x.toml")


def test_fork_spec_recognises_autograd_function_spellings() -> None:
    """A later fork revision: `QuantMatMul.apply(a, b, custom_quant_type)`, and no site for wgrad."""
    scan = scan_sources(fixture_sources("v5_apply"), FORK)
    assert [(s.file, s.scope, s.line, s.roles, [g.call for g in s.governs]) for s in scan.sites] == [
        (LAYERS, f"{LINEAR}.forward", 20, ("linear_fwd",), ["QuantMatMul.apply"]),
        (LAYERS, f"{LINEAR}.backward", 29, ("linear_dgrad",), ["QuantMatMul.apply"]),
        (ATTENTION, "DotProductAttention.forward", 10, ("qk",), ["QuantBaddbmm.apply"]),
        (ATTENTION, "DotProductAttention.forward", 13, ("pv",), ["QuantBmm.apply"]),
    ]
    assert scan.roles == ("linear_fwd", "linear_dgrad", "qk", "pv")
    assert scan.warnings == ()  # an optional role that is absent is no warning


def test_wgrad_is_told_from_dgrad_by_what_it_assigns() -> None:
    scan = scan_sources(fixture_sources("v1_three"), FORK)
    backward = [s for s in scan.sites if s.scope == f"{LINEAR}.backward"]
    assert [(s.line, s.roles) for s in backward] == [(47, ("linear_dgrad",)), (61, ("linear_wgrad",))]


# ---------------------------------------------------------------- set and status on real repositories


def test_linear_on_a_fork_without_wgrad_sets_what_exists_and_says_what_does_not(tmp_path: Path) -> None:
    root = make_git_repo(tmp_path, "v5_apply")
    code, out, err = run_cli("set", "--repo", str(root), "--linear", "mxfp8")
    assert code == 0, err
    assert NO_WGRAD in out.splitlines()
    assert "linear_fwd=mxfp8 linear_dgrad=mxfp8 linear_wgrad=none qk=hifp8 pv=hifp8" in out
    layers = (root / LAYERS).read_text()
    assert layers.count("custom_quant_type = 'mxfp8'") == 2 and "'hifp8'" not in layers
    status = api.status(root)
    assert status.absent == ("linear_wgrad",)
    assert status.values == {
        "linear_fwd": "mxfp8",
        "linear_dgrad": "mxfp8",
        "linear_wgrad": "none",
        "qk": "hifp8",
        "pv": "hifp8",
    }
    code, out, _ = run_cli("status", "--repo", str(root))
    assert code == 0
    assert (
        "spec fork: linear_fwd=mxfp8  linear_dgrad=mxfp8  linear_wgrad=(not in this tree, runs bf16)  "
        "qk=hifp8  pv=hifp8"
    ) in out
    data = json.loads(run_cli("status", "--repo", str(root), "--json")[1])
    assert data["absent_roles"] == ["linear_wgrad"] and data["roles"]["linear_dgrad"] == "mxfp8"


def test_linear_bwd_and_json_name_the_missing_role(tmp_path: Path) -> None:
    root = make_git_repo(tmp_path, "v5_apply")
    code, out, err = run_cli("set", "--repo", str(root), "--linear-bwd", "mxfp4", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["absent_roles"] == ["linear_wgrad"] and data["values"]["linear_dgrad"] == "mxfp4"
    assert [c["role"] for c in data["changes"]] == ["linear_dgrad"]


def test_a_role_named_that_the_tree_lacks_is_refused(tmp_path: Path) -> None:
    root = make_git_repo(tmp_path, "v5_apply")
    code, out, err = run_cli("set", "--repo", str(root), "--linear-wgrad", "mxfp8")
    assert code == 1 and out == ""
    assert err.startswith("error: role linear_wgrad asked for, but this tree has no linear_wgrad GEMM")
    assert "spec fork" in err and "nothing was changed" in err
    assert heads(root) == ["main"]


def test_a_role_the_spec_does_not_declare_is_refused_by_name(tmp_path: Path) -> None:
    root = make_git_repo(tmp_path, "v1_three")
    spec = tmp_path / "no-wgrad.toml"
    spec.write_text(NO_WGRAD_SPEC)
    with pytest.raises(RoleError, match="role linear_wgrad is not in trees of spec no-wgrad"):
        api.apply(root, linear_wgrad="mxfp8", spec=str(spec))
    result = api.apply(root, linear="mxfp8", spec=str(spec))
    assert result.absent == ("linear_wgrad",) and result.values["linear_wgrad"] == "none"
    assert {c.role for c in result.changes} == {"linear_fwd", "linear_dgrad"}


def test_set_refuses_a_role_without_a_gemm_instead_of_nothing_to_change(tmp_path: Path) -> None:
    """v0_early has no attention file: `--qk` used to print "nothing to change: already ..." and exit 0."""
    root = make_git_repo(tmp_path, "v0_early")
    code, out, err = run_cli("set", "--repo", str(root), "--linear", "mxfp8", "--qk", "mxfp8")
    assert code == 1 and "nothing to change" not in out
    assert err.startswith("error: role qk asked for, but this tree has no qk GEMM that spec fork recognises")
    assert "megaquant instrument" in err and "DotProductAttention.forward" in err
    assert heads(root) == ["main"] and not git.Repo(root).is_dirty()
    with pytest.raises(RoleError, match="role pv asked for"):
        api.apply(root, pv="none", dry_run=True)


def test_autograd_function_spelling_is_set(tmp_path: Path) -> None:
    """The same revision used to be all "missing" warnings and exit 0 with nothing changed."""
    root = make_git_repo(tmp_path, "v5_apply")
    result = api.apply(root, linear_fwd="mxfp4", qk="mxfp8", pv="none")
    assert result.commit is not None
    assert [(c.file, c.line, c.role) for c in result.changes] == [
        (LAYERS, 20, "linear_fwd"),
        (ATTENTION, 10, "qk"),
        (ATTENTION, 13, "pv"),
    ]
    assert "custom_quant_type = 'bf16'" in (root / ATTENTION).read_text()


# ---------------------------------------------------------------- the launcher records what ran

FAKE_TRAINER = "import sys; print('lm loss: 1.0'); sys.exit(0)\n"


def test_a_mode_means_the_same_experiment_and_the_manifest_says_what_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megaquant.launch.run import TRAIN_COMMAND_ENV, TrainRequest, execute, plan_run

    script = tmp_path / "trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setenv(TRAIN_COMMAND_ENV, shlex.join([sys.executable, str(script)]))
    manifests = {}
    for variant in ("v1_three", "v5_apply"):
        root = make_git_repo(tmp_path, variant)
        request = TrainRequest(
            model="tiny", dataset=None, mode="FA_linear_mxfp8", preset="smoke", megatron=root,
            run_dir=tmp_path / "runs" / variant,
        )  # fmt: skip
        record = execute(plan_run(request))
        assert record.exit_code == 0
        manifests[variant] = json.loads((record.run_dir / "manifest.json").read_text())
    linear = ("linear_fwd", "linear_dgrad", "linear_wgrad")
    assert manifests["v1_three"]["values"] == {**dict.fromkeys(linear, "mxfp8"), "qk": "mxfp8", "pv": "none"}
    assert manifests["v1_three"]["absent_roles"] == []
    assert manifests["v5_apply"]["values"]["linear_wgrad"] == "none"  # its wgrad GEMM ran in bf16
    assert manifests["v5_apply"]["absent_roles"] == ["linear_wgrad"]
