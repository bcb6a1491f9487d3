"""What each command imports, and shell completion.

Every `maxtwo` call, and every Tab of a shell completing one, pays the interpreter's start and
its imports: SQLAlchemy alone takes about 150 ms here. So each command imports only what it
runs (cli.py's docstring says how), and these tests check it on the installed entry point with
`python -X importtime`, in fresh processes. No timing asserts: the machine is shared and noisy;
the start-up goals are the benchmarks' (bench/startup.py, docs/performance.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maxtwo_cli import __version__
from maxtwo_cli.cli import app
from tests.serve_process import RICH_TERMINAL_OVERRIDES

MAXTWO = Path(sys.executable).with_name("maxtwo")
# Packages a command that needs no database must not load (the daemon's: `serve` only).
DATABASE_PACKAGES = ("sqlalchemy", "psycopg")
DAEMON_PACKAGES = ("daemon", "falcon", "waitress", "schedule", "prometheus_client")


def _environment(**extra: str) -> dict[str, str]:
    """This environment without maxtwo's settings, a shell's completion request or Typer's."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MAXTWO_", "_MAXTWO_", "TYPER_", "COMP_")) and key not in RICH_TERMINAL_OVERRIDES}
    return {**env, **extra}


def run_maxtwo(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the installed `maxtwo` in a fresh interpreter; its result and every module it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(MAXTWO), *args],
                          env=env or _environment(), capture_output=True, encoding="utf-8", timeout=60, check=False)
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    done.stderr = "\n".join(line for line in done.stderr.splitlines()
                            if not line.startswith("import time:"))
    return done, modules


def loaded(modules: set[str], *packages: str) -> list[str]:
    return sorted(name for name in modules if name.split(".")[0] in packages)


def test_the_probe_sees_what_a_command_imports(tmp_path):
    """The check below is live: a command that opens a database does import SQLAlchemy."""
    done, modules = run_maxtwo("query", "--json", "--database-url", f"sqlite:///{tmp_path / 'm.db'}")
    assert done.returncode == 0, done.stderr
    assert "sqlalchemy" in modules and "maxtwo_cli.core.query" in modules


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["query", "--help"], ["increment", "--help"]])
def test_version_and_help_import_no_database_daemon_or_rich_code(args):
    done, modules = run_maxtwo(*args)
    assert done.returncode == 0, done.stderr
    assert "maxtwo_cli.cli" in modules
    assert loaded(modules, *DATABASE_PACKAGES, *DAEMON_PACKAGES, "rich") == []
    if args == ["--version"]:
        assert done.stdout == f"maxtwo {__version__}\n"


def test_a_query_on_sqlite_imports_no_psycopg(tmp_path):
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    done, modules = run_maxtwo("query", "--database-url", url)
    assert done.returncode == 0, done.stderr
    assert "previous query: never" in done.stdout
    # Nor SQLAlchemy's PostgreSQL dialect (60 ms): core/schema.py's _postgres_fillfactor.
    assert loaded(modules, "psycopg", "psycopg_binary", *DAEMON_PACKAGES) == []
    assert "sqlalchemy.dialects.postgresql" not in modules
    # --json prints without rich.
    done, modules = run_maxtwo("query", "--json", "--database-url", url)
    assert done.returncode == 0, done.stderr
    assert loaded(modules, "psycopg", "rich") == []


def test_randomize_on_sqlite_imports_no_psycopg_rich_or_pydantic(tmp_path):
    done, modules = run_maxtwo("randomize", "--timing", "--database-url", f"sqlite:///{tmp_path / 'maxtwo.db'}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("randomized 0 users in ")
    assert loaded(modules, "psycopg", "rich", *DAEMON_PACKAGES) == []
    assert "sqlalchemy.dialects.postgresql" not in modules
    assert loaded(modules, "pydantic", "pydantic_core") == [], (
        "typer coerces parameters through pydantic again (typer 0.29 did: 50-60 ms per call); "
        "see the typer pin in pyproject.toml"
    )


def test_seed_off_a_terminal_imports_no_rich(tmp_path):
    done, modules = run_maxtwo("seed", "--count", "10", "--database-url", f"sqlite:///{tmp_path / 'maxtwo.db'}")
    assert done.returncode == 0, done.stderr
    assert loaded(modules, "rich") == []


def test_an_unreachable_postgresql_is_still_one_line_when_psycopg_loads_late():
    """psycopg's errors are translated although core/db.py only imports it for a PostgreSQL URL."""
    done, modules = run_maxtwo("query", "--database-url", "postgresql://maxtwo:s3cret@127.0.0.1:1/maxtwo")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 0 and done.stderr.startswith("Error: cannot use the database at ")
    assert "check that the server is running" in done.stderr
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr
    assert "psycopg" in modules


# -- shell completion ---------------------------------------------------------------------------


# Runs the installed `maxtwo` as its script does, after an audit hook (the sys module's) that
# sends this process a SIGINT as soon as typer starts loading: a Ctrl-C typed while it loads.
# (First Python's own handler, as in a shell's foreground: a job started in the background by a
# script inherits SIGINT ignored, and maxtwo leaves it so.)
_AS_IN_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
_CTRL_C_WHILE_LOADING = _AS_IN_A_TERMINAL + """
import os, runpy, signal, sys
def interrupt(event, args):
    if event == "import" and args[0] == "typer":
        os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(interrupt)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("args", [["--version"], ["query", "--help"]])
def test_ctrl_c_while_the_command_loads_ends_it_quietly(args):
    """Python's own handler made it a traceback; SIGINT's default action ends it, status 130."""
    done = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_LOADING, str(MAXTWO), *args],
                          env=_environment(), capture_output=True, encoding="utf-8", timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGINT, "", "")


def test_a_sigint_ignored_from_the_start_stays_ignored():
    """As for a job a script started in the background: the command runs on to its end."""
    ignored = _CTRL_C_WHILE_LOADING.replace(_AS_IN_A_TERMINAL, "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n")
    done = subprocess.run([sys.executable, "-c", ignored, str(MAXTWO), "--version"],
                          env=_environment(), capture_output=True, encoding="utf-8", timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"maxtwo {__version__}\n", "")


def test_ctrl_c_once_loaded_is_still_the_commands_to_answer():
    """The default action lasts only while the command loads: then Python's handler is back."""
    probe = _AS_IN_A_TERMINAL + ("import signal, sys; from maxtwo_cli.__main__ import main; sys.argv = ['maxtwo', '--version'];"
             "import atexit; atexit.register(lambda: print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)); main()")
    done = subprocess.run([sys.executable, "-c", probe], env=_environment(),
                          capture_output=True, encoding="utf-8", timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, f"maxtwo {__version__}\nTrue\n"), done.stderr


def test_help_offers_completion():
    result = CliRunner().invoke(app, ["--help"], env={"MAXTWO_DEBUG": None})
    assert result.exit_code == 0
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def complete_bash(words: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """What bash gets on Tab after `words` (the completion script runs maxtwo like this)."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    return run_maxtwo(env=_environment(_MAXTWO_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword)))


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("maxtwo ", ["seed", "randomize", "query", "increment", "counters", "serve"]),
        ("maxtwo qu", ["query"]),
        ("maxtwo query --", ["--json", "--database-url", "--help"]),
        ("maxtwo randomize --t", ["--timing"]),
        # Arguments and options already typed, some of them invalid: parsed leniently, no error.
        ("maxtwo increment page-views -5 --", ["--json", "--database-url", "--help"]),
        ("maxtwo increment '' 99999999999999999999 --j", ["--json"]),
        ("maxtwo seed --count abc --r", ["--reset"]),
        ("maxtwo counters a b --limit 3 --j", ["--json"]),
    ],
)
def test_bash_completion_completes_without_loading_the_database_code(words, expected):
    done, modules = complete_bash(words)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected
    assert done.stderr == ""
    assert loaded(modules, *DATABASE_PACKAGES, *DAEMON_PACKAGES) == []
    assert "maxtwo_cli.core.counters" not in modules


def test_show_completion_prints_the_bash_script(tmp_path):
    # NOTE: Typer detects the shell from the parent process, hence bash -c; HOME is a temporary
    # directory, so that nothing of the host's is read or written whatever Typer does.
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", '"$0" --show-completion; exit $?', str(MAXTWO)],
                          env=_environment(HOME=str(tmp_path)), capture_output=True, encoding="utf-8", timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "_MAXTWO_COMPLETE=complete_bash" in done.stdout
    assert "complete -o default -F _maxtwo_completion maxtwo" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_install_completion_writes_only_under_home(tmp_path):
    """Run only with HOME in a temporary directory: it edits the user's ~/.bashrc."""
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in _environment(HOME=str(home)).items()
           if not key.startswith("XDG_") and key not in ("ZDOTDIR", "BASH_ENV", "ENV")}
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", '"$0" --install-completion; exit $?', str(MAXTWO)],
                          env=env, capture_output=True, encoding="utf-8", timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    script = home / ".bash_completions" / "maxtwo.sh"
    assert "_MAXTWO_COMPLETE=complete_bash" in script.read_text(encoding="utf-8")
    assert str(script) in (home / ".bashrc").read_text(encoding="utf-8")
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == [
        "home", "home/.bash_completions", "home/.bash_completions/maxtwo.sh", "home/.bashrc"]
