"""Repository locks, built from whole-object writes (no flock, no rename).

A *lock* is an object ``locks/<random id>`` holding JSON: who (host, pid,
user, command), since when, last refreshed when, and whether it is
*exclusive*.  Processes that add data (snap) or read data that prune could
remove (restore, verify, diff) take a *shared* lock; prune and forget take an
*exclusive* one.  Shared locks coexist; an exclusive lock coexists with none.

Taking a lock: write our lock object, then list the others.  If a live lock
conflicts with ours, delete ours and fail (exit 4), naming the holder.  Two
processes racing both see each other and both back off: safe, and the next
try wins.

A lock is *stale*, and ignored, when its process is known to be gone: on the
same host, the pid is not running (or runs a different program, detected by
its start time); on another host, it was not refreshed for ``STALE_AFTER``.
A holder refreshes its lock every ``REFRESH_EVERY`` by writing a new object
and deleting the old one.  ``fpvault unlock`` deletes stale locks.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import msgspec

from .backend import Backend
from .errors import FpvaultError, RepositoryLocked

LOCKS = "locks/"
# A lock not refreshed for this long belongs to a process that is gone (restic uses 30 min).
STALE_AFTER = 30 * 60
# Refresh well within STALE_AFTER, so a slow backend cannot make a live lock look stale.
REFRESH_EVERY = 5 * 60


class LockInfo(msgspec.Struct, kw_only=True):
    host: str
    pid: int
    user: str = ""
    command: str = ""
    exclusive: bool = False
    time: float                 # when taken (unix seconds)
    refreshed: float            # last refresh
    process_start: float = 0.0  # start time of the process, to tell a reused pid


def _process_start(pid: int) -> float:
    """Start time of a local process in clock ticks since boot (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return float(fields[19])
    except (OSError, IndexError, ValueError):
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Held:
    name: str
    info: LockInfo


def is_stale(info: LockInfo, now: float | None = None, host: str | None = None) -> bool:
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    if info.host == host:
        if not _alive(info.pid):
            return True
        start = _process_start(info.pid)
        return bool(info.process_start and start and start != info.process_start)
    return now - info.refreshed > STALE_AFTER


def list_locks(backend: Backend) -> list[Held]:
    held = []
    for name in backend.list(LOCKS):
        try:
            info = msgspec.json.decode(backend.get(name), type=LockInfo)
        except Exception:
            continue  # a lock being written or removed right now
        held.append(Held(name, info))
    return held


def describe(info: LockInfo) -> str:
    since = datetime.fromtimestamp(info.time, timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    kind = "an exclusive" if info.exclusive else "a shared"
    return (f"{kind} lock held by {info.command or 'fpvault'} (pid {info.pid} on {info.host}, "
            f"user {info.user or '?'}) since {since}")


class Lock:
    """A lock held by this process; a context manager."""

    def __init__(self, backend: Backend, exclusive: bool, command: str, wait: float = 0.0):
        self.backend = backend
        self.exclusive = exclusive
        self.command = command
        self.wait = wait
        self.name: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _info(self, taken: float) -> LockInfo:
        try:
            user = getpass.getuser()
        except Exception:
            user = ""
        return LockInfo(host=socket.gethostname(), pid=os.getpid(), user=user,
                        command=self.command, exclusive=self.exclusive, time=taken,
                        refreshed=time.time(), process_start=_process_start(os.getpid()))

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        taken = time.time()
        while True:
            name = LOCKS + secrets.token_hex(16)
            self.backend.put(name, msgspec.json.encode(self._info(taken)))
            conflict = self._conflict(name)
            if conflict is None:
                self.name = name
                break
            self.backend.delete(name)
            if time.monotonic() >= deadline:
                wait = (f"Waited {self.wait:g} s; wait longer" if self.wait
                        else "Wait for it to finish (or pass --lock-wait SECONDS)")
                gone = ("'fpvault unlock' removes its lock" if conflict.host == socket.gethostname()
                        else "its lock is stale 30 minutes after its last refresh, or "
                             "'fpvault unlock --remove-all' removes it now")
                raise RepositoryLocked(
                    f"The repository at {self.backend.describe()} is locked: {describe(conflict)}. "
                    f"{wait}; if that process is gone, {gone}.")
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._refresher, daemon=True, name="lock-refresh")
        self._thread.start()

    def _conflict(self, mine: str) -> LockInfo | None:
        for held in list_locks(self.backend):
            if held.name == mine or is_stale(held.info):
                continue
            if self.exclusive or held.info.exclusive:
                return held.info
        return None

    def _refresher(self) -> None:
        # A refresh that fails (the store briefly unreachable) is tried again at the
        # next turn, not given up: a lock not refreshed looks stale to other hosts
        # after STALE_AFTER, and their prune would no longer wait for this command.
        while not self._stop.wait(REFRESH_EVERY):
            with contextlib.suppress(FpvaultError, msgspec.DecodeError):
                self.refresh()

    def refresh(self) -> None:
        with self._mutex:
            if self.name is None:
                return
            old = self.name
            info = msgspec.json.decode(self.backend.get(old), type=LockInfo)
            info.refreshed = time.time()
            new = LOCKS + secrets.token_hex(16)
            self.backend.put(new, msgspec.json.encode(info))
            self.name = new
            self.backend.delete(old)

    def release(self) -> None:
        self._stop.set()
        with self._mutex:
            if self.name is not None:
                self.backend.delete(self.name)
                self.name = None

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # What the command did stands (a snapshot written is committed) whether or not
        # its lock can be removed now: a lock left behind is stale once this process is
        # gone (on this host at once, elsewhere after STALE_AFTER).  Nor may a failed
        # delete hide the error the command itself ended with.
        try:
            self.release()
        except FpvaultError as failed:
            sys.stderr.write(f"fpvault: warning: could not remove the lock {self.name}: "
                             f"{failed} It is ignored once stale; 'fpvault unlock' removes "
                             "it.\n")
            sys.stderr.flush()


def remove_stale(backend: Backend, all_locks: bool = False) -> list[LockInfo]:
    """Delete stale locks (or every lock, and with them any file in locks/ that is no
    lock, which every command ignores); return the locks removed."""
    removed = []
    held = list_locks(backend)
    for lock in held:
        if all_locks or is_stale(lock.info):
            backend.delete(lock.name)
            removed.append(lock.info)
    if all_locks:
        known = {lock.name for lock in held}
        for name in backend.list(LOCKS):
            if name not in known:
                backend.delete(name)
    return removed
