"""Where Megatron's sources come from: the installed megatron-core, or a pinned wheel unpacked as text.

megatron-core 0.19.x (the only wheels that ship `megatron/training`) declares Python >= 3.12; on older
Pythons its sources are still readable, parseable and (with small shims) importable for argument parsing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

from megaquant.errors import MegaquantError

__all__ = ["PINNED_VERSION", "cache_dir", "installed_megatron", "megatron_sources", "quiet_megatron_import"]

PINNED_VERSION = "0.19.2"
"""The megatron-core release whose sources megaquant validates argv against and instruments in CI."""


BACKEND_FALLBACK_WARNING = (
    r"(?:(?:Transformer Engine|Apex)(?: and Apex)? (?:is|are)|absl\.logging is) not installed"
)
"""The start of the UserWarnings Megatron's modules emit on import when Transformer Engine / Apex are missing
("Transformer Engine and Apex are not installed. Falling back to ...", "Apex is not installed. ..."), and
megatron-core 0.19's `hyper_comm_grid` when absl is ("absl.logging is not installed. Using logging...")."""


@contextlib.contextmanager
def quiet_megatron_import() -> Iterator[None]:
    """Wrap every import of Megatron in megaquant: hides the Transformer Engine / Apex / absl fallback
    UserWarnings (megaquant runs Megatron's local implementation on purpose: only its GEMMs carry
    quantization sites) and nothing else; the filter is removed when the block ends."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=BACKEND_FALLBACK_WARNING, category=UserWarning)
        yield


def cache_dir() -> Path:
    """`$MEGAQUANT_CACHE`, else `$XDG_CACHE_HOME/megaquant`, else `~/.cache/megaquant`."""
    if env := os.environ.get("MEGAQUANT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "megaquant"


def installed_megatron() -> Path | None:
    """The directory that holds the installed `megatron/` package (its parent), or None; imports nothing."""
    try:
        dist = importlib.metadata.distribution("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None
    root = Path(str(dist.locate_file("")))
    return root if (root / "megatron" / "core").is_dir() else None


def megatron_sources(version: str = PINNED_VERSION, *, cache: Path | None = None) -> Path:
    """A directory containing `megatron/` from the megatron-core `version` wheel, downloaded once.

    The wheel is fetched with `pip download` (argv list, no shell) for Python 3.12 and unpacked; only
    Python sources and data are used, so the host Python may be older. Raises MegaquantError with the
    pip output when the package registry cannot be reached.
    """
    target = (cache or cache_dir()) / f"megatron-core-{version}"
    if (target / "megatron" / "core").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--dest",
            tmp,
            f"megatron-core=={version}",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("megatron_core-*.whl"))
        if done.returncode != 0 or not wheels:
            raise MegaquantError(
                f"could not download megatron-core=={version} (pip exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}\n"
                "Point --megatron at a Megatron-LM checkout instead, or retry with network access."
            )
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.startswith("megatron/")]
            wheel.extractall(unpacked, members=members)
        os.replace(unpacked, target)  # atomic: a crash never leaves a half-unpacked cache
    return target
