"""The hook transform, pure: one file's bytes and the rules in, new bytes and the edits out.

Each hooked GEMM gets `custom_quant_type = 'none'` before the statement that holds it in its scope and
becomes `_mq_ops.<op>(operands..., custom_quant_type, ...)`. A GEMM inside a module-level helper is hooked
in the helper, which gains a keyword parameter (default: the none literal, so its other callers run the
stock GEMM); only the scope's call passes the variable. Every other GEMM-like call in a hooked scope must be
named by an `[[unhooked]]` rule, so nothing is left unquantized silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from megaquant.errors import SourceError
from megaquant.instrument.gemms import (
    LM_HEAD_TEST,
    CallSite,
    ModuleIndex,
    call_sites,
    code,
    operands,
    parse_pattern,
    squash,
    statements,
)
from megaquant.instrument.rules import RULES_NAME, Hook, InstrumentError, InstrumentRules, Unhooked

__all__ = ["Edit", "FileResult", "instrument_source"]

_RULE_HINT = f"Nothing was changed; this Megatron version needs a rule update in rewrites/{RULES_NAME}"


@dataclass(frozen=True)
class Edit:
    """One change the codemod makes (or found already made: `applied=False`).

    kind: "hook" | "helper" (a hooked GEMM inside a helper) | "insert" | "params" | "import" |
    "unhooked" (a GEMM left alone on purpose; `detail` says why) | "lm_head" (a model whose output layer
    is marked as the LM head).
    """

    file: str
    scope: str
    line: int
    kind: str
    role: str | None
    detail: str
    applied: bool = True


@dataclass(frozen=True)
class FileResult:
    new_source: bytes | None  # None: nothing to change
    edits: tuple[Edit, ...]


@dataclass(frozen=True)
class _Found:
    hook: Hook
    site: CallSite
    hooked: bool


class _Splice(cst.CSTTransformer):
    """Replace statements (by identity) with sequences of statements; change functions' parameters."""

    def __init__(
        self, replace: Mapping[int, Sequence[cst.BaseStatement]], params: Mapping[int, cst.Parameters]
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


def _statements(text: str) -> list[cst.BaseStatement]:
    return list(cst.parse_module(text.strip("\n") + "\n").body)


def _hooked_call(hook: Hook, stock: cst.Call, variable: str) -> cst.Call:
    """`<op>(operands..., variable, keywords..., extra)` in the stock call's layout."""
    positional_values, keywords = operands(stock)
    positional = [a for a in stock.args if a.keyword is None]
    if len(positional_values) > len(positional):  # a method receiver became the first operand
        positional = [cst.Arg(value=positional_values[0]), *positional]
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
    final = args[-1]  # no trailing comma unless the stock call had one on its last argument
    if isinstance(final.comma, cst.Comma) and not isinstance(stock.args[-1].comma, cst.Comma):
        args[-1] = final.with_changes(comma=cst.MaybeSentinel.DEFAULT)
    return stock.with_changes(func=cst.parse_expression(hook.op), args=args)


def _passing(call: cst.Call, keyword: str, variable: str) -> cst.Call:
    """A helper call that also passes `keyword=variable`."""
    args = list(call.args)
    if args and not isinstance(args[-1].comma, cst.Comma):
        args[-1] = args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
    args.append(
        cst.Arg(
            keyword=cst.Name(keyword),
            value=cst.Name(variable),
            equal=cst.AssignEqual(
                whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace("")
            ),
        )
    )
    return call.with_changes(args=args)


def _add_params(params: cst.Parameters, add: Sequence[str]) -> cst.Parameters:
    """`params` with parameters appended: after the last positional one (its layout), else keyword-only."""
    extra = list(
        cst.ensure_type(
            cst.parse_statement(f"def f(*, {', '.join(add)}): pass\n"), cst.FunctionDef
        ).params.kwonly_params
    )
    if params.star_arg is not cst.MaybeSentinel.DEFAULT or params.kwonly_params or not params.params:
        return params.with_changes(kwonly_params=[*params.kwonly_params, *extra])
    last = params.params[-1]
    between = params.params[-2].comma if len(params.params) > 1 else cst.MaybeSentinel.DEFAULT
    if not isinstance(between, cst.Comma):
        between = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    moved = [p.with_changes(comma=between) for p in extra]
    moved[-1] = moved[-1].with_changes(comma=last.comma)
    return params.with_changes(params=[*params.params[:-1], last.with_changes(comma=between), *moved])


def _param_names(params: cst.Parameters) -> set[str]:
    return {p.name.value for p in (*params.posonly_params, *params.params, *params.kwonly_params)}


def _is_docstring(stmt: cst.BaseStatement) -> bool:
    return (
        isinstance(stmt, cst.SimpleStatementLine)
        and len(stmt.body) == 1
        and isinstance(stmt.body[0], cst.Expr)
        and isinstance(stmt.body[0].value, cst.SimpleString | cst.ConcatenatedString)
    )


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


class _FileTransform:
    """The state of instrumenting one file: what it replaces, and the edits it reports."""

    def __init__(self, path: str, source: bytes, rules: InstrumentRules, include_lm_head: bool) -> None:
        try:
            wrapper = MetadataWrapper(cst.parse_module(source), unsafe_skip_copy=True)
        except cst.ParserSyntaxError as exc:
            raise SourceError(f"{path}:{exc.raw_line}: cannot parse: {exc.message}") from exc
        self.path, self.source, self.rules, self.include_lm_head = path, source, rules, include_lm_head
        self.module = wrapper.module
        self.positions = wrapper.resolve(PositionProvider)
        self.index = ModuleIndex.of(self.module)
        self.replace: dict[int, list[cst.BaseStatement]] = {}
        self.new_params: dict[int, cst.Parameters] = {}
        self.after: dict[int, list[cst.BaseStatement]] = {}
        self.edits: list[Edit] = []
        self.unhooked = [u for u in rules.unhooked if u.file == path]
        self.opaque = tuple(u.call for u in self.unhooked if u.call)

    def line(self, node: cst.CSTNode) -> int:
        return self.positions[node].start.line

    def scope(self, name: str) -> cst.FunctionDef:
        func = self.index.scope(name)
        if func is None:
            cls, _, method = name.rpartition(".")
            expected = f"class {cls} with method {method}" if cls else f"module-level function {name}"
            raise InstrumentError(
                f"{self.path}: scope {name} not found (expected {expected}); this Megatron version does "
                f"not match {RULES_NAME}"
            )
        return func

    # ------------------------------------------------------------ locating

    def _describe(self, site: CallSite) -> str:
        text = f"line {self.line(site.call)}: {code(site.call)[:80]}"
        if site.via is not None:
            return f"line {self.line(site.via)}: {code(site.via)[:60]} -> helper {site.written_in}, {text}"
        return text

    def _hint(self, sites: list[CallSite]) -> str:
        gemms = [self._describe(s) for s in sites if s.kind is not None]
        return (
            "; GEMM-like calls found there: " + " | ".join(gemms)
            if gemms
            else "; no GEMM-like call found there"
        )

    def locate(self, hook: Hook) -> _Found:
        func = self.scope(hook.scope)
        pattern = parse_pattern(hook.gemm, f"{RULES_NAME}: hook {hook.role} in {hook.scope}")
        sites = call_sites(func, hook.scope, self.index, opaque=self.opaque)
        found: list[_Found] = []
        for site in sites:
            variables = (self.rules.variable, self.rules.helper_parameter)
            if pattern.matches_hooked(site.call, hook.op, variables, site.env):
                found.append(_Found(hook, site, hooked=True))
            elif pattern.matches(site.call, site.env):
                found.append(_Found(hook, site, hooked=False))
        if len(found) != 1:
            what = "not found" if not found else f"found {len(found)} times (expected once)"
            raise InstrumentError(
                f"{self.path}: in {hook.scope}: expected the {hook.role} GEMM `{hook.gemm}` (in the scope or "
                f"a module-level helper it calls), {what}{self._hint(sites)}. {_RULE_HINT}"
            )
        return found[0]

    def _unhooked_rule(self, site: CallSite) -> Unhooked | None:
        for rule in self.unhooked:
            if not fnmatchcase(site.written_in, rule.scope):
                continue
            if rule.call and fnmatchcase(site.callee, rule.call):
                return rule
            if rule.gemm and parse_pattern(rule.gemm, f"{RULES_NAME}: unhooked in {rule.scope}").matches(
                site.call, {}
            ):
                return rule
        return None

    def check_accounted(self, scope: str, hooked: list[_Found]) -> None:
        """Every GEMM-like call reached from a hooked scope is hooked or named by an `[[unhooked]]` rule."""
        taken = {id(f.site.call) for f in hooked}
        unknown: list[CallSite] = []
        for site in call_sites(self.scope(scope), scope, self.index, opaque=self.opaque):
            if site.kind is None or id(site.call) in taken:
                continue
            rule = self._unhooked_rule(site)
            if rule is None:
                unknown.append(site)
                continue
            detail = f"{' '.join(code(site.call).split())[:70]}: {rule.reason}"
            where = site.via if site.via is not None else site.call
            if not any(e.kind == "unhooked" and e.line == self.line(where) for e in self.edits):
                self.edits.append(
                    Edit(self.path, site.written_in, self.line(where), "unhooked", None, detail, False)
                )
        if unknown:
            listed = " | ".join(self._describe(s) for s in unknown)
            raise InstrumentError(
                f"{self.path}: in {scope}: GEMM-like calls that no rule hooks or names: {listed}. Each would "
                f"run unquantized; add a [[hook]] or an [[unhooked]] rule for it. {_RULE_HINT}"
            )

    # ------------------------------------------------------------ editing

    def _guarded(self, stock: cst.SimpleStatementLine, hooked: cst.SimpleStatementLine) -> cst.If:
        guard = cst.ensure_type(
            cst.parse_statement(
                f"if {LM_HEAD_TEST}:  # megaquant: the LM head stays unquantized\n    pass\nelse:\n    pass\n"
            ),
            cst.If,
        )
        orelse = cst.ensure_type(guard.orelse, cst.Else)
        return guard.with_changes(
            body=guard.body.with_changes(body=[stock]),
            orelse=orelse.with_changes(body=orelse.body.with_changes(body=[hooked])),
        )

    def _claim(self, stmt: cst.BaseStatement, new: list[cst.BaseStatement]) -> None:
        if id(stmt) in self.replace:
            raise InstrumentError(
                f"{self.path}:{self.line(stmt)}: two hooks rewrite the same statement; {_RULE_HINT}"
            )
        self.replace[id(stmt)] = new

    def hook(self, found: _Found) -> None:
        hook, site, var = found.hook, found.site, self.rules.variable
        if found.hooked:
            excluded = LM_HEAD_TEST.encode() in self.source  # the guards are there
            if hook.lm_head_guard and excluded == self.include_lm_head:
                state = "excluded" if excluded else "included"
                raise InstrumentError(
                    f"{self.path}:{self.line(site.call)}: {hook.scope} is already instrumented with the LM "
                    f"head {state}; check out the stock sources and instrument again to change that"
                )
            self.edits.append(
                Edit(
                    self.path,
                    hook.scope,
                    self.line(site.via or site.call),
                    "hook",
                    hook.role,
                    hook.gemm,
                    False,
                )
            )
            return
        if site.helper is not None and site.via is not None and site.via_stmt is not None:
            helper, param = site.helper, self.rules.helper_parameter
            hooked_inner = site.stmt.deep_replace(site.call, _hooked_call(hook, site.call, param))
            self._claim(site.stmt, [cst.ensure_type(hooked_inner, cst.SimpleStatementLine)])
            if param not in _param_names(helper.params) and id(helper) not in self.new_params:
                self.new_params[id(helper)] = _add_params(
                    helper.params, [f"{param}: str = '{self.rules.none_literal}'"]
                )
            self.edits.append(
                Edit(self.path, site.written_in, self.line(site.call), "helper", hook.role, hook.gemm)
            )
            stmt, stock_call, new_call = site.via_stmt, site.via, _passing(site.via, param, var)
        else:
            stmt, stock_call, new_call = site.stmt, site.call, _hooked_call(hook, site.call, var)
        if len(stmt.body) != 1:
            raise InstrumentError(
                f"{self.path}:{self.line(stmt)}: the GEMM shares its line with other statements; {_RULE_HINT}"
            )
        value = cst.parse_statement(f"{var} = '{self.rules.none_literal}'\n").with_changes(
            leading_lines=stmt.leading_lines
        )
        plain = stmt.with_changes(leading_lines=())
        hooked_stmt = cst.ensure_type(plain.deep_replace(stock_call, new_call), cst.SimpleStatementLine)
        guard = hook.lm_head_guard and not self.include_lm_head
        self._claim(stmt, [value, self._guarded(plain, hooked_stmt) if guard else hooked_stmt])
        self.edits.append(Edit(self.path, hook.scope, self.line(stmt), "hook", hook.role, hook.gemm))

    def insert(self, at_scope: str, text: str, after: str, start: bool) -> None:
        func = self.scope(at_scope)
        new = _statements(text)
        if squash(text) in squash(code(func)):
            self.edits.append(
                Edit(self.path, at_scope, self.line(func), "insert", None, after or "<start>", False)
            )
            return
        if start:
            body = list(cst.ensure_type(func.body, cst.IndentedBlock).body)
            if _is_docstring(body[0]):
                self.after.setdefault(id(body[0]), []).extend(new)
            else:
                first = body[0]
                lines = getattr(first, "leading_lines", ())  # blank lines and comments stay on top
                new[0] = new[0].with_changes(leading_lines=lines)
                self.replace[id(first)] = [*new, first.with_changes(leading_lines=())]
            self.edits.append(Edit(self.path, at_scope, self.line(body[0]), "insert", None, "<start>"))
            return
        anchor = squash(after)
        owners = [
            top
            for s, top in statements(func.body)
            if isinstance(s, cst.SimpleStatementLine)
            and squash(code(s.with_changes(leading_lines=()))).split("#")[0] == anchor
        ]
        if len(owners) != 1:
            raise InstrumentError(
                f"{self.path}: in {at_scope}: expected one statement `{after}` to insert after, found "
                f"{len(owners)}. {_RULE_HINT}"
            )
        self.after.setdefault(id(owners[0]), []).extend(new)
        self.edits.append(Edit(self.path, at_scope, self.line(owners[0]), "insert", None, after))

    def params(self, at_scope: str, add: Sequence[str]) -> None:
        func = self.scope(at_scope)
        names = _param_names(func.params)
        added = [p for p in add if p.split(":")[0].split("=")[0].strip() not in names]
        if not added:
            self.edits.append(
                Edit(self.path, at_scope, self.line(func), "params", None, ", ".join(add), False)
            )
            return
        self.new_params[id(func)] = _add_params(func.params, added)
        self.edits.append(Edit(self.path, at_scope, self.line(func), "params", None, ", ".join(added)))

    def add_imports(self) -> None:
        """The `imports` lines this file lacks, after its last top-level import."""
        text = self.source.decode("utf-8")
        used = {h.op.split(".")[0] for h in self.rules.hooks if h.file == self.path}
        missing = [
            line
            for line in self.rules.imports
            if line.split("#")[0].split()[-1] in used and line.split("#")[0].strip() not in text
        ]
        if not missing:
            return
        top_imports = [s for s in _leading_statements(self.module) if _is_import(s)]
        if not top_imports:
            raise InstrumentError(f"{self.path}: no top-level import to place `{missing[0]}` after")
        last = top_imports[-1]
        for line in missing:
            self.after.setdefault(id(last), []).append(cst.parse_statement(line + "\n"))
            self.edits.append(Edit(self.path, "<module>", self.line(last), "import", None, line))

    def result(self) -> FileResult:
        for owner_id, extra in self.after.items():  # an owner may itself be replaced: append after that
            owner = next(
                (s for s in self._all_statements() if id(s) == owner_id),
                None,
            )
            assert owner is not None
            self.replace[owner_id] = [*self.replace.get(owner_id, [owner]), *extra]
        if not self.replace and not self.new_params:
            return FileResult(None, tuple(self.edits))
        new_source = self.module.visit(_Splice(self.replace, self.new_params)).bytes
        try:
            cst.parse_module(new_source)
        except cst.ParserSyntaxError as exc:  # a rule produced invalid code: a bug, never write it
            raise InstrumentError(
                f"{self.path}: instrumented source does not parse ({exc.message}); nothing written"
            ) from exc
        return FileResult(new_source, tuple(self.edits))

    def _all_statements(self) -> list[cst.BaseStatement]:
        found: list[cst.BaseStatement] = list(self.module.body)
        for func in (*self.index.methods.values(), *self.index.functions.values()):
            found.extend(s for s, _ in statements(func.body))
        return found


def instrument_source(
    path: str, source: bytes, rules: InstrumentRules, *, include_lm_head: bool
) -> FileResult:
    """Hook one file's GEMMs and apply its inserts and parameters; raise before anything partial."""
    state = _FileTransform(path, source, rules, include_lm_head)
    hooks = [h for h in rules.hooks if h.file == path]
    found = [state.locate(h) for h in hooks]
    for scope in dict.fromkeys(h.scope for h in hooks):
        state.check_accounted(scope, [f for f in found if f.hook.scope == scope])
    for item in found:
        state.hook(item)
    for ins in (i for i in rules.inserts if i.file == path):
        if not (ins.when == "exclude_lm_head" and include_lm_head):
            state.insert(ins.scope, ins.code, ins.after, ins.at == "start")
    for par in (p for p in rules.params if p.file == path):
        state.params(par.scope, par.add)
    if hooks and (state.replace or state.new_params):
        state.add_imports()
    return state.result()
