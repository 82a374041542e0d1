"""Rewrite specs: which scopes and GEMM calls make up each role of a codebase (`rewrites/<name>.toml`).

Also the one table of role names and quantization value names (canonical spellings and aliases).
"""

from __future__ import annotations

import sysconfig
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from megaquant.errors import RoleError, SpecError, ValueNameError

__all__ = [
    "ALIASES",
    "GROUPS",
    "ROLES",
    "SPEC_VALUES_DEFAULT",
    "VALUES",
    "RoleRule",
    "RoleTargets",
    "Spec",
    "canonical_value",
    "load_spec",
    "parse_spec",
    "rewrites_dirs",
    "spec_path",
]

ROLES: tuple[str, ...] = ("linear_fwd", "linear_dgrad", "linear_wgrad", "qk", "pv")
GROUPS: dict[str, tuple[str, ...]] = {
    "linear": ("linear_fwd", "linear_dgrad", "linear_wgrad"),
    "linear_bwd": ("linear_dgrad", "linear_wgrad"),
}
"""Group names (`--linear`, `--linear-bwd`): they set the member roles the tree has and name the others."""
VALUES: tuple[str, ...] = ("mxfp8", "mxfp4", "hifp8", "nvfp4", "none")
SPEC_VALUES_DEFAULT: tuple[str, ...] = ("mxfp8", "mxfp4", "hifp8", "none")
"""The values of a spec that declares none (`values` in its TOML): the ones every tree's ops had before
nvfp4; a spec whose ops do more lists them."""
ALIASES: dict[str, str] = {"bf16": "none"}


def canonical_value(value: str) -> str:
    """The canonical name of a quantization value (`bf16` -> `none`); unknown -> `ValueNameError`."""
    name = value.strip().lower()
    name = ALIASES.get(name, name)
    if name not in VALUES:
        known = ", ".join([*VALUES, *(f"{a} (= {c})" for a, c in ALIASES.items())])
        raise ValueNameError(f"unknown quantization value {value!r}; use one of: {known}")
    return name


@dataclass(frozen=True)
class RoleRule:
    """GEMMs of `role`: in files matching `file` (glob), scopes matching `scope`, calls matching `calls`
    (case-insensitive: `MXFPMatMul.apply` and `mxfp_matmul` are both `*matmul*` spellings), and, when
    `assigns` is given, whose result is assigned to a name matching one of its patterns (what tells the
    weight-gradient GEMM `grad_weight = ...` from the data-gradient GEMM `grad_input = ...`)."""

    role: str
    file: str
    scope: str
    calls: tuple[str, ...]
    assigns: tuple[str, ...] = ()

    def covers(self, file: str, scope: str) -> bool:
        return fnmatchcase(file, self.file) and fnmatchcase(scope, self.scope)

    def matches_call(self, callee: str) -> bool:
        name = callee.lower()
        return any(fnmatchcase(name, pattern.lower()) for pattern in self.calls)

    def matches_result(self, results: tuple[str, ...]) -> bool:
        return not self.assigns or any(fnmatchcase(r, p) for r in results for p in self.assigns)


@dataclass(frozen=True)
class RoleTargets:
    """What a request for roles and groups sets: role -> value, and the group members this tree lacks."""

    values: dict[str, str]
    absent: tuple[str, ...]  # roles asked through a group that the tree does not have: they run bf16


@dataclass(frozen=True)
class Spec:
    """A codebase's sites: the variable, how it spells `none`, the role rules (first match wins), and the
    quantization values its ops implement."""

    name: str
    variable: str
    none_literal: str
    rules: tuple[RoleRule, ...]
    optional: tuple[str, ...] = ()
    """Declared roles that some trees of this codebase lack (a fork revision without a wgrad site)."""
    values: tuple[str, ...] = SPEC_VALUES_DEFAULT

    def roles(self) -> tuple[str, ...]:
        """The roles this codebase's trees have (in `ROLES` order), optional ones included."""
        declared = {rule.role for rule in self.rules}
        return tuple(role for role in ROLES if role in declared)

    def required(self) -> tuple[str, ...]:
        """The declared roles every tree of this codebase has: one missing means the spec does not match."""
        return tuple(role for role in self.roles() if role not in self.optional)

    def roles_in(self, file: str) -> tuple[str, ...]:
        """The roles whose GEMMs this spec looks for in `file` (`set` of them must be able to parse it)."""
        return tuple(
            role
            for role in self.roles()
            if any(r.role == role and fnmatchcase(file, r.file) for r in self.rules)
        )

    def expected(self, role: str) -> str:
        """Where this spec looks for GEMMs of `role`, for messages."""
        return "; ".join(
            f"{r.file} {r.scope} calling {' or '.join(r.calls)}"
            + (f" into {' or '.join(r.assigns)}" if r.assigns else "")
            for r in self.rules
            if r.role == role
        )

    def targets(self, asked: Mapping[str, str], found: Collection[str]) -> RoleTargets:
        """Resolve roles and groups (`linear`, `linear_bwd`) asked for into role -> canonical value.

        Groups first (`linear` before `linear_bwd`), then single roles, so the narrower option wins. A
        group sets its members this spec declares (an optional one only when the tree has it, `found`)
        and names the rest in `absent`; a role named on its own that the spec does not declare is an
        error. Whether the tree has the GEMMs of each role set is `codemod.plan_rewrite`'s check."""
        values: dict[str, str] = {}
        absent: list[str] = []
        for key in asked:
            if key not in GROUPS and key not in ROLES:
                known = ", ".join([*ROLES, *GROUPS])
                raise ValueNameError(f"unknown role {key!r}; roles are {known}")
        for group, members in GROUPS.items():
            if group in asked:
                value = canonical_value(asked[group])
                for role in members:
                    if role in self.roles() and (role not in self.optional or role in found):
                        values[role] = value
                    elif role not in absent:
                        absent.append(role)
        for role in ROLES:
            if role in asked:
                if role not in self.roles():
                    raise RoleError(
                        f"role {role} is not in trees of spec {self.name} (it has "
                        f"{', '.join(self.roles())}): that GEMM always runs bf16 there. Drop the option, "
                        "or use a group (--linear, --linear-bwd), which sets the roles the tree has"
                    )
                values[role] = canonical_value(asked[role])
                if role in absent:
                    absent.remove(role)
        return RoleTargets(values, tuple(r for r in absent if r not in values))

    def literal(self, value: str) -> str:
        """The string this codebase writes for `value` (any spelling); a value its ops lack is refused."""
        name = self.check_value(value)
        return self.none_literal if name == "none" else name

    def check_value(self, value: str) -> str:
        """The canonical name of `value`, or ValueNameError when this codebase's ops do not implement it."""
        name = canonical_value(value)
        if name not in self.values:
            raise ValueNameError(
                f"value {name!r} is not supported by spec {self.name}: its tree's ops implement "
                f"{', '.join(self.values)} (the spec's `values`); "
                + (
                    "the fork's own ops have no NVFP4 — run `megaquant instrument` on stock Megatron for it"
                    if self.name == "fork"
                    else "choose one of those"
                )
            )
        return name

    def is_gemm_call(self, callee: str) -> bool:
        """Whether `callee` matches the call patterns of any rule (a GEMM somewhere, maybe role-less)."""
        return any(rule.matches_call(callee) for rule in self.rules)

    def role_of(
        self, file: str, scope: str, callees: tuple[str, ...], results: tuple[str, ...] = ()
    ) -> str | None:
        """The role of a GEMM use in `file`/`scope` calling `callees` and assigning to `results`: the
        first rule that matches."""
        for rule in self.rules:
            if (
                rule.covers(file, scope)
                and any(rule.matches_call(c) for c in callees)
                and rule.matches_result(results)
            ):
                return rule.role
        return None


def rewrites_dirs() -> tuple[Path, ...]:
    """Where specs are looked up: the source tree's rewrites/, then an installed wheel's copy.

    A wheel installs rewrites/*.toml as <prefix>/share/megaquant/rewrites/ (pyproject's data-files).
    """
    here = Path(__file__).resolve().parent
    dirs = [here.parent / "rewrites", here / "rewrites"]
    for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")):
        try:
            dirs.append(Path(sysconfig.get_path("data", scheme)) / "share" / "megaquant" / "rewrites")
        except KeyError:
            continue
    return tuple(dict.fromkeys(dirs))


def spec_path(name_or_path: str | Path) -> Path:
    """The TOML file of a spec given by name (`fork` -> rewrites/fork.toml) or by path."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise SpecError(f"rewrite spec {path} not found; give a spec name or an existing .toml file")
        return path
    for folder in rewrites_dirs():
        candidate = folder / f"{text}.toml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in rewrites_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise SpecError(f"unknown rewrite spec {text!r}; known specs: {', '.join(known) or 'none found'}")


def _text(raw: dict[str, object], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: `{key}` must be a non-empty string, got {value!r}")
    return value


def _rule(raw: object, where: str) -> RoleRule:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: each [[rules]] entry must be a table")
    role = _text(raw, "role", where)
    if role not in ROLES:
        raise SpecError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
    calls = _patterns(raw, "calls", where, required=True)
    unknown = set(raw) - {"role", "file", "scope", "calls", "assigns"}
    if unknown:
        raise SpecError(
            f"{where}: unknown keys {sorted(unknown)} (expected role, file, scope, calls, assigns)"
        )
    return RoleRule(
        role,
        _text(raw, "file", where),
        _text(raw, "scope", where),
        calls,
        _patterns(raw, "assigns", where, required=False),
    )


def _patterns(raw: dict[str, object], key: str, where: str, *, required: bool) -> tuple[str, ...]:
    value = raw.get(key, None if required else [])
    if (
        not isinstance(value, list)
        or (required and not value)
        or not all(isinstance(c, str) and c for c in value)
    ):
        raise SpecError(f"{where}: `{key}` must be a non-empty list of name patterns, got {value!r}")
    return tuple(value)


def parse_spec(text: str, name: str, where: str) -> Spec:
    """A `Spec` from TOML text; `where` names the file in error messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{where}: not valid TOML: {exc}") from exc
    rules = raw.get("rules")
    if not isinstance(rules, list) or not rules:
        raise SpecError(f"{where}: expected at least one [[rules]] table (role, file, scope, calls)")
    unknown = set(raw) - {"name", "variable", "none_literal", "optional_roles", "rules", "values"}
    if unknown:
        raise SpecError(f"{where}: unknown top-level keys {sorted(unknown)}")
    parsed = tuple(_rule(r, f"{where}: rules[{i}]") for i, r in enumerate(rules))
    optional = _patterns(raw, "optional_roles", where, required=False)
    for role in optional:
        if role not in {rule.role for rule in parsed}:
            raise SpecError(f"{where}: optional role {role!r} has no [[rules]] entry")
    variable = _text(raw, "variable", where)
    if not variable.isidentifier():
        raise SpecError(f"{where}: `variable` must be a Python identifier, got {variable!r}")
    spec_name = raw.get("name", name)
    if not isinstance(spec_name, str):
        raise SpecError(f"{where}: `name` must be a string")
    values = raw.get("values", list(SPEC_VALUES_DEFAULT))
    if (
        not isinstance(values, list)
        or not all(isinstance(v, str) and v in VALUES for v in values)
        or "none" not in values
    ):
        raise SpecError(f"{where}: `values` must list canonical values ({', '.join(VALUES)}) incl. none")
    return Spec(
        name=spec_name,
        variable=variable,
        none_literal=_text(raw, "none_literal", where),
        rules=parsed,
        optional=optional,
        values=tuple(values),
    )


def load_spec(name_or_path: str | Path = "fork") -> Spec:
    """Load `rewrites/<name>.toml` (from the source tree or the installed package) or a spec file."""
    path = spec_path(name_or_path)
    return parse_spec(path.read_text(encoding="utf-8"), path.stem, str(path))
