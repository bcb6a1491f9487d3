"""Settings: one frozen dataclass, every field defaulted.

The CLI fills it from options, which Typer links to ``MAXTWO_*`` environment variables, so the
order of precedence is option > environment > the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from urllib.parse import quote

from maxtwo_cli.core.errors import ConfigurationError

DEFAULT_SEED_COUNT = 1_000_000
# NOTE: chosen when GET / still ran on these threads (16 served 20-30 % more than 8, as bigger
# batches; bench/NOTES.md). GET / and POST /increment now have a thread of their own (the lane,
# daemon/transport.py), so they serve the other routes; the hello-world baseline of the
# benchmarks runs with the same number.
DEFAULT_THREADS = 16
# At least: half of them may wait for the database on the routes that read it in a request
# thread (daemon/resources.py, DatabaseReads), and the other half keep /metrics and /healthz
# answering; one thread alone would be taken by the first read that hung.
MIN_THREADS = 2
# At most: a bound against typos (a thread each, and each may hold a database connection:
# PostgreSQL's pool is as large). Mind the server's max_connections, 100 by default, shared by
# every daemon.
MAX_THREADS = 256
# Users a seed creates at most: users.id is a 32-bit integer on PostgreSQL.
MAX_SEED_COUNT = 2**31 - 1


def default_database_url() -> str:
    """Return the embedded default: a SQLite file in the user's data directory.

    Under systemd (``StateDirectory=maxtwo``) that is ``$STATE_DIRECTORY/maxtwo.db``; otherwise
    ``$XDG_DATA_HOME/maxtwo/maxtwo.db`` (``~/.local/share/maxtwo/maxtwo.db``).
    """
    # NOTE: systemd may pass several colon-separated directories; ours is the first. systemd's
    # are absolute: a relative one (set by hand) would name another file in every working
    # directory, so it is ignored, as a relative XDG_DATA_HOME is.
    state_directory = Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0])
    if state_directory.is_absolute():
        return _sqlite_url(state_directory / "maxtwo.db")
    data_home = Path(os.environ.get("XDG_DATA_HOME") or "")
    if not data_home.is_absolute():
        # The XDG Base Directory spec: a relative path there is invalid and ignored (taken as
        # given, it would name another file in every working directory).
        data_home = _home() / ".local" / "share"
    return _sqlite_url(data_home / "maxtwo" / "maxtwo.db")


def _home() -> Path:
    """$HOME; or, when it is empty or relative (`env -i HOME=`, a service's environment), the
    user's entry in the password database, as when it is unset: Python takes an empty HOME for
    "/" and a relative one from the working directory."""
    home = Path(os.environ.get("HOME") or "")
    if home.is_absolute():
        return home
    import pwd

    try:
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:  # a user id without an entry (a container's)
        pass
    if not home.is_absolute():
        raise ConfigurationError(
            f"no home directory for the default database: $HOME is {os.environ.get('HOME', '')!r} and user id "
            f"{os.getuid()} has none in the password database; set XDG_DATA_HOME or give --database-url"
        )
    return home


def _sqlite_url(path: Path) -> str:
    # NOTE: percent-encoded: a "?", "#" or "%" in a directory's name would otherwise be read as
    # the URL's query, fragment or an escape, and another file used.
    if not is_utf8(str(path)):
        raise ConfigurationError(
            f"the default database, {shown_path(path)}, has a path that is not UTF-8, as SQLite's file names must be; "
            "give --database-url"
        )
    return f"sqlite:///{quote(str(path))}"


def is_utf8(text: str) -> bool:
    """False for text that cannot be written as UTF-8: a lone surrogate, as in a file name whose
    bytes are not UTF-8 (Python's surrogate escapes) or a JSON string's unpaired \\udc80.

    NOTE: SQLite names files in UTF-8: such a file opened, but ATTACH refused its neighbour's
    name and its list of files could not be read back (one-line errors calling themselves
    unexpected), and in a URL quote() refused it (a traceback)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_path(path: str | Path) -> str:
    """A path for a message, its bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything maxtwo can be told. Passed explicitly; nothing reads it at import time."""

    # APPSEC: not in repr(): the URL may hold a password, and a repr lands in tracebacks and logs.
    database_url: str = dataclasses.field(default_factory=default_database_url, repr=False)
    host: str = "127.0.0.1"
    port: int = 4000
    threads: int = DEFAULT_THREADS
    interval: float = 60.0
    seed_count: int = DEFAULT_SEED_COUNT
    # Seconds to wait for a TCP connection to PostgreSQL before reporting it unreachable.
    connect_timeout: float = 5.0
    # Seconds any one statement of a request may take (and, on SQLite, wait for the write lock)
    # before the caller gets an error instead of a hang.
    statement_timeout: float = 5.0
