"""Shared test helpers: the hand-written fixture trees under tests/fixtures/ as bytes or as git repos."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_root(name: str) -> Path:
    """The folder of fixture tree `name` (e.g. "v1_three")."""
    root = FIXTURES / name
    if not root.is_dir():
        known = ", ".join(sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
        raise KeyError(f"no fixture tree {name!r}; known: {known}")
    return root


def fixture_sources(name: str) -> dict[str, bytes]:
    """Repo-relative posix path -> bytes of every file of fixture tree `name`."""
    root = fixture_root(name)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_git_repo(tmp_path: Path, name: str) -> Path:
    """A fresh git repository (branch main) holding fixture tree `name` in one commit."""
    import git

    repo_dir = tmp_path / name
    shutil.copytree(fixture_root(name), repo_dir)
    repo = git.Repo.init(repo_dir, initial_branch="main")
    with repo.config_writer() as config:
        config.set_value("user", "name", "megaquant tests")
        config.set_value("user", "email", "tests@megaquant.invalid")
        config.set_value("core", "autocrlf", "false")
    repo.git.add("--all")
    repo.index.commit(f"fixture {name}")
    return repo_dir


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Import a script that is no package module (benchmarks/*.py, train_config.py) under `name`."""
    spec = importlib.util.spec_from_file_location(name or f"script_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_sample_files(root: Path) -> None:
    """Stand-ins (not a real dataset) for the files `megaquant data prepare --dataset sample` writes under
    `root`: what the launcher's preflight looks for, for tests that never read the data."""
    prefix = root / "dataset/sample_processed/sample_processed_text_document"
    prefix.parent.mkdir(parents=True)
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(b"x")
    (root / "tokenizers/megaquant-bpe").mkdir(parents=True)
    (root / "tokenizers/megaquant-bpe/tokenizer.json").write_text("{}")
