"""One step past the parser: build each model with megaquant's own model provider on the meta device (no
GPU, no memory), in a child process over a Megatron tree, so "accepted" means "the model builds".

The parent side is bookkeeping; `python -m megaquant.launch.buildcheck` is the child. It reads a JSON
request from stdin ({"source": tree, "cases": [{"name", "argv"}]}), puts the tree first on sys.path, and
for each case runs Megatron's parse_args + validate_args and then `megaquant.launch.pretrain`'s
`_model_provider` (the code that builds the model under `megaquant train`) inside `torch.device("meta")`.
Trees with `megatron/training` use Megatron's own `core_transformer_config_from_args`; a megatron-core
without it (0.16.1) gets its TransformerConfig from arguments parsed by sources that have one (a parser
child, or `Built.namespace` of an earlier build), translated field by field (`config_from_namespace`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaquant.errors import LaunchError
from megaquant.megatron_src import quiet_megatron_import

__all__ = ["Built", "build_args", "build_models", "config_from_namespace"]


@dataclass(frozen=True, kw_only=True)
class Built:
    name: str
    ok: bool
    error: str
    """The exception that stopped the build ('' when it built)."""
    layers: tuple[str, ...] = ()
    """Attention and MLP module class names of each built layer (what actually got built)."""
    parameters: int = 0
    expert_modules: int = 0
    """MoE layers whose experts' GEMMs megaquant.launch.pretrain counts per rank (count_expert_gemms)."""
    namespace: Mapping[str, Any] = field(default_factory=dict)
    """Megatron's parsed arguments (JSON-able part) when the tree parsed them: reusable as `namespaces`."""


def build_args(argv: Sequence[str], *, layers: int, moe_layer_freq: str | None = None) -> list[str]:
    """A registry argv made cheap to build: `layers` layers (MoE models: the `moe_layer_freq` pattern so
    that dense and expert layers both appear) and CPU initialization (on the meta device: no memory)."""
    out = list(argv)
    for flag, value in (("--num-layers", str(layers)), ("--moe-layer-freq", moe_layer_freq)):
        if value is None or flag not in out:
            continue
        out[out.index(flag) + 1] = value
    return [*out, "--use-cpu-initialization"]


def _run_child(module: str, request: Mapping[str, object], python: str) -> list[dict[str, Any]]:
    from megaquant.launch.validate import json_child

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    root = str(Path(__file__).resolve().parents[2])  # this megaquant, importable in the child
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])

    answer, done = json_child(module, request, python=python, env=env)
    if answer is None:
        raise LaunchError(
            f"the model-build check could not run over {request.get('source')} (exit {done.returncode}):\n"
            f"{done.stderr.strip()[-2000:]}"
        )
    result: list[dict[str, Any]] = answer
    return result


def build_models(
    cases: Mapping[str, Sequence[str]],
    source: Path,
    *,
    parser: Path | None = None,
    python: str = sys.executable,
    stock_spec: Sequence[str] = (),
    namespaces: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Built]:
    """Build every case (name -> Megatron argv, see `build_args`) over the tree `source`. `parser`: the
    sources whose megatron/training parses the argv when `source` has none (e.g. instrumented 0.16.1).
    `namespaces`: instead of `parser`, the parsed arguments of each case (`Built.namespace` of a build
    over a tree that parses). `stock_spec`: cases built on megatron-core's local spec as it is (no MLA fix).
    """
    request: dict[str, object] = {
        "source": str(source),
        "cases": [
            {"name": name, "argv": list(argv), "stock_spec": name in stock_spec}
            for name, argv in cases.items()
        ],
    }
    if not (source / "megatron" / "training").is_dir():
        if namespaces is None:
            if parser is None:
                raise LaunchError(f"{source} has no megatron/training; pass parser= (sources that have one)")
            parsed = _run_child(
                "megaquant.launch.buildcheck", {**request, "source": str(parser), "parse": 1}, python
            )
            bad = [p for p in parsed if not p["ok"]]
            if bad:
                raise LaunchError(f"Megatron {parser} rejects {bad[0]['name']}: {bad[0]['error']}")
            namespaces = {p["name"]: p["namespace"] for p in parsed}
        request["namespaces"] = [namespaces[name] for name in cases]
    results = _run_child("megaquant.launch.buildcheck", request, python)
    return {
        r["name"]: Built(
            name=r["name"],
            ok=bool(r["ok"]),
            error=str(r["error"]),
            layers=tuple(r.get("layers", ())),
            parameters=int(r.get("parameters", 0)),
            expert_modules=int(r.get("expert_modules", 0)),
            namespace=r.get("namespace", {}),
        )
        for r in results
    }


# ---------------------------------------------------------------- the child (imports Megatron and torch)


def config_from_namespace(namespace: Mapping[str, Any]) -> Any:
    """A TransformerConfig (MLATransformerConfig for MLA) of the installed megatron-core from parsed
    Megatron arguments: every config field the namespace has, plus the translations Megatron's own
    `core_transformer_config_from_args` makes (activation, GQA groups, experts, layer-norm persistence)."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    with quiet_megatron_import():
        from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    kind = MLATransformerConfig if namespace.get("multi_latent_attention") else TransformerConfig
    kw = {f.name: namespace[f.name] for f in dataclasses.fields(kind) if f.init and f.name in namespace}
    kw["params_dtype"] = kw["pipeline_dtype"] = torch.bfloat16 if namespace.get("bf16") else torch.float32
    kw["persist_layer_norm"] = not namespace.get("no_persist_layer_norm", False)
    kw["num_moe_experts"] = namespace.get("num_experts")
    kw["num_query_groups"] = (
        namespace.get("num_query_groups") if namespace.get("group_query_attention") else None
    )
    if namespace.get("swiglu"):
        kw.update(activation_func=F.silu, gated_linear_unit=True, bias_activation_fusion=False)
    if namespace.get("rope_type") is None:
        kw.pop("rope_type", None)
    for name in ("cuda_graph_impl", "cuda_graph_modules", "cuda_graph_scope"):
        kw.pop(name, None)  # how the step runs, not what is built (0.16.1 lacks the newer graph choices)
    if isinstance(kw.get("cp_comm_type"), list) and len(kw["cp_comm_type"]) == 1:
        kw["cp_comm_type"] = kw["cp_comm_type"][0]
    return kind(**kw)


class _NoStream:
    """Stands in for torch.cuda.Stream / Event when building on a machine without CUDA (never used)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass


def _jsonable(namespace: Any) -> dict[str, Any]:
    out = {}
    for key, value in vars(namespace).items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out


def _describe(model: Any) -> tuple[list[str], int]:
    layers = []
    for layer in model.decoder.layers:
        attention = layer.self_attention
        text = f"{type(attention).__name__}+{type(layer.mlp).__name__}"
        if hasattr(attention, "kv_layernorm"):  # MLA: which norms were built
            q_norm = getattr(attention, "q_layernorm", None)
            text += f" (q norm {type(q_norm).__name__}, kv norm {type(attention.kv_layernorm).__name__})"
        layers.append(text)
    return layers, sum(p.numel() for p in model.parameters())


def _child() -> int:
    import contextlib
    import io
    import tempfile
    import typing

    request = json.load(sys.stdin)
    sys.path.insert(0, request["source"])
    if not hasattr(typing, "override"):  # megatron-core 0.19 uses the 3.12-only name
        import typing_extensions

        typing.override = typing_extensions.override  # type: ignore[attr-defined]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    out = sys.stdout
    has_training = (Path(request["source"]) / "megatron" / "training").is_dir()
    results: list[dict[str, Any]] = []
    with contextlib.redirect_stdout(io.StringIO()):
        import torch

        if has_training:
            from megaquant.launch.validate import reuse_megatron_parser

            with quiet_megatron_import():
                import megatron.training.arguments as arguments
            reuse_megatron_parser(arguments)
        if request.get("parse"):
            for case in request["cases"]:
                sys.argv = ["pretrain_gpt.py", *case["argv"]]
                try:
                    args = arguments.parse_args()
                    arguments.validate_args(args)
                    results.append(
                        {"name": case["name"], "ok": True, "error": "", "namespace": _jsonable(args)}
                    )
                except (Exception, SystemExit) as exc:
                    results.append({"name": case["name"], "ok": False, "error": repr(exc), "namespace": {}})
            out.write(json.dumps(results) + "\n")
            return 0
        with quiet_megatron_import():
            from megatron.core import parallel_state

        if not torch.cuda.is_available():
            # Some modules place small buffers on `torch.cuda.current_device()` whatever the init device
            # (MLA's YaRN rotary embedding); without a GPU that device is the CPU (a hardware question).
            # MoE's alltoall dispatcher creates a CUDA stream in its constructor; nothing runs here, so a
            # placeholder stream / event object stands in.
            torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment, return-value]
            torch.cuda.Stream = torch.cuda.Event = _NoStream  # type: ignore[assignment, misc]
        with tempfile.TemporaryDirectory() as tmp:
            torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
            parallel_state.initialize_model_parallel()
            for i, case in enumerate(request["cases"]):
                results.append(_build_one(case, request, i, has_training))
    out.write(json.dumps(results) + "\n")
    return 0


def _build_one(
    case: Mapping[str, Any], request: Mapping[str, Any], i: int, has_training: bool
) -> dict[str, Any]:
    try:
        namespace = request["namespaces"][i] if not has_training else None
        with _local_spec(stock=bool(case.get("stock_spec"))):
            model, parsed = _build(case, namespace)
        layers, parameters = _describe(model)
        from megaquant.launch.pretrain import count_expert_gemms

        return {"name": case["name"], "ok": True, "error": "", "layers": layers, "parameters": parameters,
                "expert_modules": count_expert_gemms(model), "namespace": parsed}  # fmt: skip
    except Exception as exc:
        return {"name": case["name"], "ok": False, "error": f"{type(exc).__name__}: {exc}"}


@contextlib.contextmanager
def _local_spec(*, stock: bool) -> Iterator[None]:
    """stock: megatron-core's local spec as it is, without megaquant's MLA fix (shows what it is for)."""
    from megaquant.launch import layer_spec

    original = layer_spec._fix_mla
    if stock:
        layer_spec._fix_mla = lambda layer: None
    try:
        yield
    finally:
        layer_spec._fix_mla = original


def _build(case: Mapping[str, Any], namespace: Mapping[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """The model `megaquant train` would build, on the meta device, and the parsed arguments when the tree
    parsed them (namespace None)."""
    import torch

    from megaquant.launch import pretrain

    if namespace is not None:  # megatron-core without megatron/training: arguments from the parser child
        config = config_from_namespace(namespace)
        with torch.device("meta"):
            return pretrain.build_gpt(config, namespace, vocab_size=namespace["vocab_size"]), {}
    with quiet_megatron_import():
        import megatron.training.arguments as arguments
        import megatron.training.global_vars as global_vars

    sys.argv = ["pretrain_gpt.py", *case["argv"]]
    args = arguments.parse_args()
    arguments.validate_args(args)
    args.padded_vocab_size = args.vocab_size  # NullTokenizer's vocab (what build_tokenizer pads to)
    global_vars.set_args(args)
    with torch.device("meta"):
        return pretrain._model_provider(), _jsonable(args)


if __name__ == "__main__":
    raise SystemExit(_child())
