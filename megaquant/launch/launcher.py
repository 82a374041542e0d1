"""What `megaquant train` and train_config.py do with a request: dry run, validation, Slurm script, run.

Both front ends are thin shells over `train()`; it writes human text (or JSON) to the stream it is given.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from megaquant.errors import LaunchError, MegaquantError
from megaquant.launch.datasets import DATASETS
from megaquant.launch.models import MODELS, get_model
from megaquant.launch.modes import ATTENTION_MODES, MODES, ROLES
from megaquant.launch.presets import PRESETS
from megaquant.launch.run import TRAIN_COMMAND_ENV, RunPlan, TrainRequest, command_for, execute, plan_run
from megaquant.launch.scripts import SlurmOptions, sbatch_script
from megaquant.recipes import RECIPES, bf16_layers_for_args, get_recipe, layer_count

if TYPE_CHECKING:
    from megaquant.launch.preflight import Preflight, TrainingMegatron

__all__ = ["Validation", "format_listing", "request_options", "train", "validate_plan"]


@dataclass(frozen=True, kw_only=True)
class Validation:
    checked: bool
    version: str | None
    """megatron-core version whose parser accepted the argv (None: not checked)."""
    note: str
    source: str | None = None
    """Where that parser came from: 'tree' / 'installed' (the Megatron that trains) or 'pinned'."""


def format_listing() -> str:
    """`--list`: every registry, read from the registries themselves."""
    lines = ["models:"]
    for m in MODELS.values():
        shape = f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads"
        lines.append(f"  {m.name:<16} {m.title} ({shape})")
    lines.append("datasets:")
    lines += [f"  {d.name:<16} {d.title}: {d.prefix}" for d in DATASETS.values()]
    lines.append(f"quantization modes ({', '.join(ROLES)}):")
    for mode in MODES.values():
        values = ", ".join(mode.values().values())
        variant = "  (attention variant)" if mode.name in ATTENTION_MODES else ""
        lines.append(f"  {mode.name:<16} {values}{variant}")
    lines.append("training configs:")
    for p in PRESETS.values():
        lines.append(
            f"  {p.name:<16} {p.title}; micro/global batch {p.micro_batch_size}/{p.global_batch_size}, "
            f"seq {p.seq_length}, lr {p.lr:g} -> {p.min_lr:g}"
        )
    lines.append("training recipes (--recipe; docs/recipes.md):")
    lines += [f"  {r.name:<16} {r.listing()}" for r in RECIPES.values()]
    return "\n".join(lines) + "\n"


def validate_plan(
    plan: RunPlan, *, enabled: bool = True, training: TrainingMegatron | None | bool = True
) -> Validation:
    """Megatron's own parse_args + validate_args on the plan's argv, with the parser of the Megatron that
    will train (`training`; True: look it up), else the pinned megatron-core sources — and the note says
    which. Raises LaunchError when Megatron rejects it; an unavailable parser (no megatron-core / triton, no
    network for the pinned sources) is a note, not an error."""
    if not enabled:
        return Validation(checked=False, version=None, note="not validated (--no-validate)")
    from megaquant.launch.preflight import training_megatron
    from megaquant.launch.validate import Case, megatron_version, validate
    from megaquant.megatron_src import PINNED_VERSION, megatron_sources

    if training is True:
        training = training_megatron(plan.tree if (plan.tree / "megatron" / "core").is_dir() else None)
    assert training is None or not isinstance(training, bool)
    try:
        source = training.root if training is not None else megatron_sources(PINNED_VERSION)
        verdict = validate(
            [Case(argv=plan.megatron_args, world_size=plan.request.parallel.world_size)], source
        )
    except MegaquantError as exc:
        return Validation(checked=False, version=None, note=f"not validated: {exc}")
    version = megatron_version(source)
    if training is not None:
        where, origin = training.describe(), training.origin
    else:
        where = f"the pinned megatron-core sources {source}; NOT the Megatron that would train (it has none)"
        origin = "pinned"
    if not verdict[0].ok:
        raise LaunchError(
            f"Megatron {version} ({where}) rejects the generated arguments: {verdict[0].error}\n"
            "Fix the conflicting option (model parallel sizes, extra arguments after --) and retry"
        )
    return Validation(
        checked=True,
        version=version,
        note=f"accepted by Megatron {version} parse_args + validate_args ({where})",
        source=origin,
    )


def request_options(request: TrainRequest) -> list[str]:
    """The `megaquant train` options that reproduce a request (for generated Slurm scripts). The rendezvous
    options (`--srun`, `--master-addr`, `--master-port`, `--rdzv-id`) are left to `sbatch_script`."""
    p = request.parallel
    opts = ["--model", request.model, "--quantization", request.mode, "--training-config", request.preset]
    opts += ["--recipe", request.recipe, "--cuda-graphs", request.cuda_graphs]
    opts += ["--dataset", request.dataset] if request.dataset else ["--mock-data"]
    opts += ["--megatron", str(request.megatron.absolute())]
    for flag, value in (
        ("--data-root", request.data_root),
        ("--tokenizer", request.tokenizer),
        ("--linear", request.linear),
        ("--qk", request.qk),
        ("--pv", request.pv),
        ("--run-dir", request.run_dir),
        ("--worktree", request.worktree),
        ("--spec", request.spec),
        ("--steps", None if request.steps is None else str(request.steps)),
    ):
        if value is not None:
            opts += [flag, str(Path(value).absolute()) if isinstance(value, Path) else value]
    opts += ["--tp", str(p.tp), "--pp", str(p.pp), "--ep", str(p.ep)]
    opts += ["--nproc-per-node", str(p.nproc_per_node), "--nnodes", str(p.nnodes)]
    return opts + (["--", *request.extra] if request.extra else [])


def _describe(
    plan: RunPlan, argv: list[str], env: dict[str, str], validation: Validation, check: Preflight
) -> str:
    model = get_model(plan.request.model)
    values = " ".join(f"{role}={value}" for role, value in plan.values.items())
    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    lines = [
        f"model {model.name} ({model.title}) | dataset {plan.request.dataset or 'mock'} | mode {plan.mode} | "
        f"training config {plan.request.preset}",
        f"role values: {values}",
        f"recipe: {plan.request.recipe} ({get_recipe(plan.request.recipe).title})",
        f"cuda graphs: {'on' if plan.cuda_graphs.enabled else 'off'} ({plan.cuda_graphs.reason})",
        *(
            [f"validation split shuffled by seed {plan.request.validation_seed} (not the run's --seed)"]
            if plan.request.validation_seed is not None
            else []
        ),
        *_bf16_line(plan),
        f"spec: {plan.spec}   tree: {plan.tree}   run dir: {plan.run_dir}",
        f"validation: {validation.note}",
        f"trains with: {check.training.describe() if check.training else '(no megatron/training found)'}",
        *(f"note: {n}" for n in (*plan.notes, *check.notes)),
        *(f"problem: {p}" for p in check.problems),
        "command:",
        f"  {env_text} {shlex.join(argv)}",
    ]
    return "\n".join(lines) + "\n"


def _bf16_line(plan: RunPlan) -> list[str]:
    """The dry run's line naming the recipe's BF16 layers (none when it keeps none)."""
    layers = bf16_layers_for_args(plan.request.recipe, plan.megatron_args)
    if not layers:
        return []
    rule = get_recipe(plan.request.recipe).bf16_rule().split(": ", 1)[1]
    numbers = ", ".join(map(str, layers))
    return [
        f"BF16 layers: {numbers} of {layer_count(plan.megatron_args)} (recipe {plan.request.recipe}: {rule})"
    ]


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def train(
    request: TrainRequest,
    *,
    out: TextIO,
    dry_run: bool = False,
    as_json: bool = False,
    validate: bool = True,
    slurm: SlurmOptions | None = None,
    submit: bool = False,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Run (or show, or script) one training run; returns the process exit code.

    On a Megatron tree, a run that would fail at start-up (no megatron/training to import, a missing
    dataset or tokenizer) is refused before anything is set; a dry run prints the plan first."""
    from megaquant.launch.preflight import preflight

    plan = plan_run(request, require_tree=not dry_run and slurm is None)
    is_tree = (plan.tree / "megatron" / "core").is_dir()
    check = preflight(
        plan.tree,
        plan.megatron_args,
        is_tree=is_tree,
        environ=os.environ,
        train_command_env=TRAIN_COMMAND_ENV,
    )
    refusal = None
    if is_tree and check.problems:
        refusal = LaunchError("the run would fail at start-up, nothing was set:\n" + "\n".join(
            f"  {p}" for p in check.problems))  # fmt: skip
        if not dry_run:
            raise refusal
    validation = validate_plan(plan, enabled=validate, training=check.training)
    if slurm is not None:
        script = sbatch_script(
            slurm,
            run_dir=plan.run_dir,
            launcher=[sys.executable, "-m", "megaquant", "train", *request_options(request)],
            nodes=request.parallel.nnodes,
            gpus_per_node=request.parallel.nproc_per_node,
            master_port=request.parallel.master_port,
        )
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        path = plan.run_dir / "train.sbatch"
        path.write_text(script)
        out.write(
            f"wrote {path} ({request.parallel.nnodes} nodes x {request.parallel.nproc_per_node} GPUs)\n"
        )
        if submit:
            done = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, check=False)
            out.write(done.stdout)
            if done.returncode != 0:
                raise LaunchError(f"sbatch {path} failed (exit {done.returncode}): {done.stderr.strip()}")
        return 0
    if dry_run:
        argv, env, _ = command_for(plan, plan.tree)
        if as_json:
            payload = {
                "model": plan.request.model,
                "dataset": plan.request.dataset,
                "mode": plan.mode,
                "preset": plan.request.preset,
                "recipe": plan.request.recipe,
                "cuda_graphs": {"enabled": plan.cuda_graphs.enabled, "reason": plan.cuda_graphs.reason},
                "validation_seed": plan.request.validation_seed,
                "bf16_layers": list(bf16_layers_for_args(plan.request.recipe, plan.megatron_args)),
                "values": plan.values,
                "spec": plan.spec,
                "megatron_args": list(plan.megatron_args),
                "argv": argv,
                "env": env,
                "validated_against": validation.version,
                "validated_source": validation.source,
                "trains_with": None if check.training is None else str(check.training.root),
                "notes": [*plan.notes, *check.notes],
                "problems": list(check.problems),
            }
            out.write(json.dumps(payload, indent=2) + "\n")
        else:
            out.write(_describe(plan, argv, env, validation, check))
        if refusal is not None:
            out.flush()
            raise refusal
        return 0
    out.write(f"run dir {plan.run_dir}; {validation.note}\n")
    record = execute(
        plan, echo=echo or (lambda line: _write(out, line)), validated_against=validation.version
    )
    out.write(f"exit code {record.exit_code}; manifest {record.run_dir / 'manifest.json'}\n")
    if record.manifest.get("hint"):
        out.write(f"hint: {record.manifest['hint']}\n")
    return record.exit_code
