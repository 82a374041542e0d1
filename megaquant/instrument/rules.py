"""The instrumentation rules (`rewrites/megatron-core.instrument.toml`) as frozen dataclasses; no libcst.

A rule names a GEMM by scope and kind (`matmul(total_input, weight.t())`), not by its exact text, so the
engine can follow it into a module-level helper and through `return`, assignments and nested calls.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from megaquant.errors import SourceError

__all__ = [
    "DEFAULT_BRANCH",
    "RULES_NAME",
    "SPEC_NAME",
    "Hook",
    "Insert",
    "InstrumentError",
    "InstrumentRules",
    "LmHead",
    "Params",
    "Unhooked",
    "load_rules",
    "parse_rules",
    "rules_path",
]

DEFAULT_BRANCH = "instrumented"
RULES_NAME = "megatron-core.instrument.toml"
SPEC_NAME = "megatron-core"  # rewrites/megatron-core.toml: the spec `status`/`set` use on instrumented trees


class InstrumentError(SourceError):
    """The tree does not have the shape the instrumentation rules expect (file, scope, expected call)."""


@dataclass(frozen=True, kw_only=True)
class Hook:
    """A GEMM of `role` in `scope` (or in a module-level helper it calls) to route through `_mq_ops.<op>`."""

    role: str
    file: str
    scope: str
    gemm: str  # kind(operands, keywords): `matmul(total_input, weight.t())`, operands as named in `scope`
    op: str  # the callee written in the tree, e.g. `_mq_ops.quant_matmul` (an `imports` line binds it)
    extra: str = ""  # keywords appended to the ops call, e.g. `grad=True`
    lm_head_guard: bool = False  # keep the stock GEMM when `ctx.megaquant_lm_head` is set


@dataclass(frozen=True, kw_only=True)
class Unhooked:
    """A GEMM in a hooked scope that megaquant leaves alone on purpose, with the reason it reports."""

    file: str
    scope: str  # the function the call is written in (a helper's own name for calls inside it)
    reason: str
    gemm: str = ""  # kind(operands, keywords), matched like a hook's, or
    call: str = ""  # a callee-name glob: `fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_*`

    def names(self) -> str:
        return self.gemm or self.call


@dataclass(frozen=True, kw_only=True)
class Insert:
    """Statements added in `scope`: after the statement `after`, or at the start of the body."""

    file: str
    scope: str
    code: str
    after: str = ""
    at: str = ""  # "start": after the docstring, before the first statement
    when: str = "always"  # "always" | "exclude_lm_head"


@dataclass(frozen=True, kw_only=True)
class Params:
    """Keyword parameters appended to a function signature."""

    file: str
    scope: str
    add: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class LmHead:
    """Every model file under `models` that assigns `output_layer` must call `marked_by` (which marks it)."""

    models: str  # glob of model sources, e.g. megatron/core/models/**/*.py
    output_layer: str  # e.g. self.output_layer
    marked_by: str  # e.g. self.setup_embeddings_and_output_layer()

    def covers(self, path: str) -> bool:
        return fnmatchcase(path, self.models)


@dataclass(frozen=True, kw_only=True)
class InstrumentRules:
    variable: str
    none_literal: str
    imports: tuple[str, ...]  # lines added after a hooked file's last top-level import
    helper_parameter: str  # the keyword a hooked helper receives the value through
    hooks: tuple[Hook, ...]
    unhooked: tuple[Unhooked, ...] = ()
    inserts: tuple[Insert, ...] = ()
    params: tuple[Params, ...] = ()
    lm_head: LmHead | None = None

    def files(self) -> tuple[str, ...]:
        """The files every tree must have (the lm_head model glob adds more, where present)."""
        seen = [h.file for h in self.hooks] + [i.file for i in self.inserts] + [p.file for p in self.params]
        return tuple(dict.fromkeys(seen))

    def wants(self, path: str) -> bool:
        """Whether the engine reads `path` (a named file or a model source the LM-head check covers)."""
        return path in self.files() or (self.lm_head is not None and self.lm_head.covers(path))


def rules_path() -> Path:
    """`rewrites/megatron-core.instrument.toml` from the source tree, or the copy packaged with megaquant."""
    from megaquant.spec import rewrites_dirs

    dirs = rewrites_dirs()
    for candidate in (d / RULES_NAME for d in dirs):
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in dirs)
    raise InstrumentError(f"instrumentation rules {RULES_NAME} not found in {searched}; reinstall megaquant")


def _build(kind: type[Any], raw: object, where: str) -> Any:
    allowed = {f.name for f in fields(kind)}
    if not isinstance(raw, dict):
        raise InstrumentError(f"{where}: expected a table")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise InstrumentError(f"{where}: unknown keys {unknown} (allowed: {', '.join(sorted(allowed))})")
    try:
        return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except TypeError as exc:
        raise InstrumentError(f"{where}: {exc}") from None


def parse_rules(text: str, where: str = RULES_NAME) -> InstrumentRules:
    """Rules from TOML text; malformed tables are `InstrumentError`s that name the table."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InstrumentError(f"{where}: not valid TOML: {exc}") from exc

    def tables(key: str, kind: type[Any]) -> tuple[Any, ...]:
        return tuple(_build(kind, t, f"{where}: {key}[{i}]") for i, t in enumerate(raw.get(key, [])))

    unhooked: tuple[Unhooked, ...] = tables("unhooked", Unhooked)
    for i, entry in enumerate(unhooked):
        if bool(entry.gemm) == bool(entry.call):
            raise InstrumentError(f"{where}: unhooked[{i}]: give exactly one of `gemm` or `call`")
    inserts: tuple[Insert, ...] = tables("insert", Insert)
    for i, ins in enumerate(inserts):
        if bool(ins.after) == (ins.at == "start"):
            raise InstrumentError(f'{where}: insert[{i}]: give exactly one of `after` or `at = "start"`')
    lm_head = raw.get("lm_head")
    return InstrumentRules(
        variable=raw["variable"],
        none_literal=raw["none_literal"],
        imports=tuple(raw["imports"]),
        helper_parameter=raw["helper_parameter"],
        hooks=tables("hook", Hook),
        unhooked=unhooked,
        inserts=inserts,
        params=tables("params", Params),
        lm_head=None if lm_head is None else _build(LmHead, lm_head, f"{where}: lm_head"),
    )


def load_rules(path: Path | None = None) -> InstrumentRules:
    """The packaged rules, or those in `path`."""
    source = path or rules_path()
    return parse_rules(source.read_text(encoding="utf-8"), str(source))
