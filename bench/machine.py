"""The machine and software a run measured: every figure is only meaningful next to this."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import falcon
import sqlalchemy

from bench.wrk import wrk_path
from maxtwo_cli import __version__ as maxtwo_version

REPO_ROOT = Path(__file__).resolve().parent.parent


def describe_machine(databases: dict[str, dict]) -> dict:
    """CPU, cores, memory, OS, Python and library versions, databases, wrk, git commit, date."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "maxtwo": maxtwo_version,
        "commit": _git_commit(),
        "libraries": {"SQLAlchemy": sqlalchemy.__version__, "psycopg": version("psycopg"),
                      "falcon": falcon.__version__, "waitress": version("waitress")},
        "wrk": _wrk_version(),
        "databases": databases,
        "python_executable": sys.executable,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_commit() -> str | None:
    """The commit measured, '+dirty' when tracked files have changed.

    NOTE: --no-optional-locks: a plain `git status` may rewrite the index; this must not.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                encoding="utf-8", timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, encoding="utf-8", timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _wrk_version() -> str | None:
    wrk = wrk_path()
    if wrk is None:
        return None
    try:
        # NOTE: wrk prints its version and then its usage, exiting non-zero, for -v.
        output = subprocess.run([wrk, "-v"], check=False, capture_output=True, encoding="utf-8", timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (output.stdout or output.stderr).strip().splitlines()
    return first[0] if first else None
