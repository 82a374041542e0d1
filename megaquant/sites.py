"""Find every assignment to the quantization variable by scope, and the GEMMs each one governs.

A bytes prefilter picks the few files that mention the variable; only those are parsed, with CPython's
`ast` (positions, no metadata, ~10x faster than libcst, which only `codemod` loads to rewrite).
"""

from __future__ import annotations

import ast
import bisect
import io
import os
import tokenize
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from megaquant.errors import UnparsableError
from megaquant.spec import Spec

__all__ = [
    "FileAnalysis",
    "GemmCall",
    "Scan",
    "Site",
    "analyse_file",
    "candidate_paths",
    "governed_roles",
    "unparsable_warning",
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
    roles: tuple[str, ...] = ()  # the roles with at least one GEMM that an assignment governs


# A step into a branch of a compound statement: (id of the statement, branch name, branches exclusive?).
Step = tuple[int, str, bool]
# One ancestor on the way down the tree: (node, field of its parent it sits in, visiting order).
Frame = tuple[ast.AST, str, int]
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


@dataclass(eq=False)
class Assignment:
    """Engine-internal record of one assignment (the n-th one in source order)."""

    order: int
    line: int
    scope_key: int
    scope: str
    path: tuple[Step, ...]
    value: str | None
    expr: str


@dataclass(eq=False)
class Use:
    """Engine-internal record of one GEMM use; a sibling goes before the statement at `anchor_line`."""

    order: int
    line: int
    scope_key: int
    scope: str
    path: tuple[Step, ...]
    enclosing: tuple[
        tuple[int, int, tuple[Step, ...]], ...
    ]  # outer function scopes (key, def order, def path)
    anchor_line: int
    call: str
    role: str | None


@dataclass(eq=False)
class FileAnalysis:
    """Everything the engine knows about one file; `sites[i]` describes `assignments[i]`."""

    file: str
    assignments: list[Assignment]
    uses: list[Use]
    governor: dict[int, int]  # use index -> assignment index
    reaches: dict[int, list[int]]  # assignment index -> use indices its value can reach
    sites: list[Site] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _line_at(source: bytes, offset: int) -> int:
    return source.count(b"\n", 0, max(offset, 0)) + 1


def _parse(file: str, source: bytes) -> tuple[ast.Module, str]:
    """The tree and the decoded text of a file (PEP 263 coding cookie honoured)."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
        text = source.decode(encoding)
        return ast.parse(source, filename=file), text
    except SyntaxError as exc:
        line, cause = exc.lineno or _line_at(source, source.find(b"\0")), exc.msg
    except UnicodeDecodeError as exc:
        line, cause = _line_at(source, exc.start), str(exc)
    except (LookupError, ValueError) as exc:
        line, cause = _line_at(source, source.find(b"\0")), str(exc)
    except RecursionError:
        line, cause = 1, "nested too deeply"
    raise UnparsableError(
        f"{file}:{line}: cannot parse this file ({cause}); megaquant changed nothing. "
        "Fix the file or check out a commit where it is valid Python.",
        file=file,
        line=line,
        cause=cause,
    )


def _callee(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_callee(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{_callee(node.func)}()"
    if isinstance(node, ast.Subscript):
        return f"{_callee(node.value)}[]"
    return "?"


def _calls(nodes: list[ast.stmt]) -> list[str]:
    """Callees of the calls in `nodes`, in source order, not looking into nested functions."""
    found: list[tuple[int, int, str]] = []
    todo: list[ast.AST] = list(nodes)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Call):
            found.append((node.lineno, node.col_offset, _callee(node.func)))
        todo.extend(c for c in ast.iter_child_nodes(node) if not isinstance(c, _SCOPES))
    return [callee for _, _, callee in sorted(found)]


def _chain_callees(head: ast.If) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_calls([*head.body, *head.orelse])))


def _targets(statement: ast.AST) -> list[str]:
    """The names (or dotted attributes) an assignment statement binds; [] for any other statement."""
    if isinstance(statement, ast.Assign):
        return [_callee(t) for t in statement.targets]
    if isinstance(statement, ast.AnnAssign | ast.AugAssign):
        return [_callee(statement.target)]
    return []


def _results(nodes: list[ast.stmt], spec: Spec) -> tuple[str, ...]:
    """What the GEMM calls in `nodes` are assigned to (`grad_weight` in `grad_weight = x.matmul(y)`)."""
    found: list[str] = []
    todo: list[ast.AST] = list(nodes)
    while todo:
        node = todo.pop()
        if _targets(node) and any(
            isinstance(c, ast.Call) and spec.is_gemm_call(_callee(c.func)) for c in ast.walk(node)
        ):
            found.extend(_targets(node))
        todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt))
    return tuple(dict.fromkeys(sorted(found)))


def _scope(stack: list[Frame]) -> tuple[int, str]:
    """(identity key, qualified name) of the innermost function/class enclosing the end of `stack`."""
    parts: list[str] = []
    key = 0
    in_function = False
    for node, _, _ in stack[:-1]:
        if isinstance(node, _SCOPES):
            if in_function:
                parts.append("<locals>")
            parts.append("<lambda>" if isinstance(node, ast.Lambda) else node.name)
            in_function = not isinstance(node, ast.ClassDef)
            key = id(node)
    return key, ".".join(parts) or "<module>"


def _path(stack: list[Frame]) -> tuple[Step, ...]:
    """The branches of compound statements (within the innermost scope) that lead to the end of `stack`."""
    steps: list[Step] = []
    for (node, _, _), (child, where, _) in zip(stack, stack[1:], strict=False):
        if isinstance(node, _SCOPES):
            steps = []
        elif isinstance(node, ast.If) and where in ("body", "orelse"):
            steps.append((id(node), where, True))
        elif isinstance(node, ast.For | ast.AsyncFor | ast.While) and where in ("body", "orelse"):
            steps.append((id(node), where, False))
        elif isinstance(node, ast.Try | ast.TryStar) and where in ("body", "orelse", "finalbody", "handlers"):
            steps.append((id(node), f"handler{id(child)}" if where == "handlers" else where, False))
        elif isinstance(node, ast.Match) and where == "cases":
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


def _chain_head(stack: list[Frame]) -> int | None:
    """Index in `stack` of the if/elif chain whose test compares the variable, if the name is in one."""
    compared = False
    for i in range(len(stack) - 2, -1, -1):
        node = stack[i][0]
        compared = compared or isinstance(node, ast.Compare)
        if isinstance(node, ast.Call | ast.Lambda | ast.comprehension | ast.stmt) and not isinstance(
            node, ast.If
        ):
            return None
        if isinstance(node, ast.If):
            if stack[i + 1][1] != "test" or not compared:
                return None
            while i >= 1:  # an `elif` is an If alone in the `orelse` of the previous one, at its column
                previous = stack[i - 1][0]
                if not (
                    isinstance(previous, ast.If)
                    and stack[i][1] == "orelse"
                    and previous.orelse == [node]
                    and node.col_offset == previous.col_offset
                ):
                    break
                i -= 1
                node = previous
            return i
    return None


def _enclosing(stack: list[Frame]) -> tuple[tuple[int, int, tuple[Step, ...]], ...]:
    """For a closure: each enclosing function's (scope key, order and path of the nested def), inner first."""
    levels: list[tuple[int, int, tuple[Step, ...]]] = []
    defs = [i for i, (node, _, _) in enumerate(stack) if isinstance(node, _SCOPES)]
    for inner, outer in zip(reversed(defs[1:]), reversed(defs[:-1]), strict=True):
        if isinstance(stack[inner][0], ast.ClassDef) or isinstance(stack[outer][0], ast.ClassDef):
            break
        levels.append((id(stack[outer][0]), stack[inner][2], _path(stack[: inner + 1])))
    return tuple(levels)


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class _Walker:
    """Visits, in source order, only the nodes whose lines mention the variable, noting each occurrence."""

    def __init__(self, variable: str, lines: list[int] | None) -> None:
        self.variable = variable
        self.lines = lines  # sorted lines holding the name; None: visit everything
        self.stack: list[Frame] = []
        self.order = 0
        self.hits: list[list[Frame]] = []

    def _relevant(self, node: ast.AST) -> bool:
        start = getattr(node, "lineno", None)
        if self.lines is None or start is None:
            return True
        end = getattr(node, "end_lineno", None) or start
        i = bisect.bisect_left(self.lines, start)
        return i < len(self.lines) and self.lines[i] <= end

    def visit(self, node: ast.AST, where: str) -> None:
        self.order += 1
        self.stack.append((node, where, self.order))
        if isinstance(node, ast.Name) and node.id == self.variable:
            self.hits.append(list(self.stack))
        for name, value in ast.iter_fields(node):
            if isinstance(value, list):
                for item in value:
                    if isinstance(item, ast.AST) and self._relevant(item):
                        self.visit(item, name)
            elif isinstance(value, ast.AST) and self._relevant(value):
                self.visit(value, name)
        self.stack.pop()


def _name_lines(source: bytes, variable: str) -> list[int] | None:
    """Lines whose bytes contain the variable's name (None when line ends other than LF/CRLF occur)."""
    if source.count(b"\r") != source.count(b"\r\n"):
        return None
    needle = variable.encode("ascii")
    lines: list[int] = []
    at = source.find(needle)
    while at >= 0:
        lines.append(source.count(b"\n", 0, at) + 1)
        at = source.find(needle, at + 1)
    return sorted(set(lines))


def _segment(text: str, node: ast.expr) -> str:
    return (ast.get_source_segment(text, node) or "").replace("\r\n", "\n")


def analyse_file(file: str, source: bytes, spec: Spec) -> FileAnalysis:
    """Parse one file and relate its assignments to the GEMM uses they govern or reach."""
    tree, text = _parse(file, source)
    walker = _Walker(spec.variable, _name_lines(source, spec.variable))
    try:
        walker.visit(tree, "")
    except RecursionError as exc:
        raise UnparsableError(
            f"{file}:1: nested too deeply to analyse; megaquant changed nothing",
            file=file,
            line=1,
            cause="nested too deeply to analyse",
        ) from exc
    assignments: list[Assignment] = []
    uses: list[Use] = []
    warnings: list[str] = []
    chains: set[int] = set()
    for stack in walker.hits:
        name, (parent, _, _), where = stack[-1][0], stack[-2], stack[-1][1]
        key, scope = _scope(stack)
        line = getattr(name, "lineno", 0)
        if (isinstance(parent, ast.Assign) and where == "targets") or (
            isinstance(parent, ast.AnnAssign) and where == "target"
        ):
            assert isinstance(parent, ast.Assign | ast.AnnAssign)
            if parent.value is None:
                continue  # a bare annotation binds nothing
            assignments.append(
                Assignment(
                    order=stack[-1][2],
                    line=line,
                    scope_key=key,
                    scope=scope,
                    path=_path(stack),
                    value=_literal(parent.value),
                    expr=_segment(text, parent.value),
                )
            )
            continue
        if isinstance(getattr(name, "ctx", None), ast.Store | ast.Del) or isinstance(parent, ast.alias):
            warnings.append(
                f"{file}:{line}: {spec.variable} is bound by a {type(parent).__name__} in {scope}; "
                "megaquant only tracks plain assignments, check this line by hand"
            )
            continue
        head = _chain_head(stack)
        if head is not None:
            chain = stack[head][0]
            assert isinstance(chain, ast.If)
            if id(chain) in chains:
                continue
            chains.add(id(chain))
            callees = tuple(c for c in _chain_callees(chain) if spec.is_gemm_call(c))
            if callees:
                uses.append(
                    Use(
                        order=stack[head][2],
                        line=chain.lineno,
                        scope_key=key,
                        scope=scope,
                        path=_path(stack[: head + 1]),
                        enclosing=_enclosing(stack[:head]),
                        anchor_line=chain.lineno,
                        call=", ".join(callees),
                        role=spec.role_of(file, scope, callees, _results([chain], spec)),
                    )
                )
            continue
        call_at = (
            len(stack) - 2 if where == "args" else len(stack) - 3 if isinstance(parent, ast.keyword) else -1
        )
        call = stack[call_at][0] if call_at >= 0 else None
        if isinstance(call, ast.Call) and not any(id(node) in chains for node, _, _ in stack):
            callee = _callee(call.func)
            if spec.is_gemm_call(callee):
                anchor = next(node for node, _, _ in reversed(stack) if isinstance(node, ast.stmt))
                uses.append(
                    Use(
                        order=stack[call_at][2],
                        line=call.lineno,
                        scope_key=key,
                        scope=scope,
                        path=_path(stack[: call_at + 1]),
                        enclosing=_enclosing(stack[:call_at]),
                        anchor_line=anchor.lineno,
                        call=callee,
                        role=spec.role_of(file, scope, (callee,), tuple(_targets(anchor))),
                    )
                )
    analysis = FileAnalysis(file, assignments, uses, {}, {}, warnings=warnings)
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
            nested_checkout = os.path.lexists(os.path.join(entry.path, ".git"))  # a worktree or another repo
            if not entry.name.startswith(".") and entry.name not in _SKIP_DIRS and not nested_checkout:
                yield from _walk(Path(entry.path))
        elif entry.name.endswith(".py") and entry.is_file(follow_symlinks=False):
            yield Path(entry.path)


def candidate_paths(root: Path, spec: Spec) -> list[str]:
    """Repo-relative posix paths of the Python files whose bytes mention the variable (sorted).

    Skipped: hidden folders, caches, installed packages, and nested checkouts (a folder with its own
    `.git`, e.g. a `megaquant set --worktree` inside the repo), which are other trees.
    """
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
        try:
            analysis = analyse_file(file, sources[file], spec)
        except UnparsableError as exc:  # list what can be listed; `set` refuses only files it must change
            warnings.append(unparsable_warning(exc, spec))
            continue
        sites.extend(analysis.sites)
        warnings.extend(analysis.warnings)
        found_roles.update(governed_roles(analysis))
    for role in spec.required():
        if role not in found_roles:
            warnings.append(
                f"no GEMM of role {role} found (spec {spec.name} expects it in {spec.expected(role)})"
            )
    return Scan(tuple(sites), tuple(warnings), tuple(r for r in spec.roles() if r in found_roles))


def unparsable_warning(exc: UnparsableError, spec: Spec) -> str:
    """The warning for a file that mentions the variable but does not parse (its sites are unknown)."""
    roles = spec.roles_in(exc.file)
    consequence = (
        f"; `set` of {', '.join(roles)} is refused until it parses" if roles else "; `set` leaves it alone"
    )
    return (
        f"{exc.file}:{exc.line}: cannot parse this file ({exc.cause}): its {spec.variable} sites, if "
        f"any, are not listed{consequence}"
    )


def governed_roles(analysis: FileAnalysis) -> set[str]:
    """The roles of the file's GEMMs that an assignment governs (the ones `set` can change)."""
    return {role for u in analysis.governor if (role := analysis.uses[u].role) is not None}


def scan_tree(root: Path, spec: Spec) -> Scan:
    """Prefilter the tree, read the candidate files and scan them."""
    root = Path(root)
    return scan_sources({p: (root / p).read_bytes() for p in candidate_paths(root, spec)}, spec)
