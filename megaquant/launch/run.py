"""A recorded training run: resolve the request, set the roles through the core API, launch torchrun,
stream train.log, write manifest.json, restore the tree on success, failure and Ctrl-C.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from megaquant.errors import LaunchError, MegaquantError
from megaquant.launch.argv import (
    Entry,
    Parallel,
    entry_for,
    megatron_args,
    mla_supported,
    role_settings,
    role_values,
    torchrun_argv,
    train_env,
)
from megaquant.launch.datasets import get_dataset
from megaquant.launch.graphs import GRAPH_FLAGS, GraphDecision, decide_graphs
from megaquant.launch.models import get_model
from megaquant.launch.modes import get_mode, mode_for_values
from megaquant.launch.presets import get_preset
from megaquant.pathcounts import PATH_COUNTS_ENV, collect
from megaquant.recipes import RECIPE_ENV, bf16_layers_for_args, check_recipe, get_recipe
from megaquant.spec import load_spec

if TYPE_CHECKING:
    from megaquant.sites import Site

__all__ = [
    "TRAIN_COMMAND_ENV",
    "RunPlan",
    "RunRecord",
    "TrainRequest",
    "check_roles",
    "command_for",
    "default_run_dir",
    "detect_spec",
    "environment_summary",
    "execute",
    "failure_hint",
    "host_gpus",
    "megaquant_source",
    "plan_run",
    "release_training_lease",
    "srun_prefix",
    "take_training_lease",
]

TRAINING_LEASE = "megaquant.training"
"""File in a checkout's own git dir while `megaquant train` trains that checkout (no --worktree): pid, host,
run dir. A second run on the same checkout would set its roles on the same throwaway branch under the
first run (or be refused half-way, "changed while megaquant was planning"); it is refused up front instead."""

LOCK_WAIT_S = 120.0
"""How long a run waits for the repository lock held by another live megaquant process (experiments
started together from their own `--worktree`s each hold it for their set and restore) before failing."""

TRAIN_COMMAND_ENV = "MEGAQUANT_TRAIN_COMMAND"
"""Test/debug hook: when set (split like a shell word list, never run through a shell) it replaces the
`python -m torch.distributed.run ... <entry>` prefix; the Megatron arguments are still appended."""


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """What a user asked for (train_config.py / `megaquant train`), before anything is resolved."""

    model: str
    dataset: str | None
    """None: `--mock-data` (no dataset files needed)."""
    mode: str = "bf16"
    preset: str = "fast"
    megatron: Path = Path(".")
    data_root: Path | None = None
    """Where dataset prefixes and the built-in tokenizer live; default: the Megatron tree."""
    tokenizer: str | None = None
    linear: str | None = None
    qk: str | None = None
    pv: str | None = None
    parallel: Parallel = field(default_factory=Parallel)
    run_dir: Path | None = None
    worktree: Path | None = None
    spec: str | None = None
    """Rewrite spec; None: the tree's `git config megaquant.spec` (by `megaquant instrument`), or fork."""
    srun: bool = False
    """Start torchrun once per node through `srun` (inside a Slurm allocation)."""
    extra: tuple[str, ...] = ()
    steps: int | None = None
    """Optimizer steps instead of the preset's length (LR schedule and eval interval follow)."""
    recipe: str = "default"
    """megaquant.recipes name; the training process gets it as MEGAQUANT_RECIPE."""
    cuda_graphs: str = "auto"
    """auto | on | off: Megatron's full-iteration CUDA graph (megaquant.launch.graphs)."""
    validation_seed: int | None = None
    """Shuffle the validation split by this seed instead of the run's (`--mq-validation-seed` of
    megaquant.launch.pretrain): runs of different seeds then evaluate the same text. None: Megatron's."""


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    request: TrainRequest
    mode: str
    values: dict[str, str]
    tree: Path
    megatron_args: tuple[str, ...]
    run_dir: Path
    spec: str
    notes: tuple[str, ...] = ()
    cuda_graphs: GraphDecision = GraphDecision(False, "not decided")


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    run_dir: Path
    exit_code: int
    manifest: dict[str, object]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def default_run_dir(request: TrainRequest, mode: str, now: _dt.datetime | None = None) -> Path:
    stamp = (now or _dt.datetime.now(_dt.UTC)).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{request.model}-{request.dataset or 'mock'}-{mode}-{request.preset}"


def detect_spec(tree: Path) -> str:
    """`git config megaquant.spec` of the tree (recorded by `megaquant instrument`), else 'fork'."""
    done = subprocess.run(
        ["git", "-C", str(tree), "config", "--get", "megaquant.spec"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "fork"


def _training_root(tree: Path) -> Path:
    """The root whose megatron/training the run imports (the tree's, else the installed one's); the tree
    itself when there is none (the graph then counts as unsupported, and preflight refuses the run)."""
    from megaquant.launch.preflight import training_megatron

    found = training_megatron(tree)
    return found.root if found is not None else tree


_FULL_VALIDATION_CRASH = (  # megatron-core 0.19.2's evaluate_and_print_results, both lines
    "eval_iters = eval_iters.tolist()",
    "args.eval_iters = eval_iters[0] if not args.multiple_validation_sets else eval_iters",
)


def _full_validation_crashes(extra: Sequence[str], training_root: Path) -> bool:
    """Whether `--full-validation` (without `--multiple-validation-sets`) would crash this Megatron at its
    first evaluation: megatron-core 0.19.2 stores the full split's length as an int, then indexes it
    (`'int' object is not subscriptable`), after all the training steps before it have run."""
    flags = {a.partition("=")[0] for a in extra}
    if "--full-validation" not in flags or "--multiple-validation-sets" in flags:
        return False
    try:
        text = (training_root / "megatron" / "training" / "training.py").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return all(line in text for line in _FULL_VALIDATION_CRASH)


def plan_run(request: TrainRequest, *, require_tree: bool = True) -> RunPlan:
    """Resolve names, role values and the Megatron arguments; refuse combinations that cannot work."""
    model = get_model(request.model)
    dataset = None if request.dataset is None else get_dataset(request.dataset)
    preset = get_preset(request.preset).with_overrides(request.extra)
    if request.steps is not None:
        preset = preset.with_steps(request.steps)
    values = role_values(get_mode(request.mode), linear=request.linear, qk=request.qk, pv=request.pv)
    mode = request.mode
    if (request.linear, request.qk, request.pv) != (None, None, None):
        named = mode_for_values(values)
        mode = named if named != "custom" else f"{request.mode}+overrides"
    tree = request.megatron.absolute()
    is_tree = (tree / "megatron" / "core").is_dir()
    notes: list[str] = []
    if not is_tree:
        if require_tree:
            raise LaunchError(
                f"{tree}: not a Megatron-LM tree (no megatron/core); pass --megatron PATH to a Megatron-LM "
                "checkout or an instrumented megatron-core copy (`megaquant instrument`)"
            )
        notes.append(f"{tree} has no megatron/core: the command shown is what this path would run")
    if model.mla and is_tree and not mla_supported(tree):
        raise LaunchError(
            f"model {model.name} uses multi-latent attention, and {tree}/megatron/core/transformer/"
            "dot_product_attention.py: DotProductAttention.__init__ does not accept the k_channels/"
            "v_channels keywords MLASelfAttention passes on the local implementation (the only one "
            "whose GEMMs are quantized): the model would not build, and a Transformer Engine run would "
            "quantize nothing. Fix: run `megaquant instrument --repo TREE` (it adds the MLA channel "
            "keywords), then launch on that tree"
        )
    if model.mla and not is_tree:
        notes.append(f"{model.name} needs a tree whose local DotProductAttention takes k_channels/v_channels")
    if request.validation_seed is not None and (tree / "pretrain_gpt.py").is_file():
        raise LaunchError(
            f"--validation-seed: {tree} trains with its own pretrain_gpt.py, which shuffles the validation "
            "split by --seed and has no option for another seed (megaquant's own entry has: it trains "
            "trees without a pretrain_gpt.py, e.g. `megaquant instrument --from-installed`); drop "
            "--validation-seed, or compare validation losses of the same seed"
        )
    training_root = _training_root(tree) if is_tree else None
    if training_root is not None and _full_validation_crashes(request.extra, training_root):
        raise LaunchError(
            f"--full-validation: the Megatron this run trains with ({training_root}) crashes at its "
            "first evaluation with it unless --multiple-validation-sets is given too (megatron-core 0.19.2: "
            "\"'int' object is not subscriptable\" in evaluate_and_print_results, after the training steps "
            "before it). Evaluate the same batches in every run with `megaquant train --validation-seed N` "
            "instead, or raise --eval-iters"
        )
    data_root = (request.data_root or tree).absolute()
    args = megatron_args(
        model,
        dataset,
        preset,
        request.parallel,
        data_root=data_root,
        tokenizer=request.tokenizer,
        extra=request.extra,
    )
    spec = request.spec or (detect_spec(tree) if is_tree else "fork")
    tree_spec = load_spec(spec)
    for value in values.values():  # a value this tree's ops lack: refused before anything is set
        tree_spec.check_value(value)
    check_recipe(request.recipe, values, spec=spec)  # unknown, or not expressible on this tree: refused
    parallel = request.parallel
    graphs = decide_graphs(
        request.cuda_graphs,
        recipe=get_recipe(request.recipe),
        own_entry=not (tree / "pretrain_gpt.py").is_file(),
        training_root=training_root,
        moe=model.moe,
        world_size=parallel.nproc_per_node * parallel.nnodes,
        pipeline=parallel.pp,
        extra=tuple(request.extra),
    )
    if graphs.enabled and "--cuda-graph-impl" not in {a.partition("=")[0] for a in request.extra}:
        n = len(request.extra)  # before the extra arguments, which stay last (and can still override)
        at = len(args) - n if n and tuple(args[len(args) - n :]) == tuple(request.extra) else len(args)
        args = [*args[:at], *GRAPH_FLAGS, *args[at:]]
    run_dir = request.run_dir or default_run_dir(request, mode)
    return RunPlan(
        request=request,
        mode=mode,
        values=values,
        tree=tree,
        megatron_args=tuple(args),
        run_dir=run_dir.absolute(),
        spec=spec,
        notes=tuple(notes),
        cuda_graphs=graphs,
    )


def srun_prefix(parallel: Parallel) -> list[str]:
    """One torchrun per node inside a Slurm allocation (Megatron's own launch; no process manager here)."""
    return ["srun", "--nodes", str(parallel.nnodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]


def command_for(
    plan: RunPlan, checkout: Path, *, python: str = sys.executable, environ: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str], Entry]:
    """The full argv and the environment additions for training `checkout` (the tree or its worktree)."""
    environ = os.environ if environ is None else environ
    entry = entry_for(checkout)
    args = list(plan.megatron_args)
    if entry.own_metrics:
        args += ["--mq-metrics", str(plan.run_dir / "metrics.jsonl")]
        if plan.request.validation_seed is not None:
            args += ["--mq-validation-seed", str(plan.request.validation_seed)]
    override = environ.get(TRAIN_COMMAND_ENV)
    if override:
        argv = shlex.split(override) + args
    else:
        argv = torchrun_argv(python, plan.request.parallel, entry, args)
        if plan.request.srun:
            argv = srun_prefix(plan.request.parallel) + argv
    return argv, {**train_env(entry, environ), RECIPE_ENV: plan.request.recipe}, entry


def check_roles(sites: Sequence[Site], values: Mapping[str, str]) -> None:
    """Refuse a run whose tree would not quantize a role it was asked to: every role asked for a format
    needs at least one site of that role holding that value (run-time overrides aside)."""
    from megaquant.spec import canonical_value

    for role, value in values.items():
        if value == "none":
            continue
        held = [s for s in sites if role in s.roles and not s.override]
        if not held:
            raise LaunchError(
                f"role {role} = {value} asked for, but the tree has no {role} site: the run would "
                "silently not quantize it. Use the fork, or run `megaquant instrument` on stock Megatron"
            )
        wrong = [s for s in held if s.value is None or canonical_value(s.value) != value]
        if wrong:
            first = wrong[0]
            raise LaunchError(
                f"{first.file}:{first.line}: role {role} site holds {first.expr}, expected {value!r} after "
                "setting the roles; run `megaquant status` and `megaquant restore`"
            )


@functools.cache
def megaquant_source(root: Path | None = None) -> str:
    """The first 16 hex digits of a SHA-256 over megaquant's own Python files (path and bytes, in path
    order; `root`: the package directory, default this one): which megaquant code a run used, also where
    megaquant runs from a source tree rather than an installed release (the packages' version is then
    None). Computed once per process."""
    root = Path(__file__).resolve().parents[1] if root is None else root
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def host_gpus(nvidia_smi: str = "nvidia-smi") -> list[str] | None:
    """The names of the host's GPUs as `nvidia-smi` lists them (all of them, whatever CUDA_VISIBLE_DEVICES
    selects: the manifest records that beside it), or None where nvidia-smi is missing or fails. A run's
    step time means little without the card it ran on."""
    try:
        done = subprocess.run(
            [nvidia_smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return names if done.returncode == 0 and names else None


def environment_summary(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    environ = os.environ if environ is None else environ

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "packages": {d: version(d) for d in ("megaquant", "torch", "megatron-core", "triton")},
        "megaquant_source": megaquant_source(),
        "gpus": host_gpus(),
        "cuda_visible_devices": environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job_id": environ.get("SLURM_JOB_ID"),
    }


def _attention_cores(log: Path) -> list[str]:
    """Which attention core(s) the run used (the lines megaquant.ops.attention_core prints into the log)."""
    from megaquant.attention_cores import cores_in_log

    return cores_in_log(log.read_text(encoding="utf-8", errors="replace")) if log.is_file() else []


_CAPTURE_ERRORS = ("operation not permitted when stream is capturing", "cudaErrorStreamCapture")


def failure_hint(plan: RunPlan, log: Path) -> str | None:
    """What to try after a failed run, when its log shows a known cause (else None): a CUDA-graph capture
    that met a host synchronisation (some Megatron feature or extra argument not capturable)."""
    if not plan.cuda_graphs.enabled or not log.is_file():
        return None
    text = log.read_text(encoding="utf-8", errors="replace")
    if any(marker in text for marker in _CAPTURE_ERRORS):
        return (
            "the full-iteration CUDA graph could not be captured (a host synchronisation inside the step: "
            "see train.log); rerun with `megaquant train ... --cuda-graphs off`"
        )
    return None


def _write_manifest(run_dir: Path, manifest: Mapping[str, object]) -> None:
    tmp = run_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, run_dir / "manifest.json")


def _stream(proc: subprocess.Popen[str], log: TextIO, echo: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        log.flush()
        echo(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C reached us, not the child (own session): forward SIGINT, then escalate."""
    for sig, wait_s in ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _lease_holder(path: Path) -> dict[str, object] | None:
    """Who holds the training lease at `path` (None: nobody, or a process that is gone)."""
    from megaquant.branch.lock import _pid_alive

    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        return None
    if data.get("host") == socket.gethostname() and not _pid_alive(int(data["pid"])):
        return None  # stale: its megaquant train was killed
    return data


def take_training_lease(tree: Path, run_dir: Path) -> Path | None:
    """Refuse a run on a checkout another live `megaquant train` is training; else hold its lease (the path,
    for release_training_lease; None where the tree is no git checkout, which `api.apply` then refuses)."""
    import git

    try:
        path = Path(git.Repo(tree, search_parent_directories=True).git_dir).resolve() / TRAINING_LEASE
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):  # no repository: nothing to lease
        return None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_dir": str(run_dir)})
    for _ in range(3):
        try:  # created exclusively: of two runs starting at the same instant, one gets it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _lease_holder(path)
            if holder is not None and holder.get("pid") != os.getpid():
                raise LaunchError(
                    f"{tree}: megaquant train (pid {holder.get('pid')}, run dir {holder.get('run_dir')}) is "
                    "training this checkout; runs at once each need their own `--worktree DIR` (or wait for "
                    "that one)"
                ) from None
            if holder is None and _just_created(path):  # another run is writing it right now
                raise LaunchError(
                    f"{tree}: another megaquant train is starting on this checkout; runs at once each need "
                    "their own `--worktree DIR`"
                ) from None
            path.unlink(missing_ok=True)  # stale (its run was killed) or our own: take it over
            continue
        with os.fdopen(fd, "w") as out:
            out.write(record)
        return path
    raise LaunchError(f"{path}: could not take the training lease (it keeps reappearing); try again")


def _just_created(path: Path, seconds: float = 10.0) -> bool:
    """An unreadable lease younger than `seconds`: being written by the run that just created it."""
    import time

    try:
        return time.time() - path.stat().st_mtime < seconds and not path.read_text().strip()
    except OSError:
        return False


def release_training_lease(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def execute(
    plan: RunPlan,
    *,
    echo: Callable[[str], None] = lambda line: None,
    validated_against: str | None = None,
) -> RunRecord:
    """Set the roles (branch or worktree), train, record, restore. KeyboardInterrupt is re-raised after
    the tree is restored and the manifest says 'interrupted'."""
    from megaquant import api

    run_dir = plan.run_dir
    if (run_dir / "manifest.json").exists():
        raise LaunchError(f"{run_dir}: already holds a run (manifest.json); choose a new --run-dir")
    request = plan.request
    lease = take_training_lease(plan.tree, run_dir) if request.worktree is None else None
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        applied = api.apply(
            plan.tree,
            values=role_settings(plan.values),
            worktree=request.worktree,
            spec=plan.spec,
            lock_wait_s=LOCK_WAIT_S,
        )
    except BaseException:
        release_training_lease(lease)
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused before anything ran: leave no empty run directory behind
        raise
    checkout = Path(applied.repo)
    manifest: dict[str, object] = {
        "schema": 1,
        "mode": plan.mode,
        "model": request.model,
        "dataset": request.dataset or "mock",
        "preset": request.preset,
        "recipe": request.recipe,
        "cuda_graphs": {"enabled": plan.cuda_graphs.enabled, "reason": plan.cuda_graphs.reason},
        "validation_seed": request.validation_seed,
        "bf16_layers": list(bf16_layers_for_args(request.recipe, plan.megatron_args)),  # 1-based, unquantized
        "values": dict(applied.values),
        "absent_roles": list(applied.absent),
        "spec": plan.spec,
        "repo": str(plan.tree),
        "checkout": str(checkout),
        "branch": applied.branch,
        "base": {"branch": applied.base.branch, "commit": applied.base.commit},
        "commit": None,
        "megatron_args": list(plan.megatron_args),
        "validated_against": validated_against,
        "warnings": list(applied.warnings),
        "environment": environment_summary(),
        "log": "train.log",
        "start": _now(),
        "end": None,
        "exit_code": None,
        "status": "starting",
    }
    exit_code = 1
    interrupted = False
    try:
        status = api.status(checkout, spec=plan.spec)
        manifest["commit"] = status.head
        check_roles(status.sites, applied.values)
        argv, env_add, entry = command_for(plan, checkout)
        env_add = {**env_add, PATH_COUNTS_ENV: str(run_dir)}  # megaquant.ops writes its path counts here
        manifest.update(argv=argv, env=env_add, metrics="metrics.jsonl" if entry.own_metrics else None)
        manifest["status"] = "running"
        _write_manifest(run_dir, manifest)
        with (run_dir / "train.log").open("w") as log:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=checkout,
                    env={**os.environ, **env_add},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    bufsize=1,
                    start_new_session=True,
                )
            except OSError as exc:
                raise LaunchError(f"could not start {argv[0]!r}: {exc}") from exc
            try:
                _stream(proc, log, echo)
                exit_code = proc.wait()
            except KeyboardInterrupt:
                interrupted = True
                _stop(proc)
                exit_code = proc.returncode if proc.returncode is not None else -signal.SIGINT
                raise
    except MegaquantError as exc:
        manifest["error"] = str(exc)
        raise
    finally:
        try:
            restored = api.restore(checkout, lock_wait_s=LOCK_WAIT_S)
        finally:
            release_training_lease(lease)
        manifest["path_counts"] = collect(run_dir)  # None: nothing counted (e.g. the fork's own ops)
        manifest.update(
            end=_now(),
            exit_code=exit_code,
            status="interrupted" if interrupted else ("succeeded" if exit_code == 0 else "failed"),
            restored=restored.message,
            attention_core=_attention_cores(run_dir / "train.log"),
        )
        hint = failure_hint(plan, run_dir / "train.log") if exit_code not in (0, None) else None
        if hint is not None:
            manifest["hint"] = hint
        _write_manifest(run_dir, manifest)
    return RunRecord(run_dir=run_dir, exit_code=exit_code, manifest=manifest)
