"""Whether stderr is systemd's journal, which reads each line's priority from a "<N>" prefix."""

from __future__ import annotations

import os

# syslog's priorities, as journald reads them at the start of a line (SyslogLevelPrefix=).
ERROR_PREFIX = "<3>"


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
