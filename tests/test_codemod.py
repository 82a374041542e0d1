"""Rewrites: exact output, role isolation, siblings for shared sites, byte preservation."""

from __future__ import annotations

from conftest import fixture_sources

from megaquant.codemod import plan_rewrite
from megaquant.sites import scan_sources
from megaquant.spec import load_spec

LAYERS = "megatron/core/tensor_parallel/layers.py"
ATTENTION = "megatron/core/transformer/dot_product_attention.py"
FORK = load_spec("fork")


def values_by_role(sources: dict[str, bytes]) -> dict[str, set[str | None]]:
    """role -> the set of values the GEMMs of that role get (from their governing site)."""
    found: dict[str, set[str | None]] = {}
    for site in scan_sources(sources, FORK).sites:
        for gemm in site.governs:
            if gemm.role is not None:
                found.setdefault(gemm.role, set()).add(site.value)
    return found


def test_linear_sets_every_linear_site_and_nothing_else() -> None:
    sources = fixture_sources("v1_three")
    plan = plan_rewrite(sources, {"linear_fwd": "mxfp8", "linear_bwd": "mxfp8"}, FORK)
    assert set(plan.new_sources) == {LAYERS}
    assert [(c.role, c.kind, c.new) for c in plan.changes] == [("linear_fwd", "set", "'mxfp8'")] + [
        ("linear_bwd", "set", "'mxfp8'")
    ] * 2
    after = {**sources, **plan.new_sources}
    assert values_by_role(after) == {
        "linear_fwd": {"mxfp8"},
        "linear_bwd": {"mxfp8"},
        "qk": {"hifp8"},
        "pv": {"hifp8"},
    }
    old_lines = sources[LAYERS].splitlines()
    new_lines = plan.new_sources[LAYERS].splitlines()
    changed = [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b]
    assert [old_lines[i].strip() for i in changed] == [b"custom_quant_type = 'hifp8'"] * 3


def test_qk_and_pv_differ_through_a_sibling() -> None:
    sources = fixture_sources("v1_three")
    plan = plan_rewrite(sources, {"qk": "mxfp4", "pv": "bf16"}, FORK)
    assert [(c.role, c.kind, c.old, c.new) for c in plan.changes] == [
        ("qk", "set", "'hifp8'", "'mxfp4'"),
        ("pv", "insert", "'hifp8'", "'bf16'"),
    ]
    text = plan.new_sources[ATTENTION].decode()
    assert (
        "        custom_quant_type = 'bf16'  # megaquant: own value for pv\n        if custom_quant_type"
        in text
    )
    assert values_by_role({**sources, **plan.new_sources})["pv"] == {"bf16"}


def test_same_value_is_a_no_op() -> None:
    plan = plan_rewrite(
        fixture_sources("v1_three"), {"linear_fwd": "hifp8", "qk": "hifp8", "pv": "hifp8"}, FORK
    )
    assert plan.new_sources == {} and plan.changes == ()
