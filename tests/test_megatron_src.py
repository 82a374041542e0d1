"""megaquant.megatron_src.quiet_megatron_import: Megatron's Transformer Engine / Apex fallback warnings are
hidden where megaquant imports Megatron, and nothing else is."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megaquant.megatron_src import installed_megatron, quiet_megatron_import

PACKAGE = Path(__file__).resolve().parents[1] / "megaquant"


def test_only_the_backend_fallback_user_warnings_are_hidden() -> None:
    def warn(message: str, category: type[Warning] = UserWarning) -> None:
        warnings.warn(message, category, stacklevel=2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_megatron_import():
            warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
            warn("Apex is not installed. Falling back to Torch Norm")
            warn("Transformer Engine is not installed. Falling back")
            warn("absl.logging is not installed. Using logging.getLogger(__name__) instead.")  # core 0.19
            warn("something else is not installed")
            warn("Apex is not installed. Falling back to Torch Norm", DeprecationWarning)
        warn("Apex is not installed. Falling back to Torch Norm")  # the scope has ended
    assert [(str(w.message), w.category) for w in caught] == [
        ("something else is not installed", UserWarning),
        ("Apex is not installed. Falling back to Torch Norm", DeprecationWarning),
        ("Apex is not installed. Falling back to Torch Norm", UserWarning),
    ]


def _megatron_imports_outside_the_scope(tree: ast.AST) -> list[int]:
    """Lines of `import megatron...` / `from megatron... import` outside `with quiet_megatron_import()`."""
    found: list[int] = []

    def quiet(node: ast.With) -> bool:
        return any(
            isinstance(item.context_expr, ast.Call)
            and isinstance(item.context_expr.func, ast.Name)
            and item.context_expr.func.id == "quiet_megatron_import"
            for item in node.items
        )

    def visit(node: ast.AST, covered: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom) and not covered:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "megatron" or n.startswith("megatron.") for n in names):
                found.append(node.lineno)
        inner = covered or (isinstance(node, ast.With) and quiet(node))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_megatron_import_in_megaquant_is_quiet() -> None:
    unquiet = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := _megatron_imports_outside_the_scope(ast.parse(path.read_text())))
    }
    assert unquiet == {}, (
        "wrap these Megatron imports in `with quiet_megatron_import():` (megaquant.megatron_src) so commands "
        f"do not print Transformer Engine / Apex fallback warnings: {unquiet}"
    )
    bare = ast.parse("import megatron.core\nfrom megatron import x\n")
    assert _megatron_imports_outside_the_scope(bare) == [1, 2]


@pytest.mark.skipif(installed_megatron() is None, reason="megatron-core is not installed")
def test_the_installed_megatron_imports_quietly() -> None:
    """The filter matches what this megatron-core really emits (in a fresh interpreter: they come once)."""
    code = (
        "import warnings\n"
        "from megaquant.megatron_src import quiet_megatron_import\n"
        "with quiet_megatron_import():\n"
        "    import megatron.core.models.gpt.gpt_layer_specs, megatron.core.optimizer\n"
        "warnings.warn('Apex is not installed. (after the scope)', UserWarning)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default::UserWarning", "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shown = [line for line in done.stderr.splitlines() if "not installed" in line]
    assert shown == [line for line in shown if "(after the scope)" in line] and len(shown) == 1, done.stderr
