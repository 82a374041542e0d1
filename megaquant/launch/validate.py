"""Validate Megatron argv with Megatron's own `parse_args()` + `validate_args()` (and the sample counts
`pretrain()` derives next), in a child process.

The parent side is pure bookkeeping; `python -m megaquant.launch.validate` is the child that imports
Megatron (sources put first on sys.path) and checks a batch of argv read as JSON from stdin.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaquant.errors import LaunchError
from megaquant.launch.argv import TRAIN_ENV
from megaquant.megatron_src import quiet_megatron_import

TARGET_ARCH = 9
"""GPU major architecture assumed when validating on a machine without CUDA (9: Hopper, e.g. H100/H200)."""

__all__ = [
    "TARGET_ARCH",
    "Case",
    "Verdict",
    "json_child",
    "megatron_version",
    "reuse_megatron_parser",
    "source_for",
    "validate",
]


@dataclass(frozen=True, kw_only=True)
class Case:
    argv: tuple[str, ...]
    """Megatron arguments only (no program name, no megaquant-only flags)."""
    world_size: int = 1
    env: tuple[tuple[str, str], ...] = tuple(TRAIN_ENV.items())
    """Environment the run has (Megatron checks e.g. CUDA_DEVICE_MAX_CONNECTIONS for TP > 1)."""


@dataclass(frozen=True, kw_only=True)
class Verdict:
    ok: bool
    error: str
    """Megatron's own message ('' when accepted): argparse's usage error or the failed assertion."""


def megatron_version(source: Path) -> str:
    """The megatron-core version of a source directory (from megatron/core/package_info.py), or '?'."""
    try:
        text = (source / "megatron" / "core" / "package_info.py").read_text()
    except OSError:
        return "?"
    parts = [re.search(rf"^{key}\s*=\s*(\S+)", text, re.M) for key in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1).strip("'\"") for m in parts if m) or "?"


def source_for(tree: Path | None) -> Path:
    """Where the argument parser comes from: the tree when it has megatron/training, else the installed
    megatron-core when it ships megatron/training, else the pinned wheel's sources (downloaded once)."""
    from megaquant.megatron_src import PINNED_VERSION, installed_megatron, megatron_sources

    for candidate in (tree, installed_megatron()):
        if candidate is not None and (candidate / "megatron" / "training" / "arguments.py").is_file():
            return candidate
    return megatron_sources(PINNED_VERSION)


def validate(cases: Sequence[Case], source: Path, *, python: str = sys.executable) -> list[Verdict]:
    """One child process checks every case; a child that cannot import Megatron raises LaunchError."""
    batch = [{"argv": list(c.argv), "world_size": c.world_size, "env": dict(c.env)} for c in cases]
    request = {"source": str(source), "cases": batch}
    answer, done = json_child("megaquant.launch.validate", request, python=python)
    if answer is None:
        raise LaunchError(
            f"could not run Megatron's argument parser from {source} (exit {done.returncode}):\n"
            f"{done.stderr.strip()[-1500:]}\nInstall the megatron extra (pip install 'megaquant[megatron]', "
            "which brings triton) or pass --no-validate"
        )
    return [Verdict(ok=bool(r["ok"]), error=str(r["error"])) for r in answer]


def json_child(
    module: str, request: object, *, python: str, env: Mapping[str, str] | None = None
) -> tuple[Any, subprocess.CompletedProcess[str]]:
    """`python -m module` with `request` as JSON on stdin; (its last stdout line as JSON, or None when it
    failed or printed nothing, and the finished process)."""
    done = subprocess.run(
        [python, "-m", module],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else dict(env),
    )
    last = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []
    return (json.loads(last[0]) if done.returncode == 0 and last else None), done


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, tuple, frozenset, range)


def reuse_megatron_parser(arguments: Any) -> None:
    """Make Megatron's `parse_args()` (module `arguments`, megatron.training.arguments) reuse the parser it
    built, in this process: building it (`add_megatron_arguments`, ~1000 options, some from config
    dataclasses) takes ~0.3 s, parsing one argv ~2 ms, and a child checks hundreds of argv.

    The same parse as a fresh parser, since `add_megatron_arguments` is pure given the environment (one
    default reads WORLD_SIZE): one parser per environment, and before each reuse every default that is
    not immutable is a fresh copy of the one first built (argparse puts a default object itself into the
    namespace, and validate_args may change it in place). Trees without `add_megatron_arguments` (or with
    defaults that cannot be copied) keep building a parser per call."""
    import copy

    build = getattr(arguments, "add_megatron_arguments", None)
    if build is None:
        return
    built: dict[frozenset[tuple[str, str]], tuple[Any, list[tuple[Any, Any]], dict[str, Any]]] = {}

    def add_megatron_arguments(parser: Any) -> Any:
        key = frozenset(os.environ.items())
        if key not in built:
            full = build(parser)
            try:
                pristine = [
                    (a, copy.deepcopy(a.default))
                    for a in full._actions
                    if not isinstance(a.default, _IMMUTABLE)
                ]
                built[key] = (full, pristine, copy.deepcopy(full._defaults))
            except Exception:  # a default that cannot be copied: no reuse
                arguments.add_megatron_arguments = build
            return full
        full, pristine, parser_defaults = built[key]
        for action, default in pristine:
            action.default = copy.deepcopy(default)
        full._defaults = copy.deepcopy(parser_defaults)
        return full

    arguments.add_megatron_arguments = add_megatron_arguments


def _child() -> int:
    import contextlib
    import io
    import typing

    request = json.load(sys.stdin)
    sys.path.insert(0, request["source"])
    if not hasattr(typing, "override"):  # megatron-core 0.19 uses the 3.12-only name
        import typing_extensions

        typing.override = typing_extensions.override  # type: ignore[attr-defined]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    out = sys.stdout
    with contextlib.redirect_stdout(io.StringIO()), quiet_megatron_import():
        import megatron.training.arguments as arguments
        import megatron.training.global_vars as global_vars
        import megatron.training.training as training
        import torch

    if not torch.cuda.is_available():
        # validate_args asks the GPU's architecture (for TP/CP > 1, to pick CUDA_DEVICE_MAX_CONNECTIONS
        # advice); without a GPU, answer for the target architecture instead (a hardware query, not argv).
        def target_arch() -> int:
            return int(request.get("target_arch", TARGET_ARCH))

        arguments.get_device_arch_version = target_arch
    reuse_megatron_parser(arguments)
    parse_args, validate_args = arguments.parse_args, arguments.validate_args

    results = []
    applied: dict[str, str] = {}
    for case in request["cases"]:
        os.environ["WORLD_SIZE"] = str(case["world_size"])
        for key in set(applied) - set(case["env"]):
            os.environ.pop(key, None)
        os.environ.update(case["env"])
        applied = case["env"]
        sys.argv = ["pretrain_gpt.py", *case["argv"]]
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                args = parse_args()
                validate_args(args)
                # what pretrain() derives next from the arguments (schedule length, eval sample counts):
                # catches argv that parse but crash at start-up (e.g. --eval-iters without --eval-interval)
                global_vars.set_args(args)
                training.update_train_iters(args)
                training.get_train_valid_test_num_samples()
            results.append({"ok": True, "error": ""})
        except SystemExit:
            lines = err.getvalue().strip().splitlines()
            results.append({"ok": False, "error": lines[-1] if lines else "argparse exited"})
        except Exception as exc:  # Megatron reports a rejected combination by assert / ValueError
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    out.write(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_child())
