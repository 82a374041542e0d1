"""Wall-clock of `megaquant status` and `megaquant set` on a Megatron-sized git repo vs parsing every file.

    python benchmarks/scan_speed.py [--repeat 5] [--fixture DIR]

The repo: the installed megatron-core (`megatron/core`, 366 .py files in 0.16.1) plus a second copy of it
under `mirror/` (Megatron-LM has `megatron/training`, `legacy`, `tools`, `tests` beside `core`), so the text
prefilter reads >= 600 .py files; the fork's two files replaced by fork-shaped fixtures at their fork paths.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

LAYERS = "megatron/core/tensor_parallel/layers.py"
ATTENTION = "megatron/core/transformer/dot_product_attention.py"


def fixture_files(fixture: Path | None) -> dict[str, bytes]:
    """The fork-variant files: from --fixture DIR (a tree with the fork paths), else the first fixture tree
    under tests/fixtures that has both, else the fixture sources of tests/test_api.py."""
    fixtures = ROOT / "tests" / "fixtures"
    trees = [fixtures / "v1_three", *sorted(p for p in fixtures.glob("v*") if p.is_dir())]
    candidates = [fixture] if fixture else trees
    for tree in candidates:
        if (tree / LAYERS).is_file() and (tree / ATTENTION).is_file():
            print(f"fork-variant fixture: {tree}")
            return {LAYERS: (tree / LAYERS).read_bytes(), ATTENTION: (tree / ATTENTION).read_bytes()}
    sys.path.insert(0, str(ROOT / "tests"))
    import test_api

    print("fork-variant fixture: tests/test_api.py sources")
    return {LAYERS: test_api.LAYERS_SRC.encode(), ATTENTION: test_api.ATTENTION_SRC.encode()}


def build_repo(dest: Path, files: dict[str, bytes]) -> int:
    from megaquant.megatron_src import installed_megatron

    site = installed_megatron()
    if site is None:
        raise SystemExit("megatron-core is not installed (pip install -e '.[megatron]')")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    shutil.copytree(site / "megatron" / "core", dest / "megatron" / "core", ignore=ignore)
    shutil.copytree(site / "megatron" / "core", dest / "mirror" / "megatron_core_copy", ignore=ignore)
    for rel, data in files.items():
        (dest / rel).write_bytes(data)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@example.com"}
    env |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@example.com"}
    for argv in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "megatron-sized tree"]):
        subprocess.run(["git", *argv], cwd=dest, check=True, env=env)
    return sum(1 for _ in dest.rglob("*.py"))


def cli_seconds(repo: Path, *args: str) -> tuple[float, float]:
    """(wall, CPU user+sys) seconds of one `megaquant ...` subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    argv = [sys.executable, "-m", "megaquant", *args, "--repo", str(repo)]
    done = subprocess.run(argv, capture_output=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"megaquant {' '.join(args)} failed: {done.stderr.decode()}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def parse_all_seconds(repo: Path) -> tuple[float, float]:
    import libcst

    start, cpu = time.perf_counter(), time.process_time()
    for path in repo.rglob("*.py"):
        libcst.parse_module(path.read_bytes())
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fixture", type=Path, default=None, help="tree holding the fork's two files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="megaquant-bench-") as tmp:
        repo = Path(tmp) / "megatron-sized"
        count = build_repo(repo, fixture_files(args.fixture))
        cli_seconds(repo, "status")  # warm the page cache and .pyc files
        status = [cli_seconds(repo, "status") for _ in range(args.repeat)]
        status_json = [cli_seconds(repo, "status", "--json") for _ in range(args.repeat)]
        sets = []
        for _ in range(args.repeat):
            sets.append(cli_seconds(repo, "set", "--linear", "mxfp8", "--qk", "mxfp4"))
            cli_seconds(repo, "restore")
        (Path(tmp) / "megatron-sized" / ".git" / "megaquant-scan-cache.pickle").unlink()
        cold = cli_seconds(repo, "status", "--json")
        parse_all = parse_all_seconds(repo)
    rows = [
        ("megaquant status (median)", *median(status), 0.5),
        ("megaquant status --json (median)", *median(status_json), 0.5),
        ("megaquant status --json, no scan cache (1 run)", *cold, 0.5),
        ("megaquant set --linear mxfp8 --qk mxfp4 (median)", *median(sets), 1.0),
        (f"libcst parse of all {count} .py files (1 run)", *parse_all, None),
    ]
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\nmachine: {machine}, Python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")
    print(f"repo: {count} .py files; {args.repeat} runs each\n")
    header = ("wall s", "CPU s", "ratio wall", "ratio CPU", "target")
    print(f"| {'name':50} | " + " | ".join(header) + " |")
    print(f"|{'-' * 52}|" + "|".join("-" * (len(h) + 1) + ":" for h in header) + "|")
    for name, wall, cpu, target in rows:
        target_text = f"<= {target}" if target else ""
        ratios = f"{parse_all[0] / wall:9.1f}x | {parse_all[1] / cpu:8.1f}x"
        print(f"| {name:50} | {wall:6.3f} | {cpu:5.3f} | {ratios} | {target_text:>6} |")
    print("\nratio = parse-all time / this time (wall: elapsed; CPU: user+sys of the process)")


def median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


if __name__ == "__main__":
    main()
