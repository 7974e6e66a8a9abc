"""Ctrl-C and SIGTERM once a command's work is durable.

The CLI turns both into exceptions in the main thread, which unwind the command
so that locks, temporary files and child processes are cleaned up.  But once a
snapshot's manifest is written, the snapshot is complete: an interrupt that
comes then must neither make the command say that it failed nor stop it before
it prints the snapshot's id, which scripts read.  ``durable`` marks that write:
from just before it to the end of the command, an interrupt is remembered
(``pending``) instead of raised, and the command ends as it would have, saying
that it was asked to stop.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_held: str | None = None                      # what was made durable, once it was
_holding = False
_pending: type[BaseException] | None = None   # the interrupt that came meanwhile


def reset() -> None:
    """Forget all of it (a new command in the same process)."""
    global _held, _holding, _pending
    _held, _holding, _pending = None, False, None


def interrupt(exc: type[BaseException]) -> None:
    """From a signal handler: raise ``exc``, or remember it while work is made durable
    or after it was."""
    global _pending
    if _holding:
        _pending = _pending or exc
        return
    raise exc()


@contextmanager
def durable(what: str) -> Iterator[None]:
    """Around the write that makes the command's work durable (``what``: "the
    snapshot was written").  An interrupt waits until the block ends; if the block
    raises, so does the interrupt then (else the error); if not, it is remembered
    until the command ends."""
    global _held, _holding, _pending
    _holding = True
    try:
        yield
    except BaseException:
        _holding = False
        pending, _pending = _pending, None
        if pending is not None:
            raise pending()   # the command stops, as it was asked; the error is chained
        raise
    _held = what


def pending() -> type[BaseException] | None:
    """The interrupt that came while, or since, the command's work was made durable."""
    return _pending


def held() -> str | None:
    """What was made durable, if anything was."""
    return _held
