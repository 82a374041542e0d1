"""Site scanning: every fork variant and adversarial fixture, exact sites by scope and role."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import fixture_root, fixture_sources

from megaquant.errors import SourceError
from megaquant.sites import Site, analyse_file, candidate_paths, scan_sources, scan_tree
from megaquant.spec import load_spec, parse_spec

LAYERS = "megatron/core/tensor_parallel/layers.py"
ATTENTION = "megatron/core/transformer/dot_product_attention.py"
LINEAR = "CustomLinearWithGradAccumulationAndAsyncCommunication"
FWD, BWD, ATT = f"{LINEAR}.forward", f"{LINEAR}.backward", "DotProductAttention.forward"
FORK = load_spec("fork")

Row = tuple[str, str, int, str | None, bool, bool, tuple[str, ...], int]


def rows(sites: tuple[Site, ...]) -> list[Row]:
    """(file, scope, line, value, conditional, override, roles, number of GEMMs governed) per site."""
    return [
        (s.file, s.scope, s.line, s.value, s.conditional, s.override, s.roles, len(s.governs)) for s in sites
    ]


def test_variant1_three_linear_sites_and_one_shared_attention_site() -> None:
    scan = scan_sources(fixture_sources("v1_three"), FORK)
    assert rows(scan.sites) == [
        (LAYERS, FWD, 26, "hifp8", False, False, ("linear_fwd",), 1),
        (LAYERS, BWD, 47, "hifp8", False, False, ("linear_dgrad",), 1),
        # the weight-gradient site sits in the `else:` of `if ctx.gradient_accumulation_fusion:`
        (LAYERS, BWD, 61, "hifp8", True, False, ("linear_wgrad",), 1),
        (ATTENTION, ATT, 18, "hifp8", False, False, ("qk", "pv"), 2),
    ]
    assert scan.warnings == ()
    qk, pv = scan.sites[3].governs
    assert (qk.line, qk.role, pv.line, pv.role) == (19, "qk", 32, "pv")
    assert qk.call == "mxfp_baddbmm, hifp_baddbmm, torch.baddbmm"
    assert pv.call == "mxfp_matmul, hifp_matmul, torch.bmm"
    assert scan.sites[2].governs[0].call == "mxfp_matmul, hifp_matmul, grad_output.t().matmul"


def test_early_version_one_backward_site_feeds_both_gradients() -> None:
    scan = scan_sources(fixture_sources("v0_early"), FORK)
    assert rows(scan.sites) == [
        (LAYERS, FWD, 12, "mxfp8", False, False, ("linear_fwd",), 1),
        (
            LAYERS,
            BWD,
            23,
            "mxfp8",
            False,
            False,
            ("linear_dgrad", "linear_wgrad"),
            2,
        ),  # dgrad, and wgrad in the `else:`
    ]
    assert [g.line for g in scan.sites[1].governs] == [24, 32]
    # attention is absent from this tree: status says so instead of showing nothing
    assert scan.warnings == tuple(
        f"no GEMM of role {role} found (spec fork expects it in {ATTENTION} {ATT} calling {calls})"
        for role, calls in (
            ("qk", "*baddbmm or *baddbmm.apply"),
            ("pv", "*bmm or *matmul or *bmm.apply or *matmul.apply"),
        )
    )


def test_variant2_label_sites_follow_the_next_gemm() -> None:
    scan = scan_sources(fixture_sources("v2_label"), FORK)
    assert rows(scan.sites) == [
        (LAYERS, FWD, 17, "mxfp4", False, False, ("linear_fwd",), 1),
        (LAYERS, BWD, 35, "mxfp4", True, False, ("linear_dgrad",), 0),  # `if wgrad_compute:` label
        (LAYERS, BWD, 38, "mxfp4", False, False, ("linear_dgrad",), 1),
        (LAYERS, BWD, 52, "mxfp4", True, False, ("linear_wgrad",), 1),
        (ATTENTION, ATT, 18, "mxfp4", False, False, ("qk",), 0),  # label of the saved query/key
        (ATTENTION, ATT, 23, "mxfp4", False, False, ("qk", "pv"), 2),
    ]
    assert [s.label for s in scan.sites] == [False, True, False, False, True, False]
    assert scan.warnings == ()


def test_variant3_environment_reads_are_sites_without_a_value() -> None:
    scan = scan_sources(fixture_sources("v3_env"), FORK)
    env = "os.environ.get('CUSTOM_QUANT_TYPE', 'hifp8')"
    assert [(s.scope, s.line, s.value, s.roles) for s in scan.sites] == [
        (FWD, 16, None, ("linear_fwd",)),
        (BWD, 32, None, ("linear_dgrad",)),
        (BWD, 43, None, ("linear_wgrad",)),
        (ATT, 17, None, ("qk",)),
        (ATT, 25, "bf16", ("pv",)),
    ]
    assert [s.expr for s in scan.sites if s.line in (16, 32, 17)] == [env] * 3
    # the source text exactly as written (continuation lines keep their indentation)
    assert (
        scan.sites[2].expr
        == "os.environ.get(\n                'CUSTOM_QUANT_TYPE',\n                'hifp8',\n            )"
    )


def test_variant4_run_time_overrides_are_listed_and_warned() -> None:
    scan = scan_sources(fixture_sources("v4_override"), FORK)
    assert rows(scan.sites) == [
        (LAYERS, FWD, 14, "hifp8", False, False, ("linear_fwd",), 1),
        (LAYERS, FWD, 16, None, True, True, ("linear_fwd",), 0),
        (LAYERS, BWD, 30, "hifp8", False, False, ("linear_dgrad",), 1),
        (LAYERS, BWD, 41, "hifp8", True, False, ("linear_wgrad",), 1),
        (ATTENTION, ATT, 15, "hifp8", False, False, ("qk", "pv"), 2),
        (ATTENTION, ATT, 18, None, True, True, ("qk", "pv"), 0),  # inside try: + if
    ]
    assert scan.sites[1].expr == "ctx._adaptive_quantization_manager.get_current_quantization_type()"
    assert len(scan.warnings) == 2
    assert scan.warnings[0].startswith(f"{LAYERS}:16: run-time override in {FWD}")
    assert scan.warnings[1].startswith(f"{ATTENTION}:18: run-time override in {ATT}")
    assert scan.sites[1].to_json()["override"] is True


def test_variant7_broken_commit_names_file_line_and_cause() -> None:
    with pytest.raises(SourceError) as info:
        analyse_file(LAYERS, fixture_sources("v7_broken")[LAYERS], FORK)
    message = str(info.value)
    assert message.startswith(f"{LAYERS}:26: cannot parse this file (invalid non-printable character U+0001)")
    assert "changed nothing" in message


def test_variant7_scan_lists_nothing_from_broken_files_and_warns_for_each() -> None:
    scan = scan_sources(fixture_sources("v7_broken"), FORK)
    assert scan.sites == () and scan.roles == ()
    broken = [w for w in scan.warnings if "cannot parse this file" in w]
    assert [w.split(" (")[0] for w in broken] == [
        f"{LAYERS}:26: cannot parse this file",
        f"{ATTENTION}:18: cannot parse this file",
    ]
    assert broken[0].endswith("`set` of linear_fwd, linear_dgrad, linear_wgrad is refused until it parses")


def test_adversarial_tree() -> None:
    scan = scan_sources(fixture_sources("adversarial"), FORK)
    nested = "megatron/core/fusions/nested.py"
    legacy = "megatron/legacy/model/dot_product_attention.py"
    assert rows(scan.sites) == [
        # nested functions: the closure reads the outer assignment, `project` has its own (role-less: no rule)
        (nested, "make_projection", 7, "mxfp4", False, False, (), 1),
        (nested, "make_projection.<locals>.project", 12, "mxfp8", False, False, (), 1),
        # tabs, double quotes, an annotated assignment; decoys and custom_quant_type_backup are not sites
        (LAYERS, FWD, 19, "mxfp8", False, False, ("linear_fwd",), 1),
        (LAYERS, BWD, 35, "mxfp8", False, False, ("linear_dgrad",), 1),
        (LAYERS, BWD, 43, "mxfp8", True, False, ("linear_wgrad",), 1),
        # CRLF + latin-1 coding cookie
        (ATTENTION, ATT, 13, "hifp8", False, False, ("qk", "pv"), 2),
        # the same class name in another file: listed, role-less (the spec names the fork's file)
        (legacy, ATT, 10, "hifp8", False, False, (), 1),
    ]
    assert scan.sites[0].governs[0].line == 20 and scan.sites[1].governs[0].line == 13
    assert scan.sites[2].expr == '"mxfp8"'
    assert scan.warnings == ()


@pytest.mark.parametrize(
    ("source", "where"),
    [
        (
            b"x = 1\n# caf\xe9 without a coding cookie\ncustom_quant_type = 'a'\n",
            "m.py:2: cannot parse this file ('utf-8'",
        ),
        (
            b"custom_quant_type = 'a'\n\x00\n",
            "m.py:2: cannot parse this file (source code string cannot contain null",
        ),
        (
            b"# -*- coding: nope -*-\ncustom_quant_type = 1\n",
            "m.py:1: cannot parse this file (unknown encoding: nope)",
        ),
        (b"def f(:\n    custom_quant_type = 1\n", "m.py:1: cannot parse this file (invalid syntax)"),
    ],
)
def test_unreadable_sources_name_file_and_line(source: bytes, where: str) -> None:
    with pytest.raises(SourceError) as info:
        analyse_file("m.py", source, FORK)
    assert str(info.value).startswith(where)
    # a scan lists what it can: an unrelated unreadable file is a warning that names file, line, cause
    (warning,) = (w for w in scan_sources({"m.py": source}, FORK).warnings if "m.py" in w)
    assert warning.startswith(where) and warning.endswith("`set` leaves it alone")


def test_gemm_without_an_assignment_is_warned() -> None:
    source = b"def f(a, b, custom_quant_type):\n    return quant_matmul(a, b, custom_quant_type)\n"
    scan = scan_sources({"m.py": source}, FORK)
    assert scan.sites == ()
    assert scan.warnings[0].startswith("m.py:2: the GEMM (quant_matmul) in f reads the variable")


def test_exclusive_branches_and_loops() -> None:
    source = b"""def f(a, b, flag):
    custom_quant_type = 'hifp8'
    if flag:
        custom_quant_type = 'mxfp8'
    else:
        if custom_quant_type == 'mxfp8':
            return mxfp_matmul(a, b)
        return torch.matmul(a, b)
    for _ in range(2):
        custom_quant_type = 'mxfp4'
    return quant_matmul(a, b, custom_quant_type)
"""
    scan = scan_sources({"m.py": source}, FORK)
    # line 4 cannot reach the GEMM in the other branch (line 6) but does reach line 11 past the if: override
    assert [(s.line, s.override, [g.line for g in s.governs]) for s in scan.sites] == [
        (2, False, [6, 11]),
        (4, True, []),
        (10, True, []),
    ]
    assert scan.sites[0].conditional is False and scan.sites[2].conditional is True


def test_another_fork_is_a_spec_not_code(tmp_path: Path) -> None:
    """A made-up MoE fork: another variable, a call receiving it, an expert scope pattern."""
    spec = parse_spec(
        """
name = "moe-fork"
variable = "qmode"
none_literal = "off"
[[rules]]
role = "linear_fwd"
file = "model/experts/*.py"
scope = "*Expert.forward"
calls = ["ops.grouped_gemm"]
""",
        "moe-fork",
        "moe-fork.toml",
    )
    source = b"""class RoutedExpert:
    def forward(self, x, w):
        qmode = 'off'
        log_mode(x, qmode)
        return ops.grouped_gemm(x, w, qmode)
"""
    scan = scan_sources({"model/experts/routed.py": source, "model/other.py": b"qmode_x = 1\n"}, spec)
    assert [(s.scope, s.value, s.roles, s.governs[0].call) for s in scan.sites] == [
        ("RoutedExpert.forward", "off", ("linear_fwd",), "ops.grouped_gemm")
    ]


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")
def test_instrumented_stock_megatron_through_its_spec() -> None:
    """`megaquant instrument` output: `custom_quant_type = 'none'`, then a megaquant.ops call reading it."""
    from megaquant.instrument import load_rules, plan_instrument
    from megaquant.megatron_src import installed_megatron

    root = installed_megatron()
    assert root is not None
    rules = load_rules()
    sources = {f: (root / f).read_bytes() for f in rules.files()}  # (no LM-head model sources: not checked)
    hooked = {**sources, **plan_instrument(sources, rules).new_sources}
    scan = scan_sources(hooked, load_spec("megatron-core"))
    assert [(s.scope.split(".")[-1], s.value, s.roles, s.override) for s in scan.sites] == [
        ("forward", "none", ("linear_fwd",), False),
        ("backward", "none", ("linear_dgrad",), False),
        ("backward", "none", ("linear_wgrad",), False),
        ("forward", "none", ("qk",), False),
        ("forward", "none", ("pv",), False),
    ]
    assert [g.call for s in scan.sites for g in s.governs] == [
        "_mq_ops.quant_matmul",
        "_mq_ops.quant_matmul",
        "_mq_wgrad_matmul",
        "_mq_ops.quant_baddbmm",
        "_mq_ops.quant_bmm",
    ]
    assert scan.warnings == ()
    # the stock tree has no sites: status says which roles it did not find
    stock = scan_sources(sources, FORK)
    assert stock.sites == () and len(stock.warnings) == 4


def test_scan_tree_parses_only_the_prefiltered_files(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for i in range(600):
        noise = root / "megatron" / f"pkg{i % 20}" / f"mod{i}.py"
        noise.parent.mkdir(parents=True, exist_ok=True)
        noise.write_text(f"def f{i}(x):\n    return x + {i}  # custom_quant decoy prefix\n")
    (root / "megatron" / "broken_but_unrelated.py").write_bytes(b"\x01 not python\n")
    for rel, data in fixture_sources("v1_three").items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    assert candidate_paths(root, FORK) == [LAYERS, ATTENTION]
    assert scan_tree(root, FORK) == scan_sources(fixture_sources("v1_three"), FORK)
    assert candidate_paths(fixture_root("adversarial"), FORK)[0] == "megatron/core/fusions/nested.py"


def test_candidate_paths_skips_hidden_installed_and_nested_checkouts(tmp_path: Path) -> None:
    (tmp_path / "worktree").mkdir()
    (tmp_path / "worktree" / ".git").write_text("gitdir: /elsewhere\n")
    for rel in (
        "a.py",
        ".venv/lib/site-packages/x.py",
        "pkg/site-packages/y.py",
        "b.txt",
        "c.py",
        "worktree/d.py",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("custom_quant_type = 'hifp8'\n" if rel != "c.py" else "x = 1\n")
    assert candidate_paths(tmp_path, FORK) == ["a.py"]


def test_to_json_is_plain_data() -> None:
    site = scan_sources(fixture_sources("v1_three"), FORK).sites[3]
    assert site.to_json() == {
        "file": ATTENTION,
        "scope": ATT,
        "line": 18,
        "value": "hifp8",
        "expr": "'hifp8'",
        "conditional": False,
        "override": False,
        "label": False,
        "roles": ["qk", "pv"],
        "governs": [
            {"line": 19, "call": "mxfp_baddbmm, hifp_baddbmm, torch.baddbmm", "role": "qk"},
            {"line": 32, "call": "mxfp_matmul, hifp_matmul, torch.bmm", "role": "pv"},
        ],
    }


def test_make_git_repo_commits_the_fixture_byte_for_byte(tmp_path: Path) -> None:
    import git
    from conftest import make_git_repo

    root = make_git_repo(tmp_path, "adversarial")
    repo = git.Repo(root)
    assert repo.active_branch.name == "main" and len(list(repo.iter_commits())) == 1
    assert not repo.is_dirty(untracked_files=True)
    for rel, data in fixture_sources("adversarial").items():
        assert (root / rel).read_bytes() == data
        assert repo.head.commit.tree[rel].data_stream.read() == data  # CRLF and latin-1 kept in the blob
