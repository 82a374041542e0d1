"""Pure libcst rewrites of the quantization variable: set values by role, give a shared site a sibling.

Bytes in, bytes out: the file's encoding, newline style, quote style and every other byte are kept.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass

import libcst as cst
from libcst._nodes.internal import CodegenState

from megaquant.errors import RoleError, SourceError, UnparsableError, ValueNameError
from megaquant.sites import FileAnalysis, Step, analyse_file, governed_roles, unparsable_warning
from megaquant.spec import ROLES, Spec, canonical_value

__all__ = ["Change", "RewritePlan", "missing_role_error", "plan_rewrite"]


@dataclass(frozen=True)
class Change:
    """One edit: `set` replaces the right-hand side of a site, `insert` adds a sibling before a GEMM."""

    file: str
    scope: str
    line: int
    role: str
    old: str  # the expression before (for `insert`: the one the GEMM used to get)
    new: str  # the literal after (for `insert` keeping another role's value: that expression)
    kind: str  # "set" | "insert"


@dataclass(frozen=True)
class RewritePlan:
    new_sources: dict[str, bytes]  # only files that change
    changes: tuple[Change, ...]
    warnings: tuple[str, ...]


def _value_key(value: str | None, expr: str) -> str:
    """What a GEMM effectively gets: a canonical value name, else the literal or the expression's syntax."""
    if value is None:
        try:  # layout-independent: libcst may re-indent the continuation lines of a copied expression
            return f"expr:{ast.dump(ast.parse(expr.strip(), mode='eval'))}"
        except SyntaxError:
            return f"expr:{expr}"
    try:
        return canonical_value(value)
    except ValueNameError:
        return f"literal:{value}"


def _quote(node: cst.BaseExpression, module: cst.Module) -> tuple[str, str]:
    """(prefix, quote) to write a literal with: the site's own, else the first string in it or the file."""

    class First(cst.CSTVisitor):
        found: cst.SimpleString | None = None

        def visit_SimpleString(self, string: cst.SimpleString) -> bool:
            if self.found is None and string.quote in ("'", '"'):
                self.found = string
            return False

    for where in (node, module):
        visitor = First()
        where.visit(visitor)
        if visitor.found is not None:
            prefix = visitor.found.prefix.replace("b", "").replace("B", "").replace("f", "").replace("F", "")
            return prefix if where is node else "", visitor.found.quote
    return "", "'"


def _string(literal: str, style: tuple[str, str]) -> str:
    prefix, quote = style
    return f"{prefix}{quote}{literal}{quote}"


class _Index(CodegenState):
    """The assignments to the variable (in source order) and the statements by first line, in one pass.

    A code generator that only counts lines: it visits every node in source order several times faster
    than a CSTVisitor, and gives line numbers without the cost of libcst's PositionProvider.
    """

    def __init__(self, module: cst.Module, variable: str) -> None:
        super().__init__(default_indent=module.default_indent, default_newline=module.default_newline)
        self.variable = variable
        self.line = 1
        self.parents: list[cst.CSTNode] = []
        self.assigns: list[tuple[int, cst.Assign | cst.AnnAssign]] = []
        self.statements: dict[int, cst.BaseStatement] = {}

    def add_token(self, value: str) -> None:
        self.tokens.append(value)
        self.line += value.count("\n")

    def before_codegen(self, node: cst.CSTNode) -> None:
        if isinstance(node, cst.SimpleStatementLine | cst.BaseCompoundStatement):
            self.statements.setdefault(self.line + len(node.leading_lines), node)
        elif type(node) is cst.Name and node.value == self.variable and self.parents:
            parent = self.parents[-1]
            if isinstance(parent, cst.AssignTarget) and parent.target is node:
                assign = self.parents[-2]
                assert isinstance(assign, cst.Assign)
                self.assigns.append((self.line, assign))
            elif isinstance(parent, cst.AnnAssign) and parent.target is node and parent.value is not None:
                self.assigns.append((self.line, parent))
        self.parents.append(node)

    def after_codegen(self, node: cst.CSTNode) -> None:
        self.parents.pop()


class _Edit(cst.CSTTransformer):
    def __init__(
        self, values: dict[int, str], inserts: dict[int, list[cst.SimpleStatementLine]], module: cst.Module
    ) -> None:
        self.values = values
        self.inserts = inserts
        self.module = module

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        new = self.values.get(id(original))
        return updated if new is None else updated.with_changes(value=cst.parse_expression(new))

    def leave_AnnAssign(self, original: cst.AnnAssign, updated: cst.AnnAssign) -> cst.AnnAssign:
        new = self.values.get(id(original))
        return updated if new is None else updated.with_changes(value=cst.parse_expression(new))

    def _body(
        self, original: tuple[cst.BaseStatement, ...], updated: tuple[cst.BaseStatement, ...]
    ) -> list[cst.BaseStatement]:
        out: list[cst.BaseStatement] = []
        for before, after in zip(original, updated, strict=True):
            new: list[cst.BaseStatement] = list(self.inserts.get(id(before), []))
            if new:
                # The sibling goes right before the GEMM statement, after the comments that precede it.
                if isinstance(after, cst.SimpleStatementLine | cst.BaseCompoundStatement):
                    new[0] = cst.ensure_type(new[0], cst.SimpleStatementLine).with_changes(
                        leading_lines=after.leading_lines
                    )
                    after = after.with_changes(leading_lines=())
                out.extend(new)
            out.append(after)
        return out

    def leave_IndentedBlock(
        self, original: cst.IndentedBlock, updated: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        return updated.with_changes(body=self._body(tuple(original.body), tuple(updated.body)))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        return updated.with_changes(body=self._body(tuple(original.body), tuple(updated.body)))


def _targets(targets: Mapping[str, str], spec: Spec) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for role, value in targets.items():
        if role not in ROLES:
            raise ValueNameError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        canonical_value(value)
        if role not in spec.roles():
            raise RoleError(
                f"role {role} is not in trees of spec {spec.name} (it has {', '.join(spec.roles())}); "
                "nothing was changed"
            )
        wanted[role] = spec.literal(value)
    return wanted


def missing_role_error(role: str, spec: Spec) -> RoleError:
    """The refusal when a role asked for has no GEMM an assignment governs (never `nothing to change`)."""
    return RoleError(
        f"role {role} asked for, but this tree has no {role} GEMM that spec {spec.name} recognises "
        f"(it looks in {spec.expected(role)}); nothing was changed, a run would keep the old value. "
        "On stock Megatron run `megaquant instrument` first; on a tree spelled differently, pass a "
        "matching spec with --spec (see `megaquant status`)"
    )


def _plan_file(
    fa: FileAnalysis, module: cst.Module, index: _Index, wanted: Mapping[str, str], variable: str
) -> tuple[dict[int, str], dict[int, list[cst.SimpleStatementLine]], list[Change], list[str], dict[int, str]]:
    """Edits of one file (keyed by libcst node identity), and the value key every GEMM must end up with."""
    values: dict[int, str] = {}
    inserts: dict[int, list[cst.SimpleStatementLine]] = {}
    changes: list[Change] = []
    warnings: list[str] = []
    expected: dict[int, str] = {}
    for i, (a, site) in enumerate(zip(fa.assignments, fa.sites, strict=True)):
        node = index.assigns[i][1]
        assert node.value is not None  # only assignments with a value are indexed
        style = _quote(node.value, module)
        if site.override:
            touched = [r for r in site.roles if r in wanted]
            if touched:
                warnings.append(
                    f"{fa.file}:{a.line}: run-time override in {a.scope} (`{a.expr}`) can still replace the "
                    f"value of {', '.join(touched)} at run time; megaquant left it alone"
                )
            continue
        governed = [u for u, g in sorted(fa.governor.items()) if g == i]
        original = _value_key(a.value, a.expr)
        if not governed:  # a label: follows the role of the next GEMM
            role = site.roles[0] if site.roles else None
            if role is not None and role in wanted and original != _value_key(wanted[role], ""):
                values[id(node)] = _string(wanted[role], style)
                changes.append(Change(fa.file, a.scope, a.line, role, a.expr, values[id(node)], "set"))
            continue
        # Each governed GEMM wants its role's new literal, or (role not asked for / role-less) the old value.
        wants: list[tuple[str, str]] = []  # (key, code) per governed use
        for u in governed:
            role = fa.uses[u].role
            if role is not None and role in wanted:
                wants.append((_value_key(wanted[role], ""), _string(wanted[role], style)))
            else:
                wants.append((original, a.expr))
        first_key, first_code = wants[0]
        if first_key != original:
            values[id(node)] = first_code
            first_role = fa.uses[governed[0]].role or ""
            changes.append(Change(fa.file, a.scope, a.line, first_role, a.expr, first_code, "set"))
        live: list[tuple[int, tuple[Step, ...], str]] = [(a.order, a.path, first_key)]
        for u, (key, code) in zip(governed, wants, strict=True):
            use = fa.uses[u]
            expected[u] = key
            current = [k for order, path, k in live if order <= use.order and _within(path, use.path)][-1]
            if current != key:
                if use.scope_key != a.scope_key:
                    raise SourceError(
                        f"{fa.file}:{use.line}: the GEMM in {use.scope} reads {variable} from the "
                        f"enclosing function ({a.scope}, line {a.line}), which also governs another role; "
                        "megaquant cannot give it its own value. Set both roles to the same value, or add "
                        "an assignment by hand."
                    )
                shadowed = [
                    fa.assignments[j].line
                    for j, reached in fa.reaches.items()
                    if u in reached and fa.sites[j].override
                ]
                if shadowed:
                    warnings.append(
                        f"{fa.file}:{use.line}: the {use.role} GEMM in {use.scope} now has its own "
                        f"assignment, so the run-time override at line {', '.join(map(str, shadowed))} no "
                        "longer reaches it"
                    )
                anchor = index.statements.get(use.anchor_line)
                if anchor is None:
                    raise SourceError(
                        f"{fa.file}:{use.anchor_line}: no statement starts on this line (internal)"
                    )
                sibling = cst.ensure_type(
                    cst.parse_statement(
                        f"{variable} = None  # megaquant: own value for {use.role or 'this GEMM'}\n",
                        config=module.config_for_parsing,
                    ),
                    cst.SimpleStatementLine,
                )
                assign = cst.ensure_type(sibling.body[0], cst.Assign)
                # keeping the old value: a copy of the original expression (layout and quotes as written)
                value = node.value.deep_clone() if key == original else cst.parse_expression(code)
                sibling = sibling.with_changes(body=[assign.with_changes(value=value)])
                inserts.setdefault(id(anchor), []).append(sibling)
                live.append((use.order, use.path, key))
                changes.append(Change(fa.file, use.scope, use.line, use.role or "", a.expr, code, "insert"))
    return values, inserts, changes, warnings, expected


def _within(outer: tuple[Step, ...], inner: tuple[Step, ...]) -> bool:
    return len(outer) <= len(inner) and inner[: len(outer)] == outer


def _verify(fa: FileAnalysis, new: bytes, expected: Mapping[int, str], spec: Spec) -> None:
    """Re-parse the new source and check that every GEMM gets exactly the value it should."""
    after = analyse_file(fa.file, new, spec)
    problem = ""
    if len(after.uses) != len(fa.uses):
        problem = f"found {len(after.uses)} GEMM uses after the edit, {len(fa.uses)} before"
    else:
        for u, key in expected.items():
            g = after.governor.get(u)
            got = None if g is None else after.assignments[g]
            if got is None or _value_key(got.value, got.expr) != key:
                problem = f"the GEMM at line {fa.uses[u].line} would not get {key}"
                break
    if problem:
        raise SourceError(
            f"{fa.file}: megaquant cannot rewrite this file safely ({problem}); nothing was changed. "
            "Please report this with the file attached."
        )


def plan_rewrite(sources: Mapping[str, bytes], targets: Mapping[str, str], spec: Spec) -> RewritePlan:
    """New sources setting each role in `targets` (role -> value, any spelling); other roles untouched."""
    wanted = _targets(targets, spec)
    warnings: list[str] = []
    new_sources: dict[str, bytes] = {}
    changes: list[Change] = []
    found: set[str] = set()
    for file in sorted(sources):
        source = sources[file]
        if spec.variable.encode("ascii") not in source:
            continue
        try:
            fa = analyse_file(file, source, spec)
        except UnparsableError as exc:
            if not set(spec.roles_in(file)).isdisjoint(wanted):
                raise  # a file this change may have to edit: refuse, naming file, line and cause
            warnings.append(unparsable_warning(exc, spec))
            continue
        if not fa.assignments:
            continue
        roles = {r for site in fa.sites for r in site.roles}
        found.update(governed_roles(fa))
        if roles.isdisjoint(wanted):
            continue  # nothing here can change: skip the (slower) libcst parse
        module = cst.parse_module(source)
        index = _Index(module, spec.variable)
        module._codegen(index)  # noqa: SLF001 - see _Index
        if [line for line, _ in index.assigns] != [a.line for a in fa.assignments]:
            raise SourceError(
                f"{file}: libcst and CPython disagree on the assignments to {spec.variable} "
                f"(lines {[line for line, _ in index.assigns]} vs {[a.line for a in fa.assignments]}); "
                "nothing was changed. Please report this with the file attached."
            )
        values, inserts, file_changes, file_warnings, expected = _plan_file(
            fa, module, index, wanted, spec.variable
        )
        warnings.extend(file_warnings)
        if not values and not inserts:
            continue
        new = module.visit(_Edit(values, inserts, module)).bytes
        _verify(fa, new, expected, spec)
        new_sources[file] = new
        changes.extend(file_changes)
    for role in wanted:
        if role not in found:
            raise missing_role_error(role, spec)
    return RewritePlan(new_sources, tuple(changes), tuple(warnings))
