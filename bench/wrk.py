"""Running wrk (the Debian package `wrk`) and reading its --latency report."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import say
from bench.processes import read_process

INSTALL_HINT = "install wrk: apt-get install wrk"
WRK_THREADS = 2
WRK_ATTEMPTS = 2  # a run whose report cannot be read is made again, once

_SECONDS_PER_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, connections: int, seconds: int, server_pid: int | None = None, *,
            script: Path | None = None, script_args: Sequence[str] = ()) -> dict:
    """One wrk run; its figures, plus the wall-clock window it ran in (for matching with logs).

    `script`: a Lua script (`wrk -s`) that makes the requests; `script_args` go after `--`.

    `server_pid`: also the CPU time (user + system) the server process used during the run,
    per request answered. NOTE: far steadier than req/s on a shared machine, where what else runs
    changes how much of the CPU a server gets, not how much it needs per request.
    """
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError(INSTALL_HINT)
    # NOTE: wrk takes whole seconds only ("500ms" and "0.5s" are refused).
    args = [wrk, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency",
            *(["-s", str(script)] if script is not None else []), url,
            *(["--", *script_args] if script_args else [])]
    for attempt in range(1, WRK_ATTEMPTS + 1):
        cpu_before = cpu_seconds(server_pid) if server_pid is not None else None
        started_at = time.time()
        proc = subprocess.run(args, check=False, capture_output=True, encoding="utf-8", timeout=seconds + 60)
        ended_at = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
        try:
            report = parse_wrk_output(proc.stdout)
            break
        except RuntimeError:
            # NOTE: seen once, in a CI run on 2026-12-06: wrk exited 0 having printed nothing,
            # not even its first line. No measurement was made; the run is made again.
            if attempt == WRK_ATTEMPTS:
                raise RuntimeError(f"wrk printed no report {WRK_ATTEMPTS} times (exit 0; stdout {proc.stdout!r}; "
                                   f"stderr {proc.stderr.strip()!r})") from None
            say(f"  wrk printed no report (exit 0; stderr {proc.stderr.strip()!r}): running it again")
    figures = {"connections": connections, "seconds": seconds, "started_at": started_at,
               "ended_at": ended_at, **report}
    if cpu_before is not None:
        used = cpu_seconds(server_pid) - cpu_before
        figures["server_cpu_seconds"] = used
        figures["cpu_us_per_request"] = used / figures["requests"] * 1e6 if figures["requests"] else None
    return figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process."""
    total = read_process(pid, lambda process: sum(process.cpu_times()[:2]))  # user, system
    if total is None:
        raise RuntimeError(f"the server under load (pid {pid}) is gone")
    return total


def parse_wrk_output(text: str) -> dict:
    """req/s, p50/p99/max latency (ms), non-2xx/3xx responses and socket errors."""
    latency = re.search(rf"^\s*Latency\s+{_DURATION}\s+{_DURATION}\s+{_DURATION}", text, re.MULTILINE)
    requests_per_second = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in", text, re.MULTILINE)
    if not (latency and requests_per_second and total):
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    # wrk prints these two lines only when they are not zero.
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                             (int(value) for value in sockets.groups()) if sockets else (0, 0, 0, 0), strict=True))
    return {
        "requests_per_second": float(requests_per_second.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": _percentile_ms(text, "50"),
        "p99_ms": _percentile_ms(text, "99"),
        "max_ms": _milliseconds(latency.group(5), latency.group(6)),
        "non_2xx_3xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors,
    }


def errors_of(run: dict) -> int:
    return run["non_2xx_3xx"] + sum(run["socket_errors"].values())


def answered_per_second(run: dict) -> float:
    """Requests answered 2xx/3xx per second. wrk's own req/s counts every answer, so a server
    failing fast (503s) would look faster than one doing the work: ratios use this rate."""
    if not run["requests"]:
        return 0.0
    return run["requests_per_second"] * (run["requests"] - run["non_2xx_3xx"]) / run["requests"]


def _percentile_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+{_DURATION}", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no {percentile}% latency (was --latency given?)")
    return _milliseconds(match.group(1), match.group(2))


def _milliseconds(value: str, unit: str) -> float:
    return float(value) * _SECONDS_PER_UNIT[unit] * 1000
