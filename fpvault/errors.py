"""The error tree of fpvault.

Every error a user can meet is an ``FpvaultError`` subclass that carries its
exit code (cli.md: 1 failed, 2 usage, 3 damaged, 4 locked, 5 database).
Only ``cli.main`` turns them into exit codes and messages; everything below
raises and lets them travel, keeping the cause with ``raise ... from``.
"""


class FpvaultError(Exception):
    """An error with a message meant for the user."""

    exit_code = 1


class UsageError(FpvaultError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class RepositoryNotFound(FpvaultError):
    """There is no fpvault repository at the given place."""


class RepositoryExists(FpvaultError):
    """``init`` was pointed at a repository that already exists."""


class SnapshotNotFound(UsageError):
    """A snapshot reference matches no snapshot, or several."""


class RepositoryDamaged(FpvaultError):
    """Stored data does not match its hash, or is missing."""

    exit_code = 3


class RepositoryLocked(FpvaultError):
    """Another live process holds a conflicting lock."""

    exit_code = 4


class DatabaseError(FpvaultError):
    """The database could not be reached, or refused what we asked."""

    exit_code = 5


class SnapshotFailed(FpvaultError):
    """Reading the database failed part-way; no snapshot was written."""


class RestoreFailed(FpvaultError):
    """The target database refused the restore; it was rolled back."""


class ToolError(FpvaultError):
    """pg_dump or pg_restore is missing, too old, or failed."""


class Stopped(Exception):
    """A parallel task gave up because another one failed; that one's error is reported."""


def first_cause(errors: list[BaseException]) -> BaseException:
    """Of the errors parallel tasks ended with, the one to report: not a ``Stopped``."""
    return next((e for e in errors if not isinstance(e, Stopped)), errors[0])
