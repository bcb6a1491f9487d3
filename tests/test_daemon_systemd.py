"""daemon/systemd.py and daemon/watchdog.py in isolation: sd_notify's socket handling and the
watchdog's interval, which the end-to-end tests only see through a filesystem socket with no
WATCHDOG_PID (a mutation audit: the abstract namespace, WATCHDOG_PID as systemd sets it, a bad
WATCHDOG_USEC, a missing socket all went untested)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import pytest

from daemon import systemd
from daemon.watchdog import Watchdog


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("value", [None, ""])
def test_notify_without_a_notify_socket_sends_nothing(clean_env, value):
    if value is not None:
        clean_env.setenv("NOTIFY_SOCKET", value)
    assert systemd.notify("READY=1") is False


def test_notify_reaches_a_socket_in_the_abstract_namespace(clean_env):
    """systemd may hand out "@name": the abstract socket "\\0name", not a file called "@name"."""
    name = f"maxtwo-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(2)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        assert listener.recv(4096) == b"READY=1"


def test_notify_to_a_socket_that_is_gone_is_logged_not_raised(clean_env, tmp_path, caplog):
    """A lost notification must never take the service down (nor claim it was sent)."""
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "no-such.sock"))
    with caplog.at_level(logging.WARNING, logger="daemon.systemd"):
        assert systemd.notify("WATCHDOG=1") is False
    assert "sd_notify WATCHDOG failed" in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("1000000", None, 0.25),  # a quarter of WatchdogSec=: three checks before its deadline
        ("400000", None, 0.1),
        ("1000000", "own", 0.25),  # systemd sets WATCHDOG_PID to the main PID: ours
        ("1000000", "other", None),  # meant for another process (a parent, a child)
        (None, None, None),
        ("", None, None),
        ("abc", None, None),  # garbage must not stop the daemon from starting
        ("0", None, None),  # no timeout: not a ping loop that never waits
        ("-1000000", None, None),
    ],
)
def test_watchdog_interval(clean_env, usec, pid, expected):
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid == "own":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() == expected


class CountingStop:
    """Stands in for the watchdog's stop Event: records each wait's timeout; "set" after `turns`."""

    def __init__(self, turns: int) -> None:
        self.timeouts: list[float | None] = []
        self._turns = turns
        self._real = threading.Event()

    def wait(self, timeout=None) -> bool:
        self.timeouts.append(timeout)
        return len(self.timeouts) > self._turns

    def set(self) -> None:
        self._real.set()


def test_the_watchdog_pings_once_every_interval_while_healthy():
    """The e2e test counts ">= 4 pings in 4 s": pings at a whole WatchdogSec= would pass it."""
    pings: list[str] = []
    watchdog = Watchdog(interval=0.25, loop_stale_after=1000, batch_running_for=lambda: 0.0,
                        batch_limit=10, notify=pings.append)
    watchdog._stop = CountingStop(turns=3)
    watchdog._loop()
    assert watchdog._stop.timeouts == [0.25, 0.25, 0.25, 0.25]
    assert pings == ["WATCHDOG=1"] * 3


def test_stop_returns_once_the_watchdog_thread_has_ended():
    """A ping blocked on a full notification socket must not outlive stop(): a WATCHDOG=1 after
    STOPPING=1, or a thread left behind serve_requests()."""
    entered = threading.Event()

    def slow_notify(message: str) -> None:
        entered.set()
        time.sleep(0.3)

    watchdog = Watchdog(interval=0.01, loop_stale_after=1000, batch_running_for=lambda: 0.0, batch_limit=10,
                        notify=slow_notify)
    watchdog.start()
    assert entered.wait(5)
    watchdog.stop()
    assert not watchdog._thread.is_alive()
