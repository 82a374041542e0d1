"""CLI commands of the launcher: `megaquant train`, `megaquant scripts`, `megaquant data prepare`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from megaquant.launch.datasets import DATASETS
from megaquant.launch.models import MODELS
from megaquant.launch.modes import MODES
from megaquant.launch.presets import PRESETS
from megaquant.recipes import DEFAULT_RECIPE, RECIPES

__all__ = ["register"]

_Opt = typer.Option


def register(app: typer.Typer) -> None:
    @app.command(
        "train",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def train_command(
        ctx: typer.Context,
        model: Annotated[str, _Opt(help=f"One of: {', '.join(MODELS)}.")] = "llama32-1b",
        dataset: Annotated[str, _Opt(help=f"One of: {', '.join(DATASETS)}.")] = "wikipedia",
        quantization: Annotated[
            str, _Opt("--quantization", "-q", "--mode", help=f"One of: {', '.join(MODES)}.")
        ] = "bf16",
        training_config: Annotated[
            str, _Opt("--training-config", "--preset", help=f"One of: {', '.join(PRESETS)}.")
        ] = "fast",
        megatron: Annotated[Path, _Opt(help="The Megatron-LM tree (git checkout) to set and train.")] = Path(
            "."
        ),
        mock_data: Annotated[bool, _Opt("--mock-data", help="Megatron's mock data; no dataset.")] = False,
        data_root: Annotated[Path | None, _Opt(help="Where dataset/ lives (default: the tree).")] = None,
        tokenizer: Annotated[str | None, _Opt(help="Tokenizer directory or hub name.")] = None,
        linear: Annotated[
            str | None, _Opt(help="Override every linear role the tree has (fwd, dgrad, wgrad).")
        ] = None,
        qk: Annotated[str | None, _Opt(help="Override the attention QK role.")] = None,
        pv: Annotated[str | None, _Opt(help="Override the attention PV role.")] = None,
        recipe: Annotated[
            str, _Opt(help=f"Training recipe (docs/recipes.md): {', '.join(RECIPES)}.")
        ] = DEFAULT_RECIPE,
        cuda_graphs: Annotated[
            str,
            _Opt(help="auto | on | off: Megatron's full-iteration CUDA graph (auto: on where it is safe)."),
        ] = "auto",
        validation_seed: Annotated[
            int | None,
            _Opt(
                help="Shuffle the validation split by this seed instead of the run's --seed, so runs of "
                "different seeds evaluate the same text (megaquant's own training entry)."
            ),
        ] = None,
        tp: Annotated[int, _Opt(help="Tensor model parallel size.")] = 1,
        pp: Annotated[int, _Opt(help="Pipeline model parallel size.")] = 1,
        ep: Annotated[int, _Opt(help="Expert model parallel size (MoE models).")] = 1,
        nproc_per_node: Annotated[int, _Opt(help="GPUs (processes) per node.")] = 1,
        nnodes: Annotated[int, _Opt(help="Nodes.")] = 1,
        node_rank: Annotated[int, _Opt(help="This node's rank (multi-node without --slurm).")] = 0,
        master_addr: Annotated[str, _Opt(help="Rendezvous host (node 0).")] = "127.0.0.1",
        master_port: Annotated[int, _Opt(help="Rendezvous port.")] = 29500,
        rdzv_id: Annotated[str | None, _Opt(help="c10d rendezvous id (elastic / Slurm).")] = None,
        run_dir: Annotated[Path | None, _Opt(help="Run directory (default runs/<time>-<run>).")] = None,
        worktree: Annotated[Path | None, _Opt(help="Set the roles in a new git worktree DIR.")] = None,
        spec: Annotated[str | None, _Opt(help="Rewrite spec (default: the tree's, else fork).")] = None,
        dry_run: Annotated[bool, _Opt("--dry-run", help="Print the command and role values only.")] = False,
        as_json: Annotated[bool, _Opt("--json", help="With --dry-run: print one JSON object.")] = False,
        no_validate: Annotated[
            bool, _Opt("--no-validate", help="Skip Megatron's own argument validation.")
        ] = False,
        slurm: Annotated[bool, _Opt("--slurm", help="Write an sbatch script into the run dir.")] = False,
        submit: Annotated[bool, _Opt("--submit", help="With --slurm: submit it with sbatch.")] = False,
        partition: Annotated[str | None, _Opt(help="Slurm partition.")] = None,
        time_limit: Annotated[str | None, _Opt("--time", help="Slurm time limit.")] = None,
        account: Annotated[str | None, _Opt(help="Slurm account.")] = None,
        srun: Annotated[bool, _Opt("--srun", hidden=True, help="Inside sbatch: torchrun per node.")] = False,
        steps: Annotated[
            int | None, _Opt(help="Optimizer steps instead of the preset's length (LR schedule follows).")
        ] = None,
        list_registries: Annotated[bool, _Opt("--list", help="Show the registries.")] = False,
    ) -> None:
        """Train MODEL on DATASET under a quantization mode: set roles, launch torchrun, record, restore.

        Extra Megatron arguments go after `--`.
        """
        from megaquant.launch.argv import Parallel
        from megaquant.launch.launcher import format_listing, train
        from megaquant.launch.run import TrainRequest
        from megaquant.launch.scripts import SlurmOptions

        if list_registries:
            sys.stdout.write(format_listing())
            return
        request = TrainRequest(
            model=model,
            dataset=None if mock_data else dataset,
            mode=quantization,
            preset=training_config,
            megatron=megatron,
            data_root=data_root,
            tokenizer=tokenizer,
            linear=linear,
            qk=qk,
            pv=pv,
            parallel=Parallel(
                tp=tp,
                pp=pp,
                ep=ep,
                nproc_per_node=nproc_per_node,
                nnodes=nnodes,
                node_rank=node_rank,
                master_addr=master_addr,
                master_port=master_port,
                rdzv_id=rdzv_id,
            ),
            run_dir=run_dir,
            worktree=worktree,
            spec=spec,
            srun=srun,
            extra=tuple(ctx.args),
            steps=steps,
            recipe=recipe,
            cuda_graphs=cuda_graphs,
            validation_seed=validation_seed,
        )
        options = SlurmOptions(partition=partition, time=time_limit, account=account) if slurm else None
        code = train(
            request,
            out=sys.stdout,
            dry_run=dry_run,
            as_json=as_json,
            validate=not no_validate,
            slurm=options,
            submit=submit,
        )
        raise typer.Exit(code)

    @app.command("scripts")
    def scripts_command(
        out: Annotated[Path, _Opt("--out", help="Directory for the generated scripts.")],
        megatron: Annotated[str, _Opt(help="Megatron tree the scripts train.")] = "${MEGATRON:-.}",
        training_config: Annotated[str, _Opt("--training-config", help="Preset.")] = "fast",
    ) -> None:
        """Write one script per model x dataset x mode (60), each a one-line `megaquant train` call."""
        from megaquant.launch.presets import get_preset
        from megaquant.launch.scripts import combination_scripts

        get_preset(training_config)
        out.mkdir(parents=True, exist_ok=True)
        scripts = combination_scripts(megatron=megatron, preset=training_config)
        for name, text in scripts.items():
            path = out / name
            path.write_text(text)
            path.chmod(0o755)
        typer.echo(f"wrote {len(scripts)} scripts to {out}")

    data_app = typer.Typer(help="Prepare Megatron indexed datasets.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("prepare")
    def prepare_command(
        dataset: Annotated[str | None, _Opt(help=f"Registry dataset: {', '.join(DATASETS)}.")] = None,
        inputs: Annotated[
            list[Path] | None, _Opt("--input", help="Input file(s): .jsonl/.json/.json.gz, `text` key.")
        ] = None,
        output: Annotated[str | None, _Opt(help="Output prefix (writes <prefix>.bin/.idx).")] = None,
        tokenizer: Annotated[
            Path | None, _Opt(help="Tokenizer directory (tokenizer.json); sample: built offline.")
        ] = None,
        data_root: Annotated[Path, _Opt(help="Root the registry paths are relative to.")] = Path("."),
        append_eod: Annotated[bool, _Opt(help="Append the end-of-document token.")] = True,
        max_documents: Annotated[
            int | None, _Opt(help="A package corpus (realtext): only its first N documents, a slice.")
        ] = None,
        megatron: Annotated[
            Path | None,
            _Opt(help="A Megatron-LM tree whose own megatron package writes the files (default: installed)."),
        ] = None,
    ) -> None:
        """Tokenize JSON-lines text into `<prefix>.bin/.idx` with megatron-core's IndexedDatasetBuilder."""
        from megaquant.data import prepare_dataset

        result = prepare_dataset(
            dataset=dataset,
            inputs=tuple(inputs or ()),
            output=output,
            tokenizer=tokenizer,
            data_root=data_root,
            append_eod=append_eod,
            progress=True,
            max_documents=max_documents,
            megatron=megatron,
        )
        typer.echo(
            f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} tokens "
            f"(tokenizer {result.tokenizer})"
        )
