"""When `maxtwo serve` randomized, read from its log.

The daemon logs "<asctime> INFO ...: randomized N users in X s (epoch E)" when a run commits
(asctime in local time, to the millisecond; JOURNAL_STREAM is unset for the benchmark, so the
timestamp is there). The run began X seconds before that line.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

_RANDOMIZED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*\brandomized (\d+) users in ([\d.]+) s")


def randomizations(log_path: Path) -> list[dict]:
    """Every randomization in the log: {"start", "end"} as Unix times, "seconds", "rows"."""
    found = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _RANDOMIZED.match(line)
        if match is None:
            continue
        stamp, millis, rows, seconds = match.groups()
        # NOTE: naive local time, as logging's asctime writes it; timestamp() reads it as local.
        end = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + int(millis) / 1000
        found.append({"start": end - float(seconds), "end": end, "seconds": float(seconds), "rows": int(rows)})
    return found


def overlaps(window: dict, spans: list[dict]) -> bool:
    """Whether a wrk run ({"started_at", "ended_at"}) overlapped any randomization."""
    return any(window["started_at"] < span["end"] and span["start"] < window["ended_at"] for span in spans)
