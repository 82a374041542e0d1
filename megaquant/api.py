"""The library API: `status`, `apply`, `restore`, `diff`, returning frozen dataclasses (no printing).

`apply` plans every edit in memory (pure engine), then hands the bytes to `branch` for the git lifecycle.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megaquant import branch as _branch
from megaquant.branch import Base
from megaquant.errors import GitStateError, MegaquantError, ValueNameError

if TYPE_CHECKING:
    import git

    from megaquant.codemod import Change, RewritePlan
    from megaquant.sites import Scan, Site
    from megaquant.spec import Spec

__all__ = ["ApplyResult", "Base", "RestoreResult", "Status", "apply", "diff", "restore", "status"]


@dataclass(frozen=True)
class Status:
    repo: str
    branch: str | None
    head: str
    base: Base | None
    sites: tuple[Site, ...]
    warnings: tuple[str, ...]
    spec: str = "fork"
    values: dict[str, str] = field(default_factory=dict)
    """role -> value for every role: what its sites hold, `none` where the tree lacks the role."""
    absent: tuple[str, ...] = ()
    """Roles this tree does not have (its spec lacks them, or they are optional and not found)."""

    def to_json(self) -> dict[str, object]:
        return {
            "repo": self.repo,
            "branch": self.branch,
            "head": self.head,
            "base": None if self.base is None else {"branch": self.base.branch, "commit": self.base.commit},
            "spec": self.spec,
            "roles": dict(self.values),
            "absent_roles": list(self.absent),
            "sites": [site.to_json() for site in self.sites],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class ApplyResult:
    repo: str
    branch: str
    base: Base
    commit: str | None
    changes: tuple[Change, ...]
    values: dict[str, str]
    """role -> value for every role after the change (`none` for a role the tree lacks)."""
    warnings: tuple[str, ...]
    diff: str
    absent: tuple[str, ...] = ()
    """Roles asked through a group (`--linear`, `--linear-bwd`) that this tree lacks: they run bf16."""

    def to_json(self) -> dict[str, object]:
        return {
            "repo": self.repo,
            "branch": self.branch,
            "base": {"branch": self.base.branch, "commit": self.base.commit},
            "commit": self.commit,
            "changes": [
                {
                    "file": c.file,
                    "scope": c.scope,
                    "line": c.line,
                    "role": c.role,
                    "old": c.old,
                    "new": c.new,
                    "kind": c.kind,
                }
                for c in self.changes
            ],
            "values": dict(self.values),
            "absent_roles": list(self.absent),
            "warnings": list(self.warnings),
            "diff": self.diff,
        }


@dataclass(frozen=True)
class RestoreResult:
    restored: bool
    branch: str | None
    message: str

    def to_json(self) -> dict[str, object]:
        return {"restored": self.restored, "branch": self.branch, "message": self.message}


# ---------------------------------------------------------------- helpers


def _read_sources(root: Path, spec: Spec) -> dict[str, bytes]:
    from megaquant.sites import candidate_paths

    return {rel: (root / rel).read_bytes() for rel in candidate_paths(root, spec)}


SCAN_CACHE = "megaquant-scan-cache.pickle"
SET_OPTIONS = ("--linear", "--linear-fwd", "--linear-bwd", "--linear-dgrad", "--linear-wgrad", "--qk", "--pv")


def _scan_key(sources: Mapping[str, bytes], spec: Spec) -> str:
    """Identifies a scan: `scan_sources` is pure, so the same engine, spec and bytes give the same result."""
    import megaquant.sites
    import megaquant.spec

    digest = hashlib.sha256(repr(spec).encode())
    for module in (megaquant.sites, megaquant.spec):
        digest.update(Path(str(module.__file__)).read_bytes())
    for rel in sorted(sources):
        digest.update(b"%d:%s\0" % (len(sources[rel]), rel.encode()))
        digest.update(sources[rel])
    return digest.hexdigest()


def _cached_scan(rep: git.Repo, sources: Mapping[str, bytes], spec: Spec) -> Scan:
    """`scan_sources`, remembered under the git dir by content (a hit skips every parse)."""
    from megaquant.sites import scan_sources

    path = Path(rep.git_dir) / SCAN_CACHE
    key = _scan_key(sources, spec)
    try:
        cached_key, cached = pickle.loads(path.read_bytes())
        if cached_key == key:
            return cached
    except (OSError, pickle.UnpicklingError, ValueError, TypeError, EOFError, AttributeError, ImportError):
        pass  # no cache, or one from another version: scan
    scan = scan_sources(sources, spec)
    tmp = path.with_name(f"{SCAN_CACHE}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        tmp.write_bytes(pickle.dumps((key, scan)))
        os.replace(tmp, path)
    return scan


def _spec_name(repo: git.Repo, spec: str | None) -> str:
    """The spec asked for, else git config `megaquant.spec` (set by `instrument`), else fork."""
    if spec is not None:
        return spec
    return _branch.config_value(repo, "megaquant.spec") or "fork"


def _throwaway_base(repo: git.Repo) -> tuple[Base | None, str | None]:
    """(base, throwaway branch) when HEAD is on a megaquant branch, else (None, None)."""
    on = _branch.head_branch(repo)
    if not (on and on.startswith(_branch.BRANCH_PREFIX)):
        return None, None
    journal = _branch.read_journal(repo)
    return (journal.base if journal else _branch.recorded_base(repo, on)), on


def _refuse_interrupted(rep: git.Repo, *, locked: bool) -> None:
    """Raise when a journal says an operation was interrupted. Without the repository lock a journal may be
    another live process's operation in flight (a worktree run's restore journals the main checkout while
    it removes its worktree): while a live process holds the lock it is left to the check made under the
    lock, where a journal can only be one that a killed process left."""
    journal = _branch.read_journal(rep)
    if journal is None:
        return
    if not locked:
        holder = _branch.lock_info(rep)
        if holder is not None and holder.alive:
            return
    raise GitStateError(
        f"an interrupted megaquant {journal.op} (step {journal.step!r}) left {journal.branch} half done; "
        "run `megaquant restore` first"
    )


def _asked(values: Mapping[str, str] | None, **options: str | None) -> dict[str, str]:
    """Roles and groups asked for: the `values` mapping, then the keyword options given."""
    asked: dict[str, str] = dict(values or {})
    asked.update({key: value for key, value in options.items() if value is not None})
    if not asked:
        raise MegaquantError(f"nothing to set: give at least one of {', '.join(SET_OPTIONS)}")
    return asked


def _role_values(scan: Scan, targets: Mapping[str, str], spec: Spec) -> dict[str, str]:
    """role -> canonical value for every role: the target, else what the (non-override) sites hold now,
    `none` for a role this tree does not have (that GEMM runs bf16), `absent` when a role the spec
    requires was not found (the tree does not match the spec)."""
    from megaquant.spec import ROLES, canonical_value

    current: dict[str, set[str]] = {role: set() for role in ROLES}
    for site in scan.sites:
        for role in site.roles:
            if not site.override:
                try:
                    current[role].add(canonical_value(site.value) if site.value is not None else site.expr)
                except ValueNameError:
                    current[role].add(str(site.value))
    values = {}
    for role in ROLES:
        found = current[role]
        if role in targets:
            values[role] = targets[role]
        elif role not in spec.roles() or (role in spec.optional and role not in scan.roles):
            values[role] = "none"
        else:
            values[role] = next(iter(found)) if len(found) == 1 else ("mixed" if found else "absent")
    return values


def lacking_roles(scan: Scan, spec: Spec) -> tuple[str, ...]:
    """The roles this tree does not have: not declared by its spec, or optional and not found."""
    from megaquant.spec import ROLES

    return tuple(
        role
        for role in ROLES
        if role not in spec.roles() or (role in spec.optional and role not in scan.roles)
    )


def unified_diff(before: Mapping[str, bytes], after: Mapping[str, bytes]) -> str:
    chunks: list[str] = []
    for rel in sorted(after):
        old = before.get(rel, b"").decode("utf-8", errors="replace").splitlines(keepends=True)
        new = after[rel].decode("utf-8", errors="replace").splitlines(keepends=True)
        chunks.extend(difflib.unified_diff(old, new, f"a/{rel}", f"b/{rel}"))
    return "".join(chunks)


def _commit_text(plan: RewritePlan, base: Base, values: Mapping[str, str]) -> str:
    subject = "megaquant set " + " ".join(f"{role}={value}" for role, value in values.items())
    body = "\n".join(
        f"{c.file}:{c.line} {c.scope} [{c.role}] {c.old} -> {c.new} ({c.kind})" for c in plan.changes
    )
    return _branch.commit_message(subject, body, base, values)


# ---------------------------------------------------------------- API


def status(repo: str | Path = ".", *, spec: str | None = None) -> Status:
    """Where the repository stands: every site of the spec's variable, the base if on a throwaway branch,
    and warnings that explain interrupted or unusual states."""
    from megaquant.spec import load_spec

    rep = _branch.open_repo(repo)
    root = _branch.worktree_root(rep)
    base, _ = _throwaway_base(rep)
    spec_obj = load_spec(_spec_name(rep, spec))
    scan = _cached_scan(rep, _read_sources(root, spec_obj), spec_obj)
    warnings = (*scan.warnings, *_branch.describe_state(rep))
    head = _branch.head_commit(rep) or ""
    return Status(
        str(root),
        _branch.head_branch(rep),
        head,
        base,
        scan.sites,
        tuple(warnings),
        spec=spec_obj.name,
        values=_role_values(scan, {}, spec_obj),
        absent=lacking_roles(scan, spec_obj),
    )


def apply(
    repo: str | Path = ".",
    *,
    linear: str | None = None,
    linear_bwd: str | None = None,
    linear_fwd: str | None = None,
    linear_dgrad: str | None = None,
    linear_wgrad: str | None = None,
    qk: str | None = None,
    pv: str | None = None,
    values: Mapping[str, str] | None = None,
    dry_run: bool = False,
    worktree: str | Path | None = None,
    spec: str | None = None,
    lock_wait_s: float = 0.0,
) -> ApplyResult:
    """Set role values on the throwaway branch `megaquant/<base>` (or a new worktree) with one commit.

    `linear` (all linear GEMMs) and `linear_bwd` (dgrad and wgrad) are groups: they set the member roles
    the tree has and report the others in `ApplyResult.absent`; a narrower option wins over a group.
    `values` maps roles or group names to values. Raises `RoleError` for a role named on its own that the
    spec does not declare, and for any role asked for that has no GEMM in the tree (nothing is written)."""
    from megaquant.codemod import plan_rewrite
    from megaquant.spec import load_spec

    rep = _branch.open_repo(repo)
    spec_obj = load_spec(_spec_name(rep, spec))
    asked = _asked(
        values,
        linear=linear,
        linear_bwd=linear_bwd,
        linear_fwd=linear_fwd,
        linear_dgrad=linear_dgrad,
        linear_wgrad=linear_wgrad,
        qk=qk,
        pv=pv,
    )
    spec_obj.targets(asked, spec_obj.roles())  # names and values checked before anything else
    _refuse_interrupted(rep, locked=False)
    base, name = _throwaway_base(rep)
    if base is None or name is None:
        if name is not None:
            raise GitStateError(f"{name}: no recorded base; check out the base branch and run set there")
        base = _branch.current_base(rep)
        name = _branch.throwaway_branch(base)
    elif worktree is not None:
        raise GitStateError(f"already on {name}; run `megaquant restore` before creating a worktree")

    def plan_in(checkout: git.Repo) -> tuple[dict[str, bytes], RewritePlan, dict[str, str], tuple[str, ...]]:
        sources = _read_sources(_branch.worktree_root(checkout), spec_obj)
        scan = _cached_scan(checkout, sources, spec_obj)
        targets = spec_obj.targets(asked, scan.roles)
        plan = plan_rewrite(sources, targets.values, spec_obj)
        return sources, plan, _role_values(scan, targets.values, spec_obj), targets.absent

    root = _branch.worktree_root(rep)
    if dry_run or worktree is None:
        sources, plan, role_values, absent = plan_in(rep)
        text = unified_diff(sources, plan.new_sources)
        if dry_run or not plan.new_sources:
            return ApplyResult(
                str(root), name, base, None, plan.changes, role_values, plan.warnings, text, absent
            )
        with _branch.repo_lock(rep, "set", wait_s=lock_wait_s):
            _refuse_interrupted(rep, locked=True)
            done = _branch.commit_files(
                rep,
                plan.new_sources,
                sources,
                base=base,
                branch=name,
                message=_commit_text(plan, base, role_values),
            )
        return ApplyResult(
            done.repo, name, base, done.commit, plan.changes, role_values, plan.warnings, text, absent
        )
    with _branch.repo_lock(rep, "set", wait_s=lock_wait_s):
        _refuse_interrupted(rep, locked=True)
        wt = _branch.add_worktree(rep, Path(worktree).absolute(), base)
        wt_root = _branch.worktree_root(wt)
        wt_name = _branch.head_branch(wt)
        assert wt_name is not None
        try:
            sources, plan, role_values, absent = plan_in(wt)
        except MegaquantError:
            _branch.discard_worktree(rep, wt_root, wt_name)  # fresh, holds nothing of the user's
            raise
        text = unified_diff(sources, plan.new_sources)
        commit = None
        if plan.new_sources:
            message = _commit_text(plan, base, role_values)
            commit = _branch.commit_files(
                wt, plan.new_sources, sources, base=base, branch=wt_name, message=message
            ).commit
    return ApplyResult(
        str(wt_root), wt_name, base, commit, plan.changes, role_values, plan.warnings, text, absent
    )


def restore(repo: str | Path = ".", *, keep: bool = False, lock_wait_s: float = 0.0) -> RestoreResult:
    """Back to the recorded base; deletes the throwaway branch unless `keep`. Nothing to restore: no error.
    `lock_wait_s`: wait that long for another live process's repository lock instead of failing at once."""
    done = _branch.restore(_branch.open_repo(repo), keep=keep, lock_wait_s=lock_wait_s)
    return RestoreResult(done.restored, done.branch, done.message)


def diff(repo: str | Path = ".") -> str:
    """What megaquant committed on the throwaway branch, as a diff against its base ('' elsewhere)."""
    rep = _branch.open_repo(repo)
    base, _ = _throwaway_base(rep)
    if base is None:
        return ""
    with _branch.git_errors("diffing against the base"):
        out: str = rep.git.diff(base.commit, "HEAD")
    return out + "\n" if out else ""
