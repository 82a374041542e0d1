"""Site scanning: every fork variant and adversarial fixture, exact sites by scope and role."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fixture_root, fixture_sources

from megaquant.errors import SourceError
from megaquant.sites import Site, candidate_paths, scan_sources, scan_tree
from megaquant.spec import load_spec

LAYERS = "megatron/core/tensor_parallel/layers.py"
ATTENTION = "megatron/core/transformer/dot_product_attention.py"
LINEAR = "CustomLinearWithGradAccumulationAndAsyncCommunication"
FORK = load_spec("fork")


def summary(sites: tuple[Site, ...]) -> list[tuple[str, str, str | None, bool, bool, tuple[str, ...], int]]:
    """(file, scope, value, conditional, override, roles, number of GEMMs governed) per site."""
    return [(s.file, s.scope, s.value, s.conditional, s.override, s.roles, len(s.governs)) for s in sites]


def test_variant1_three_sites() -> None:
    scan = scan_sources(fixture_sources("v1_three"), FORK)
    assert summary(scan.sites) == [
        (LAYERS, f"{LINEAR}.forward", "hifp8", False, False, ("linear_fwd",), 1),
        (LAYERS, f"{LINEAR}.backward", "hifp8", False, False, ("linear_bwd",), 1),
        (LAYERS, f"{LINEAR}.backward", "hifp8", True, False, ("linear_bwd",), 1),
        (ATTENTION, "DotProductAttention.forward", "hifp8", False, False, ("qk", "pv"), 2),
    ]
    assert scan.warnings == ()
    qk, pv = scan.sites[3].governs
    assert (qk.role, pv.role) == ("qk", "pv")
    assert "torch.baddbmm" in qk.call and "torch.bmm" in pv.call
    assert scan.sites[3].to_json()["roles"] == ["qk", "pv"]


def test_scan_tree_reads_only_candidates() -> None:
    root = fixture_root("v1_three")
    assert candidate_paths(root, FORK) == [LAYERS, ATTENTION]
    assert scan_tree(root, FORK) == scan_sources(fixture_sources("v1_three"), FORK)


def test_unparsable_file_names_file_and_line() -> None:
    broken = b"def f():\n    x = 1\n    \x01'hifp8'\n    custom_quant_type = 'x'\n"
    with pytest.raises(SourceError, match=r"^a/b\.py:3: cannot parse"):
        scan_sources({"a/b.py": broken}, FORK)


def test_candidate_paths_skips_hidden_and_venv(tmp_path: Path) -> None:
    for rel in ("a.py", ".venv/lib/site-packages/x.py", "pkg/site-packages/y.py", "b.txt", "c.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("custom_quant_type = 'hifp8'\n" if rel != "c.py" else "x = 1\n")
    assert candidate_paths(tmp_path, FORK) == ["a.py"]
