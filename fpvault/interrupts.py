"""Ctrl-C and SIGTERM once a command's work is durable.

The CLI turns both into exceptions in the main thread, which unwind the command
so that locks, temporary files and child processes are cleaned up.  But once a
snapshot's manifest is written, the snapshot is complete: an interrupt that
comes then must neither make the command say that it failed nor stop it before
it prints the snapshot's id, which scripts read.  ``durable`` marks that write:
from just before it to the end of the command, the first interrupt is
remembered (``pending``) instead of raised, and the command ends as it would
have, saying that it was asked to stop.  A second one is raised: a write or a
COMMIT that hangs can still be stopped without SIGKILL.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_holding = False
_held: str | None = None                      # what was made durable, once it was
_pending: type[BaseException] | None = None   # the interrupt that came meanwhile


def reset() -> None:
    """Forget all of it (a new command in the same process)."""
    global _holding, _held, _pending
    _holding, _held, _pending = False, None, None


def interrupt(exc: type[BaseException]) -> None:
    """From a signal handler: raise ``exc``, or, while work is made durable or after it
    was, remember the first one."""
    global _pending
    if _holding and _pending is None:
        _pending = exc
        return
    raise exc()


@contextmanager
def durable(what: str, unsure: str) -> Iterator[None]:
    """Around the write that makes the command's work durable (``what``: "the
    snapshot was written").  The first interrupt waits until the block ends, and is
    then remembered until the command ends; if the block fails, its error is
    raised as it would have been.  A second interrupt stops the block, noting
    ``unsure`` (what is then not known, and how to find out)."""
    global _holding, _held, _pending
    _holding = True
    try:
        yield
    except KeyboardInterrupt as exc:   # a second signal (SIGTERM too: cli.Terminated)
        _holding, _pending = False, None
        exc.add_note(unsure)
        raise
    except BaseException:
        _holding, _pending = False, None
        raise
    _held = what


def pending() -> type[BaseException] | None:
    """The interrupt that came while, or since, the command's work was made durable."""
    return _pending


def held() -> str | None:
    """What was made durable, if anything was."""
    return _held
