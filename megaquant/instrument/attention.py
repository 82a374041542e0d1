"""Pure libcst rewrite: route an instrumented DotProductAttention.forward through the fused core.

Source in, source out (after `megaquant instrument`'s hooks). The forward first asks
`_mq_ops.attention_core.fused_core(...)`; when it answers a core, the unfused statements (K/V repeat,
score buffer, baddbmm, softmax, dropout, bmm) are skipped and the core runs with the values of the qk and
pv sites. The two `custom_quant_type = '<value>'` sites stay where they were, each governing its own
hooked GEMM, so `status` lists them and `set --qk/--pv` sets them exactly as before:

    _mq_fused = _mq_ops.attention_core.fused_core(self, query, key, value, attention_mask)
    if _mq_fused is None:
        <statements before the qk site>
    custom_quant_type = 'mxfp8'                       # qk site
    if _mq_fused is not None:
        _mq_qk = custom_quant_type
    else:
        matmul_result = _mq_ops.quant_baddbmm(...)    # + the statements up to the pv site
    custom_quant_type = 'mxfp8'                       # pv site
    if _mq_fused is not None:
        return _mq_fused(_mq_qk, custom_quant_type)
    context = _mq_ops.quant_bmm(...)

The rule (file, scope, hooked ops) is `[attention_core]` in rewrites/megatron-core.instrument.toml.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from megaquant.errors import SourceError

if TYPE_CHECKING:
    from megaquant.instrument import InstrumentPlan

__all__ = [
    "AttentionRule",
    "FusedAttention",
    "fuse_attention",
    "load_attention_rule",
    "with_fused_attention",
]

MARK = "_mq_ops.attention_core.fused_core("


@dataclass(frozen=True, kw_only=True)
class AttentionRule:
    """Where the attention core lives and which hooked calls follow its two sites."""

    file: str
    scope: str
    variable: str
    qk_op: str
    pv_op: str


@dataclass(frozen=True)
class FusedAttention:
    """The rewritten source (None: unchanged) and the line of the forward it rewrote or found rewritten."""

    new_source: bytes | None
    line: int
    applied: bool


def load_attention_rule(path: Path) -> AttentionRule | None:
    """The `[attention_core]` table of an instrumentation rules file (None when it has none)."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    table = raw.get("attention_core")
    if table is None:
        return None
    return AttentionRule(variable=raw["variable"], **table)


def _code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def _is_site(stmt: cst.BaseStatement, variable: str) -> bool:
    if not (isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1):
        return False
    small = stmt.body[0]
    return (
        isinstance(small, cst.Assign)
        and len(small.targets) == 1
        and isinstance(small.targets[0].target, cst.Name)
        and small.targets[0].target.value == variable
    )


def _site_index(body: list[cst.BaseStatement], rule: AttentionRule, op: str, path: str) -> int:
    """Index of the site statement directly followed by the statement that calls `op`."""
    found = [
        i
        for i in range(len(body) - 1)
        if _is_site(body[i], rule.variable) and f"{op}(" in _code(body[i + 1]).replace(" ", "")
    ]
    if len(found) != 1:
        raise SourceError(
            f"{path}: in {rule.scope}: expected one `{rule.variable} = ...` site directly followed by the "
            f"hooked `{op}(...)` call, found {len(found)}; run `megaquant instrument` on stock sources "
            "(this Megatron version may need a rule update in rewrites/megatron-core.instrument.toml)"
        )
    return found[0]


def _leading(body: list[cst.BaseStatement]) -> int:
    """Statements kept before the fused-core question: the docstring and the argument asserts."""
    i = 0
    while i < len(body):
        stmt = body[i]
        if not isinstance(stmt, cst.SimpleStatementLine) or not all(
            isinstance(s, cst.Assert) or (isinstance(s, cst.Expr) and isinstance(s.value, cst.SimpleString))
            for s in stmt.body
        ):
            break
        i += 1
    return i


def _if(test: str, body: list[cst.BaseStatement], orelse: list[cst.BaseStatement] | None = None) -> cst.If:
    template = f"if {test}:\n    pass\n" + ("else:\n    pass\n" if orelse is not None else "")
    node = cst.ensure_type(cst.parse_statement(template), cst.If)
    node = node.with_changes(body=node.body.with_changes(body=body))
    if orelse is not None:
        branch = cst.ensure_type(node.orelse, cst.Else)
        node = node.with_changes(orelse=branch.with_changes(body=branch.body.with_changes(body=orelse)))
    return node


def fuse_attention(source: bytes, rule: AttentionRule, *, path: str = "") -> FusedAttention:
    """Rewrite the forward of `rule.scope` in `source` (already hooked) as the module doc shows."""
    path = path or rule.file
    try:
        wrapper = MetadataWrapper(cst.parse_module(source), unsafe_skip_copy=True)
    except cst.ParserSyntaxError as exc:
        raise SourceError(f"{path}:{exc.raw_line}: cannot parse: {exc.message}") from exc
    module = wrapper.module
    from megaquant.instrument.gemms import ModuleIndex  # here: megaquant.instrument imports this module

    func = ModuleIndex.of(module).scope(rule.scope)
    if func is None:
        raise SourceError(f"{path}: scope {rule.scope} not found; this Megatron version needs a rule update")
    line = wrapper.resolve(PositionProvider)[func].start.line
    if MARK in _code(func):
        return FusedAttention(None, line, applied=False)
    body = list(cst.ensure_type(func.body, cst.IndentedBlock).body)
    i_qk = _site_index(body, rule, rule.qk_op, path)
    i_pv = _site_index(body, rule, rule.pv_op, path)
    start = _leading(body)
    if not start <= i_qk < i_pv:
        raise SourceError(f"{path}: in {rule.scope}: the qk site must come before the pv site")
    var = rule.variable
    ask = cst.parse_statement(
        f"_mq_fused = {MARK}self, query, key, value, attention_mask)  # megaquant: fused attention core\n"
    )
    new_body: list[cst.BaseStatement] = [*body[:start], ask]
    if body[start:i_qk]:
        new_body.append(_if("_mq_fused is None", body[start:i_qk]))
    new_body += [
        body[i_qk],
        _if("_mq_fused is not None", [cst.parse_statement(f"_mq_qk = {var}\n")], body[i_qk + 1 : i_pv]),
        body[i_pv],
        _if("_mq_fused is not None", [cst.parse_statement(f"return _mq_fused(_mq_qk, {var})\n")]),
        *body[i_pv + 1 :],
    ]
    new_func = func.with_changes(body=func.body.with_changes(body=new_body))
    new_source = module.deep_replace(func, new_func)
    assert isinstance(new_source, cst.Module)
    return FusedAttention(new_source.bytes, line, applied=True)


def with_fused_attention(plan: InstrumentPlan, sources: dict[str, bytes], rules: Path) -> InstrumentPlan:
    """`plan` (megaquant instrument's hooks) plus the fused-core rewrite of the rules' `[attention_core]`."""
    from megaquant.instrument import Edit, InstrumentPlan

    rule = load_attention_rule(rules)
    if rule is None or rule.file not in sources:
        return plan
    hooked = plan.new_sources.get(rule.file, sources[rule.file])
    fused = fuse_attention(hooked, rule)
    what = "fused attention core"
    edit = Edit(rule.file, rule.scope, fused.line, "fuse", None, what, applied=fused.applied)
    new_sources = dict(plan.new_sources)
    if fused.new_source is not None:
        new_sources[rule.file] = fused.new_source
    return InstrumentPlan(new_sources=new_sources, edits=(*plan.edits, edit))
