"""devtools/pgserver.py, the throwaway PostgreSQL server the suite starts for itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import time
from devtools import pgserver
with pgserver.from_env_or_start(fsync=False) as server:
    print(server.data_dir, flush=True)
    time.sleep(300)
"""


def is_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # exited, and not reaped (a container's init may not)


def test_a_sigterm_to_the_process_holding_a_server_stops_it_and_removes_its_files():
    """SIGTERM (a CI job's timeout) ended the process at once: the server and its directory
    under /tmp stayed behind (an audit)."""
    env = {key: value for key, value in os.environ.items() if key != "MAXTWO_TEST_POSTGRES_URL"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        data_dir = Path(holder.stdout.readline().strip())
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        holder.send_signal(signal.SIGTERM)
        holder.wait(60)
    finally:
        holder.kill()
        holder.wait()
    try:
        wait_for(lambda: is_gone(postmaster), "the server's postmaster to exit", 30)
        assert not data_dir.parent.exists()
    finally:  # what a failure leaves behind, removed
        if not is_gone(postmaster):
            os.kill(postmaster, signal.SIGKILL)
            wait_for(lambda: is_gone(postmaster), "the killed postmaster to exit", 30)
        shutil.rmtree(data_dir.parent, ignore_errors=True)
