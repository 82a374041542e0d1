"""Rewrite specs: the value/role vocabulary, TOML validation, and lookup from the tree or a wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megaquant.errors import SpecError, ValueNameError
from megaquant.spec import ROLES, VALUES, RoleRule, Spec, canonical_value, load_spec, parse_spec

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("given", "expected"),
    [("mxfp8", "mxfp8"), ("MXFP4", "mxfp4"), ("hifp8", "hifp8"), ("none", "none"), ("bf16", "none")],
)
def test_canonical_value(given: str, expected: str) -> None:
    assert canonical_value(given) == expected


def test_unknown_value_lists_the_known_ones() -> None:
    with pytest.raises(ValueNameError) as info:
        canonical_value("fp8")
    for name in (*VALUES, "bf16"):
        assert name in str(info.value)


def test_fork_spec() -> None:
    spec = load_spec("fork")
    assert (spec.name, spec.variable, spec.none_literal) == ("fork", "custom_quant_type", "bf16")
    assert spec.roles() == ROLES
    assert spec.literal("none") == spec.literal("bf16") == "bf16"
    assert spec.literal("MXFP8") == "mxfp8"
    attention = "megatron/core/transformer/dot_product_attention.py"
    scope = "DotProductAttention.forward"
    # QK before PV: "*bmm" alone would also match baddbmm.
    assert spec.role_of(attention, scope, ("mxfp_baddbmm", "torch.baddbmm")) == "qk"
    assert spec.role_of(attention, scope, ("hifp_matmul", "torch.bmm")) == "pv"
    assert spec.role_of("megatron/legacy/attention.py", scope, ("torch.bmm",)) is None
    assert spec.is_gemm_call("x.t().matmul") and not spec.is_gemm_call("save_quant_tensor")


def test_megatron_core_spec_loads() -> None:
    spec = load_spec("megatron-core")
    assert spec.none_literal == "none"
    assert set(spec.roles()) == {"linear_fwd", "linear_dgrad", "linear_wgrad", "qk", "pv"}


def test_spec_by_path_and_unknown_name(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text(
        'variable = "quant_mode"\nnone_literal = "off"\n'
        '[[rules]]\nrole = "qk"\nfile = "model/*.py"\nscope = "Attn.*"\ncalls = ["q_bmm"]\n'
    )
    assert load_spec(path) == Spec(
        "other", "quant_mode", "off", (RoleRule("qk", "model/*.py", "Attn.*", ("q_bmm",)),)
    )
    with pytest.raises(SpecError, match="unknown rewrite spec 'nope'; known specs: .*fork"):
        load_spec("nope")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("variable = 'x'\nnone_literal = 'n'\n", "at least one \\[\\[rules\\]\\]"),
        (
            "variable = 'x'\nnone_literal = 'n'\n[[rules]]\nrole='up'\nfile='a'\nscope='b'\ncalls=['c']\n",
            "unknown role",
        ),
        (
            "variable = 'x'\nnone_literal = 'n'\n[[rules]]\nrole='qk'\nfile='a'\nscope='b'\ncalls=[]\n",
            "calls",
        ),
        (
            "variable = 'a b'\nnone_literal = 'n'\n[[rules]]\nrole='qk'\nfile='a'\nscope='b'\ncalls=['c']\n",
            "identifier",
        ),
        ("variable = 'x'\n[[rules]]\nrole='qk'\nfile='a'\nscope='b'\ncalls=['c']\n", "none_literal"),
        ("variable = \n", "not valid TOML"),
    ],
)
def test_malformed_specs_are_named(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=f"^bad.toml: .*{message}"):
        parse_spec(text, "bad", "bad.toml")


@pytest.mark.slow
def test_fork_spec_loads_from_an_installed_wheel(tmp_path: Path) -> None:
    """Build a wheel, install it (no deps) into a fresh venv, load the spec there, away from the tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("megaquant", "rewrites"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("megaquant-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)], check=True)
    shutil.rmtree(src)  # nothing may come from the source tree
    out = subprocess.run(
        [
            str(python),
            "-c",
            "from megaquant.spec import load_spec; s = load_spec('fork'); print(s.name, s.none_literal)",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.stdout.split() == ["fork", "bf16"]
