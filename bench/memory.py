"""Benchmark 5: peak resident memory of a process, sampled every 50 ms.

`maxtwo serve` is sampled by the load benchmark while wrk runs; here `maxtwo seed --count N` is
compared with `maxtwo seed --count 0` (same imports, same connection, no rows), so the
difference is what N rows cost in Python memory: nearly nothing, as rows are generated inside
the database.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Self

from bench.common import say
from bench.processes import MAXTWO, REPO_ROOT, read_process
from bench.targets import process_environment

SAMPLE_SECONDS = 0.05
MB = 1_000_000


class PeakRssSampler:
    """`with PeakRssSampler(pid) as sampler: ...` then `sampler.peak_bytes`."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="rss-sampler", daemon=True)
        self.peak_bytes = 0
        self.samples = 0

    def __enter__(self) -> Self:
        self._sample()  # at once: a short-lived process may be gone before the first tick
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            if not self._sample():
                return

    def _sample(self) -> bool:
        """Add one sample; False once the process is gone."""
        rss = read_process(self._pid, lambda process: process.memory_info().rss)
        if rss is None:
            return False
        self.peak_bytes = max(self.peak_bytes, int(rss))
        self.samples += 1
        return True


def run_seed(target, rows: int, work_dir: Path) -> dict:
    """Peak RSS of `maxtwo seed --count rows` and of `--count 0`, each on a fresh database."""
    with_rows = _seed_subprocess(target, rows, work_dir)
    without_rows = _seed_subprocess(target, 0, work_dir)
    growth = with_rows["peak_rss_bytes"] - without_rows["peak_rss_bytes"]
    say(f"  memory of maxtwo seed --count {rows:,} on {target.name}: "
        f"{with_rows['peak_rss_bytes'] / MB:.1f} MB peak ({growth / MB:+.1f} MB vs --count 0)")
    return {"rows": rows, "seed": with_rows, "seed_zero_rows": without_rows, "growth_bytes": growth}


def _seed_subprocess(target, count: int, work_dir: Path) -> dict:
    with target.fresh_database(f"memory_seed_{count}") as url:
        log_path = work_dir / f"seed-{target.name}-{count}.log"
        with open(log_path, "w", encoding="utf-8") as log:
            started = time.perf_counter()
            process = subprocess.Popen([str(MAXTWO), "seed", "--count", str(count)],
                                       env=process_environment(url), cwd=REPO_ROOT,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            try:
                with PeakRssSampler(process.pid) as sampler:
                    status = process.wait(timeout=3600)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if status != 0:
            raise RuntimeError(f"maxtwo seed --count {count} exited with {status}: "
                               f"{log_path.read_text(errors='replace').strip()}")
        return {"count": count, "peak_rss_bytes": sampler.peak_bytes, "samples": sampler.samples,
                "seconds": time.perf_counter() - started}
