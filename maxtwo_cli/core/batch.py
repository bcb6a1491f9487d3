"""One database connection held from batch to batch, for callers that write many times a second.

A pool checkout and return per batch cost a fifth of a query batch on SQLite, and SQLAlchemy's
per-call work (connection and transaction objects, events, result processing) three times the
statements themselves (0.7 ms vs 0.2 ms per transaction, bench/NOTES.md). So the hot paths
talk to the driver directly: the held connection stays in autocommit with one cursor until
release(), a single statement is its own transaction, and transaction() brackets several.

Not thread-safe: one per thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

from sqlalchemy.engine import Engine

from maxtwo_cli.core.db import closed_while_idle, database_errors, driver_errors, is_postgres, redact
from maxtwo_cli.core.errors import DatabaseUnavailableError, MaxtwoError

T = TypeVar("T")


class HeldConnection:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.postgres = is_postgres(engine)
        self._pooled: Any = None  # SQLAlchemy's pooled connection, while held
        self._cursor: Any = None  # the driver's cursor on it
        self._in_transaction = False
        # Why the open transaction can commit nothing any more, as (error class, message, the
        # error that doomed it), or None: a statement of it failed, or its connection was lost.
        # Until transaction() ends, nothing more runs and no COMMIT is sent, should a caller
        # catch the error and go on: after a lost connection each statement would run on a
        # fresh one, committed by itself, and the COMMIT there commit nothing; after a failed
        # statement PostgreSQL takes the COMMIT as a ROLLBACK, and reports success.
        self._doomed: tuple[type[Exception], str, BaseException | None] | None = None

    def run(self, work: Callable[[Any], T], *, starts_work: bool = True) -> T:
        """`work(cursor)`, its driver errors turned into MaxtwoErrors.

        Outside a transaction, an error gives the connection back (or throws it away if it is
        broken) and the next run takes a fresh one; inside one, the transaction's owner rolls
        back and goes on, unless the connection is broken. `starts_work`: nothing is pending on
        the connection (False for a COMMIT, which must fail on the connection it was to end,
        not run on another)."""
        if self._doomed is not None:
            self._raise_doomed(self._doomed)
        try:
            with database_errors(self.engine):
                try:
                    if starts_work and self.postgres and self._pooled is not None and not self._in_transaction:
                        self._replace_if_closed_while_idle()
                    return work(self._held_cursor())
                except driver_errors():
                    if not (self._in_transaction and self.held and not self._broken()):
                        self._discard()
                    raise
                except BaseException:
                    if not self._in_transaction:
                        self.release()
                    raise
        except BaseException as ex:
            if self._in_transaction and self._doomed is None:
                # The same kind of error (a DatabaseBusyError stays one: a 503, not a 500).
                kind = type(ex) if isinstance(ex, MaxtwoError) else RuntimeError
                why = "a statement of this transaction failed, and its caller went on: nothing of it was committed"
                self._doomed = (kind, why, ex)
            raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything run inside commits together, or not at all. Its first statement must write.

        NOTE: on SQLite a deferred BEGIN, so that the first write locks only the file it writes
        (BEGIN IMMEDIATE would lock every attached file, the main one too, which a randomization
        holds for a while: see core/db.py, ONE_FILE_OPTION). A first statement that writes waits
        for that lock in the busy handler; one that read first and wrote later could fail with
        SQLITE_BUSY at once instead."""
        self.run(lambda cursor: cursor.execute("BEGIN"))
        self._in_transaction = True
        try:
            yield
        except BaseException:
            self._in_transaction, self._doomed = False, None
            self._rollback("ROLLBACK")
            raise
        self._in_transaction = False
        doomed, self._doomed = self._doomed, None
        if doomed is not None:
            self._rollback("ROLLBACK")  # (nothing to do if the connection was lost)
            self._raise_doomed(doomed)
        # NOTE: a connection the server closed before the COMMIT took the transaction with it:
        # the COMMIT fails there (an unknown outcome, a 503), rather than be sent on a fresh
        # connection, where it would commit nothing and say it did.
        self.run(self._commit, starts_work=False)

    def _commit(self, cursor: Any) -> None:
        cursor.execute("COMMIT")
        # NOTE: PostgreSQL ends a transaction that had an error (one a work function caught
        # itself) with a ROLLBACK, and the COMMIT reports success: its command tag says which.
        if self.postgres and cursor.statusmessage != "COMMIT":
            raise RuntimeError(
                f"the database ended this transaction with {cursor.statusmessage} (a statement of it "
                "failed): nothing of it was committed"
            )

    @staticmethod
    def _raise_doomed(doomed: tuple[type[Exception], str, BaseException | None]) -> NoReturn:
        error, message, cause = doomed
        raise error(message) from cause

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction() is open."""
        return self._in_transaction

    @property
    def held(self) -> bool:
        """Whether a connection is held (False after an error gave it back, until the next run)."""
        return self._cursor is not None

    def release(self) -> None:
        """Return the held connection to the pool (the next run takes one again)."""
        pooled, self._pooled = self._pooled, None
        cursor, self._cursor = self._cursor, None
        if self._in_transaction and self._doomed is None:
            why = (f"the connection to the database at {redact(self.engine.url)} was lost during a transaction: "
                   "nothing of it was committed")
            self._doomed = (DatabaseUnavailableError, why, None)
        self._in_transaction = False
        if pooled is None:
            return
        # None once invalidated (on SQLite its cursor must be closed before: _discard).
        driver = pooled.driver_connection
        if driver is not None:
            try:
                if cursor is not None:
                    cursor.close()
                if self.postgres and not driver.broken:
                    driver.autocommit = False  # as the pool's other users expect it
            except driver_errors():
                # e.g. a statement interrupted half-way, a transaction still open: a connection
                # in a state we cannot undo must not go back to the pool (nor hide the error
                # that got us here).
                pooled.invalidate()
        pooled.close()

    def _rollback(self, statement: str) -> None:
        """Undo after an error; a connection that cannot even do that is thrown away."""
        if not self.held:
            return
        try:
            self._cursor.execute(statement)
        except driver_errors():
            self._discard()

    def _replace_if_closed_while_idle(self) -> None:
        """A held connection the server closed between two batches (a restart, an idle-session
        timeout) is given up for another before use: the batch would fail on it, a 503 for all
        of its requests. The pool checks the next one the same way (core/db.py)."""
        if closed_while_idle(self._pooled.driver_connection):
            self._pooled.invalidate()
            self.release()

    def _broken(self) -> bool:
        return self.postgres and self._pooled is not None and self._pooled.driver_connection.broken

    def _discard(self) -> None:
        pooled = self._pooled
        if pooled is not None:
            if self._broken():
                # The server went away (restart, outage): every pooled connection is as dead
                # as this one, so start a fresh pool, as SQLAlchemy does on a disconnect. The
                # request engine does not ping before each use: that would cost a round trip.
                pooled.invalidate()
                self.engine.dispose()
            elif not self.postgres:
                # NOTE: a SQLite connection opened while the file could not be written
                # (read-only, full disk) stays read-only for good; a fresh one costs little.
                # Its cursor is closed first: SQLite closes a connection only once its
                # statements are finalized, and the error's traceback keeps the cursor, and
                # its statement, alive: each discarded connection kept both files open (a
                # review: 7,400 descriptors after 8 s of a read-only file under load).
                with contextlib.suppress(*driver_errors()):
                    if self._cursor is not None:
                        self._cursor.close()
                pooled.invalidate()
        self.release()

    def _held_cursor(self) -> Any:
        if self._cursor is None:
            if self._pooled is None:
                self._pooled = self.engine.raw_connection()
            driver = self._pooled.driver_connection
            # NOTE: maxtwo's SQLite connections always are in autocommit; its engine emits
            # BEGIN itself (core/db.py).
            if self.postgres:
                driver.autocommit = True
            self._cursor = driver.cursor()
        return self._cursor
