"""Benchmark 7: the CLI's start-up, as a user and a script feel it: whole processes, from
spawning `maxtwo` to its exit.

Contenders, taking turns after one warm-up each: `maxtwo --version`, `maxtwo --help`,
`maxtwo query` and `maxtwo randomize --timing` on a SQLite file seeded with N users, and two
baselines from the same run: the interpreter alone (`python -c pass`) and the CLI framework
alone (`python -c "import typer"`). For `randomize --timing` the figure is the wall time minus
the time it reports, i.e. what the process costs beyond the randomization itself. maxtwo's own
modules run from cached bytecode, as a user's do (bytecode_cached).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Rounds, ratio, run_in_rounds, say, timing_summary
from bench.processes import MAXTWO
from bench.targets import process_environment
from maxtwo_cli.core.db import create_engine
from maxtwo_cli.core.schema import ensure_schema
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings

PYTHON = "python -c pass"
TYPER = 'python -c "import typer"'
VERSION = "maxtwo --version"
HELP = "maxtwo --help"
QUERY = "maxtwo query"
RANDOMIZE = "maxtwo randomize --timing"
BASELINES = (PYTHON, TYPER)
COMMANDS = (VERSION, HELP, QUERY, RANDOMIZE)
# `maxtwo randomize --timing`: what it prints, and the figure its goal is about.
_REPORTED = re.compile(r"randomized [\d,]+ users in ([\d.]+) s")
RANDOMIZE_OVERHEAD = "maxtwo randomize --timing on SQLite: wall time - reported time"


def run(target, rows: int, runs: int, work_dir: Path) -> dict:
    """Medians of `runs` whole-process runs per contender (SQLite only: the goals are for it)."""
    with target.fresh_database("startup") as url:
        engine = create_engine(Settings(database_url=url), pool_size=1)
        try:
            ensure_schema(engine)
            seed_users(engine, rows)
        finally:
            engine.dispose()
        env = bytecode_cached(process_environment(url))
        argv = {
            PYTHON: [sys.executable, "-c", "pass"],
            TYPER: [sys.executable, "-c", "import typer"],
            VERSION: [str(MAXTWO), "--version"],
            HELP: [str(MAXTWO), "--help"],
            QUERY: [str(MAXTWO), "query"],
            RANDOMIZE: [str(MAXTWO), "randomize", "--timing"],
        }
        rounds = run_in_rounds({name: lambda args=args: _timed(args, env, work_dir) for name, args in argv.items()},
                               runs)

    walls = {name: Rounds(result.warmup[0], [wall for wall, _ in result.runs]) for name, result in rounds.items()}
    contenders = {name: timing_summary(result) for name, result in walls.items()}
    randomizing = rounds[RANDOMIZE]
    reported = Rounds(_reported(randomizing.warmup[1]), [_reported(output) for _, output in randomizing.runs])
    overhead = Rounds(randomizing.warmup[0] - reported.warmup,
                      [wall - seconds for (wall, _), seconds in zip(randomizing.runs, reported.runs, strict=True)])
    medians = {name: summary["median"] for name, summary in contenders.items()}
    medians[RANDOMIZE_OVERHEAD] = timing_summary(overhead)["median"]
    result = {
        "rows": rows,
        "runs": runs,
        "bytecode_cached": True,  # (runs before 2026-12-07 afternoon did not say, nor cache it)
        "contenders": contenders,
        "randomize_reported": timing_summary(reported),
        "randomize_overhead": timing_summary(overhead),
        # Every figure against each baseline of the same run (medians over medians).
        "over_python": {name: ratio(value, medians[PYTHON]) for name, value in medians.items()},
        "over_typer": {name: ratio(value, medians[TYPER]) for name, value in medians.items()},
    }
    say(f"  start-up ({runs} runs, {rows:,} users on SQLite): "
        + ", ".join(f"{name} {medians[name]:.3f} s" for name in (*BASELINES, *COMMANDS))
        + f"; randomize reported {result['randomize_reported']['median']:.3f} s, "
        f"overhead {medians[RANDOMIZE_OVERHEAD]:.3f} s")
    return result


def bytecode_cached(env: dict[str, str]) -> dict[str, str]:
    """`env` without PYTHONDONTWRITEBYTECODE: maxtwo's own modules are then cached as bytecode
    by the warm-up run, as on any machine without that setting (pip compiles an installed
    package's at install time). With it (this project's machines set it), an editable install
    compiles them again at every start: 5-15 ms more a process here (bench/NOTES.md), a cost
    the baselines, whose libraries pip compiled, do not pay."""
    return {key: value for key, value in env.items() if key != "PYTHONDONTWRITEBYTECODE"}


def _timed(args: list[str], env: dict[str, str], work_dir: Path) -> tuple[float, str]:
    """Seconds from spawning the process to its exit, and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=work_dir, stdin=subprocess.DEVNULL, capture_output=True,
                          encoding="utf-8", timeout=600, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[1:])} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return seconds, done.stdout


def _reported(output: str) -> float:
    found = _REPORTED.search(output)
    if found is None:
        raise RuntimeError(f"maxtwo randomize --timing printed no time: {output!r}")
    return float(found.group(1))
