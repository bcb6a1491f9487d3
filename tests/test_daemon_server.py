"""Unit checks of the waitress adjustments in daemon/server.py and daemon/eventloop.py."""

from __future__ import annotations

import socket

import pytest
from waitress.adjustments import Adjustments

from daemon.eventloop import QuietChannel
from daemon.server import BindError, bind
from maxtwo_cli.core.settings import Settings


def channel(*, requests: int, outbuf: int, will_close: bool = False) -> QuietChannel:
    # NOTE: only the attributes writable() reads; no socket is needed to decide.
    instance = object.__new__(QuietChannel)
    instance.adj = Adjustments()
    instance.requests = [object()] * requests
    instance.total_outbufs_len = outbuf
    instance.will_close = will_close
    instance.close_when_flushed = False
    return instance


def test_no_poll_for_writing_while_the_worker_writes_its_own_response():
    assert not channel(requests=1, outbuf=120).writable()


def test_poll_for_writing_once_the_request_is_done():
    assert channel(requests=0, outbuf=120).writable()


def test_a_huge_response_is_still_drained_by_the_main_loop():
    assert channel(requests=1, outbuf=Adjustments().outbuf_high_watermark).writable()


def test_a_channel_told_to_close_still_closes():
    assert channel(requests=1, outbuf=0, will_close=True).writable()
    assert not channel(requests=0, outbuf=0).writable()


def test_a_host_with_several_addresses_is_refused_in_one_line(monkeypatch):
    real = socket.getaddrinfo

    def two_addresses(host, *args, **kwargs):
        if host == "dual.example":
            return real("127.0.0.1", *args, **kwargs) + real("::1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    with pytest.raises(BindError, match="several addresses"):
        bind(lambda environ, start_response: [], Settings(database_url="sqlite:///x.db", host="dual.example", port=0))


def test_a_host_that_is_no_address_is_a_bind_error():
    with pytest.raises(BindError):
        bind(lambda environ, start_response: [], Settings(database_url="sqlite:///x.db", host="no such host..", port=0))
