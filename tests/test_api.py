"""The library API on real git repositories of a hand-written fork-shaped tree: status/apply/restore/diff."""

from __future__ import annotations

import json
from pathlib import Path

import git
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import megaquant
from megaquant import api
from megaquant.errors import GitStateError, MegaquantError, SourceError, ValueNameError
from megaquant.spec import canonical_value

LAYERS = "megatron/core/tensor_parallel/layers.py"
ATTENTION = "megatron/core/transformer/dot_product_attention.py"

# Hand-written stand-ins of the fork's two files (shapes from reference/fork-facts.md, variant 1).
LAYERS_SRC = """\
\"\"\"Test fixture: the fork's custom linear autograd function, reduced to its quantization sites.\"\"\"
import torch


class CustomLinearWithGradAccumulationAndAsyncCommunication(torch.autograd.Function):
    @staticmethod
    def forward(ctx, total_input, weight, bias, gradient_accumulation_fusion):
        from quant_ops import hifp_matmul, mxfp_matmul

        ctx.save_for_backward(total_input, weight)
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        custom_quant_type = 'bf16'  # chosen by hand before each run
        if custom_quant_type == 'mxfp8':
            output = mxfp_matmul(total_input, weight.t(), 'fp8_e4m3')
        elif custom_quant_type == 'hifp8':
            output = hifp_matmul(total_input, weight.t())
        else:
            output = torch.matmul(total_input, weight.t())
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    def backward(ctx, grad_output):
        from quant_ops import mxfp_matmul

        total_input, weight = ctx.saved_tensors
        custom_quant_type = 'bf16'
        if custom_quant_type == 'mxfp8':
            grad_input = mxfp_matmul(grad_output, weight, 'fp8_e5m2')
        else:
            grad_input = grad_output.matmul(weight)
        if ctx.gradient_accumulation_fusion:
            grad_weight = None
        else:
            custom_quant_type = 'bf16'
            if custom_quant_type == 'mxfp8':
                grad_weight = mxfp_matmul(grad_output.t(), total_input, 'fp8_e5m2')
            else:
                grad_weight = grad_output.t().matmul(total_input)
        return grad_input, grad_weight, None, None
"""

ATTENTION_SRC = """\
\"\"\"Test fixture: core attention with one site before the QK GEMM and one before the PV GEMM.\"\"\"
import torch


class DotProductAttention(torch.nn.Module):
    def forward(self, query, key, value, buffer):
        from quant_ops import mxfp_baddbmm, mxfp_bmm

        custom_quant_type = 'bf16'
        if custom_quant_type in ('mxfp8', 'mxfp4'):
            scores = mxfp_baddbmm(buffer, query, key, custom_quant_type)
        else:
            scores = torch.baddbmm(buffer, query, key, beta=0.0, alpha=self.softmax_scale)
        probs = torch.softmax(scores, dim=-1)
        custom_quant_type = 'bf16'
        if custom_quant_type in ('mxfp8', 'mxfp4'):
            context = mxfp_bmm(probs, value, custom_quant_type)
        else:
            context = torch.bmm(probs, value)
        return context
"""

# Variant 7 of the fork: a sed `\1` written into a Python string left a bare \x01 (does not parse).
BROKEN_LAYERS_SRC = LAYERS_SRC.replace("custom_quant_type = 'bf16'  #", "custom_quant_type = \x01'hifp8'  #")

FILES = {
    LAYERS: LAYERS_SRC,
    ATTENTION: ATTENTION_SRC,
    "megatron/core/other.py": "def helper():\n    return 1\n",
    "README.md": "fixture\n",
}


STATUS_KEYS = {"repo", "branch", "head", "base", "spec", "roles", "absent_roles", "sites", "warnings"}
"""The keys of `status --json` (docs/cli.md)."""


def make_fork_repo(root: Path, files: dict[str, str] | None = None) -> Path:
    """A git repository (branch main, one commit) holding the fork-shaped fixture tree."""
    root.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(root, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "Test")
        cfg.set_value("user", "email", "test@example.com")
    for rel, text in (files or FILES).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    repo.git.add("--", *(files or FILES))
    repo.git.commit("-q", "-m", "fixture")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the checkout (not .git), byte for byte."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


@pytest.fixture
def fork_repo(tmp_path: Path) -> Path:
    return make_fork_repo(tmp_path / "fork")


def values_by_scope(status: api.Status) -> dict[tuple[str, str], list[str | None]]:
    out: dict[tuple[str, str], list[str | None]] = {}
    for site in status.sites:
        out.setdefault((site.file, site.scope), []).append(site.value)
    return out


def test_import_is_lazy() -> None:
    import subprocess
    import sys

    heavy = "('git', 'libcst', 'torch', 'megatron')"
    code = f"import sys, megaquant; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert megaquant.status is api.status and megaquant.Base is api.Base


def test_status_lists_sites_with_roles(fork_repo: Path) -> None:
    status = api.status(fork_repo)
    assert status.branch == "main" and status.base is None and len(status.head) == 40
    roles = {(s.file, s.scope, s.roles) for s in status.sites}
    fwd = "CustomLinearWithGradAccumulationAndAsyncCommunication.forward"
    bwd = "CustomLinearWithGradAccumulationAndAsyncCommunication.backward"
    assert (LAYERS, fwd, ("linear_fwd",)) in roles
    assert [s.roles for s in status.sites if s.scope == bwd] == [("linear_dgrad",), ("linear_wgrad",)]
    assert [s.roles for s in status.sites if s.file == ATTENTION] == [("qk",), ("pv",)]
    assert all(s.value == "bf16" for s in status.sites)
    data = json.loads(json.dumps(status.to_json()))
    assert set(data) == STATUS_KEYS
    assert data["roles"] == dict.fromkeys(("linear_fwd", "linear_dgrad", "linear_wgrad", "qk", "pv"), "none")
    assert data["spec"] == "fork" and data["absent_roles"] == []
    assert {"file", "scope", "line", "value", "expr", "conditional", "roles"} <= set(data["sites"][0])


def test_apply_commits_and_restore_returns(fork_repo: Path) -> None:
    before = snapshot(fork_repo)
    result = api.apply(fork_repo, linear="mxfp8", qk="mxfp4")
    assert result.branch == "megaquant/main" and result.commit is not None
    assert result.values == {
        "linear_fwd": "mxfp8",
        "linear_dgrad": "mxfp8",
        "linear_wgrad": "mxfp8",
        "qk": "mxfp4",
        "pv": "none",
    }
    assert {c.role for c in result.changes} == {"linear_fwd", "linear_dgrad", "linear_wgrad", "qk"}
    assert result.absent == ()
    assert (
        "-        custom_quant_type = 'bf16'" in result.diff
        and "+        custom_quant_type = 'mxfp4'" in result.diff
    )
    status = api.status(fork_repo)
    assert status.branch == "megaquant/main" and status.base is not None and status.base.branch == "main"
    by_role = {s.roles: s.value for s in status.sites}
    assert by_role[("linear_fwd",)] == "mxfp8" and by_role[("qk",)] == "mxfp4" and by_role[("pv",)] == "bf16"
    # the forward site keeps its comment, quotes and indentation
    assert "custom_quant_type = 'mxfp8'  # chosen by hand before each run" in (fork_repo / LAYERS).read_text()
    message = str(git.Repo(fork_repo).head.commit.message)
    assert f"Megaquant-Base: main@{status.base.commit}" in message
    values = "linear_fwd=mxfp8 linear_dgrad=mxfp8 linear_wgrad=mxfp8 qk=mxfp4 pv=none"
    assert f"Megaquant-Values: {values}" in message
    assert api.diff(fork_repo).count("+        custom_quant_type") >= 2
    restored = api.restore(fork_repo)
    assert restored.restored and restored.branch == "megaquant/main"
    assert snapshot(fork_repo) == before and "megaquant/main" not in git.Repo(fork_repo).heads
    assert api.diff(fork_repo) == ""


def test_second_apply_adds_a_commit_and_same_values_make_none(fork_repo: Path) -> None:
    first = api.apply(fork_repo, linear="mxfp8")
    second = api.apply(fork_repo, pv="hifp8")
    assert second.commit not in (None, first.commit) and second.base == first.base
    assert second.values["linear_fwd"] == "mxfp8" and second.values["pv"] == "hifp8"
    again = api.apply(fork_repo, pv="hifp8", linear="mxfp8")
    assert again.commit is None and again.changes == ()
    assert git.Repo(fork_repo).head.commit.hexsha == second.commit
    assert api.restore(fork_repo).restored
    assert all(s.value == "bf16" for s in api.status(fork_repo).sites)


def test_dry_run_writes_nothing(fork_repo: Path) -> None:
    before = snapshot(fork_repo)
    result = api.apply(fork_repo, qk="mxfp4", dry_run=True)
    assert result.commit is None and "+        custom_quant_type = 'mxfp4'" in result.diff
    assert snapshot(fork_repo) == before and git.Repo(fork_repo).active_branch.name == "main"


def test_bf16_alias_and_unknown_value(fork_repo: Path) -> None:
    assert api.apply(fork_repo, linear="bf16").commit is None  # already 'bf16' == none
    with pytest.raises(ValueNameError, match="mxfp8"):
        api.apply(fork_repo, qk="fp7")
    with pytest.raises(ValueNameError, match="unknown role"):
        api.apply(fork_repo, values={"lm_head": "mxfp8"})
    with pytest.raises(MegaquantError, match="nothing to set"):
        api.apply(fork_repo)


def test_dirty_target_refused(fork_repo: Path) -> None:
    (fork_repo / ATTENTION).write_text(ATTENTION_SRC + "# local tweak\n")
    before = snapshot(fork_repo)
    with pytest.raises(GitStateError, match=f"{ATTENTION}: has uncommitted changes"):
        api.apply(fork_repo, qk="mxfp4")
    assert snapshot(fork_repo) == before and git.Repo(fork_repo).active_branch.name == "main"


def test_unparsable_file_names_file_and_line(tmp_path: Path) -> None:
    broken = BROKEN_LAYERS_SRC
    root = make_fork_repo(tmp_path / "broken", {**FILES, LAYERS: broken})
    before = snapshot(root)
    with pytest.raises(SourceError, match=rf"{LAYERS}:\d+"):
        api.apply(root, linear="mxfp8")
    assert snapshot(root) == before


UNRELATED = "megatron/core/tools/old_patch.py"  # mentions the variable, does not parse, governs nothing
UNRELATED_SRC = "# left by an old sed script\ncustom_quant_type = \x01'hifp8'\n"


def test_status_lists_what_it_can_beside_an_unrelated_unparsable_file(tmp_path: Path) -> None:
    """Issue 13 item 4: one unrelated broken file used to refuse `status` as a whole."""
    root = make_fork_repo(tmp_path / "fork", {**FILES, UNRELATED: UNRELATED_SRC})
    status = api.status(root)
    assert len(status.sites) == 5
    (warning,) = (w for w in status.warnings if UNRELATED in w)
    assert warning.startswith(f"{UNRELATED}:2: cannot parse this file (invalid non-printable character")
    assert warning.endswith("`set` leaves it alone")


def test_set_changes_past_an_unrelated_unparsable_file(tmp_path: Path) -> None:
    root = make_fork_repo(tmp_path / "fork", {**FILES, UNRELATED: UNRELATED_SRC})
    result = api.apply(root, linear="mxfp8", qk="mxfp4")
    assert result.commit is not None and any(UNRELATED in w for w in result.warnings)
    assert (root / UNRELATED).read_text() == UNRELATED_SRC


def test_set_refuses_only_when_a_file_it_must_change_is_unparsable(tmp_path: Path) -> None:
    root = make_fork_repo(tmp_path / "broken", {**FILES, LAYERS: BROKEN_LAYERS_SRC})
    status = api.status(root)  # the attention sites are still listed, the linear file is warned about
    assert [s.file for s in status.sites] == [ATTENTION, ATTENTION]
    assert any(w.startswith(f"{LAYERS}:") and "`set` of linear_fwd" in w for w in status.warnings)
    result = api.apply(root, qk="mxfp4")  # attention parses: setting qk does not need layers.py
    assert result.commit is not None and [c.file for c in result.changes] == [ATTENTION]
    api.restore(root)
    with pytest.raises(SourceError, match=rf"^{LAYERS}:\d+: cannot parse this file"):
        api.apply(root, linear_fwd="mxfp8")
    assert [h.name for h in git.Repo(root).heads] == ["main"]


def test_worktree_mode(fork_repo: Path, tmp_path: Path) -> None:
    before = snapshot(fork_repo)
    result = api.apply(fork_repo, linear="mxfp4", worktree=tmp_path / "exp")
    assert Path(result.repo) == (tmp_path / "exp").resolve() and result.branch == "megaquant/main-exp"
    assert "'mxfp4'" in (tmp_path / "exp" / LAYERS).read_text()
    assert snapshot(fork_repo) == before and git.Repo(fork_repo).active_branch.name == "main"
    other = api.apply(fork_repo, qk="hifp8", worktree=tmp_path / "exp2")
    assert other.branch == "megaquant/main-exp2"
    assert api.status(tmp_path / "exp").base == result.base
    assert api.restore(tmp_path / "exp").restored and not (tmp_path / "exp").exists()
    assert api.restore(tmp_path / "exp2").restored
    assert set(h.name for h in git.Repo(fork_repo).heads) == {"main"}


def test_restore_with_nothing_to_restore(fork_repo: Path) -> None:
    result = api.restore(fork_repo)
    assert not result.restored and "nothing to restore" in result.message


def test_worktree_removed_when_planning_fails(tmp_path: Path) -> None:
    broken = BROKEN_LAYERS_SRC
    root = make_fork_repo(tmp_path / "broken", {**FILES, LAYERS: broken})
    with pytest.raises(SourceError):
        api.apply(root, linear="mxfp8", worktree=tmp_path / "exp")
    assert not (tmp_path / "exp").exists() and [h.name for h in git.Repo(root).heads] == ["main"]


def test_scan_cache_is_keyed_by_content(fork_repo: Path) -> None:
    first = api.status(fork_repo)
    cache = Path(git.Repo(fork_repo).git_dir) / api.SCAN_CACHE
    assert cache.is_file()
    assert api.status(fork_repo).sites == first.sites  # a hit
    (fork_repo / ATTENTION).write_text(ATTENTION_SRC.replace("'bf16'", "'hifp8'", 1))
    changed = api.status(fork_repo)
    assert [s.value for s in changed.sites if s.file == ATTENTION] == ["hifp8", "bf16"]
    cache.write_bytes(b"not a pickle")
    assert api.status(fork_repo).sites == changed.sites


VARIANTS = ("v1_three", "v2_label", "v3_env", "v4_override", "adversarial")
TARGETS = {
    "linear_fwd": "hifp8",
    "linear_dgrad": "mxfp4",
    "linear_wgrad": "none",
    "qk": "mxfp8",
    "pv": "mxfp4",
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_fixture_variant_round_trips(tmp_path: Path, variant: str) -> None:
    """core-engine's fixture trees of the fork's variants: set four different values, check, restore."""
    from conftest import make_git_repo

    root = make_git_repo(tmp_path, variant)
    before = snapshot(root)
    result = api.apply(root, values=TARGETS)
    assert result.commit is not None and result.values == TARGETS
    overrides = [s for s in api.status(root).sites if s.override]
    for site in overrides:  # left alone, and said so
        assert any(f"{site.file}:{site.line}: run-time override" in w for w in result.warnings), (
            result.warnings
        )
    status = api.status(root)
    for site in status.sites:
        if site.override or not site.roles:
            continue
        assert len(site.roles) == 1, site  # qk and pv differ: no site may govern both
        assert site.value is not None and canonical_value(site.value) == TARGETS[site.roles[0]], site
    assert {role for s in status.sites for role in s.roles} == set(TARGETS)
    assert api.restore(root).restored
    assert snapshot(root) == before and [h.name for h in git.Repo(root).heads] == ["main"]


def test_broken_fixture_variant_changes_nothing(tmp_path: Path) -> None:
    from conftest import make_git_repo

    root = make_git_repo(tmp_path, "v7_broken")
    before = snapshot(root)
    with pytest.raises(SourceError, match=r"\.py:\d+"):
        api.apply(root, linear="mxfp8")
    assert snapshot(root) == before and [h.name for h in git.Repo(root).heads] == ["main"]


def test_spec_from_git_config(fork_repo: Path) -> None:
    """`megaquant instrument` records `megaquant.spec`; status/set use it unless a spec is given."""
    git.Repo(fork_repo).git.config("megaquant.spec", "megatron-core")
    assert any("spec megatron-core" in w for w in api.status(fork_repo).warnings)
    assert len(api.status(fork_repo, spec="fork").sites) == 5


ROLE_VALUES = st.dictionaries(
    st.sampled_from(["linear_fwd", "linear_dgrad", "linear_wgrad", "qk", "pv"]),
    st.sampled_from(["mxfp8", "mxfp4", "hifp8", "none", "bf16"]),
    min_size=1,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    variant=st.sampled_from(VARIANTS),
    steps=st.lists(st.one_of(ROLE_VALUES, st.just("restore")), min_size=1, max_size=5),
)
def test_any_sequence_of_sets_and_restores(
    tmp_path_factory: pytest.TempPathFactory, variant: str, steps: list[object]
) -> None:
    """Whatever sequence of sets and restores: every role holds the last value asked for since the last
    restore, and each restore gives back the exact base tree."""
    from conftest import make_git_repo

    root = make_git_repo(tmp_path_factory.mktemp("seq"), variant)
    before = snapshot(root)
    expected: dict[str, str] = {}
    for step in steps:
        if step == "restore":
            api.restore(root)
            assert snapshot(root) == before and [h.name for h in git.Repo(root).heads] == ["main"]
            expected = {}
            continue
        assert isinstance(step, dict)
        result = api.apply(root, values=step)
        expected.update({role: canonical_value(value) for role, value in step.items()})
        assert {role: result.values[role] for role in expected} == expected
        for site in api.status(root).sites:
            for role in set(site.roles) & set(expected):
                if not site.override:
                    assert site.value is not None and canonical_value(site.value) == expected[role], site
    api.restore(root)
    assert snapshot(root) == before
