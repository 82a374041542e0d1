"""Before a run sets anything: which Megatron would train (and can it), and do its data and tokenizer exist.

`torchrun ... <entry>` runs with the tree first on PYTHONPATH; `megatron` is a namespace package, so
`megatron.training` comes from the tree when it has one, else from the installed megatron-core. Nothing
here imports Megatron: it reads files (package_info.py, the data prefix, the tokenizer directory).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MIN_PYTHON_FROM",
    "Preflight",
    "TrainingMegatron",
    "data_problems",
    "preflight",
    "training_megatron",
    "training_problem",
]

MIN_PYTHON_FROM = ((0, 17), (3, 12))
"""megatron-core >= 0.17 declares Python >= 3.12 (0.16.1 is the newest release for Python 3.11, and it
ships no megatron/training)."""

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, kw_only=True)
class TrainingMegatron:
    """The Megatron whose `megatron.training` a run would import."""

    root: Path
    """The directory holding `megatron/` (its `megatron/training` trains)."""
    version: str
    origin: str
    """'tree' (the tree that trains has megatron/training) or 'installed' (the installed megatron-core)."""

    def describe(self) -> str:
        where = "the tree that trains" if self.origin == "tree" else "the installed megatron-core"
        return f"{where}, {self.root}"


@dataclass(frozen=True, kw_only=True)
class Preflight:
    training: TrainingMegatron | None
    problems: tuple[str, ...]
    """Why the run would fail at start-up (each one actionable)."""
    notes: tuple[str, ...] = ()


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:2]:
        digits = re.match(r"\d+", part)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


def training_megatron(tree: Path | None) -> TrainingMegatron | None:
    """The Megatron with `megatron/training` that `tree` (first on PYTHONPATH) would train with, or None."""
    from megaquant.launch.validate import megatron_version
    from megaquant.megatron_src import installed_megatron

    for root, origin in ((tree, "tree"), (installed_megatron(), "installed")):
        if root is not None and (root / "megatron" / "training" / "arguments.py").is_file():
            return TrainingMegatron(root=root, version=megatron_version(root), origin=origin)
    return None


def _installed_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def training_problem(
    tree: Path, training: TrainingMegatron | None, *, python: tuple[int, int] | None = None
) -> str | None:
    """Why `tree` cannot train under this Python (no megatron/training anywhere, or one too new), or None."""
    python = python or (sys.version_info.major, sys.version_info.minor)
    py = f"{python[0]}.{python[1]}"
    newer = "pip install 'megaquant[megatron]' under Python >= 3.12 (it installs megatron-core 0.19.2)"
    checkout = (
        "or pass --megatron PATH to a Megatron-LM checkout (git clone https://github.com/NVIDIA/Megatron-LM, "
        "then `megaquant instrument --repo PATH`)"
    )
    if training is None:
        installed = _installed_version()
        have = f"the installed megatron-core {installed}" if installed else "no megatron-core is installed"
        why = (
            f" (megatron-core 0.16.1, the newest release for Python {py}, ships only megatron/core)"
            if python < MIN_PYTHON_FROM[1]
            else ""
        )
        return (
            f"{tree} cannot train: it has no megatron/training, and {have} has none either{why}. "
            f"megatron-core >= 0.17 needs Python >= 3.12: {newer}, {checkout}"
        )
    (min_version, min_python) = MIN_PYTHON_FROM
    if _version_tuple(training.version) >= min_version and python < min_python:
        return (
            f"{tree} cannot train under Python {py}: it would import megatron-core {training.version} "
            f"({training.describe()}), which needs Python >= 3.12. Run megaquant under Python >= 3.12 "
            f"({newer}), {checkout} at a release that supports Python {py}"
        )
    return None


def _values(argv: Sequence[str], flag: str) -> list[str]:
    """The values after the last occurrence of `flag` (up to the next option)."""
    if flag not in argv:
        return []
    at = len(argv) - 1 - list(reversed(argv)).index(flag)
    out = []
    for value in argv[at + 1 :]:
        if value.startswith("--"):
            break
        out.append(value)
    return out


def data_problems(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(problems, notes) for the dataset prefixes and the tokenizer the Megatron argv reads."""
    from megaquant.data import dataset_problem

    problems: list[str] = []
    notes: list[str] = []
    if "--mock-data" not in argv:
        for value in _values(argv, "--data-path"):
            if re.fullmatch(r"[0-9.eE+-]+", value):  # a blend weight, not a prefix
                continue
            problem = dataset_problem(Path(value))
            if problem is not None:
                problems.append(f"dataset {problem}")
    tokenizer = _values(argv, "--tokenizer-model")
    kind = _values(argv, "--tokenizer-type")
    if tokenizer and kind == ["HuggingFaceTokenizer"]:
        name = tokenizer[0]
        path = Path(name).expanduser()
        if path.is_dir():
            if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                problems.append(f"tokenizer {path}: no tokenizer.json or tokenizer_config.json in it")
        elif path.exists() or not _HUB_NAME.match(name):
            problems.append(
                f"tokenizer {name}: {'not a directory' if path.exists() else 'no such directory'}; "
                "pass --tokenizer DIR (a Hugging Face tokenizer "
                "directory), or prepare the sample dataset (`megaquant data prepare --dataset sample`)"
            )
        else:
            notes.append(
                f"tokenizer {name} is a Hugging Face hub name: the run needs hub access or a local cache; "
                "offline, pass --tokenizer DIR"
            )
    return problems, notes


def preflight(
    tree: Path, argv: Sequence[str], *, is_tree: bool, environ: Mapping[str, str], train_command_env: str
) -> Preflight:
    """Everything that would make the run fail at start-up. The trainability check is skipped when the test
    hook `train_command_env` replaces the training command (it does not import the tree's Megatron)."""
    training = training_megatron(tree if is_tree else None)
    problems, notes = data_problems(argv)
    if not environ.get(train_command_env):
        problem = training_problem(tree, training)
        if problem is not None:
            problems.insert(0, problem)
    return Preflight(training=training, problems=tuple(problems), notes=tuple(notes))
