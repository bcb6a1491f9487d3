"""waitress, and the few of its internals maxtwo adjusts: the only module that imports it.

Each adjustment is a hook into waitress's internals. tests/test_daemon_transport.py checks that
every one still exists in the installed release (and names it if not); bench/NOTES.md holds the
paired measurement that keeps each speed hook:

- QuietChannel.writable: waitress's connection, minus a busy loop that starved the request
  threads (about 10x on GET /).
- Lane: the batched routes (GET /, POST /increment) answered in batches by one lane thread
  instead of a request thread each (a dispatcher of our own, passed through create_server's
  `_dispatcher`; the outcome reaches the app in its WSGI environ, through the channel's task
  class).
- ChangePoller: the serving loop's poll set kept across passes (epoll) instead of rebuilt from
  every connection on every pass; and one trigger pull per lane batch answered instead of one
  per response (ChangePoller.one_pull).
- JsonErrorTask: the errors waitress answers itself, before the app sees the request (a
  malformed request, headers or body too large, a request line too long (414), an unknown
  transfer coding, the Host check, the HTTP version and HTTP/1.0 with Transfer-Encoding
  below), in the app's JSON error shape instead of waitress's plain text; none to HEAD.
- StrictFramingParser: a request with both Transfer-Encoding and Content-Length is answered and
  its connection closed (RFC 9112 section 6.1), so nothing pipelined behind it is read with
  framing an intermediary may have seen differently; so is an HTTP/1.0 request with
  Transfer-Encoding, answered 400 (waitress framed it by Content-Length and kept the
  connection); an HTTP/1.1 request without exactly one Host header is answered 400 (RFC 9112
  section 3.2); a header with a bare LF line ending is
  answered 400 as soon as one arrives, not after the channel timeout; HTTP/1.2 and later minor
  versions are served as HTTP/1.1, another major version answered 505 (RFC 9110 section 2.5),
  a request line without a version 400.
- accept_waiting: the listening socket takes every connection waiting in its backlog per
  turn of the serving loop (up to ACCEPTS_PER_TURN, within the connection limit), not one: a
  burst of new connections no longer waits hundreds of turns (max latency 0.53-0.62x for
  POST /increment on a hot key when 400 clients connect at once; 0.92-0.98x at 200 on GET /).
- IdleReclaimer: at the connection limit, with a client waiting to connect, the connection
  idle longest (for at least RECLAIM_IDLE_SECONDS), or else the one whose request has been
  arriving longest (RECLAIM_SLOW_REQUEST_SECONDS: StrictFramingParser notes when a request
  started), or else the one whose answers have waited longest for its client to read them
  (RECLAIM_UNREAD_SECONDS), is closed for it, one per waiting client (waitress would hold it
  out until one closed by itself: up to the 30 s channel timeout, or forever against a slow
  sender or a client that reads nothing). And at any number of connections, one whose answers
  have waited CHANNEL_TIMEOUT for its client is closed (waitress's timeout never came for it).
- add_task_unless_unread (the server's add_task) and QuietChannel.held / handle_write: a
  client that pipelines requests and does not read the answers gets no more of them answered
  while more than UNSENT_ANSWER_BYTES wait for it; its connection is answered on once its
  client reads (waitress buffered every answer, up to 16 MiB a connection, bench/NOTES.md).
- Transport.serve_until / drain: a loop that turns in short ticks (a stop request is noticed
  without tearing the loop down mid-response) and a shutdown that answers every request
  already received, closing each kept-alive connection once answered, which waitress's own
  run()/close() do not.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import re
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import falcon
import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import BadRequest, Error, RequestHeaderFieldsTooLarge

log = logging.getLogger(__name__)

# waitress settings. NOTE: channel_timeout drops idle keep-alive connections; the connection
# limit is above the 200 concurrent clients we test with, below the default fd limit (1024).
# waitress counts its own listening socket and trigger in it: 510 clients.
CONNECTION_LIMIT = 512
CHANNEL_TIMEOUT = 30
BACKLOG = 1024
# APPSEC: no route takes more than 4 KiB; waitress would otherwise buffer up to 1 GB of a body
# (to a temporary file) before the app could refuse it. Past this, waitress answers 413 itself.
MAX_REQUEST_BODY = 64 * 1024
# APPSEC: no request of ours needs more than a few hundred bytes of header (nginx's own limit is
# 8 KiB a line); waitress's default, 256 KiB, let a client make the server parse and join a
# quarter of a megabyte of header lines for every request (271 ms of CPU for one). Past this,
# waitress answers 431 itself.
MAX_REQUEST_HEADER = 32 * 1024
# How often the serving loop looks up from poll() to notice a stop request (and so how often,
# at least, it turns: the watchdog counts on it).
LOOP_TICK_SECONDS = 0.2
# A connection counts as idle (safe to close at shutdown) once quiet this long: a client that
# has just connected may not have sent its request yet, and closing it then would reset it.
QUIET_SECONDS = 0.25
# Seconds between the ChangePoller's passes that ask every connection.
FULL_CHECK_SECONDS = 1.0
# Connections taken from the listening socket's backlog in one turn of the serving loop, at
# most (waitress takes one): bounded, so that a flood of new connections cannot hold up the
# loop's work for those it has.
ACCEPTS_PER_TURN = 64
# A connection closed once answered (at a drain, or after an answer that closes it) waits this
# long at most for its client to close its end, reading and dropping what comes
# (QuietChannel.handle_close).
LINGER_SECONDS = 2.0
# At the connection limit, with a client waiting to connect: the connection quiet longest, if
# quiet this long (its requests answered), is closed for it; after a look that closed none, the
# next one this much later at the earliest.
RECLAIM_IDLE_SECONDS = 1.0
RECLAIM_LOOK_SECONDS = 0.1
# At the connection limit, with a client waiting to connect and no connection idle: a request
# still arriving this long after its first bytes (headers or body trickled in, as a "slowloris"
# client does to hold connections) is given up on, and its connection closed for the newcomer.
RECLAIM_SLOW_REQUEST_SECONDS = 10.0
# At the connection limit, with a client waiting to connect and no connection idle or slow: a
# connection whose answers have waited this long for its client to read them (none taken since),
# with nothing else being answered on it, is closed for the newcomer.
RECLAIM_UNREAD_SECONDS = 10.0
# APPSEC: a client that pipelines requests (sends the next before reading the last answer) and
# reads slowly or never: past this many bytes of its answers unsent (its socket buffers full),
# its next request waits for the serving loop to send them down to this. Otherwise waitress
# answers every request it has read and buffers the answers (to a temporary file past 1 MiB, up
# to 16 MiB a connection): 510 such clients took the daemon from 51 to 677 MB (bench/NOTES.md).
UNSENT_ANSWER_BYTES = 32 * 1024
# APPSEC: bytes read from a connection at a time (waitress's default: 8 KiB). Every request in
# a read is parsed before the next read (500-800 bytes each for a small one): a read of tiny
# pipelined requests is the most memory one read costs (about 40 KB at 2 KiB, 4 times that at
# 8 KiB). No request of ours needs more than one read of this size but a header of several
# hundred bytes.
RECV_BYTES = 2048
# A line feed not preceded by a carriage return (RFC 9112 section 2.2).
_BARE_LF = re.compile(rb"(?<!\r)\n")
# The blank lines before a request, which waitress skips (bare LFs included), as bytes.strip() has them.
_LEADING_SPACE = re.compile(rb"\s*")
# A request line's version later than HTTP/1.1 within major version 1 (RFC 9110 section 2.5).
# (waitress strips any whitespace that ends the line: bytes.rstrip()'s, less the LF.)
_USUAL_VERSION_ENDS = (b" HTTP/1.1", b" HTTP/1.0")
_LATER_HTTP_1 = re.compile(rb"\A([^\r\n]* )HTTP/1\.[2-9](?=[ \t\r\x0b\x0c]*(?:\r\n|\Z))")
# RFC 9112 section 3.2's request targets other than a path from "/": a whole URL, or "*".
_OTHER_TARGET_FORMS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|\*\Z")
# The lane's thread, by name (as thread listings and profilers show it).
LANE_THREAD_NAME = "maxtwo-lane"

# epoll's event bits are poll()'s (EPOLLIN == POLLIN and so on), which wasyncore.readwrite reads.
_READ = select.POLLIN | select.POLLPRI
_WRITE = select.POLLOUT

# The connection this thread is answering a request of, if any (see QuietChannel.service): the
# ChangePoller learns from it which connection a trigger pull was for; and whether this thread
# holds its pulls for one at the end (ChangePoller.one_pull). Transport-internal.
_answering = threading.local()


@dataclasses.dataclass(frozen=True)
class LaneRequest:
    """A complete request, as the lane hands it to Lane.submit."""

    method: str
    path: str
    # waitress's request headers: names upper case, "-" written "_" (CONTENT_TYPE, ...).
    headers: dict[str, str]
    # At most Lane.max_body + 1 bytes of the body (more tells the app it is too large).
    body: bytes


@dataclasses.dataclass(frozen=True)
class Lane:
    """What a lane needs: which requests it takes, and how to get their outcomes."""

    routes: frozenset[tuple[str, str]]  # (method, path)
    # submit(requests, wake): start getting an outcome for each request (what the app answers
    # it with, an exception included), without waiting for it; a handle for ready() and
    # collect(). wake() is to be called, from any thread, whenever outcomes come in.
    submit: Callable[[list[LaneRequest], Callable[[], None]], Any]
    # ready(handle): whether all of its outcomes are in (collect() would not wait).
    ready: Callable[[Any], bool]
    # collect(handle, timeout): those outcomes, waiting at most `timeout` seconds for them.
    collect: Callable[[Any, float], list[Any]]
    max_batch: int
    # Seconds a request may wait for its answer from its arrival (the oldest of a batch sets it).
    max_wait: float
    max_body: int
    # environ_for(outcome, arrived): the WSGI environ entries that hand the app its outcome.
    environ_for: Callable[[Any, float], dict[str, Any]]
    # failure_scope(outcome): which requests queued in the lane meanwhile would meet the failure
    # an outcome reports, and share it instead of waiting out a timeout again: "all", "route"
    # (those of its route), or None (none: its own failure, or none at all).
    failure_scope: Callable[[Any], str | None]


class StrictFramingParser(HTTPRequestParser):
    def __init__(self, adj) -> None:
        super().__init__(adj)
        # The channel makes a parser when a request's first bytes come in: when it started.
        self.started = time.monotonic()
        # How much of the header received so far the bare-LF check has read, and whether the
        # request line has begun (past the blank lines before it).
        self._checked = 0
        self._begun = False

    def received(self, data: bytes) -> int:
        before = self.header_plus  # the header received so far (waitress keeps it until it ends)
        consumed = super().received(data)
        limit = self.adj.max_request_header_size
        if type(self.error) is RequestHeaderFieldsTooLarge and _request_line_unended((before + data)[:limit]):
            # RFC 9112 section 3: a request target longer than the server will parse MUST be
            # answered 414, not 431: the request line alone reached the header's limit. NOTE:
            # within the limit's bytes only: the read that crossed it may hold the line's end
            # (where reads end is the network's choice), and the same request got a 431.
            self.error = UriTooLongError(f"the request line reaches {limit} bytes; this server takes less")
        if self.completed:
            # A request complete with its header (no body, or one refused at once: 413) is sent
            # no 100 Continue: waitress sent one, and took the request for incomplete again, so
            # it was never answered (RFC 9110 section 10.1.1: the server may omit it).
            self.expect_continue = False
        # waitress finds the end of a header only at CRLF CRLF, and refuses a bare LF only once
        # it has it: a client ending its lines with LF alone (printf, a hand-written client) got
        # no answer until the channel timed out. A header still arriving with a bare LF in it
        # (past the blank lines waitress skips) can only end in that 400: answered now.
        if not self.completed and not self.headers_finished and self._bare_lf_arrived():
            self.error = BadRequest("a header line ends with a bare LF; HTTP/1.1 lines end with CRLF")
            self.completed = True
        return consumed

    def _bare_lf_arrived(self) -> bool:
        # NOTE: only what arrived since the last read (the lookbehind still sees the byte before
        # it): the whole header at every read cost a header trickled in a byte at a time 3.4 ms
        # a byte at 240 KB, 19 times waitress's own work.
        header = self.header_plus
        start, self._checked = self._checked, len(header)
        if not self._begun:
            start = _LEADING_SPACE.match(header, start).end()
            self._begun = start < len(header)
        return self._begun and _BARE_LF.search(header, start) is not None

    def parse_header(self, header_plus: bytes) -> None:
        # RFC 9110 section 2.5: a later minor version is served as the highest one we implement
        # (waitress served HTTP/1.2 as HTTP/1.0, without HTTP/1.1's framing). NOTE: the regex
        # only for a request line that does not end as nearly all do: 0.2 us a request, not 1.6.
        end = header_plus.find(b"\r\n")
        if header_plus[end - 9 : end] not in _USUAL_VERSION_ENDS:
            header_plus = _LATER_HTTP_1.sub(rb"\1HTTP/1.1", header_plus, count=1)
        super().parse_header(header_plus)
        if not self.version:
            # RFC 9112 section 3: the request line ends with the version. waitress served a line
            # without one (HTTP/0.9's form) as HTTP/1.0.
            raise ParsingError("the request line has no HTTP version (e.g. GET / HTTP/1.1)")
        if not self.version.startswith("1."):
            # Section 15.6.6: a major version other than 1 is refused with 505. waitress answered
            # HTTP/2.0 and HTTP/0.9 as HTTP/1.0, so a GET / meant for another protocol was served,
            # and counted as a query.
            self.error = HttpVersionNotSupportedError(
                f"HTTP/{self.version} is not supported; this server speaks HTTP/1.1 (and HTTP/1.0)"
            )
            self.version = "1.1"  # the answer's own version
            self.completed = True
            return
        if self.request_uri[:1] != "/" and not _OTHER_TARGET_FORMS.match(self.request_uri):
            # waitress served `GET healthz` and `GET %2F` as the paths they decode to, so the
            # latter counted as a query.
            raise ParsingError("the request target must start with '/' (e.g. GET / HTTP/1.1)")
        if self.version == "1.0" and "TRANSFER_ENCODING" in self.headers:
            # RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding MUST be taken for
            # one whose framing is faulty, Content-Length or not. waitress reads chunked only in
            # HTTP/1.1: it framed the body by Content-Length (or took none) and kept a keep-alive
            # connection, so the rest of a chunked body was read as the next request (smuggled
            # past a front end that framed it by the chunks).
            raise ParsingError("an HTTP/1.0 request cannot have a Transfer-Encoding; send HTTP/1.1")
        # waitress already lets Transfer-Encoding win (and drops the header); RFC 9112 section
        # 6.1 also asks the server to close the connection after answering such a request.
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            self.headers["CONNECTION"] = "close"
            self.connection_close = True
        if self.version == "1.1" and not self.connection_close and _asks_to_close(self.headers.get("CONNECTION")):
            # RFC 9112 section 9.6: a request whose Connection names "close" among other options
            # ("TE, close", as libwww-perl sends; or two Connection headers, joined) MUST have
            # its connection closed once answered. waitress looks for the value "close" alone:
            # it kept such a connection open (for 30 s), and its answer did not say it closes.
            # Through waitress's own rule, as the answer to both framings above goes.
            self.headers["CONNECTION"] = "close"
            self.connection_close = True
        if self.version == "1.1":
            # RFC 9112 section 3.2: an HTTP/1.1 request without a Host, or with more than one
            # (waitress joins repeated fields with ", "; a host and port hold no comma), is
            # answered 400: an intermediary may have routed it by another host than ours.
            host = self.headers.get("HOST")
            if host is None or "," in host:
                raise ParsingError("an HTTP/1.1 request needs exactly one Host header")


def _asks_to_close(connection: str | None) -> bool:
    """Whether a Connection header's value names the option "close" (RFC 9110 section 7.6.1: a
    comma-separated list of options, case-insensitive)."""
    # (The substring test first: "keep-alive", which many clients send, is never split.)
    return (connection is not None and "close" in connection.lower()
            and any(option.strip(" \t").lower() == "close" for option in connection.split(",")))


def _request_line_unended(header: bytes) -> bool:
    """Whether a header's request line (after the blank lines before it) has not ended yet."""
    return b"\n" not in header[_LEADING_SPACE.match(header).end():]


class UriTooLongError(Error):
    code = 414
    reason = "URI Too Long"


class HttpVersionNotSupportedError(Error):
    code = 505
    reason = "HTTP Version Not Supported"


# waitress's descriptions that name its settings ("exceeds max_header of 32768"), in words a
# client can act on; any other is shown as waitress wrote it.
_PLAIN_WORDS = (
    (re.compile(r"exceeds max_header of (\d+)"), "the request line and headers reach {} bytes; this server takes less"),
    (re.compile(r"exceeds max_body of (\d+)"), "the body is {} bytes or more; this server takes less"),
)


def _in_plain_words(description: str) -> str:
    for pattern, words in _PLAIN_WORDS:
        if found := pattern.fullmatch(description):
            return words.format(found[1])
    return description


class _JsonError:
    """A waitress error (waitress.utilities.Error: code, reason, body) that answers in the app's
    JSON error shape (daemon/app.py's _serialize_error) rather than as text."""

    def __init__(self, error) -> None:
        self.error = error

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        # falcon's status text, as the app's errors have it (waitress's 413 is "Request Entity
        # Too Large", RFC 9110's and falcon's "Content Too Large").
        status = falcon.code_to_http_status(self.error.code)
        body = {"status": self.error.code, "title": status, "description": _in_plain_words(self.error.body)}
        return status, [("Content-Type", "application/json")], json.dumps(body).encode()


class JsonErrorTask(ErrorTask):
    # waitress warns, once per task, that it left out the body it was given for a HEAD request
    # (has_body below): a log line that any client could have for each malformed HEAD it sends.
    logged_write_no_body = True

    def execute(self) -> None:
        # waitress's ErrorTask answers with request.error.to_response(): the rest (closing the
        # connection after the answer, Content-Length) stays waitress's.
        if not isinstance(self.request.error, _JsonError):
            self.request.error = _JsonError(self.request.error)
        # The answer closes the connection: through waitress's own rule, as if the client had
        # asked (see LaneTask). To an HTTP/1.0 request asking to keep it, waitress added
        # "Connection: Keep-Alive" after its "Connection: close", and a client that believes the
        # last sends its next request down a connection being closed.
        self.request.headers["CONNECTION"] = "close"
        # Counted before the answer is written: its client, answered, may read /metrics at once
        # (an end-to-end test read it uncounted); and counted even if the client is gone.
        on_refused = getattr(self.channel.server, "on_refused", None)  # see Transport
        if on_refused is not None:
            try:
                on_refused(self.request.error.error.code)
            except Exception:  # a metrics callback must never cost the connection its answer
                log.exception("on_refused callback failed")
        super().execute()

    @property
    def has_body(self) -> bool:
        # waitress writes its error's body even in answer to HEAD. (A request line it could not
        # parse left no command.)
        return super().has_body and getattr(self.request, "command", None) != "HEAD"


class LaneTask(WSGITask):
    def get_environment(self) -> dict[str, Any]:
        environ = super().get_environment()
        # NOTE: taken, not just read: the channel hands a request pipelined behind this one to
        # a request thread as soon as this one is answered, before the lane clears it, and that
        # request must not get this one's outcome and arrival time.
        extra, self.channel.lane_environ = getattr(self.channel, "lane_environ", None), None
        if extra:
            environ.update(extra)
        return environ

    def build_response_header(self) -> bytes:
        channel = self.channel
        if getattr(channel, "discarding", False) and channel.requests[-1:] == [self.request]:
            # NOTE: at a drain the connection closes once its last request read is answered
            # (_close_after_answering): its answer says so, or a client that keeps connections
            # (nginx) sends its next request down this one, where it is dropped, and nginx
            # retries no POST: a 502. Only the last: waitress drops the requests behind an
            # answer that closes. Through waitress's own rule, as if the client had asked, so
            # that an HTTP/1.0 keep-alive answer says "close", not "Keep-Alive".
            self.request.headers["CONNECTION"] = "close"
        return super().build_response_header()


class QuietChannel(HTTPChannel):
    """waitress's channel, minus a busy loop that starves the request threads, and telling the
    ChangePoller (if the server has one) about itself.

    NOTE: while a request is being answered, its worker thread writes and flushes the response
    itself (holding the channel's output lock). Stock waitress still asks poll() for POLLOUT on
    that socket, which is always ready, so the main loop spins on a lock it cannot take, holding
    the GIL: measured, the main thread burned a whole core and GET / fell to a few hundred
    requests/s. Here the main loop only waits to write when no request is running (the worker
    pulls the loop's trigger when it finishes; the lane once per batch) or when a huge response
    must be drained while the worker waits at the high-water mark.
    """

    parser_class = StrictFramingParser
    task_class = LaneTask
    error_task_class = JsonErrorTask
    # Environ entries for its request being answered: set by the lane around service() (the
    # outcome, the arrival), or by add_task for a request thread (the arrival); LaneTask takes it.
    lane_environ: dict[str, Any] | None = None
    # Its next request waits for its client to read the answers so far (see add_task_unless_unread).
    held = False
    # Closing once answered, at a drain: what the client still sends is read and dropped, and
    # the close is lingering (see handle_close).
    discarding = False
    # Closing once its last answer is sent (the request asked for it, HTTP/1.0, an error): the
    # close lingers too.
    closing_answered = False
    lingering_until: float | None = None  # time.monotonic(): its FIN sent, until the client's

    def __init__(self, server, sock, addr, adj, map=None) -> None:
        # NOTE: the kernel takes no more than UNSENT_ANSWER_BYTES of answers not yet sent
        # (TCP_NOTSENT_LOWAT, Linux): by default it took megabytes (the send buffer grows to
        # tcp_wmem's 4 MB), so the serving loop made no send for a client reading them slowly,
        # and the timeouts below took it for one that reads nothing (a reader at 28 KB/s was
        # closed after 30 s). Now the loop sends as the client reads; the kernel holds what is
        # in flight and 32 KiB more.
        with contextlib.suppress(AttributeError, OSError):  # not Linux; not TCP
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_ANSWER_BYTES)
        super().__init__(server, sock, addr, adj, map)

    def readable(self) -> bool:
        if self.lingering_until is not None:
            return self.connected  # what comes is dropped, until the client's end
        if self.discarding:
            # Once answered (an EOF read before would close it unanswered: a client that sent
            # its request and shut its end, as HTTP/1.0 clients may); until the client's end.
            return self.connected and not self.requests and not self.total_outbufs_len
        return super().readable()

    def handle_read(self) -> None:
        super().handle_read()  # (received() drops what comes once the connection is to close)
        if self.lingering_until is not None and not _busy(self):
            super().handle_close()

    def handle_close(self) -> None:
        """A connection closing once answered (at a drain, or after an answer that closes it)
        sends its FIN after its answers and reads until the client closes its end (or
        LINGER_SECONDS), as nginx's lingering close does.

        NOTE: closed at once with bytes of the client unread (the rest of a request half
        received when the drain began, or more pipelined requests), the socket sent a reset,
        and a reset drops the answers the kernel has not delivered yet: a pipelining client
        lost the last of its answers. Not for a close of the reclaimer or a timeout: a
        connection that makes way for a client waiting at the connection limit must be gone
        at once."""
        if (
            (self.discarding or self.closing_answered)
            and self.lingering_until is None
            and self.connected
            and not self.total_outbufs_len
            # more may come, or our answers are still on their way: else at once
            and (self.request is not None or _unacknowledged(self) > 0 or _has_unread_input(self))
        ):
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # gone already: close it
            else:
                self.lingering_until = time.monotonic() + LINGER_SECONDS
                self.will_close = False
                self.close_when_flushed = True  # received() goes on dropping what comes
                return
        if self.lingering_until is not None:
            _drop_unread_input(self)  # (a close with it unread would still send a reset)
        super().handle_close()

    def writable(self) -> bool:
        if self.lingering_until is not None:
            return False  # its FIN is sent: nothing more
        if self.held:
            return True  # nothing else sends its answers
        if self.requests and self.total_outbufs_len < self.adj.outbuf_high_watermark:
            return bool(self.will_close)
        return super().writable()

    def handle_write(self) -> None:
        if self.close_when_flushed:
            # Its last answer closes it (waitress's flag, set by service() before it pulls the
            # loop's trigger): noted here, on the loop's thread, which is the one that closes
            # (set by the request thread after service(), the loop closed some before it was).
            self.closing_answered = True
        if not self.held:
            super().handle_write()
            return
        # No request is being answered on it: flush as waitress does then, but do not close it
        # once flushed (waitress would: its requests are still to be answered).
        self._flush_exception(self._flush_some)
        if self.will_close:
            self.handle_close()
        elif not self.connected:
            return  # the client is gone (a failed send closes the connection): nothing to answer
        elif self.total_outbufs_len <= UNSENT_ANSWER_BYTES:
            self.held = False
            with self.requests_lock:
                self.server.add_task(self)

    def service(self) -> None:
        _answering.channel = self
        try:
            super().service()
        finally:
            _answering.channel = None

    def add_channel(self, map=None) -> None:
        super().add_channel(map)
        poller = getattr(self.server, "change_poller", None)
        if poller is not None:
            poller.touched(self._fileno)

    def del_channel(self, map=None) -> None:
        descriptor = self._fileno
        super().del_channel(map)
        poller = getattr(self.server, "change_poller", None)
        if poller is not None:
            poller.forget(descriptor)


def add_task_unless_unread(add_task: Callable[[Any], None], channel) -> None:
    """The server's add_task(): a connection's next request is answered now (`add_task`, the
    server's own), unless more than UNSENT_ANSWER_BYTES of its answers wait for its client to
    read them; then the connection is held, and its own handle_write() hands the request on
    once the serving loop has sent them down to that.

    NOTE: waitress calls it when a connection's first request has arrived (nothing unsent: it
    reads a connection only then) and, after each answer, for the request pipelined behind it.
    A client that never reads keeps one read's requests parsed (RECV_BYTES: about 40 KB of
    them at most) and UNSENT_ANSWER_BYTES (plus one answer) buffered, and as much again in the
    kernel (QuietChannel.__init__); the reclaimer and the channel timeout close it (IdleReclaimer).
    """
    if channel.total_outbufs_len > UNSENT_ANSWER_BYTES:  # (a QuietChannel: the hook comes with it)
        channel.held = True
        return
    add_task(channel)


def waitress_settings(threads: int) -> dict[str, Any]:
    """The transport's waitress settings, all of them documented options (none a hook): the
    stock-waitress baseline of the benchmarks (bench/hello.py) runs on them too."""
    return {
        "threads": threads,
        "connection_limit": CONNECTION_LIMIT,
        "channel_timeout": CHANNEL_TIMEOUT,
        "backlog": BACKLOG,
        "max_request_body_size": MAX_REQUEST_BODY,
        "max_request_header_size": MAX_REQUEST_HEADER,
        "recv_bytes": RECV_BYTES,
        "asyncore_use_poll": True,  # select() cannot watch more than 1024 descriptors
        "ident": "maxtwo",
        "expose_tracebacks": False,
    }


def accept_waiting(server: BaseWSGIServer, accept_one: Callable[[], None]) -> None:
    """The listening socket's handle_accept(): waitress's own (`accept_one`, which takes one
    connection, or none if none waits), again and again while connections wait and the server
    takes more (its readable(): the connection limit), up to ACCEPTS_PER_TURN.

    NOTE: with one connection taken per turn, 400 clients connecting at once waited in the
    backlog for hundreds of turns, each made longer by the requests of the connections taken
    before them: the backlog emptied only 0.15-0.3 s into a run here, and on a slower host
    that most likely took requests past wrk's 2 s timeout (bench/NOTES.md).
    """
    channels = server._map
    for _ in range(ACCEPTS_PER_TURN):
        open_before = len(channels)
        accept_one()
        if len(channels) == open_before or not server.readable():
            return


class IdleReclaimer:
    """At the connection limit, with a client waiting in the listening socket's backlog: close
    the connection idle longest (for at least RECLAIM_IDLE_SECONDS), or failing that the one
    whose request has been arriving longest (for at least RECLAIM_SLOW_REQUEST_SECONDS), or
    failing that the one whose answers have waited longest for its client to read them (for at
    least RECLAIM_UNREAD_SECONDS), so that the client is taken in. Called by the serving loop at
    every turn; cheap below the limit. One connection closed per client found waiting, each
    client accepted at once, up to ACCEPTS_PER_TURN a turn: how many clients wait is not known
    (the backlog is only seen to be empty or not), and each closed connection is one a client
    may want again; one a turn freed 5-10 connections a second, and a burst of a few thousand
    connections that send nothing held every client behind them in the backlog out for 85-116 s
    (bench/NOTES.md). At any number of connections, once a second: a connection whose answers have
    waited for its client CHANNEL_TIMEOUT is closed (waitress's channel timeout only marks it to
    close when it can next write, which a client that reads nothing never lets come).

    NOTE: waitress stops accepting at its connection limit until a connection closes by itself.
    Idle keep-alive connections (a client's pool, a proxy's kept connections, or anyone's) then
    held every new client out for up to the channel timeout (30 s), however idle they were.
    nginx does the same when it runs out of connections: it closes its idle keep-alive ones.
    A client that trickles its request in a byte at a time is never idle, so the channel
    timeout never comes for it: 512 such connections held every new client out for as long as
    they liked (bench/NOTES.md); nginx would have ended each after its client_header_timeout.
    A client that sends requests and never reads the answers held its connection for good the
    same way (nginx's send_timeout ends those). Closing an idle persistent connection is the
    server's right (RFC 9112 section 9.5). A connection with bytes waiting to be read is not
    closed for being idle or slow (they are a request on its way); a request sent in the
    instant between that look and the close is lost unread, as with the channel timeout: an
    idempotent one a client may retry on a new connection, an increment safely only with its
    Idempotency-Key. One whose client does not read closes with its unread answers.
    """

    def __init__(self, server: BaseWSGIServer) -> None:
        self._server = server
        self._next_look = 0.0
        self._next_timeout_check = 0.0
        self._backlog = select.poll()
        self._backlog.register(server.socket.fileno(), select.POLLIN)

    def turn(self) -> None:
        server = self._server
        now = time.monotonic()
        if now >= self._next_timeout_check:
            self._next_timeout_check = now + FULL_CHECK_SECONDS
            self._close_unread(time.time() - CHANNEL_TIMEOUT)
            self._end_lingering()
        if len(server._map) < server.adj.connection_limit or not server.accepting:
            return
        if now < self._next_look:
            return
        try:
            reclaimed = self._make_way()
        except Exception:  # never by design; the loop must go on serving
            log.exception("reclaiming an idle connection at the connection limit failed")
            reclaimed = 0
        if not reclaimed:
            self._next_look = now + RECLAIM_LOOK_SECONDS
        # else: look again at the next turn: more may wait, and more may be reclaimable

    def _make_way(self) -> int:
        """For each client waiting to connect (up to ACCEPTS_PER_TURN), close a connection and
        take the client in; how many."""
        reclaimed = 0
        candidates = self._candidates()
        while reclaimed < ACCEPTS_PER_TURN and self._backlog.poll(0):  # a client waits to connect
            channel = next(candidates, None)
            if channel is None:
                break
            if channel.connected:  # (not closed meanwhile by a request thread)
                channel.handle_close()
                # Take the client in at once: the server stays at its limit, and waitress does
                # not log leaving it and reaching it again for every connection reclaimed.
                self._server.handle_accept()
                reclaimed += 1
        return reclaimed

    def _candidates(self) -> Iterator:
        """The connections that may be closed for a waiting client, in order: the idle ones,
        then the slow ones, that have no bytes waiting to be read (idle longest, slow longest
        first), then the unread ones (waiting longest first)."""
        quiet_since = time.time() - RECLAIM_IDLE_SECONDS  # waitress's last_activity is time.time()
        slow_since = time.monotonic() - RECLAIM_SLOW_REQUEST_SECONDS
        # NOTE: a list first: a request thread that fails to send closes its channel.
        channels = list(self._server.active_channels.values())
        quiet = [
            channel
            for channel in channels
            if not channel.requests and not channel.total_outbufs_len  # nothing being answered
        ]
        idle = [channel for channel in quiet if channel.request is None and channel.last_activity < quiet_since]
        slow = [
            channel
            for channel in quiet
            if channel.request is not None and getattr(channel.request, "started", slow_since) < slow_since
        ]
        idle.sort(key=lambda channel: channel.last_activity)
        slow.sort(key=lambda channel: channel.request.started)
        unread = _unread(channels, time.time() - RECLAIM_UNREAD_SECONDS)
        unread.sort(key=lambda channel: channel.last_activity)
        # NOTE: lazily: the peek for unread input (a system call) is made at a candidate's turn only.
        return itertools.chain((channel for channel in idle + slow if not _has_unread_input(channel)), unread)

    def _close_unread(self, since: float) -> None:
        for channel in _unread(list(self._server.active_channels.values()), since):
            channel.handle_close()

    def _end_lingering(self) -> None:
        """Close the lingering connections whose client has acknowledged every answer, or after
        LINGER_SECONDS (QuietChannel.handle_close): one whose client neither sends nor closes
        has no read to end it. (A drain's loop looks at every turn.)"""
        for channel in list(self._server.active_channels.values()):
            if getattr(channel, "lingering_until", None) is not None and not _busy(channel):
                channel.handle_close()


def _unread(channels: list, since: float) -> list:
    """The connections whose answers wait for their client to read them, none taken since
    `since` (time.time()), with nothing else being answered on them (no request, or held)."""
    return [
        channel
        for channel in channels
        if channel.total_outbufs_len
        and (not channel.requests or getattr(channel, "held", False))
        and channel.last_activity < since
    ]


def _has_unread_input(channel) -> bool:
    """Bytes the serving loop has not read yet (a request sent since its last turn): closing
    the connection now would reset it and lose them."""
    sock = channel.socket  # None once closed, by another thread too (a failed send)
    if sock is None:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing waits; any other: closing it loses nothing
        return False


class Transport:
    """A waitress server for `app` on `listener`, driven by serve_until() and drain().

    `lanes`: answer their requests in batches, on one thread (see LaneDispatcher).
    `change_poller`: the serving loop's epoll set (Linux); otherwise waitress's own poll loop.
    `quiet_channel`: the busy-poll fix; off only to measure what it is worth.
    `one_pull`: the lane's trigger pulls for a batch made as one (ChangePoller.one_pull, so only
    with the change poller); off only to measure what it is worth.
    `accept_backlog`: up to ACCEPTS_PER_TURN waiting connections accepted per turn of the loop
    (accept_waiting()); off only to measure what it is worth.
    `on_refused(status)`: called for each request waitress answers itself, refused before the
    app saw it (JsonErrorTask), with its status code: the app never counts those.
    `arrival_key`: see LaneDispatcher (with lanes only).
    """

    def __init__(
        self,
        app: Callable,
        listener: socket.socket,
        *,
        threads: int,
        lanes: Iterable[Lane] = (),
        change_poller: bool = True,
        quiet_channel: bool = True,
        one_pull: bool = True,
        accept_backlog: bool = True,
        on_refused: Callable[[int], None] | None = None,
        arrival_key: str | None = None,
    ) -> None:
        lanes = list(lanes)
        dispatcher = None
        if lanes:
            dispatcher = LaneDispatcher(lanes, one_pull=one_pull, arrival_key=arrival_key)
            dispatcher.set_thread_count(threads)
        self._lane_dispatcher = dispatcher
        self.server: BaseWSGIServer = waitress.create_server(
            app,
            sockets=[listener],
            # NOTE: waitress's own hook for a dispatcher of one's own (it calls it a test shim).
            # None: its default.
            _dispatcher=dispatcher,
            **waitress_settings(threads),
        )
        if quiet_channel:
            server, add_task = self.server, self.server.add_task
            server.channel_class = QuietChannel
            server.on_refused = on_refused
            server.add_task = lambda channel: add_task_unless_unread(add_task, channel)
        if accept_backlog:
            server, accept_one = self.server, self.server.handle_accept
            server.handle_accept = lambda: accept_waiting(server, accept_one)
        self._change_poller = change_poller and quiet_channel and ChangePoller.available()

    def lane_waiting(self) -> int:
        """Requests queued in the lanes, not yet in a batch (0: no lanes)."""
        return self._lane_dispatcher.waiting() if self._lane_dispatcher is not None else 0

    def lane_busy_for(self) -> float:
        """Seconds the lane thread has been at its current turn (0: it waits for requests, or no lanes)."""
        return self._lane_dispatcher.busy_for() if self._lane_dispatcher is not None else 0.0

    def serve_until(self, stopping: Callable[[], bool], on_turn: Callable[[], None] = lambda: None) -> None:
        """Answer requests until stopping() is true; on_turn() at every turn of the loop (at
        least every LOOP_TICK_SECONDS)."""
        # NOTE: waitress's own run() loops until an exception; this loop polls in short ticks,
        # so a stop request is noticed without tearing the loop down mid-response.
        server = self.server
        poller = ChangePoller(server) if self._change_poller else None
        reclaimer = IdleReclaimer(server)
        try:
            while not stopping():
                on_turn()
                reclaimer.turn()
                if poller is not None:
                    poller.poll(LOOP_TICK_SECONDS)
                else:
                    wasyncore.loop(timeout=LOOP_TICK_SECONDS, map=server._map, use_poll=True, count=1)
        finally:
            if poller is not None:
                poller.close()

    def drain(self, seconds: float, on_turn: Callable[[], None] = lambda: None) -> bool:
        """Stop listening, answer every request already received (for up to `seconds`), then
        close everything. Whether everything was answered in time."""
        server = self.server
        deadline = time.monotonic() + seconds
        # Connections that completed their handshake but wait in the backlog count as accepted:
        # take them in before the listening socket closes (closing it would reset them).
        for _ in range(BACKLOG):
            try:
                accepted = server.accept()
                if accepted is None:
                    break
                conn, addr = accepted
                server.set_socket_options(conn)
            except OSError:
                continue  # one client gave up in the backlog; the next may not have
            server.channel_class(server, conn, server.fix_addr(addr), server.adj, map=server._map)
        # Close the listening socket only; the trigger that wakes this loop must stay open.
        wasyncore.dispatcher.close(server)
        answered = False
        while time.monotonic() < deadline:
            on_turn()
            for channel in list(server.active_channels.values()):
                _close_after_answering(channel)
            if not any(_busy(channel) for channel in list(server.active_channels.values())) and not (
                server.task_dispatcher.queue or server.task_dispatcher.active_count
            ):
                answered = True
                break
            wasyncore.loop(timeout=0.05, map=server._map, use_poll=True, count=1)
        self.close(thread_timeout=1)
        return answered

    def close(self, thread_timeout: float = 5) -> None:
        """Close at once, answered or not (what drain() ends with), waiting up to
        `thread_timeout` s for the request threads."""
        self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=thread_timeout)
        for channel in list(self.server.active_channels.values()):
            # NOTE: waitress's handle_close (not QuietChannel's lingering one): unlike close_all's
            # close of the socket alone, it closes the answers' buffers (one over 1 MB is a
            # temporary file, left to the garbage collector) and wakes a request thread waiting
            # for room to write more of its answer (it waited forever).
            HTTPChannel.handle_close(channel)
        wasyncore.close_all(self.server._map)


def _close_after_answering(channel) -> None:
    """From now on the connection takes no new request: it closes once what it has received is
    answered (at once if that is nothing). A client that keeps its connection open, as a
    reverse proxy does, would otherwise send request after request into a daemon that is
    stopping, until the drain's deadline cut one off with its answer unsent; closed, it goes to
    another instance instead.

    NOTE: not while a request is half received and none is complete before it (it is answered
    first), nor within QUIET_SECONDS of the last activity (a client that has just connected may
    be about to send one). A request half received behind complete ones is a client's
    pipelining cut by a read: it is dropped with the rest of what the client sent after them
    (not read: a client may send those again elsewhere), or the loop would read on, and every
    read brings more complete requests (20 clients pipelining 220 requests each kept the drain
    answering past its 5 s). Nor while bytes the loop has not read yet wait (the start of a
    request sent just before the serving loop ended: dropped unread, its client was told
    nothing)."""
    if channel.requests or (
        channel.request is None
        and time.time() - channel.last_activity >= QUIET_SECONDS
        and not _has_unread_input(channel)
    ):
        # waitress's own flag: received() takes nothing more, the loop closes once flushed;
        # ours: what still comes is read and dropped, and the close lingers (QuietChannel).
        channel.close_when_flushed = True
        channel.discarding = True


def _busy(channel) -> bool:
    """A request in progress, a response unsent, or bytes that may still be on their way; or a
    lingering close not over (QuietChannel.handle_close)."""
    lingering_until = getattr(channel, "lingering_until", None)
    if lingering_until is not None:  # until the client has everything (or LINGER_SECONDS)
        return channel.connected and time.monotonic() < lingering_until and _unacknowledged(channel) > 0
    return bool(
        channel.requests
        or (channel.request is not None and not getattr(channel, "discarding", False))  # (never to be answered)
        or channel.total_outbufs_len
        or time.time() - channel.last_activity < QUIET_SECONDS
        or (not getattr(channel, "discarding", False) and _has_unread_input(channel))  # to be read first
    )


def _drop_unread_input(channel) -> None:
    """Read and drop what the client has sent that the serving loop has not read."""
    sock = channel.socket
    for _ in range(64 if sock is not None else 0):  # (None: closed already)
        try:
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                return
        except OSError:  # BlockingIOError: nothing more; any other: nothing to save
            return


def _unacknowledged(channel) -> int:
    """Bytes sent on the connection that its client has not acknowledged yet, our FIN included
    (Linux's SIOCOUTQ); 0 where that cannot be asked. Once 0, a close loses it nothing."""
    try:
        return struct.unpack("i", fcntl.ioctl(channel.socket.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except (AttributeError, OSError, ValueError):  # not Linux; closed
        return 0


def _route(channel) -> tuple[str, str]:
    """(method, path) of the request a channel is to answer next."""
    request = channel.requests[0]
    return request.command, request.path


class LaneDispatcher(ThreadedTaskDispatcher):
    """waitress's dispatcher with lanes: complete requests for a lane's routes queue in that
    lane, and the lane thread takes all of them at once, fetches their outcomes in one batch,
    then answers each request in turn through the same app, which finds its outcome in its WSGI
    environ. Everything else (and a request no lane would recognise, e.g. a malformed one) goes
    to the request threads as before.

    NOTE: waitress wakes a request thread for every request, and a GET / (or POST /increment)
    thread then sleeps again until its batch commits: two sleeps and wake-ups per request, which
    cost more than the app itself. Per batch here: three wake-ups (the lane's, the committer's,
    the lane's again for the answers); every response is still made by the app, in order, once
    its batch has committed (bench/NOTES.md).

    Each lane has one batch in flight at most, and the lanes' batches are answered as each comes
    in: a lane whose batch waits (an increment for a counter's row lock) holds up no other lane's
    answers. One thread serves every lane: a thread per lane cost 0.80x the req/s under both
    routes at once, and twice the p99 (bench/NOTES.md).
    """

    def __init__(self, lanes: Iterable[Lane], *, one_pull: bool = True, arrival_key: str | None = None) -> None:
        """`arrival_key`: the environ entry that tells the app when a request for the request
        threads arrived (perf_counter), as Lane.environ_for does for the lanes' requests."""
        super().__init__()
        self._one_pull = one_pull
        self._arrival_key = arrival_key
        self._lanes = [_LaneQueue(lane) for lane in lanes]
        self._lane_of = {route: lane for lane in self._lanes for route in lane.spec.routes}
        self._lane_lock = threading.Lock()
        self._lane_ready = threading.Condition(self._lane_lock)
        self._lane_thread: threading.Thread | None = None
        self._lane_stopping = False
        self._turn_started: float | None = None  # time.monotonic() of the lane's turn; None: idle

    def add_task(self, task) -> None:
        # NOTE: called with the channel's requests_lock held (by the serving thread when a
        # request is complete, or by a request thread for the next pipelined request), so its
        # first request cannot change under us.
        lane = self._lane_for(task)
        if lane is not None:
            with self._lane_lock:
                lane.queue.append((task, time.perf_counter()))
                # NOTE: behind a batch in flight the request waits for that batch, whose
                # outcomes wake the lane thread; woken for it, the thread would find nothing
                # to do (it cost GET / a tenth of its req/s on PostgreSQL, bench/NOTES.md).
                if lane.in_flight is None:
                    self._lane_ready.notify()
            return
        if self._arrival_key is not None:
            # NOTE: while every request thread is busy, a request waits here for one; the app's
            # latency (its histogram) left that wait out (an audit). `task` is the channel
            # (waitress's name), whose one request answered at a time takes this with its
            # environ (LaneTask).
            task.lane_environ = {self._arrival_key: time.perf_counter()}
        super().add_task(task)

    def _lane_for(self, channel) -> _LaneQueue | None:
        requests = getattr(channel, "requests", None)
        if not requests:
            return None
        request = requests[0]
        return self._lane_of.get((request.command, request.path)) if request.error is None else None

    def set_thread_count(self, count: int) -> None:
        super().set_thread_count(count)
        with self._lane_lock:
            # The lane runs while there are request threads (waitress sets 0 to shut down).
            self._lane_stopping = count == 0
            if count > 0 and self._lane_thread is None:
                # NOTE: one thread: a second one, waiting for its batch while the first answers
                # its own, cost 40-70 us more CPU per request and served less (bench/NOTES.md).
                self._lane_thread = threading.Thread(target=self._serve_lanes, name=LANE_THREAD_NAME, daemon=True)
                self._lane_thread.start()
            self._lane_ready.notify()

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        lane_thread = self._lane_thread
        result = super().shutdown(cancel_pending, timeout)  # stops the lane too (set_thread_count)
        if lane_thread is not None:
            lane_thread.join(timeout)  # a batch stuck in the database is not waited out
        if cancel_pending:
            with self._lane_lock:
                pending = [channel for lane in self._lanes for channel, _ in lane.queue]
                for lane in self._lanes:
                    lane.queue.clear()
            for channel in pending:
                channel.cancel()
        return result

    def waiting(self) -> int:
        """Requests queued in the lanes, not yet in a batch. (A deque's length is read whole.)"""
        return sum(len(lane.queue) for lane in self._lanes)

    def busy_for(self) -> float:
        """Seconds the lane thread has been at its current turn (0: it waits for requests):
        past its requests' wait for the database, it no longer works."""
        started = self._turn_started
        return 0.0 if started is None else time.monotonic() - started

    def _wake(self) -> None:
        """A lane's outcomes may be in (called by whoever hands them over)."""
        with self._lane_lock:
            self._lane_ready.notify()

    def _serve_lanes(self) -> None:
        # NOTE: a lane's outcomes are collected, then the requests that arrived meanwhile are
        # submitted, and only then is the lane's batch answered: the database works on the next
        # batch while the lane answers (one batch at a time left each idle while the other
        # worked; bench/NOTES.md).
        while True:
            self._turn_started = time.monotonic()
            with self._lane_lock:
                due = self._wait_for_work()
                if due is None:
                    self._lane_thread = None
                    self._turn_started = None
                    return
            try:
                self._turn(due)
            except Exception:
                # Never reached by design (every outcome, a failure included, is an answer); if
                # it is, the lane goes on for the requests to come.
                log.exception("the lane's turn failed")

    def _turn(self, due: list[_LaneQueue]) -> None:
        answers: list[tuple[Lane, list, list[Any]]] = []
        # NOTE: a lane whose batch came in while this turn collected and submitted is answered
        # in this turn too, with one trigger pull for all (ChangePoller.one_pull): under both
        # routes at once, the lanes' batches come in at nearly the same time.
        for _ in self._lanes:
            self._collect_and_submit(due, answers)
            with self._lane_lock:
                due = [lane for lane in self._lanes if lane.in_flight is not None and lane.ready()]
            if not due:
                break
        self._answer(answers)

    def _collect_and_submit(self, due: list[_LaneQueue], answers: list[tuple[Lane, list, list[Any]]]) -> None:
        """Collect the due lanes' outcomes into `answers`, then submit what waits in the lanes."""
        collected = [(lane, *lane.collect()) for lane in due]
        submitting: list[tuple[_LaneQueue, list]] = []
        with self._lane_lock:
            for lane, queued, outcomes in collected:
                answers.append((lane.spec, queued, outcomes))
                failures = lane.failures(queued, outcomes)
                if failures:
                    # NOTE: as in the batcher: those who queued while a batch failed would meet
                    # the same database (or lock) and wait a whole timeout more; they share its
                    # error. The others go in the lane's next batch.
                    shared = lane.take_sharing(failures)
                    answers.append((lane.spec, [item for item, _ in shared], [failure for _, failure in shared]))
            if not self._lane_stopping:  # (a stopping lane takes nothing new: see shutdown)
                submitting = [(lane, lane.take_batch()) for lane in self._lanes if lane.idle()]
        for lane, queued in submitting:
            lane.submit(queued, self._wake)

    def _wait_for_work(self) -> list[_LaneQueue] | None:
        """Wait until a lane's batch is in (or its wait is over), or requests wait in a lane
        with no batch in flight; the lanes whose batch is due (none: just requests). None: the
        lane thread is to end. Called with the lane's lock held."""
        while True:
            in_flight = [lane for lane in self._lanes if lane.in_flight is not None]
            if self._lane_stopping and not in_flight:
                return None
            now = time.perf_counter()
            due = [lane for lane in in_flight if lane.due(now)]
            if due or (not self._lane_stopping and any(lane.idle() for lane in self._lanes)):
                return due
            if in_flight:
                self._lane_ready.wait(min(lane.deadline() for lane in in_flight) - now)
            else:
                self._turn_started = None
                self._lane_ready.wait()
                self._turn_started = time.monotonic()

    def _answer(self, answers: list[tuple[Lane, list, list[Any]]]) -> None:
        """Answer each lane's requests, [(channel, arrived)], with their outcomes, in turn."""
        if not any(queued for _, queued, _ in answers):
            return
        first = next(queued for _, queued, _ in answers if queued)
        poller = getattr(first[0][0].server, "change_poller", None) if self._one_pull else None
        with poller.one_pull() if poller is not None else contextlib.nullcontext():
            for spec, queued, outcomes in answers:
                for (channel, arrived), outcome in zip(queued, outcomes, strict=True):
                    environ = channel.lane_environ = spec.environ_for(outcome, arrived)
                    try:
                        channel.service()
                    except BaseException:
                        # As waitress's own request threads: log it and go on with the rest.
                        log.exception("Exception when servicing %r", channel)
                    finally:
                        # Unless taken (LaneTask), or already the arrival of the request behind
                        # it, handed to a request thread (add_task).
                        if channel.lane_environ is environ:
                            channel.lane_environ = None


class _LaneQueue:
    """One lane's requests: those waiting, and its batch in flight (see LaneDispatcher). Only
    the lane thread changes in_flight; the queue changes with the lane's lock held."""

    def __init__(self, spec: Lane) -> None:
        self.spec = spec
        self.queue: collections.deque = collections.deque()  # (channel, arrived)
        self.in_flight: tuple[list, Any] | None = None  # ([(channel, arrived)], handle): submitted

    def idle(self) -> bool:
        """Requests wait and no batch is in flight."""
        return self.in_flight is None and bool(self.queue)

    def deadline(self) -> float:
        """When the batch in flight has waited as long as its oldest request may (perf_counter)."""
        return self.in_flight[0][0][1] + self.spec.max_wait

    def due(self, now: float) -> bool:
        """Whether the batch in flight is to be collected: its outcomes are in, or its wait is over."""
        return now >= self.deadline() or self.ready()

    def ready(self) -> bool:
        """Whether the batch in flight's outcomes are in (collect() would not wait)."""
        handle = self.in_flight[1]
        if isinstance(handle, _Failed):
            return True
        try:
            return self.spec.ready(handle)
        except Exception:  # noqa: BLE001 - collect() will say what it is
            return True

    def take_batch(self) -> list:
        """At most one transaction's worth of the waiting requests; the rest go in the next."""
        return [self.queue.popleft() for _ in range(min(len(self.queue), self.spec.max_batch))]

    def submit(self, queued: list, wake: Callable[[], None]) -> None:
        try:
            handle = self.spec.submit([self._lane_request(channel) for channel, _ in queued], wake)
        except Exception as ex:  # noqa: BLE001 - each request turns it into its error response
            handle = _Failed(ex)
        self.in_flight = (queued, handle)

    def collect(self) -> tuple[list, list[Any]]:
        """The batch in flight and its outcomes (it is due: they are in, or its wait is over)."""
        (queued, handle), self.in_flight = self.in_flight, None
        # NOTE: every request waits for the database at most max_wait from its arrival, as it
        # would in a request thread of its own; the oldest of the batch sets the bound.
        timeout = max(queued[0][1] + self.spec.max_wait - time.perf_counter(), 0.0)
        try:
            if isinstance(handle, _Failed):
                raise handle.error
            return queued, self.spec.collect(handle, timeout)
        except Exception as ex:  # noqa: BLE001 - each request turns it into its error response
            return queued, [ex] * len(queued)

    def failures(self, queued: list, outcomes: list[Any]) -> dict[tuple[str, str] | None, Any]:
        """The failures among a batch's outcomes that requests queued meanwhile share, by the
        route they concern (None: every route)."""
        failures: dict[tuple[str, str] | None, Any] = {}
        for (channel, _), outcome in zip(queued, outcomes, strict=True):
            scope = self.spec.failure_scope(outcome)
            if scope == "all":
                return {None: outcome}
            if scope == "route":
                failures.setdefault(_route(channel), outcome)
        return failures

    def take_sharing(self, failures: dict[tuple[str, str] | None, Any]) -> list[tuple[Any, Any]]:
        """Take from the queue each request that shares one of `failures`, with that failure.
        Called with the lane's lock held."""
        everyone = failures.get(None)
        shared, kept = [], []
        for item in self.queue:
            failure = everyone if everyone is not None else failures.get(_route(item[0]))
            if failure is None:
                kept.append(item)
            else:
                shared.append((item, failure))
        self.queue.clear()
        self.queue.extend(kept)
        return shared

    def _lane_request(self, channel) -> LaneRequest:
        request = channel.requests[0]
        body = b""
        if request.command != "GET":
            # NOTE: the app gets its outcome, not the body: reading it here leaves wsgi.input empty.
            body = request.get_body_stream().read(self.spec.max_body + 1)
        return LaneRequest(request.command, request.path, request.headers, body)


@dataclasses.dataclass(frozen=True)
class _Failed:
    """A batch whose submit() raised: its requests are answered with the error."""

    error: Exception


class ChangePoller:
    """One pass of the serving loop at a time (poll()), for a server whose channels are
    QuietChannels; close() hands the server back to waitress's own loop. Linux only (epoll).

    waitress's own poller (wasyncore.poll2) builds a new poll set on every pass, asking every
    open connection whether it wants to read or write; a pass runs every time a response is sent
    or a request arrives. While the lane's requests wait for their shared commit, the serving
    thread has the interpreter to itself and makes pass after pass: with 200 connections, most
    of its time went into asking (bench/NOTES.md). Here one epoll set lives across passes, and a
    pass asks only what may have changed since the last:
    - the connections that had an event in the last pass (reading or writing changed them);
    - the connections a request thread touched: it pulls the loop's trigger when it finishes a
      request (or needs the loop to write for it), and the pull records which connection it
      was answering. A connection that waits for its answer changes in no other way;
    - new connections, and the listening socket and the trigger (always);
    - every connection once a second: waitress's maintenance closes idle connections from the
      loop, and whatever the rules above could miss is caught within that second.

    A thread answering a batch (the lane) holds its pulls in one_pull() and makes one at the
    end: waitress pulls after every response, and each pull woke the loop, which then traded
    the interpreter lock with the lane once per response (bench/NOTES.md).
    """

    @staticmethod
    def available() -> bool:
        return hasattr(select, "epoll")

    def __init__(self, server: BaseWSGIServer) -> None:
        self._server = server
        self._map = server._map
        self._epoll = select.epoll()
        self._registered: dict[int, tuple[object, int]] = {}  # descriptor -> (dispatcher, events)
        # Appended to by request threads, emptied by the loop: deque's append and popleft are
        # atomic, a set's iteration is not.
        self._touched: collections.deque[int] = collections.deque()
        self._fired: list[int] = []
        self._next_full_check = 0.0
        # The listening socket and the trigger: not connections, few, asked every pass.
        self._others = [fd for fd, dispatcher in self._map.items() if not isinstance(dispatcher, HTTPChannel)]
        self._pull_trigger = server.pull_trigger
        server.pull_trigger = self._pull_trigger_for
        server.change_poller = self

    def close(self) -> None:
        del self._server.pull_trigger  # the class's own again
        del self._server.change_poller
        self._epoll.close()

    def touched(self, descriptor: int | None) -> None:
        if descriptor is not None:
            self._touched.append(descriptor)

    @contextlib.contextmanager
    def one_pull(self) -> Iterator[None]:
        """The trigger pulls this thread makes inside are recorded but held; one real pull at
        the end wakes the loop for all of their connections.

        Held only while the loop has nothing to do for the connection at once: its output below
        waitress's high-water mark and the connection not closing. Past the mark (or after a
        failed send) the thread pulls and then waits for the loop to drain or close the
        connection; held, that pull would leave it waiting for the loop's next tick each time.
        """
        _answering.holding_pulls = True
        _answering.pull_held = False
        try:
            yield
        finally:
            _answering.holding_pulls = False
            if _answering.pull_held:
                _answering.pull_held = False
                self._pull_trigger()

    def forget(self, descriptor: int | None) -> None:
        """A connection is closing (its descriptor is still open)."""
        known = self._registered.pop(descriptor, None)
        if known is not None and known[1]:
            try:
                self._epoll.unregister(descriptor)
            except OSError:  # closed already, or epoll is
                pass

    def poll(self, timeout: float) -> None:
        """Ask what may have changed, wait up to `timeout` s for events, handle them."""
        channels = self._map
        now = time.monotonic()
        if now >= self._next_full_check:
            self._next_full_check = now + FULL_CHECK_SECONDS
            for descriptor, (dispatcher, _) in list(self._registered.items()):
                if channels.get(descriptor) is not dispatcher:
                    self.forget(descriptor)
            candidates: Iterable[int] = set(channels)
        else:
            candidates = set(self._fired)
            candidates.update(self._others)
            touched = self._touched
            while touched:
                candidates.add(touched.popleft())
        for descriptor in candidates:
            dispatcher = channels.get(descriptor)
            if dispatcher is None:
                self.forget(descriptor)
            else:
                self._update(descriptor, dispatcher)
        events = self._epoll.poll(timeout)
        self._fired = [descriptor for descriptor, _ in events]
        for descriptor, flags in events:
            dispatcher = channels.get(descriptor)
            if dispatcher is not None:
                wasyncore.readwrite(dispatcher, flags)

    def _pull_trigger_for(self, *args) -> None:
        channel = getattr(_answering, "channel", None)
        if channel is not None:
            self.touched(channel._fileno)
            if (
                getattr(_answering, "holding_pulls", False)
                and channel.total_outbufs_len < channel.adj.outbuf_high_watermark
                and not channel.will_close
            ):
                _answering.pull_held = True
                return
        self._pull_trigger(*args)

    def _update(self, descriptor: int, dispatcher) -> None:
        """Register what the dispatcher waits for now, as wasyncore.poll2 would ask it."""
        wanted = 0
        if dispatcher.readable():
            wanted |= _READ
        if dispatcher.writable() and not dispatcher.accepting:
            wanted |= _WRITE
        known = self._registered.get(descriptor)
        # NOTE: another dispatcher on a known descriptor: the old one was closed, and the
        # kernel dropped its registration with it.
        current = known[1] if known is not None and known[0] is dispatcher else 0
        if known is not None and known[0] is dispatcher and current == wanted:
            return
        epoll = self._epoll
        try:
            if wanted and current:
                epoll.modify(descriptor, wanted)
            elif wanted:
                epoll.register(descriptor, wanted)
            else:
                # NOTE: poll2 leaves out a dispatcher that waits for nothing; so must epoll, or
                # it would still report a hang-up of a client whose request is being answered.
                epoll.unregister(descriptor)
        except FileExistsError:  # registered after all (a dispatcher we had not seen yet)
            epoll.modify(descriptor, wanted)
        except FileNotFoundError:  # not registered after all
            if wanted:
                epoll.register(descriptor, wanted)
        except OSError:  # the descriptor is closed: the dispatcher is on its way out
            self._registered.pop(descriptor, None)
            return
        self._registered[descriptor] = (dispatcher, wanted)


def configure_logging() -> None:
    # NOTE: waitress warns "Task queue depth is N" once per queued request under load, which
    # would flood the journal exactly when it matters; queueing is visible in the latency
    # histogram instead.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    waitress_log = logging.getLogger("waitress")
    if not any(isinstance(each, ConnectionLimitNotes) for each in waitress_log.filters):
        waitress_log.addFilter(ConnectionLimitNotes())


class ConnectionLimitNotes(logging.Filter):
    """waitress's line on reaching the connection limit at most once every SECONDS, and its
    line on dropping below it only after a "reached" that was written (so the last of the two
    in the log tells the state): it writes them at every crossing, and clients connecting and
    closing at the limit made 12 lines a second (the reclaimer's closings add their own)."""

    SECONDS = 60.0
    _REACHED = "total open connections reached the connection limit"
    _DROPPED = "total open connections dropped below the connection limit"

    def __init__(self) -> None:
        super().__init__()
        self._reached_at = -self.SECONDS  # monotonic time of the last "reached" written
        self._reached_written = False
        self._unwritten = 0  # "reached" lines left out since the last one written

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not isinstance(message, str):
            return True
        if message.startswith(self._DROPPED):
            return self._reached_written
        if not message.startswith(self._REACHED):
            return True
        now = time.monotonic()
        self._reached_written = now - self._reached_at >= self.SECONDS
        if not self._reached_written:
            self._unwritten += 1
            return False
        if self._unwritten:
            record.msg = f"{message} ({self._unwritten} crossing(s) of the limit unlogged since the last such line)"
        self._reached_at, self._unwritten = now, 0
        return True
