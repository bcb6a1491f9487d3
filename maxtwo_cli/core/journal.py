"""Whether stderr is systemd's journal, which reads each line's priority from a "<N>" prefix."""

from __future__ import annotations

import os

# logging's levels CRITICAL, ERROR, WARNING and INFO (not imported: the CLI's start-up does
# without the logging module) and syslog's crit, err, warning and info.
_PRIORITIES = ((50, 2), (40, 3), (30, 4), (20, 6))


def priority_prefix(level: int) -> str:
    """The syslog priority of a logging level, as journald reads it at the start of a line
    (SyslogLevelPrefix=); debug below INFO."""
    return next((f"<{priority}>" for least, priority in _PRIORITIES if level >= least), "<7>")


ERROR_PREFIX = priority_prefix(40)


def stderr_is_journal() -> bool:
    """systemd connects a service's stderr to the journal and says so in JOURNAL_STREAM, the
    stream's "device:inode"; a process whose stderr goes elsewhere (a script's redirect, a
    terminal) may have inherited the variable, so it is compared with stderr itself
    (systemd.exec(5))."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        found = os.fstat(2)
        return (int(device), int(inode)) == (found.st_dev, found.st_ino)
    except (ValueError, OSError):
        return False
