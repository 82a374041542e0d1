"""Find every assignment to the quantization variable by scope, and the GEMMs each one governs.

A bytes prefilter picks the few files that mention the variable; only those are parsed with libcst.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
from libcst._nodes.internal import CodegenState

from megaquant.errors import SourceError
from megaquant.spec import Spec

__all__ = [
    "FileAnalysis",
    "GemmCall",
    "Scan",
    "Site",
    "analyse_file",
    "candidate_paths",
    "scan_sources",
    "scan_tree",
]

# Folders never worth scanning: VCS data, caches, virtual environments (which would hold megaquant itself).
_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})


@dataclass(frozen=True)
class GemmCall:
    """One GEMM use: an if/elif chain dispatching on the variable, or a call receiving it."""

    line: int
    call: str  # the callee(s) matching the spec's call patterns, e.g. "mxfp_matmul, torch.matmul"
    role: str | None


@dataclass(frozen=True)
class Site:
    """One assignment to the variable, identified by file and scope (the line is informative only)."""

    file: str
    scope: str
    line: int
    value: str | None  # the string literal, None when the right-hand side is not a literal
    expr: str  # source text of the right-hand side
    conditional: bool  # inside if / try / loop / match
    override: bool  # run-time override: its block does not contain the GEMMs its value reaches
    governs: tuple[GemmCall, ...]
    roles: tuple[str, ...]

    @property
    def label(self) -> bool:
        """Only labels tensors: its value reaches no GEMM (it follows the next GEMM's role)."""
        return not self.governs and not self.override

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "scope": self.scope,
            "line": self.line,
            "value": self.value,
            "expr": self.expr,
            "conditional": self.conditional,
            "override": self.override,
            "label": self.label,
            "roles": list(self.roles),
            "governs": [{"line": g.line, "call": g.call, "role": g.role} for g in self.governs],
        }


@dataclass(frozen=True)
class Scan:
    sites: tuple[Site, ...]
    warnings: tuple[str, ...]


# A step into a branch of a compound statement: (id of the statement, branch name, branches exclusive?).
Step = tuple[int, str, bool]


@dataclass(eq=False)
class Assignment:
    """Engine-internal record of one assignment (the codemod rewrites `node`)."""

    order: int
    line: int
    scope_key: int
    scope: str
    path: tuple[Step, ...]
    node: cst.Assign | cst.AnnAssign
    value: str | None
    expr: str


@dataclass(eq=False)
class Use:
    """Engine-internal record of one GEMM use; `anchor` is the statement a sibling goes before."""

    order: int
    line: int
    scope_key: int
    scope: str
    path: tuple[Step, ...]
    enclosing: tuple[
        tuple[int, int, tuple[Step, ...]], ...
    ]  # outer function scopes (key, def order, def path)
    anchor: cst.BaseStatement
    call: str
    role: str | None


@dataclass(eq=False)
class FileAnalysis:
    """Everything the engine knows about one file; `sites[i]` describes `assignments[i]`."""

    file: str
    module: cst.Module
    assignments: list[Assignment]
    uses: list[Use]
    governor: dict[int, int]  # use index -> assignment index
    reaches: dict[int, list[int]]  # assignment index -> use indices its value can reach
    sites: list[Site] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Walker(CodegenState):
    """A code generator that only counts lines and notes each occurrence of the variable's name.

    Code generation visits every node in source order several times faster than a CSTVisitor and
    gives line numbers for free, without the cost of libcst's PositionProvider.
    """

    def __init__(self, module: cst.Module, variable: str) -> None:
        super().__init__(default_indent=module.default_indent, default_newline=module.default_newline)
        self.variable = variable
        self.line = 1
        self.stack: list[cst.CSTNode] = []
        self.starts: list[int] = []
        self.seq = 0
        self.seqs: list[int] = []
        self.hits: list[tuple[tuple[cst.CSTNode, ...], tuple[int, ...], tuple[int, ...]]] = []

    def add_token(self, value: str) -> None:
        self.tokens.append(value)
        self.line += value.count("\n")

    def before_codegen(self, node: cst.CSTNode) -> None:
        self.stack.append(node)
        self.starts.append(self.line)
        self.seq += 1
        self.seqs.append(self.seq)
        if type(node) is cst.Name and node.value == self.variable:
            self.hits.append((tuple(self.stack), tuple(self.starts), tuple(self.seqs)))

    def after_codegen(self, node: cst.CSTNode) -> None:
        self.stack.pop()
        self.starts.pop()
        self.seqs.pop()


def _parse(file: str, source: bytes) -> cst.Module:
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        line, cause = exc.raw_line, exc.message
    except (UnicodeDecodeError, LookupError, SyntaxError) as exc:
        line, cause = 1, str(exc)
    try:  # CPython's parser names the offending line more precisely than libcst's tokenizer does
        ast.parse(source, filename=file)
    except SyntaxError as exc:
        line, cause = exc.lineno or line, exc.msg
    except (ValueError, UnicodeDecodeError):
        pass
    raise SourceError(
        f"{file}:{line}: cannot parse this file ({cause}); megaquant changed nothing. "
        "Fix the file or check out a commit where it is valid Python."
    )


def _callee(node: cst.BaseExpression) -> str:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return f"{_callee(node.value)}.{node.attr.value}"
    if isinstance(node, cst.Call):
        return f"{_callee(node.func)}()"
    if isinstance(node, cst.Subscript):
        return f"{_callee(node.value)}[]"
    return "?"


class _Calls(cst.CSTVisitor):
    """Callees of the calls in a dispatch chain's branches (not in nested functions)."""

    def __init__(self) -> None:
        self.callees: list[str] = []

    def visit_Call(self, node: cst.Call) -> None:
        self.callees.append(_callee(node.func))

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return False

    def visit_Lambda(self, node: cst.Lambda) -> bool:
        return False


def _chain_callees(head: cst.If) -> tuple[str, ...]:
    visitor = _Calls()
    head.body.visit(visitor)
    if head.orelse is not None:
        head.orelse.visit(visitor)
    return tuple(dict.fromkeys(visitor.callees))


def _scope(stack: tuple[cst.CSTNode, ...]) -> tuple[int, str]:
    """(identity key, qualified name) of the innermost function/class enclosing the end of `stack`."""
    parts: list[str] = []
    key = 0
    in_function = False
    for node in stack[:-1]:
        if isinstance(node, cst.FunctionDef | cst.ClassDef | cst.Lambda):
            if in_function:
                parts.append("<locals>")
            parts.append(node.name.value if not isinstance(node, cst.Lambda) else "<lambda>")
            in_function = not isinstance(node, cst.ClassDef)
            key = id(node)
    return key, ".".join(parts) or "<module>"


def _path(stack: tuple[cst.CSTNode, ...]) -> tuple[Step, ...]:
    """The branches of compound statements (within the innermost scope) that lead to the end of `stack`."""
    steps: list[Step] = []
    for i, node in enumerate(stack[:-1]):
        child = stack[i + 1]
        if isinstance(node, cst.FunctionDef | cst.ClassDef | cst.Lambda):
            steps = []
        elif isinstance(node, cst.If):
            if child is node.body:
                steps.append((id(node), "body", True))
            elif child is node.orelse:
                steps.append((id(node), "orelse", True))
        elif isinstance(node, cst.For | cst.While):
            if child is node.body or child is node.orelse:
                steps.append((id(node), "body" if child is node.body else "orelse", False))
        elif isinstance(node, cst.Try | cst.TryStar):
            branch = "body" if child is node.body else "orelse" if child is node.orelse else "other"
            if child is node.finalbody:
                branch = "finally"
            steps.append((id(node), branch if branch != "other" else f"handler{id(child)}", False))
        elif isinstance(node, cst.Match):
            steps.append((id(node), f"case{id(child)}", True))
    return tuple(steps)


def _contains(outer: tuple[Step, ...], inner: tuple[Step, ...]) -> bool:
    """Whether the block at `outer` contains (or is) the block at `inner`."""
    return len(outer) <= len(inner) and inner[: len(outer)] == outer


def _exclusive(a: tuple[Step, ...], b: tuple[Step, ...]) -> bool:
    """Whether the two paths lie in different branches of one if/elif/else (or match)."""
    for step_a, step_b in zip(a, b, strict=False):
        if step_a != step_b:
            return step_a[0] == step_b[0] and step_a[2]
    return False


def _chain_head(stack: tuple[cst.CSTNode, ...]) -> int | None:
    """Index in `stack` of the if/elif chain whose test compares the variable, if the name is in one."""
    for i in range(len(stack) - 2, -1, -1):
        node = stack[i]
        if isinstance(node, cst.Call | cst.Lambda | cst.BaseSuite | cst.BaseSmallStatement):
            return None
        if isinstance(node, cst.If):
            if stack[i + 1] is not node.test or not any(isinstance(n, cst.Comparison) for n in stack[i:]):
                return None
            while i >= 1:  # an `elif` is an If in the `orelse` of the previous one
                previous = stack[i - 1]
                if not (isinstance(previous, cst.If) and stack[i] is previous.orelse):
                    break
                i -= 1
            return i
    return None


def _enclosing(
    stack: tuple[cst.CSTNode, ...], seqs: tuple[int, ...]
) -> tuple[tuple[int, int, tuple[Step, ...]], ...]:
    """For a closure: each enclosing function's (scope key, order and path of the nested def), inner first."""
    levels: list[tuple[int, int, tuple[Step, ...]]] = []
    defs = [
        i for i, node in enumerate(stack) if isinstance(node, cst.FunctionDef | cst.ClassDef | cst.Lambda)
    ]
    for inner, outer in zip(reversed(defs[1:]), reversed(defs[:-1]), strict=True):
        if isinstance(stack[inner], cst.ClassDef) or isinstance(stack[outer], cst.ClassDef):
            break
        levels.append((id(stack[outer]), seqs[inner], _path(stack[: inner + 1])))
    return tuple(levels)


def _anchor(stack: tuple[cst.CSTNode, ...]) -> cst.BaseStatement:
    for node in reversed(stack):
        if isinstance(node, cst.BaseStatement):
            return node
    raise AssertionError("every expression lies in a statement")


def _literal(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.SimpleString):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    return None


def analyse_file(file: str, source: bytes, spec: Spec) -> FileAnalysis:
    """Parse one file and relate its assignments to the GEMM uses they govern or reach."""
    module = _parse(file, source)
    walker = _Walker(module, spec.variable)
    module._codegen(walker)  # noqa: SLF001 - see _Walker
    assignments: list[Assignment] = []
    uses: list[Use] = []
    warnings: list[str] = []
    chains: set[int] = set()
    for stack, starts, seqs in walker.hits:
        name, parent = stack[-1], stack[-2]
        key, scope = _scope(stack)
        target = (isinstance(parent, cst.AssignTarget) and parent.target is name) or (
            isinstance(parent, cst.AnnAssign) and parent.target is name
        )
        if target:
            node = stack[-3] if isinstance(parent, cst.AssignTarget) else parent
            assert isinstance(node, cst.Assign | cst.AnnAssign)
            if node.value is None:
                continue  # a bare annotation binds nothing
            assignments.append(
                Assignment(
                    order=seqs[-1],
                    line=starts[-1],
                    scope_key=key,
                    scope=scope,
                    path=_path(stack),
                    node=node,
                    value=_literal(node.value),
                    expr=module.code_for_node(node.value),
                )
            )
            continue
        if isinstance(parent, cst.AugAssign | cst.NamedExpr | cst.Element | cst.For | cst.AsName):
            warnings.append(
                f"{file}:{starts[-1]}: {spec.variable} is bound or read by a {type(parent).__name__} in "
                f"{scope}; megaquant only tracks plain assignments, check this line by hand"
            )
            continue
        head = _chain_head(stack)
        if head is not None:
            chain = stack[head]
            assert isinstance(chain, cst.If)
            if id(chain) in chains:
                continue
            chains.add(id(chain))
            callees = tuple(c for c in _chain_callees(chain) if spec.is_gemm_call(c))
            if callees:
                uses.append(
                    Use(
                        order=seqs[head],
                        line=starts[head] + len(chain.leading_lines),
                        scope_key=key,
                        scope=scope,
                        path=_path(stack[: head + 1]),
                        enclosing=_enclosing(stack[:head], seqs),
                        anchor=chain,
                        call=", ".join(callees),
                        role=spec.role_of(file, scope, callees),
                    )
                )
            continue
        if isinstance(parent, cst.Arg) and parent.value is name and isinstance(stack[-3], cst.Call):
            call = stack[-3]
            assert isinstance(call, cst.Call)
            callee = _callee(call.func)
            inside_chain = any(isinstance(n, cst.If) and id(n) in chains for n in stack)
            if spec.is_gemm_call(callee) and not inside_chain:
                uses.append(
                    Use(
                        order=seqs[-3],
                        line=starts[-3],
                        scope_key=key,
                        scope=scope,
                        path=_path(stack[:-2]),
                        enclosing=_enclosing(stack[:-2], seqs),
                        anchor=_anchor(stack),
                        call=callee,
                        role=spec.role_of(file, scope, (callee,)),
                    )
                )
    analysis = FileAnalysis(file, module, assignments, uses, {}, {}, warnings=warnings)
    _relate(analysis)
    return analysis


def _relate(fa: FileAnalysis) -> None:
    """Governor of each use, uses each assignment reaches, and the `Site` records (DESIGN.md rules)."""
    by_scope: dict[int, list[int]] = {}
    for i, a in enumerate(fa.assignments):
        by_scope.setdefault(a.scope_key, []).append(i)
    for u, use in enumerate(fa.uses):
        before = [i for i in by_scope.get(use.scope_key, []) if fa.assignments[i].order < use.order]
        governing = [i for i in before if _contains(fa.assignments[i].path, use.path)]
        if not governing and not by_scope.get(use.scope_key):
            governing = _closure_governor(fa, by_scope, use)
        if governing:
            fa.governor[u] = governing[-1]
        else:
            fa.warnings.append(
                f"{fa.file}:{use.line}: the GEMM ({use.call}) in {use.scope} reads the variable but no "
                "assignment before it in that scope governs it; megaquant cannot set it"
            )
        for i in before:
            a = fa.assignments[i]
            killed = any(
                a.order < fa.assignments[j].order and _contains(fa.assignments[j].path, use.path)
                for j in before
            )
            if not killed and not _exclusive(a.path, use.path):
                fa.reaches.setdefault(i, []).append(u)
    for i, a in enumerate(fa.assignments):
        governs = [u for u, g in fa.governor.items() if g == i]
        reached = fa.reaches.get(i, [])
        override = not governs and bool(reached)
        if governs:
            roles_from = governs
        elif override:
            roles_from = reached
        else:  # a label follows the role of the next GEMM in its scope
            later = [
                u for u, use in enumerate(fa.uses) if use.scope_key == a.scope_key and use.order > a.order
            ]
            roles_from = later[:1]
        extra = [u for u in reached if u not in governs]
        if governs and extra:
            lines = ", ".join(str(fa.uses[u].line) for u in extra)
            fa.warnings.append(
                f"{fa.file}:{a.line}: the assignment in {a.scope} also reaches the GEMM(s) at line {lines} "
                "at run time, which another assignment governs; check this by hand"
            )
        fa.sites.append(
            Site(
                file=fa.file,
                scope=a.scope,
                line=a.line,
                value=a.value,
                expr=a.expr,
                conditional=bool(a.path),
                override=override,
                governs=tuple(GemmCall(fa.uses[u].line, fa.uses[u].call, fa.uses[u].role) for u in governs),
                roles=tuple(dict.fromkeys(r for u in roles_from if (r := fa.uses[u].role) is not None)),
            )
        )
        if override:
            fa.warnings.append(
                f"{fa.file}:{a.line}: run-time override in {a.scope} (`{a.expr}`) can replace the value at "
                "run time; megaquant shows it and never rewrites it"
            )


def _closure_governor(fa: FileAnalysis, by_scope: Mapping[int, list[int]], use: Use) -> list[int]:
    """A nested function without its own assignment reads the variable of an enclosing function."""
    for key, def_order, def_path in use.enclosing:
        candidates = [
            i
            for i in by_scope.get(key, [])
            if fa.assignments[i].order < def_order and _contains(fa.assignments[i].path, def_path)
        ]
        if candidates or by_scope.get(key):
            return candidates[-1:]
    return []


def _walk(root: Path) -> Iterator[Path]:
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            if not entry.name.startswith(".") and entry.name not in _SKIP_DIRS:
                yield from _walk(Path(entry.path))
        elif entry.name.endswith(".py") and entry.is_file(follow_symlinks=False):
            yield Path(entry.path)


def candidate_paths(root: Path, spec: Spec) -> list[str]:
    """Repo-relative posix paths of the Python files whose bytes mention the variable (sorted)."""
    needle = spec.variable.encode("ascii")
    found = [path.relative_to(root).as_posix() for path in _walk(Path(root)) if needle in path.read_bytes()]
    return sorted(found)


def scan_sources(sources: Mapping[str, bytes], spec: Spec) -> Scan:
    """Sites of all files in `sources` (path -> bytes), in file then source order; pure."""
    sites: list[Site] = []
    warnings: list[str] = []
    found_roles: set[str] = set()
    for file in sorted(sources):
        if spec.variable.encode("ascii") not in sources[file]:
            continue
        analysis = analyse_file(file, sources[file], spec)
        sites.extend(analysis.sites)
        warnings.extend(analysis.warnings)
        found_roles.update(u.role for u in analysis.uses if u.role is not None)
    for role in spec.roles():
        if role not in found_roles:
            places = "; ".join(f"{r.file} {r.scope}" for r in spec.rules if r.role == role)
            warnings.append(f"no GEMM of role {role} found (spec {spec.name} expects it in {places})")
    return Scan(tuple(sites), tuple(warnings))


def scan_tree(root: Path, spec: Spec) -> Scan:
    """Prefilter the tree, read the candidate files and scan them."""
    root = Path(root)
    return scan_sources({p: (root / p).read_bytes() for p in candidate_paths(root, spec)}, spec)
