"""Rewrites: exact output, role isolation, siblings for shared sites, overrides, byte preservation."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from conftest import FIXTURES, fixture_sources
from hypothesis import given, settings
from hypothesis import strategies as st

from megaquant.codemod import RewritePlan, plan_rewrite
from megaquant.errors import RoleError, SourceError, ValueNameError
from megaquant.sites import analyse_file, scan_sources
from megaquant.spec import ROLES, load_spec

LAYERS = "megatron/core/tensor_parallel/layers.py"
ATTENTION = "megatron/core/transformer/dot_product_attention.py"
FORK = load_spec("fork")
EXPECTED = FIXTURES / "expected"
VARIANTS = ("v1_three", "v2_label", "v3_env", "v4_override", "adversarial")


def gemm_values(sources: Mapping[str, bytes]) -> list[tuple[str, int, str | None, str]]:
    """(file, GEMM index, role, expression of its governing assignment) for every GEMM, in order."""
    out = []
    for file in sorted(sources):
        if b"custom_quant_type" not in sources[file]:
            continue
        fa = analyse_file(file, sources[file], FORK)
        for u, use in enumerate(fa.uses):
            g = fa.governor.get(u)
            out.append((file, u, use.role, "" if g is None else fa.assignments[g].expr))
    return out


def literal(value: str) -> str:
    return "bf16" if value == "none" else value


@pytest.mark.parametrize(
    ("variant", "targets", "file", "expected"),
    [
        ("v1_three", {"qk": "mxfp4", "pv": "none"}, ATTENTION, "v1_attention_qk-mxfp4_pv-none.py"),
        (
            "v3_env",
            {"linear_fwd": "mxfp8", "linear_dgrad": "mxfp8", "linear_wgrad": "mxfp8"},
            LAYERS,
            "v3_layers_linear-mxfp8.py",
        ),
        (
            "adversarial",
            {"qk": "mxfp4", "pv": "mxfp8"},
            ATTENTION,
            "adversarial_attention_qk-mxfp4_pv-mxfp8.py",
        ),
        (
            "adversarial",
            {"linear_fwd": "hifp8", "linear_dgrad": "bf16", "linear_wgrad": "bf16"},
            LAYERS,
            "adversarial_layers_fwd-hifp8_bwd-none.py",
        ),
    ],
)
def test_whole_output_matches_the_hand_written_file(
    variant: str, targets: dict[str, str], file: str, expected: str
) -> None:
    plan = plan_rewrite(fixture_sources(variant), targets, FORK)
    assert list(plan.new_sources) == [file]
    assert plan.new_sources[file] == (EXPECTED / expected).read_bytes()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("role", ROLES)
def test_a_role_change_changes_every_gemm_of_that_role_and_none_of_another(variant: str, role: str) -> None:
    sources = fixture_sources(variant)
    before = gemm_values(sources)
    assert any(r == role for _, _, r, _ in before)
    value = "mxfp4" if all(expr != "'mxfp4'" for _, _, r, expr in before if r == role) else "hifp8"
    plan = plan_rewrite(sources, {role: value}, FORK)
    after = gemm_values({**sources, **plan.new_sources})
    assert len(after) == len(before)
    for (file, u, r, old), (file2, u2, r2, new) in zip(before, after, strict=True):
        assert (file, u, r) == (file2, u2, r2)
        if r == role:
            assert new.strip("'\"") == value, (file, u)
        else:
            assert new == old, (file, u)


def test_one_site_for_both_gradients_is_set_once() -> None:
    sources = fixture_sources("v0_early")
    plan = plan_rewrite(sources, {"linear_dgrad": "hifp8", "linear_wgrad": "hifp8"}, FORK)
    assert [(c.line, c.role, c.kind) for c in plan.changes] == [(23, "linear_dgrad", "set")]
    assert changed_lines(sources[LAYERS], plan.new_sources[LAYERS]) == [23]


def test_one_site_for_both_gradients_gives_wgrad_its_own_value_when_they_differ() -> None:
    plan = plan_rewrite(fixture_sources("v0_early"), {"linear_dgrad": "hifp8"}, FORK)
    assert [(c.line, c.role, c.kind, c.new) for c in plan.changes] == [
        (23, "linear_dgrad", "set", "'hifp8'"),
        (32, "linear_wgrad", "insert", "'mxfp8'"),  # wgrad keeps the old value through its own assignment
    ]


def test_labels_follow_the_next_gemm() -> None:
    targets = {"linear_dgrad": "hifp8", "linear_wgrad": "hifp8", "qk": "mxfp8"}
    plan = plan_rewrite(fixture_sources("v2_label"), targets, FORK)
    assert [(c.file, c.line, c.role, c.kind) for c in plan.changes] == [
        (LAYERS, 35, "linear_dgrad", "set"),  # the `if wgrad_compute:` label
        (LAYERS, 38, "linear_dgrad", "set"),
        (LAYERS, 52, "linear_wgrad", "set"),
        (ATTENTION, 18, "qk", "set"),  # the label before the QK GEMM
        (ATTENTION, 23, "qk", "set"),
        (ATTENTION, 35, "pv", "insert"),  # PV keeps its value through its own assignment
    ]
    assert plan.changes[-1].new == "'mxfp4'"


def test_overrides_are_left_alone_with_a_warning() -> None:
    sources = fixture_sources("v4_override")
    plan = plan_rewrite(sources, {"linear_fwd": "mxfp8", "qk": "mxfp4", "pv": "mxfp4"}, FORK)
    assert [(c.line, c.role) for c in plan.changes] == [(14, "linear_fwd"), (15, "qk")]
    assert b"get_current_quantization_type()" in plan.new_sources[LAYERS]
    assert plan.new_sources[LAYERS].count(b"get_current_quantization_type") == sources[LAYERS].count(
        b"get_current_quantization_type"
    )
    assert [w.split(" (")[0] for w in plan.warnings] == [
        f"{LAYERS}:16: run-time override in CustomLinearWithGradAccumulationAndAsyncCommunication.forward",
        f"{ATTENTION}:18: run-time override in DotProductAttention.forward",
    ]
    assert "left it alone" in plan.warnings[0] and "qk, pv" in plan.warnings[1]


def test_a_sibling_that_hides_an_override_is_warned() -> None:
    plan = plan_rewrite(fixture_sources("v4_override"), {"qk": "mxfp4", "pv": "mxfp8"}, FORK)
    assert any("run-time override at line 18 no longer reaches it" in w for w in plan.warnings)


def test_no_op_when_values_already_match() -> None:
    sources = fixture_sources("v2_label")
    plan = plan_rewrite(sources, {role: "mxfp4" for role in ROLES}, FORK)
    assert plan == RewritePlan({}, (), ())
    bf16 = fixture_sources("v3_env")  # PV is 'bf16': `none` is the same value
    assert plan_rewrite(bf16, {"pv": "none"}, FORK).new_sources == {}


def test_environment_reads_become_literals() -> None:
    plan = plan_rewrite(fixture_sources("v3_env"), {"qk": "mxfp8"}, FORK)
    assert [(c.old, c.new) for c in plan.changes] == [
        ("os.environ.get('CUSTOM_QUANT_TYPE', 'hifp8')", "'mxfp8'")
    ]


def test_broken_sources_raise_and_change_nothing() -> None:
    with pytest.raises(SourceError, match=rf"^{LAYERS}:26: cannot parse"):
        plan_rewrite(fixture_sources("v7_broken"), {"linear_fwd": "mxfp8"}, FORK)


def test_bad_roles_and_values() -> None:
    sources = fixture_sources("v1_three")
    with pytest.raises(ValueNameError, match="unknown role 'mlp'"):
        plan_rewrite(sources, {"mlp": "mxfp8"}, FORK)
    with pytest.raises(ValueNameError, match="unknown quantization value 'fp8'"):
        plan_rewrite(sources, {"qk": "fp8"}, FORK)


def test_missing_role_is_refused_not_ignored() -> None:
    with pytest.raises(
        RoleError, match="^role qk asked for, but this tree has no qk GEMM that spec fork"
    ) as info:
        plan_rewrite({LAYERS: fixture_sources("v1_three")[LAYERS]}, {"qk": "mxfp8"}, FORK)
    assert "megaquant instrument" in str(info.value) and "DotProductAttention.forward" in str(info.value)


def test_closure_gemm_sharing_an_outer_site_cannot_get_its_own_value() -> None:
    spec_source = b"""class CustomLinearWithGradAccumulationAndAsyncCommunication:
    def forward(ctx, a, b):
        custom_quant_type = 'hifp8'
        out = quant_matmul(a, b, custom_quant_type)
        def again(x):
            return quant_matmul(x, b, custom_quant_type)
        return again(out)
"""
    sources = {LAYERS: spec_source}
    assert [len(s.governs) for s in scan_sources(sources, FORK).sites] == [2]
    with pytest.raises(SourceError, match="enclosing function"):
        plan_rewrite(sources, {"linear_fwd": "mxfp8"}, FORK)


LITERAL_VARIANTS = ("v1_three", "v2_label", "v4_override", "adversarial")
targets_strategy = st.dictionaries(
    st.sampled_from(ROLES), st.sampled_from((*FORK.values, "bf16")), min_size=1
)


def original_values(sources: Mapping[str, bytes]) -> dict[str, str]:
    """role -> the literal its GEMMs get in the unmodified fixture (one value per role there)."""
    values: dict[str, str] = {}
    for site in scan_sources(sources, FORK).sites:
        for gemm in site.governs:
            if gemm.role is not None and site.value is not None:
                assert values.setdefault(gemm.role, site.value) == site.value
    return values


def changed_lines(old: bytes, new: bytes) -> list[int]:
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    assert len(a) == len(b)
    return [i + 1 for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


@settings(max_examples=40, deadline=None)
@given(variant=st.sampled_from(LITERAL_VARIANTS), targets=targets_strategy)
def test_property_rewrite_and_back(variant: str, targets: dict[str, str]) -> None:
    sources = fixture_sources(variant)
    plan = plan_rewrite(sources, targets, FORK)
    inserted = {c.file for c in plan.changes if c.kind == "insert"}
    for file, new in plan.new_sources.items():
        old = sources[file]
        assert analyse_file(file, new, FORK)  # parses
        if file in inserted:
            marker = b"# megaquant: own value for"
            kept = b"".join(line for line in new.splitlines(keepends=True) if marker not in line)
            new_without = kept
        else:
            new_without = new
        set_lines = {c.line for c in plan.changes if c.file == file and c.kind == "set"}
        assert set(changed_lines(old, new_without)) <= set_lines
    # rewriting back to the original values restores every file that got no sibling, byte for byte
    after = {**sources, **plan.new_sources}
    back = plan_rewrite(after, original_values(sources), FORK)
    restored = {**after, **back.new_sources}
    for file in sources:
        if file not in inserted:
            assert restored[file] == sources[file], file
    # and the GEMMs of every role get the original values again, siblings or not
    values = {r: v for r, v in original_values(sources).items()}
    for site in scan_sources(restored, FORK).sites:
        for gemm in site.governs:
            if gemm.role is not None:
                assert site.value == values[gemm.role]


def test_calls_receiving_the_variable_get_siblings_too() -> None:
    """The hook shape of `megaquant instrument`: one site feeding two ops calls, one behind a guard."""
    spec = load_spec("megatron-core")
    attention = b"""class DotProductAttention:
    def forward(self, q, k, v, buf):
        custom_quant_type = 'none'
        scores = _mq_ops.quant_baddbmm(buf, q, k, custom_quant_type, beta=0.0)
        probs = scores.softmax(-1)
        if self.keep_stock:
            context = torch.bmm(probs, v)
        else:
            context = _mq_ops.quant_bmm(probs, v, quant=custom_quant_type)
        return context
"""
    sources = {ATTENTION: attention}
    (site,) = scan_sources(sources, spec).sites
    assert [(g.line, g.call, g.role) for g in site.governs] == [
        (4, "_mq_ops.quant_baddbmm", "qk"),
        (9, "_mq_ops.quant_bmm", "pv"),
    ]
    plan = plan_rewrite(sources, {"qk": "mxfp8", "pv": "none"}, spec)
    assert plan.new_sources[ATTENTION] == attention.replace(
        b"custom_quant_type = 'none'", b"custom_quant_type = 'mxfp8'"
    ).replace(
        b"        else:\n",
        b"        else:\n            custom_quant_type = 'none'  # megaquant: own value for pv\n",
    )


def restyle(source: bytes, indent: str, quote: str, newline: str) -> bytes:
    """The same program with another indentation unit, quote character and line ending."""
    lines = []
    for line in source.decode().split("\n"):
        body = line.lstrip(" ")
        depth = (len(line) - len(body)) // 4
        lines.append(indent * depth + (body.replace("'", quote) if '"""' not in body else body))
    return newline.join(lines).encode()


@settings(max_examples=30, deadline=None)
@given(
    variant=st.sampled_from(("v1_three", "v2_label")),
    indent=st.sampled_from(("    ", "\t", "  ")),
    quote=st.sampled_from(("'", '"')),
    newline=st.sampled_from(("\n", "\r\n")),
    targets=targets_strategy,
)
def test_property_any_style_same_sites_and_a_faithful_round_trip(
    variant: str, indent: str, quote: str, newline: str, targets: dict[str, str]
) -> None:
    plain = fixture_sources(variant)
    styled = {f: restyle(data, indent, quote, newline) for f, data in plain.items()}

    def shape(sources: Mapping[str, bytes]) -> list[tuple[str, str | None, tuple[str, ...], int, int]]:
        return [
            (s.scope, s.value, s.roles, s.line, len(s.governs)) for s in scan_sources(sources, FORK).sites
        ]

    assert shape(styled) == shape(plain)
    plan = plan_rewrite(styled, targets, FORK)
    for change in plan.changes:
        assert change.new.startswith(quote)
    for new in plan.new_sources.values():
        assert new.count(b"\r\n") == new.count(b"\n") if newline == "\r\n" else b"\r" not in new
        assert (b"\t" in new) == (indent == "\t")
    after = {**styled, **plan.new_sources}
    back = plan_rewrite(after, original_values(plain), FORK)
    inserted = {c.file for c in plan.changes if c.kind == "insert"}
    for file, data in {**after, **back.new_sources}.items():
        if file not in inserted:
            assert data == styled[file]


def test_a_role_left_alone_keeps_a_shared_environment_read_as_written() -> None:
    """QK set, PV not asked for: PV keeps the multi-line env read through a copy laid out as the original."""
    shared = fixture_sources("v1_three")[ATTENTION]
    env = b"custom_quant_type = os.environ.get(\n            'CUSTOM_QUANT_TYPE',\n            'hifp8')"
    source = shared.replace(b"custom_quant_type = 'hifp8'", env)
    plan = plan_rewrite({ATTENTION: source}, {"qk": "mxfp8"}, FORK)
    expected = source.replace(env, b"custom_quant_type = 'mxfp8'").replace(
        b"dim=-1)\n\n        if",
        b"dim=-1)\n\n        " + env + b"  # megaquant: own value for pv\n        if",
    )
    assert plan.new_sources[ATTENTION] == expected
    assert [c.kind for c in plan.changes] == ["set", "insert"]


# Random attention bodies: assignments, QK/PV chains and calls, nested in if/try/for/with, for the rule
# "a role change changes every GEMM of that role and none of another", checked from outside the engine.
QK_CHAIN = (
    "if custom_quant_type == 'mxfp8':\n    s = mxfp_baddbmm(b, q, k)\nelse:\n    s = torch.baddbmm(b, q, k)\n"
)
PV_CHAIN = "if custom_quant_type == 'hifp8':\n    c = hifp_matmul(p, v)\nelse:\n    c = torch.bmm(p, v)\n"
PV_CALL = "c = quant_bmm(p, v, custom_quant_type)\n"

statements: st.SearchStrategy[str] = st.deferred(
    lambda: st.one_of(
        st.sampled_from(("mxfp8", "mxfp4", "hifp8", "bf16")).map(lambda v: f"custom_quant_type = '{v}'\n"),
        st.sampled_from((QK_CHAIN, PV_CHAIN, PV_CALL, "p = s.softmax(-1)\n")),
        st.tuples(blocks, blocks).map(
            lambda bodies: "if flag:\n" + _indent(bodies[0]) + "else:\n" + _indent(bodies[1])
        ),
        st.tuples(blocks, blocks).map(
            lambda bodies: "try:\n" + _indent(bodies[0]) + "except ValueError:\n" + _indent(bodies[1])
        ),
        blocks.map(lambda body: "for _ in range(2):\n" + _indent(body)),
        blocks.map(lambda body: "with ctx:\n" + _indent(body)),
    )
)
blocks: st.SearchStrategy[str] = st.lists(statements, min_size=1, max_size=4).map("".join)


def _indent(code: str) -> str:
    return "".join(f"    {line}\n" for line in code.splitlines())


def gemm_governors(source: bytes) -> list[tuple[str | None, str | None]]:
    """(role, governing expression) per GEMM in source order, None where nothing governs it."""
    fa = analyse_file(ATTENTION, source, FORK)
    return [
        (use.role, fa.assignments[fa.governor[u]].expr if u in fa.governor else None)
        for u, use in enumerate(fa.uses)
    ]


@settings(max_examples=60, deadline=None)
@given(
    body=blocks,
    targets=st.dictionaries(st.sampled_from(("qk", "pv")), st.sampled_from(FORK.values), min_size=1),
)
def test_property_random_bodies_change_exactly_the_asked_roles(body: str, targets: dict[str, str]) -> None:
    source = (
        "class DotProductAttention:\n    def forward(self, b, q, k, v, flag):\n"
        "        custom_quant_type = 'hifp8'\n" + "".join(f"        {line}\n" for line in body.splitlines())
    ).encode()
    before = gemm_governors(source)
    if any(all(r != role or old is None for r, old in before) for role in targets):
        with pytest.raises(RoleError):  # a role asked for without a governed GEMM: refused, never a no-op
            plan_rewrite({ATTENTION: source}, targets, FORK)
        return
    try:
        plan = plan_rewrite({ATTENTION: source}, targets, FORK)
    except SourceError as exc:  # only ever a refusal that names why, never a wrong rewrite
        pytest.fail(f"refused: {exc}")
    after = gemm_governors(plan.new_sources.get(ATTENTION, source))
    assert len(after) == len(before)
    for (role, old), (role_after, new) in zip(before, after, strict=True):
        assert role == role_after
        if old is None:
            continue  # not governed: nothing to set (the scan warns about it)
        if role in targets:
            assert new == f"'{literal(targets[role])}'"
        else:
            assert new == old
