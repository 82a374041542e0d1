"""The CLI through typer's CliRunner and a real subprocess: output, exit codes, `error:` lines, JSON shape,
and docs/cli.md checked against the app (commands, options) with every documented example run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import git
import pytest
import typer.main
from test_api import ATTENTION, LAYERS, STATUS_KEYS, make_fork_repo, snapshot
from typer.testing import CliRunner

from megaquant import api
from megaquant.cli import app, build_app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def fork_repo(tmp_path: Path) -> Path:
    return make_fork_repo(tmp_path / "fork")


def test_status_json_shape(fork_repo: Path) -> None:
    code, out, err = invoke("status", "--repo", str(fork_repo), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == STATUS_KEYS
    assert data["branch"] == "main" and data["base"] is None and data["warnings"] == []
    assert len(data["sites"]) == 5
    for site in data["sites"]:
        assert {"file", "scope", "line", "value", "expr", "conditional", "roles"} <= set(site)
        assert isinstance(site["line"], int) and isinstance(site["roles"], list)


def test_status_human(fork_repo: Path) -> None:
    code, out, _ = invoke("status", "--repo", str(fork_repo))
    assert code == 0
    assert f"{LAYERS}\n" in out and f"{ATTENTION}\n" in out
    fwd = next(s for s in api.status(fork_repo).sites if s.roles == ("linear_fwd",))
    assert re.search(rf"^ +{fwd.line}  {re.escape(fwd.scope)}  'bf16'  linear_fwd$", out, re.M), out
    assert "(conditional)" in out


def test_set_diff_restore_round_trip(fork_repo: Path) -> None:
    before = snapshot(fork_repo)
    code, out, err = invoke("set", "--repo", str(fork_repo), "--linear", "mxfp8", "--qk", "mxfp4", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["branch"] == "megaquant/main" and len(data["commit"]) == 40
    linear = dict.fromkeys(("linear_fwd", "linear_dgrad", "linear_wgrad"), "mxfp8")
    assert data["values"] == {**linear, "qk": "mxfp4", "pv": "none"}
    assert {c["role"] for c in data["changes"]} == {*linear, "qk"}
    code, out, _ = invoke("status", "--repo", str(fork_repo), "--json")
    status = json.loads(out)
    assert status["base"]["branch"] == "main" and len(status["base"]["commit"]) == 40
    code, out, _ = invoke("diff", "--repo", str(fork_repo))
    assert code == 0 and f"+++ b/{ATTENTION}" in out and "+        custom_quant_type = 'mxfp4'" in out
    code, out, _ = invoke("restore", "--repo", str(fork_repo))
    assert code == 0 and "restored main@" in out
    assert snapshot(fork_repo) == before
    code, out, _ = invoke("restore", "--repo", str(fork_repo))
    assert code == 0 and "nothing to restore" in out


def test_dry_run_prints_diff(fork_repo: Path) -> None:
    before = snapshot(fork_repo)
    code, out, _ = invoke("set", "--repo", str(fork_repo), "--pv", "hifp8", "--dry-run")
    assert code == 0 and "+        custom_quant_type = 'hifp8'" in out and "dry run" in out
    assert snapshot(fork_repo) == before


def test_unknown_value_is_exit_1_listing_values(fork_repo: Path) -> None:
    code, _, err = invoke("set", "--repo", str(fork_repo), "--qk", "fp7")
    assert (
        code == 1 and err.startswith("error: ") and all(v in err for v in ("mxfp8", "mxfp4", "hifp8", "none"))
    )


def test_dirty_file_error_names_file(fork_repo: Path) -> None:
    (fork_repo / LAYERS).write_text((fork_repo / LAYERS).read_text() + "# wip\n")
    code, _, err = invoke("set", "--repo", str(fork_repo), "--linear", "mxfp8")
    assert code == 1 and err.startswith(f"error: {LAYERS}: has uncommitted changes")


def test_usage_errors_exit_2(fork_repo: Path) -> None:
    assert invoke("set", "--repo", str(fork_repo))[0] == 2  # no role given
    assert invoke("set", "--bogus")[0] == 2
    assert invoke("frobnicate")[0] == 2


def test_not_a_repo(tmp_path: Path) -> None:
    code, _, err = invoke("status", "--repo", str(tmp_path))
    assert code == 1 and err.startswith("error: ") and "not inside a git repository" in err


def test_registered_modules_are_built_in() -> None:
    names = set(typer.main.get_command(build_app(())).commands)  # type: ignore[attr-defined]
    assert names == {"status", "set", "restore", "diff"}


# ---------------------------------------------------------------- real subprocess


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "megaquant", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_subprocess_exit_codes_and_no_traceback(fork_repo: Path, tmp_path: Path) -> None:
    ok = run_cli("status", "--json", cwd=fork_repo)
    assert ok.returncode == 0 and json.loads(ok.stdout)["repo"] == str(fork_repo.resolve())
    bad_value = run_cli("set", "--linear", "fp7", cwd=fork_repo)
    assert bad_value.returncode == 1 and bad_value.stderr.startswith("error: ")
    assert "Traceback" not in bad_value.stderr
    not_repo = run_cli("restore", "--repo", str(tmp_path / "nowhere"))
    assert (
        not_repo.returncode == 1
        and not_repo.stderr.startswith("error: ")
        and "Traceback" not in not_repo.stderr
    )
    usage = run_cli("set", "--linear")
    assert usage.returncode == 2


def test_subprocess_unparsable_file_names_line(tmp_path: Path) -> None:
    from test_api import BROKEN_LAYERS_SRC, FILES

    broken = BROKEN_LAYERS_SRC
    root = make_fork_repo(tmp_path / "broken", {**FILES, LAYERS: broken})
    line = next(i for i, text in enumerate(broken.splitlines(), 1) if "\x01" in text)
    done = run_cli("set", "--linear", "mxfp8", cwd=root)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert re.search(rf"{re.escape(LAYERS)}:{line}\b", done.stderr), done.stderr
    assert git.Repo(root).active_branch.name == "main"


def test_status_warns_about_an_unrelated_unparsable_file_and_exits_0(tmp_path: Path) -> None:
    from test_api import FILES, UNRELATED, UNRELATED_SRC

    root = make_fork_repo(tmp_path / "fork", {**FILES, UNRELATED: UNRELATED_SRC})
    done = run_cli("status", cwd=root)
    assert done.returncode == 0, done.stderr
    assert f"warning: {UNRELATED}:2: cannot parse this file" in done.stderr and f"{LAYERS}\n" in done.stdout


# ---------------------------------------------------------------- docs/cli.md


CORE = ("status", "set", "restore", "diff")


def documented() -> dict[str, set[str]]:
    """command -> options listed in docs/cli.md's tables under `### megaquant <command>` (core commands)."""
    sections: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"### megaquant (\S+)$", line)
        if heading:
            current = sections.setdefault(heading.group(1), set())
        elif line.startswith("## "):
            current = None
        elif current is not None and line.startswith("| `"):
            current.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return sections


def registered_in_docs() -> set[str]:
    """Commands listed in the table of 'Commands added by other modules'."""
    text = DOC.read_text().split("## Commands added by other modules", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z-]+)` \|", text, re.M))


def actual() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    out: dict[str, set[str]] = {}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        names: set[str] = set()
        for param in command.params:
            if param.param_type_name == "argument":
                names.add(str(param.name).upper())
            else:
                names.update(o for o in (*param.opts, *param.secondary_opts) if o != "--help")
        out[name] = names
    return out


def test_docs_match_the_app() -> None:
    app_commands = actual()
    assert documented() == {name: app_commands[name] for name in CORE}
    assert registered_in_docs() == set(app_commands) - set(CORE)


def doc_examples() -> list[tuple[list[str], int]]:
    """(argv, expected exit code) of every `$ megaquant ...` line in console blocks, in order."""
    examples: list[tuple[list[str], int]] = []
    in_console = False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            in_console = line.strip() == "```console"
            continue
        if in_console and line.startswith("$ megaquant "):
            examples.append((shlex.split(line[2:])[1:], 0))
        elif in_console and (m := re.match(r"\[exit (\d+)\]", line)):
            examples[-1] = (examples[-1][0], int(m.group(1)))
    return examples


def test_doc_examples_run(fork_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = doc_examples()
    assert len(examples) >= 8
    monkeypatch.chdir(fork_repo)
    for argv, expected in examples:
        result = runner.invoke(app, argv)
        assert result.exit_code == expected, (argv, result.stdout, result.stderr)
        if "--json" in argv:
            json.loads(result.stdout)
    assert git.Repo(fork_repo).active_branch.name == "main"


def test_set_worktree_and_restore_there(fork_repo: Path, tmp_path: Path) -> None:
    before = snapshot(fork_repo)
    exp = tmp_path / "exp-qk4"
    code, out, err = invoke(
        "set", "--repo", str(fork_repo), "--qk", "mxfp4", "--worktree", str(exp), "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["repo"] == str(exp.resolve()) and data["branch"] == "megaquant/main-exp-qk4"
    assert snapshot(fork_repo) == before
    code, out, _ = invoke("status", "--repo", str(exp), "--json")
    assert json.loads(out)["base"]["branch"] == "main"
    assert invoke("restore", "--repo", str(exp))[0] == 0 and not exp.exists()


def test_os_error_is_an_error_line(fork_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError escaping the API (an unreadable file; injected, as root reads any file) is one line."""

    def unreadable(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", LAYERS)

    monkeypatch.setattr(api, "status", unreadable)
    code, _, err = invoke("status", "--repo", str(fork_repo))
    assert code == 1 and err == f"error: {LAYERS}: Permission denied\n"


def test_docs_list_the_fault_steps() -> None:
    from megaquant.branch import RESTORE_STEPS, SET_STEPS

    hook = DOC.read_text().split("## Test hook: fault injection", 1)[1]
    set_part, restore_part = hook.split("of `restore`:", 1)
    assert re.findall(r"`([a-z-]+)`", set_part.split("Steps of `set`:", 1)[1]) == list(SET_STEPS)
    assert re.findall(r"`([a-z-]+)`", restore_part) == list(RESTORE_STEPS)


def test_version_from_package_metadata_without_heavy_imports() -> None:
    import importlib.metadata

    import megaquant

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"megaquant {importlib.metadata.version('megaquant')}\n"
    assert importlib.metadata.version("megaquant") == megaquant.__version__  # pyproject and package agree
    code = (
        "import sys\n"
        "sys.argv = ['megaquant', '--version']\n"
        "from megaquant.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "heavy = {'torch', 'triton', 'megatron', 'git', 'libcst', 'rich'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('megaquant.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [
        f"megaquant {megaquant.__version__}",
        "['megaquant.cli', 'megaquant.errors']",
    ]


def test_docs_list_the_global_options() -> None:
    text = DOC.read_text().split("## Global options", 1)[1].split("\n## ", 1)[0]
    listed = {
        o for line in text.splitlines() if line.startswith("| `") for o in re.findall(r"`(--[a-z-]+)`", line)
    }
    group = typer.main.get_command(app)
    assert listed == {o for p in group.params for o in p.opts if o != "--help"}
