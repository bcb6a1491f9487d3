"""The errors the core raises. Each message says what to check or do next."""


class MaxtwoError(Exception):
    """Base of every error maxtwo reports to a user (CLI: one line and exit 1; HTTP: JSON)."""


class ConfigurationError(MaxtwoError):
    """A setting is wrong: a database URL that cannot be parsed or names an unsupported database."""


class DatabaseUnavailableError(MaxtwoError):
    """The database cannot be reached, refused the credentials, or did not answer in time."""


class DatabaseBusyError(DatabaseUnavailableError):
    """The database is there but could not do this now: a lock or a statement timeout ran out,
    or it rolled back a deadlock. Other work, or the same later, may well succeed."""


class SchemaMismatchError(MaxtwoError):
    """The database holds tables that maxtwo did not create; maxtwo refuses to touch them."""


class AlreadySeededError(MaxtwoError):
    """`seed` was asked to add users to a table that already has some."""


class RandomizationInProgressError(MaxtwoError):
    """Another process's scheduled run still holds the lock that scheduled runs take at the
    half of the slot: this slot is left to it (a run late for the slot before, or this slot's,
    too long for the interval); or, `stopping`, this process stopped waiting for it."""

    def __init__(self, message: str, *, stopping: bool = False) -> None:
        super().__init__(message)
        self.stopping = stopping
