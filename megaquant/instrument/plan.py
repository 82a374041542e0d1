"""`plan_instrument`: every transform over a tree's sources in memory, pure; nothing partial is ever returned.

The GEMM hooks run first (`transform.py`); further transforms (e.g. attention wiring) go in `_TRANSFORMS`.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from megaquant.instrument.rules import InstrumentError, InstrumentRules
from megaquant.instrument.transform import Edit, instrument_source

__all__ = ["InstrumentPlan", "Transform", "plan_instrument"]


@dataclass(frozen=True)
class InstrumentPlan:
    new_sources: dict[str, bytes]  # only files that change
    edits: tuple[Edit, ...]

    @property
    def changed(self) -> bool:
        return bool(self.new_sources)


# A transform maps the current sources (path -> bytes) to the files it changes and its edits.
Transform = Callable[[Mapping[str, bytes], InstrumentRules, bool], InstrumentPlan]


def hook_gemms(sources: Mapping[str, bytes], rules: InstrumentRules, include_lm_head: bool) -> InstrumentPlan:
    """The `[[hook]]`, `[[insert]]` and `[[params]]` rules, file by file."""
    new_sources: dict[str, bytes] = {}
    edits: list[Edit] = []
    for path in rules.files():
        result = instrument_source(path, sources[path], rules, include_lm_head=include_lm_head)
        edits.extend(result.edits)
        if result.new_source is not None and result.new_source != sources[path]:
            new_sources[path] = result.new_source
    return InstrumentPlan(new_sources, tuple(edits))


def check_lm_heads(
    sources: Mapping[str, bytes], rules: InstrumentRules, include_lm_head: bool
) -> InstrumentPlan:
    """Every model class with an output layer gets it marked as the LM head, or the tree is refused.

    The mark is set in the method `lm_head.marked_by` names (an `[[insert]]`); a model file that assigns
    the output layer but never calls it would have its LM head quantized.
    """
    if rules.lm_head is None or include_lm_head:
        return InstrumentPlan({}, ())
    head = rules.lm_head
    edits: list[Edit] = []
    for path in sorted(p for p in sources if head.covers(p)):
        try:
            tree = ast.parse(sources[path])
        except SyntaxError:
            continue  # not ours to judge: only files that assign an output layer matter
        marked = any(
            isinstance(n, ast.Call) and ast.unparse(n) == head.marked_by.strip() for n in ast.walk(tree)
        )
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            assigns = [
                n
                for n in ast.walk(cls)
                if isinstance(n, ast.Assign) and any(ast.unparse(t) == head.output_layer for t in n.targets)
            ]
            if not assigns:
                continue
            if not marked:
                raise InstrumentError(
                    f"{path}:{assigns[0].lineno}: {cls.name} assigns {head.output_layer} but nothing in "
                    f"{path} calls {head.marked_by}, where megaquant marks the LM head, so its LM head would "
                    "be quantized. Pass --include-lm-head to quantize it knowingly, or add a rule for it"
                )
            edits.append(Edit(path, cls.name, assigns[0].lineno, "lm_head", None, head.output_layer, False))
    return InstrumentPlan({}, tuple(edits))


# Transforms after the GEMM hooks, in order; each sees the sources as the previous ones left them.
_TRANSFORMS: tuple[Transform, ...] = (check_lm_heads,)


def plan_instrument(
    sources: Mapping[str, bytes], rules: InstrumentRules, *, include_lm_head: bool = False
) -> InstrumentPlan:
    """Instrument `sources` (repo-relative posix path -> bytes) in memory; raise before anything partial.

    Every file `rules.files()` names must be present (model sources the LM-head check covers are used
    where given). Re-running on instrumented sources changes nothing.
    """
    missing = [f for f in rules.files() if f not in sources]
    if missing:
        raise InstrumentError(
            f"{', '.join(missing)}: not found; expected a Megatron tree (a Megatron-LM checkout or a "
            "directory holding megatron/core); pass --repo DIR pointing at it, or use --from-installed DIR"
        )
    current = dict(sources)
    new_sources: dict[str, bytes] = {}
    edits: list[Edit] = []
    for transform in (hook_gemms, *_TRANSFORMS):
        step = transform(current, rules, include_lm_head)
        current.update(step.new_sources)
        new_sources.update(step.new_sources)
        edits.extend(step.edits)
    return InstrumentPlan({p: b for p, b in new_sources.items() if b != sources.get(p)}, tuple(edits))
