"""`megaquant instrument`: a libcst codemod that hooks stock Megatron's GEMMs to `megaquant.ops`.

The pure core (`plan_instrument`) maps sources to new sources; `instrument_repo` writes and commits them.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import libcst as cst
import typer
from libcst.metadata import MetadataWrapper, PositionProvider

from megaquant import instrument_attention
from megaquant.errors import GitStateError, SourceError

__all__ = [
    "DEFAULT_BRANCH",
    "Edit",
    "Hook",
    "InstrumentError",
    "InstrumentPlan",
    "InstrumentResult",
    "InstrumentRules",
    "copy_installed",
    "instrument_repo",
    "load_rules",
    "plan_instrument",
    "register",
]

DEFAULT_BRANCH = "instrumented"
RULES_NAME = "megatron-core.instrument.toml"
SPEC_NAME = "megatron-core"  # rewrites/megatron-core.toml: the spec `status`/`set` use on instrumented trees


class InstrumentError(SourceError):
    """The tree does not have the shape the instrumentation rules expect (file, scope, expected call)."""


@dataclass(frozen=True, kw_only=True)
class Hook:
    """A GEMM statement `<target> = <call>` to route through `megaquant.ops.<op>`."""

    role: str
    file: str
    scope: str
    call: str
    op: str
    extra: str = ""
    lm_head_guard: bool = False


@dataclass(frozen=True, kw_only=True)
class Insert:
    """Statements added after the function-body statement that contains `after`."""

    file: str
    scope: str
    after: str
    code: str
    when: str = "always"  # "always" | "exclude_lm_head"


@dataclass(frozen=True, kw_only=True)
class Params:
    """Keyword parameters appended to a function signature."""

    file: str
    scope: str
    add: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class InstrumentRules:
    variable: str
    none_literal: str
    ops_import: str
    hooks: tuple[Hook, ...]
    inserts: tuple[Insert, ...] = ()
    params: tuple[Params, ...] = ()

    def files(self) -> tuple[str, ...]:
        seen = [h.file for h in self.hooks] + [i.file for i in self.inserts] + [p.file for p in self.params]
        return tuple(dict.fromkeys(seen))


@dataclass(frozen=True)
class Edit:
    """One change the codemod makes (or found already made: `applied=False`)."""

    file: str
    scope: str
    line: int
    kind: str  # "hook" | "insert" | "params" | "import"
    role: str | None
    detail: str
    applied: bool = True


@dataclass(frozen=True)
class InstrumentPlan:
    new_sources: dict[str, bytes]  # only files that change
    edits: tuple[Edit, ...]

    @property
    def changed(self) -> bool:
        return bool(self.new_sources)


@dataclass(frozen=True)
class InstrumentResult:
    repo: str
    branch: str
    commit: str | None  # None: the tree was already instrumented, nothing committed
    edits: tuple[Edit, ...] = field(default_factory=tuple)


def rules_path() -> Path:
    """`rewrites/megatron-core.instrument.toml` from the source tree, or the copy packaged with megaquant."""
    from megaquant.spec import rewrites_dirs

    dirs = rewrites_dirs()
    for candidate in (d / RULES_NAME for d in dirs):
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in dirs)
    raise InstrumentError(f"instrumentation rules {RULES_NAME} not found in {searched}; reinstall megaquant")


def load_rules(path: Path | None = None) -> InstrumentRules:
    raw = tomllib.loads((path or rules_path()).read_text(encoding="utf-8"))
    return InstrumentRules(
        variable=raw["variable"],
        none_literal=raw["none_literal"],
        ops_import=raw["ops_import"],
        hooks=tuple(Hook(**h) for h in raw.get("hook", [])),
        inserts=tuple(Insert(**i) for i in raw.get("insert", [])),
        params=tuple(
            Params(file=p["file"], scope=p["scope"], add=tuple(p["add"])) for p in raw.get("params", [])
        ),
    )


# ---------------------------------------------------------------- pure core


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def _dotted(expr: cst.BaseExpression) -> str | None:
    if isinstance(expr, cst.Name):
        return expr.value
    if isinstance(expr, cst.Attribute):
        head = _dotted(expr.value)
        return None if head is None else f"{head}.{expr.attr.value}"
    return None


def _call_key(call: cst.Call) -> str:
    """Whitespace- and comment-free text of a call: callee + argument values (comments live in commas)."""
    args = ",".join((f"{a.keyword.value}=" if a.keyword else "") + _squash(_code(a.value)) for a in call.args)
    return f"{_squash(_code(call.func))}({args})"


def _operands(call: cst.Call) -> tuple[list[cst.Arg], list[cst.Arg]]:
    """(positional operands incl. a method receiver, keyword args) of a stock GEMM call."""
    positional = [a for a in call.args if a.keyword is None]
    keywords = [a for a in call.args if a.keyword is not None]
    name = _dotted(call.func) or ""
    if isinstance(call.func, cst.Attribute) and not name.startswith("torch."):
        positional = [cst.Arg(value=call.func.value), *positional]  # x.matmul(y) -> op(x, y, ...)
    return positional, keywords


def _hooked_prefix(hook: Hook, stock: cst.Call, variable: str) -> str:
    positional, _ = _operands(stock)
    parts = [_squash(_code(a.value)) for a in positional] + [variable]
    return f"_mq_ops.{hook.op}(" + ",".join(parts)


def _hooked_call(hook: Hook, stock: cst.Call, variable: str) -> cst.Call:
    positional, keywords = _operands(stock)
    last = positional[-1]
    comma: cst.Comma | cst.MaybeSentinel = cst.MaybeSentinel.DEFAULT
    if isinstance(last.comma, cst.Comma):  # keep a multi-line layout, minus the operand's comment
        after = last.comma.whitespace_after
        if isinstance(after, cst.ParenthesizedWhitespace):
            first_line = after.first_line.with_changes(comment=None, whitespace=cst.SimpleWhitespace(""))
            after = after.with_changes(first_line=first_line)
        comma = last.comma.with_changes(whitespace_after=after)
    value_arg = cst.Arg(
        value=cst.Name(variable), comma=comma if keywords or hook.extra else cst.MaybeSentinel.DEFAULT
    )
    extra = (
        list(cst.ensure_type(cst.parse_expression(f"f({hook.extra})"), cst.Call).args) if hook.extra else []
    )
    args = [*positional, value_arg, *keywords, *extra]
    # the final argument keeps no trailing comma unless the stock call had one on its last argument
    final = args[-1]
    if isinstance(final.comma, cst.Comma) and not isinstance(stock.args[-1].comma, cst.Comma):
        args[-1] = final.with_changes(comma=cst.MaybeSentinel.DEFAULT)
    return stock.with_changes(func=cst.parse_expression(f"_mq_ops.{hook.op}"), args=args)


def _blocks(stmt: cst.CSTNode) -> list[cst.BaseSuite]:
    found: list[cst.BaseSuite] = []
    for name in ("body", "orelse", "finalbody"):
        child = getattr(stmt, name, None)
        if isinstance(child, cst.BaseSuite):
            found.append(child)
        elif isinstance(child, cst.CSTNode):  # Else / Finally / elif If
            found.extend(
                _blocks(child) if not isinstance(child, cst.If) else [child.body, *_blocks_of_orelse(child)]
            )
    for handler in getattr(stmt, "handlers", ()):
        found.append(handler.body)
    return found


def _blocks_of_orelse(stmt: cst.If) -> list[cst.BaseSuite]:
    return _blocks(stmt.orelse) if isinstance(stmt.orelse, cst.CSTNode) else []


def _walk(suite: cst.BaseSuite) -> list[tuple[cst.BaseStatement, cst.BaseStatement]]:
    """(statement, the function-body-level statement containing it) for every statement, depth first."""
    out: list[tuple[cst.BaseStatement, cst.BaseStatement]] = []

    def visit(block: cst.BaseSuite, top: cst.BaseStatement | None) -> None:
        body = block.body if isinstance(block, cst.IndentedBlock) else [block]
        for stmt in body:
            if not isinstance(stmt, cst.BaseStatement):
                continue
            owner = top or stmt
            out.append((stmt, owner))
            if isinstance(stmt, cst.BaseCompoundStatement):
                for inner in _blocks(stmt):
                    visit(inner, owner)

    visit(suite, None)
    return out


def _find_scope(module: cst.Module, scope: str) -> cst.FunctionDef | None:
    cls_name, _, func_name = scope.partition(".")
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value == cls_name:
            for item in stmt.body.body:
                if isinstance(item, cst.FunctionDef) and item.name.value == func_name:
                    return item
    return None


def _assign_call(stmt: cst.BaseStatement) -> tuple[cst.Assign, cst.Call] | None:
    if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1:
        small = stmt.body[0]
        if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call):
            return small, small.value
    return None


class _Splice(cst.CSTTransformer):
    """Replace statements (by identity) with sequences of statements; change functions' parameters."""

    def __init__(
        self,
        replace: Mapping[int, Sequence[cst.BaseStatement]],
        params: Mapping[int, cst.Parameters],
    ) -> None:
        self.replace = replace
        self.params = params

    def on_leave(  # type: ignore[override]
        self, original_node: cst.CSTNode, updated_node: cst.CSTNode
    ) -> cst.CSTNode | cst.FlattenSentinel[cst.BaseStatement]:
        if id(original_node) in self.replace:
            return cst.FlattenSentinel(list(self.replace[id(original_node)]))
        if isinstance(updated_node, cst.FunctionDef) and id(original_node) in self.params:
            return updated_node.with_changes(params=self.params[id(original_node)])
        return updated_node


def _statements(code: str) -> list[cst.BaseStatement]:
    return list(cst.parse_module(code.strip("\n") + "\n").body)


def _gemm_hint(func: cst.FunctionDef, positions: Mapping[cst.CSTNode, object]) -> str:
    calls = []
    for node in _all_calls(func):
        name = _dotted(node.func) or ""
        if re.search(r"(matmul|bmm|baddbmm|mm)$", name):
            pos = positions.get(node)
            line = getattr(getattr(pos, "start", None), "line", "?")
            calls.append(f"line {line}: {_code(node)[:80]}")
    return (
        "; GEMM-like calls found there: " + " | ".join(calls) if calls else "; no GEMM-like call found there"
    )


def _all_calls(node: cst.CSTNode) -> list[cst.Call]:
    found: list[cst.Call] = []

    class _V(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> None:
            found.append(call)

    node.visit(_V())
    return found


def _instrument_file(
    path: str, source: bytes, rules: InstrumentRules, include_lm_head: bool
) -> tuple[bytes | None, list[Edit]]:
    try:
        wrapper = MetadataWrapper(cst.parse_module(source), unsafe_skip_copy=True)
    except cst.ParserSyntaxError as exc:
        raise SourceError(f"{path}:{exc.raw_line}: cannot parse: {exc.message}") from exc
    module = wrapper.module
    positions = wrapper.resolve(PositionProvider)

    def line_of(node: cst.CSTNode) -> int:
        return positions[node].start.line

    var, none = rules.variable, rules.none_literal
    replace: dict[int, list[cst.BaseStatement]] = {}
    new_params: dict[int, cst.Parameters] = {}
    edits: list[Edit] = []
    after_extra: dict[int, list[cst.BaseStatement]] = {}  # statements appended after a top-level statement
    lm_mark = "megaquant_lm_head"
    has_lm_mark = lm_mark.encode() in source

    def scope_of(scope: str) -> cst.FunctionDef:
        func = _find_scope(module, scope)
        if func is None:
            raise InstrumentError(
                f"{path}: scope {scope} not found (expected class {scope.split('.')[0]} with method "
                f"{scope.split('.')[-1]}); this Megatron version does not match {RULES_NAME}"
            )
        return func

    hooks = [h for h in rules.hooks if h.file == path]
    for hook in hooks:
        func = scope_of(hook.scope)
        pattern = cst.ensure_type(cst.parse_expression(hook.call), cst.Call)
        key = _call_key(pattern)
        stock = [s for s, _ in _walk(func.body) if (ac := _assign_call(s)) and _call_key(ac[1]) == key]
        prefix = _hooked_prefix(hook, pattern, var)
        hooked = [c for c in _all_calls(func) if _call_key(c).startswith(prefix)]
        if hooked:
            if has_lm_mark == include_lm_head and hook.lm_head_guard:
                state = "excluded" if has_lm_mark else "included"
                raise InstrumentError(
                    f"{path}:{line_of(hooked[0])}: {hook.scope} is already instrumented with the LM head "
                    f"{state}; check out the stock sources and instrument again to change that"
                )
            edits.append(
                Edit(path, hook.scope, line_of(hooked[0]), "hook", hook.role, hook.call, applied=False)
            )
            continue
        if len(stock) != 1:
            what = "not found" if not stock else f"found {len(stock)} times (expected once)"
            raise InstrumentError(
                f"{path}: in {hook.scope}: expected the {hook.role} GEMM statement `<target> = {hook.call}`, "
                f"{what}{_gemm_hint(func, positions)}. Nothing was changed; this Megatron version needs a "
                f"rule update in rewrites/{RULES_NAME}"
            )
        stmt = cst.ensure_type(stock[0], cst.SimpleStatementLine)
        assign, call = _assign_call(stmt) or (None, None)
        assert assign is not None and call is not None
        site = cst.parse_statement(f"{var} = '{none}'\n").with_changes(leading_lines=stmt.leading_lines)
        plain = stmt.with_changes(leading_lines=())
        hooked_stmt = plain.with_changes(body=[assign.with_changes(value=_hooked_call(hook, call, var))])
        new: list[cst.BaseStatement] = [site]
        if hook.lm_head_guard and not include_lm_head:
            guard = cst.ensure_type(
                cst.parse_statement(
                    "if ctx.megaquant_lm_head:  # megaquant: the LM head stays unquantized\n"
                    "    pass\nelse:\n    pass\n"
                ),
                cst.If,
            )
            orelse = cst.ensure_type(guard.orelse, cst.Else)
            guard = guard.with_changes(
                body=guard.body.with_changes(body=[plain]),
                orelse=orelse.with_changes(body=orelse.body.with_changes(body=[hooked_stmt])),
            )
            new.append(guard)
        else:
            new.append(hooked_stmt)
        replace[id(stmt)] = new
        edits.append(Edit(path, hook.scope, line_of(stmt), "hook", hook.role, hook.call))

    for ins in (i for i in rules.inserts if i.file == path):
        if ins.when == "exclude_lm_head" and include_lm_head:
            continue
        func = scope_of(ins.scope)
        statements = _statements(ins.code)
        if _squash(ins.code) in _squash(_code(func)):
            edits.append(Edit(path, ins.scope, line_of(func), "insert", None, ins.after, applied=False))
            continue
        anchor = _squash(ins.after)
        owners = [
            top
            for s, top in _walk(func.body)
            if isinstance(s, cst.SimpleStatementLine)
            and _squash(_code(s.with_changes(leading_lines=()))).split("#")[0] == anchor
        ]
        if len(owners) != 1:
            raise InstrumentError(
                f"{path}: in {ins.scope}: expected one statement `{ins.after}` to insert after, found "
                f"{len(owners)}. Nothing was changed; this Megatron version needs a rule update in "
                f"rewrites/{RULES_NAME}"
            )
        after_extra.setdefault(id(owners[0]), []).extend(statements)
        edits.append(Edit(path, ins.scope, line_of(owners[0]), "insert", None, ins.after))

    for par in (p for p in rules.params if p.file == path):
        func = scope_of(par.scope)
        params = func.params
        names = {p.name.value for p in (*params.params, *params.kwonly_params)}
        added = [p for p in par.add if p.split(":")[0].split("=")[0].strip() not in names]
        if not added:
            edits.append(
                Edit(path, par.scope, line_of(func), "params", None, ", ".join(par.add), applied=False)
            )
            continue
        parsed = cst.ensure_type(
            cst.parse_statement(f"def f(*, {', '.join(added)}): pass\n"), cst.FunctionDef
        )
        extra = list(parsed.params.kwonly_params)
        if params.star_arg is cst.MaybeSentinel.DEFAULT and not params.kwonly_params:
            # appended after the last positional-or-keyword parameter, in the layout of the ones before it
            last = params.params[-1]
            between = params.params[-2].comma if len(params.params) > 1 else cst.MaybeSentinel.DEFAULT
            if not isinstance(between, cst.Comma):
                between = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
            moved = [p.with_changes(comma=between) for p in extra]
            moved[-1] = moved[-1].with_changes(comma=last.comma)
            kept = [*params.params[:-1], last.with_changes(comma=between)]
            new_params[id(func)] = params.with_changes(params=[*kept, *moved])
        else:
            new_params[id(func)] = params.with_changes(kwonly_params=[*params.kwonly_params, *extra])
        edits.append(Edit(path, par.scope, line_of(func), "params", None, ", ".join(added)))

    for owner_id, extra_stmts in after_extra.items():
        # an owner may itself be a hooked statement: append after its replacement
        base = replace.get(owner_id)
        owner = next(top for f in _scopes(module) for s, top in _walk(f.body) if id(top) == owner_id)
        replace[owner_id] = [*(base or [owner]), *extra_stmts]

    if (replace or new_params) and hooks and rules.ops_import not in source.decode("utf-8"):
        top_imports = [s for s in _leading_statements(module) if _is_import(s)]
        if not top_imports:
            raise InstrumentError(f"{path}: no top-level import to place `{rules.ops_import}` after")
        last_import = top_imports[-1]
        replace[id(last_import)] = [
            *replace.get(id(last_import), [last_import]),
            cst.parse_statement(rules.ops_import + "\n"),
        ]
        edits.append(Edit(path, "<module>", line_of(last_import), "import", None, rules.ops_import))

    if not replace and not new_params:
        return None, edits
    new_module = module.visit(_Splice(replace, new_params))
    new_source = new_module.bytes
    try:
        cst.parse_module(new_source)
    except cst.ParserSyntaxError as exc:  # a rule produced invalid code: a bug, never write it
        raise InstrumentError(
            f"{path}: instrumented source does not parse ({exc.message}); nothing written"
        ) from exc
    return new_source, edits


def _scopes(module: cst.Module) -> list[cst.FunctionDef]:
    return [
        f
        for c in module.body
        if isinstance(c, cst.ClassDef)
        for f in c.body.body
        if isinstance(f, cst.FunctionDef)
    ]


def _leading_statements(module: cst.Module) -> list[cst.BaseStatement]:
    out: list[cst.BaseStatement] = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef | cst.FunctionDef):
            break
        out.append(stmt)
    return out


def _is_import(stmt: cst.BaseStatement) -> bool:
    return isinstance(stmt, cst.SimpleStatementLine) and all(
        isinstance(s, cst.Import | cst.ImportFrom) for s in stmt.body
    )


def plan_instrument(
    sources: Mapping[str, bytes], rules: InstrumentRules, *, include_lm_head: bool = False
) -> InstrumentPlan:
    """Instrument `sources` (repo-relative posix path -> bytes) in memory; raise before anything partial.

    Every file named by the rules must be present. Re-running on instrumented sources changes nothing.
    """
    missing = [f for f in rules.files() if f not in sources]
    if missing:
        raise InstrumentError(
            f"{', '.join(missing)}: not found; expected a Megatron tree (a Megatron-LM checkout or a "
            "directory holding megatron/core); pass --repo DIR pointing at it, or use --from-installed DIR"
        )
    new_sources: dict[str, bytes] = {}
    edits: list[Edit] = []
    for path in rules.files():
        new, file_edits = _instrument_file(path, sources[path], rules, include_lm_head)
        edits.extend(file_edits)
        if new is not None and new != sources[path]:
            new_sources[path] = new
    return InstrumentPlan(new_sources=new_sources, edits=tuple(edits))


# ---------------------------------------------------------------- I/O edge


def copy_installed(dest: Path, *, source: Path | None = None) -> Path:
    """Copy the installed megatron-core package (`megatron/`) into `dest`, a new git repo with one commit."""
    import git

    from megaquant.megatron_src import installed_megatron

    root = source or installed_megatron()
    if root is None:
        raise InstrumentError(
            "megatron-core is not installed; `pip install 'megaquant[megatron]'` or pass --repo"
        )
    if dest.exists() and any(dest.iterdir()):
        raise GitStateError(f"{dest}: exists and is not empty; choose a new directory for --from-installed")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        root / "megatron", dest / "megatron", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    repo = git.Repo.init(dest, initial_branch="stock")
    with repo.config_writer() as cfg:
        if not repo.config_reader().has_option("user", "email"):
            cfg.set_value("user", "email", "megaquant@localhost")
            cfg.set_value("user", "name", "megaquant")
    repo.git.add("--all", "--", "megatron")
    version = _installed_version()
    repo.index.commit(f"stock megatron-core {version} (copied by megaquant instrument --from-installed)")
    return dest


def _installed_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def instrument_repo(
    repo_dir: Path,
    *,
    include_lm_head: bool = False,
    branch: str = DEFAULT_BRANCH,
    rules: InstrumentRules | None = None,
) -> InstrumentResult:
    """Instrument the Megatron tree in git repo `repo_dir` and commit the result on `branch`.

    The branch is created from HEAD (or reused when it is checked out). Files to change must have no
    uncommitted edits. An already instrumented tree gives `commit=None` and touches nothing.
    """
    import git

    rules = rules or load_rules()
    try:
        repo = git.Repo(repo_dir)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        raise GitStateError(
            f"{repo_dir}: not a git repository; `git init` it or use --from-installed DIR"
        ) from exc
    root = Path(repo.working_tree_dir or repo_dir)
    sources = {f: (root / f).read_bytes() for f in rules.files() if (root / f).is_file()}
    plan = plan_instrument(sources, rules, include_lm_head=include_lm_head)
    plan = instrument_attention.with_fused_attention(plan, sources, rules_path())
    current = None if repo.head.is_detached else repo.active_branch.name
    if not plan.changed:
        return InstrumentResult(str(root), current or repo.head.commit.hexsha, None, plan.edits)
    dirty = [f for f in plan.new_sources if repo.is_dirty(path=f) or f in repo.untracked_files]
    if dirty:
        raise GitStateError(
            f"{', '.join(dirty)}: uncommitted changes; commit or discard them, then run again"
        )
    if current != branch:
        if branch in repo.heads:
            raise GitStateError(
                f"branch {branch!r} already exists; check it out (`git checkout {branch}`) "
                "or pass --branch NAME"
            )
        repo.create_head(branch).checkout()
    for rel, data in plan.new_sources.items():
        target = root / rel
        tmp = target.with_name(target.name + ".megaquant-tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    repo.index.add(list(plan.new_sources))
    roles = sorted({e.role for e in plan.edits if e.role})
    message = (
        "megaquant instrument: hook GEMMs to megaquant.ops\n\n"
        f"Megaquant-Instrument-Roles: {', '.join(roles)}\n"
        f"Megaquant-Instrument-LM-Head: {'included' if include_lm_head else 'excluded'}\n"
    )
    commit = repo.index.commit(message)
    with repo.config_writer() as cfg:  # names the spec that finds these sites (a hint for `status`/`set`)
        cfg.set_value("megaquant", "spec", SPEC_NAME)
    return InstrumentResult(str(root), branch, commit.hexsha, plan.edits)


# ---------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    @app.command("instrument")
    def instrument_command(
        repo: Annotated[
            Path | None, typer.Option(help="A git checkout holding megatron/core (e.g. Megatron-LM).")
        ] = None,
        from_installed: Annotated[
            Path | None,
            typer.Option("--from-installed", help="Copy the installed megatron-core into this new git repo."),
        ] = None,
        include_lm_head: Annotated[bool, typer.Option(help="Quantize the GPT output layer too.")] = False,
        branch: Annotated[
            str, typer.Option(help="Branch that receives the instrumentation commit.")
        ] = DEFAULT_BRANCH,
    ) -> None:
        """Hook stock Megatron's linear and attention GEMMs to megaquant.ops (custom_quant_type sites)."""
        if (repo is None) == (from_installed is None):
            raise typer.BadParameter("give exactly one of --repo DIR or --from-installed DIR")
        target = copy_installed(from_installed) if from_installed is not None else repo
        assert target is not None
        result = instrument_repo(target, include_lm_head=include_lm_head, branch=branch)
        for edit in result.edits:
            state = "added" if edit.applied else "present"
            typer.echo(
                f"{state:8} {edit.file}:{edit.line} {edit.scope} {edit.kind} {edit.role or ''}".rstrip()
            )
        if result.commit:
            typer.echo(f"committed {result.commit[:12]} on branch {result.branch} in {result.repo}")
        else:
            typer.echo(f"already instrumented: nothing to do in {result.repo}")
