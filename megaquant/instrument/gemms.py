"""Finding GEMMs in libcst trees: by kind (matmul / mm / bmm / baddbmm / linear / gemm, an autograd Function's
`.apply`), in a scope and in the module-level helpers it calls, with the helper's parameters read as the
caller's arguments, so a rule written against one Megatron layout finds the GEMM in another.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import libcst as cst

from megaquant.instrument.rules import InstrumentError

__all__ = [
    "CallSite",
    "GemmPattern",
    "ModuleIndex",
    "call_sites",
    "callee_name",
    "code",
    "gemm_kind",
    "operands",
    "parse_pattern",
    "squash",
]

LM_HEAD_TEST = "ctx.megaquant_lm_head"  # the guard whose first branch keeps the stock GEMM
# Receivers that are namespaces, not operands: `torch.matmul(a, b)` vs `a.matmul(b)`.
_NAMESPACES = frozenset({"torch", "F", "torch.nn.functional", "_mq_ops", "np"})
_FAMILY = {"mm": "matmul"}  # a rule for matmul also finds torch.mm / x.mm


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def callee_name(func: cst.BaseExpression) -> str:
    """Dotted text of a callee: `torch.matmul`, `grad_output.t().matmul`, `Fn.apply`; `?` for others."""
    if isinstance(func, cst.Name):
        return func.value
    if isinstance(func, cst.Attribute):
        return f"{callee_name(func.value)}.{func.attr.value}"
    if isinstance(func, cst.Call):
        return f"{callee_name(func.func)}()"
    if isinstance(func, cst.Subscript):
        return f"{callee_name(func.value)}[]"
    return "?"


def gemm_kind(callee: str) -> str | None:
    """The GEMM kind a callee name says it is (case-insensitive), or None.

    `X.apply` is an autograd Function: its class name says the kind (`SomethingMatMul.apply` -> matmul).
    """
    parts = callee.split(".")
    name = parts[-2] if parts[-1] == "apply" and len(parts) > 1 else parts[-1]
    low = name.lower().rstrip("()")
    for kind in ("baddbmm", "bmm", "matmul", "gemm", "linear"):
        if kind in low:
            return kind
    if re.search(r"(^|_)mm($|_)", low) or name.endswith("MM"):
        return "mm"
    return None


def family(kind: str | None) -> str | None:
    return _FAMILY.get(kind, kind) if kind is not None else None


def operands(call: cst.Call) -> tuple[list[cst.BaseExpression], list[cst.Arg]]:
    """(positional operands including a method receiver, keyword arguments) of a GEMM call."""
    positional: list[cst.BaseExpression] = [a.value for a in call.args if a.keyword is None and not a.star]
    keywords = [a for a in call.args if a.keyword is not None]
    func = call.func
    if isinstance(func, cst.Attribute) and func.attr.value != "apply":
        receiver = callee_name(func.value)
        is_class = receiver.split(".")[-1][:1].isupper()
        if receiver not in _NAMESPACES and not is_class:
            positional = [func.value, *positional]  # x.matmul(y) -> (x, y)
    return positional, keywords


class _Substitute(cst.CSTTransformer):
    """A helper's parameter names replaced by the caller's argument expressions (attribute names kept)."""

    def __init__(self, env: Mapping[str, cst.BaseExpression]) -> None:
        self.env = env

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.BaseExpression:
        return self.env.get(original_node.value, updated_node)

    def leave_Attribute(self, original_node: cst.Attribute, updated_node: cst.Attribute) -> cst.Attribute:
        return updated_node.with_changes(attr=original_node.attr)

    def leave_Arg(self, original_node: cst.Arg, updated_node: cst.Arg) -> cst.Arg:
        return updated_node.with_changes(keyword=original_node.keyword)


def _text(expr: cst.BaseExpression, env: Mapping[str, cst.BaseExpression]) -> str:
    node = expr.visit(_Substitute(env)) if env else expr
    assert isinstance(node, cst.CSTNode)  # a Name is only ever replaced by an expression
    return squash(code(node))


@dataclass(frozen=True)
class GemmPattern:
    """A rule's `kind(operands, keywords)`: what to look for, independent of spelling and layout."""

    text: str
    kind: str
    operands: tuple[str, ...]
    keywords: tuple[tuple[str, str], ...]

    def matches(self, call: cst.Call, env: Mapping[str, cst.BaseExpression]) -> bool:
        if family(gemm_kind(callee_name(call.func))) != family(self.kind):
            return False
        positional, keywords = operands(call)
        return (
            tuple(_text(p, env) for p in positional) == self.operands
            and tuple(sorted((k.keyword.value, _text(k.value, env)) for k in keywords if k.keyword))
            == self.keywords
        )

    def matches_hooked(
        self, call: cst.Call, op: str, variables: tuple[str, ...], env: Mapping[str, cst.BaseExpression]
    ) -> bool:
        """Whether `call` is this GEMM already routed through `<op>(<operands>, <variable>, ...)`."""
        if callee_name(call.func) != op:
            return False
        positional = [a.value for a in call.args if a.keyword is None]
        return (
            len(positional) == len(self.operands) + 1
            and tuple(_text(p, env) for p in positional[:-1]) == self.operands
            and squash(code(positional[-1])) in variables
        )


def parse_pattern(text: str, where: str) -> GemmPattern:
    try:
        call = cst.ensure_type(cst.parse_expression(text), cst.Call)
    except (cst.ParserSyntaxError, TypeError) as exc:
        raise InstrumentError(f"{where}: `{text}` is not a call like `matmul(a, b)`") from exc
    kind = gemm_kind(callee_name(call.func))
    if kind is None:
        raise InstrumentError(
            f"{where}: `{text}` names no GEMM kind (matmul, mm, bmm, baddbmm, linear, gemm)"
        )
    positional, keywords = operands(call)
    return GemmPattern(
        text=text,
        kind=kind,
        operands=tuple(squash(code(p)) for p in positional),
        keywords=tuple(sorted((k.keyword.value, squash(code(k.value))) for k in keywords if k.keyword)),
    )


@dataclass(frozen=True)
class ModuleIndex:
    """The scopes of one module: `Class.method` and module-level functions (by name)."""

    methods: dict[str, cst.FunctionDef]
    functions: dict[str, cst.FunctionDef]

    @classmethod
    def of(cls, module: cst.Module) -> ModuleIndex:
        methods: dict[str, cst.FunctionDef] = {}
        functions: dict[str, cst.FunctionDef] = {}
        for stmt in module.body:
            if isinstance(stmt, cst.FunctionDef):
                functions[stmt.name.value] = stmt
            elif isinstance(stmt, cst.ClassDef):
                for item in stmt.body.body:
                    if isinstance(item, cst.FunctionDef):
                        methods[f"{stmt.name.value}.{item.name.value}"] = item
        return cls(methods, functions)

    def scope(self, name: str) -> cst.FunctionDef | None:
        return self.methods.get(name) or self.functions.get(name)


def _blocks(stmt: cst.BaseCompoundStatement) -> list[cst.BaseSuite]:
    """The blocks of a compound statement, except the stock branch of an LM-head guard."""
    found: list[cst.BaseSuite] = []
    if not (isinstance(stmt, cst.If) and squash(code(stmt.test)) == LM_HEAD_TEST):
        found.append(stmt.body)
    for name in ("orelse", "finalbody"):
        child = getattr(stmt, name, None)
        if isinstance(child, cst.If):  # elif
            found.extend(_blocks(child))
        elif isinstance(child, cst.Else | cst.Finally):
            found.append(child.body)
    for handler in getattr(stmt, "handlers", ()):
        found.append(handler.body)
    return found


def statements(suite: cst.BaseSuite) -> Iterator[tuple[cst.BaseStatement, cst.BaseStatement]]:
    """(statement, the function-body statement containing it), depth first, skipping LM-head stock copies."""

    def visit(
        block: cst.BaseSuite, top: cst.BaseStatement | None
    ) -> Iterator[tuple[cst.BaseStatement, cst.BaseStatement]]:
        body = block.body if isinstance(block, cst.IndentedBlock) else [block]
        for stmt in body:
            if not isinstance(stmt, cst.BaseStatement):
                continue
            owner = top or stmt
            yield stmt, owner
            if isinstance(stmt, cst.BaseCompoundStatement) and not isinstance(
                stmt, cst.FunctionDef | cst.ClassDef
            ):
                for inner in _blocks(stmt):
                    yield from visit(inner, owner)

    yield from visit(suite, None)


def calls_in(node: cst.CSTNode) -> list[cst.Call]:
    """Calls in `node` in source order (outer before inner), not looking into nested functions or lambdas."""
    found: list[cst.Call] = []

    class _Visitor(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> None:
            found.append(call)

        def visit_Lambda(self, node: cst.Lambda) -> bool:
            return False

        def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
            return False

    node.visit(_Visitor())
    return found


@dataclass(frozen=True)
class CallSite:
    """A call reached from a scope: written in it, or in a module-level helper the scope calls (`via`)."""

    call: cst.Call
    stmt: cst.SimpleStatementLine  # the statement holding `call`
    written_in: str  # the scope, or the helper's name
    env: Mapping[str, cst.BaseExpression]  # helper parameter -> the caller's argument
    helper: cst.FunctionDef | None = None
    via: cst.Call | None = None  # the scope's call of the helper
    via_stmt: cst.SimpleStatementLine | None = None

    @property
    def callee(self) -> str:
        return callee_name(self.call.func)

    @property
    def kind(self) -> str | None:
        return gemm_kind(self.callee)


def _binding(helper: cst.FunctionDef, call: cst.Call) -> dict[str, cst.BaseExpression]:
    """The helper's parameter names bound to the call's argument expressions (what can be bound)."""
    names = [p.name.value for p in (*helper.params.posonly_params, *helper.params.params)]
    env: dict[str, cst.BaseExpression] = {}
    position = 0
    for arg in call.args:
        if arg.star:
            break
        if arg.keyword is None:
            if position < len(names):
                env[names[position]] = arg.value
            position += 1
        else:
            env[arg.keyword.value] = arg.value
    return env


def call_sites(
    func: cst.FunctionDef, scope: str, index: ModuleIndex, *, opaque: tuple[str, ...] = ()
) -> list[CallSite]:
    """Every call in `func` and, one level deep, in the module-level helpers it calls.

    A call of a helper is replaced by the calls inside it, unless its name matches a glob in `opaque`
    (helpers the rules name as not hooked: they are reported as one call).
    """
    sites: list[CallSite] = []
    for stmt, _ in statements(func.body):
        if not isinstance(stmt, cst.SimpleStatementLine):
            continue
        for call in calls_in(stmt):
            name = callee_name(call.func)
            helper = index.functions.get(name)
            if helper is not None and helper is not func and not any(fnmatchcase(name, g) for g in opaque):
                env = _binding(helper, call)
                for inner_stmt, _ in statements(helper.body):
                    if isinstance(inner_stmt, cst.SimpleStatementLine):
                        for inner in calls_in(inner_stmt):
                            sites.append(CallSite(inner, inner_stmt, name, env, helper, call, stmt))
                continue
            sites.append(CallSite(call, stmt, scope, {}))
    return sites
