"""Storage backends: named objects, written whole.

A repository is a set of named objects (``config``, ``data/ab/abcd…``,
``index/…``, ``snapshots/…``).  A backend stores them and knows nothing of
what they mean.  The protocol is what S3-compatible object storage offers:
whole-object put, get (optionally a byte range), list by prefix, delete.
There is no rename, no append and no lock, so everything above is built from
whole-object writes and works the same on a local directory and a bucket.

``LocalBackend`` keeps objects as files.  A put writes a temporary file,
fsyncs it, renames it into place and fsyncs the directory, so an object is
either absent or complete, whatever moment a crash comes at.  Files are
created 0600 and directories 0700: backups hold the whole database.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from pathlib import Path
from typing import Iterator, Protocol

from .errors import FpvaultError, RepositoryDamaged

# Temporary files carry this marker; list() never shows them and a crash can
# leave them behind harmlessly.
TEMP_MARKER = ".tmp-"
# A temporary file in locks/ younger than this may be a lock being taken right now
# (remove_temp_files); no write of a few hundred bytes takes an hour.
TEMP_LOCK_AGE = 60 * 60


class Backend(Protocol):
    """What fpvault needs from a storage location."""

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` as ``name``, atomically and durably."""

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object, or ``length`` bytes of it from ``offset``."""

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def list(self, prefix: str) -> Iterator[str]:
        """Names under ``prefix`` (a folder-like path ending in ``/``)."""

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(name, size) of each object under ``prefix``, from the listing itself."""

    def delete(self, name: str) -> None: ...

    def describe(self) -> str:
        """Where this backend stores, for messages."""


class ObjectMissing(RepositoryDamaged):
    """A named object the repository refers to is not there."""


class LocalBackend:
    """A repository in a local directory."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return self.root / name

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        self._makedirs(path.parent)
        tmp = path.with_name(path.name + TEMP_MARKER + secrets.token_hex(4))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise _storage_error(exc, f"writing {name}", self.root) from exc

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                data = f.read() if length is None else f.read(length)
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{name} is missing from the repository at {self.root}; "
                                "run 'fpvault verify' to see what it affects.") from exc
        except OSError as exc:
            raise _storage_error(exc, f"reading {name}", self.root) from exc
        if length is not None and len(data) != length:
            raise RepositoryDamaged(f"{name} in {self.root} is shorter than the index says "
                                    f"(wanted {length} bytes at offset {offset}); "
                                    "run 'fpvault verify'.")
        return data

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{name} is missing from the repository at {self.root}.") from exc

    def list(self, prefix: str) -> Iterator[str]:
        for name, _ in self._walk(prefix, sizes=False):
            yield name

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        return self._walk(prefix, sizes=True)

    def _walk(self, prefix: str, sizes: bool) -> Iterator[tuple[str, int]]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(base):
            for filename in filenames:
                if TEMP_MARKER in filename:
                    continue
                full = Path(dirpath) / filename
                try:
                    size = full.stat().st_size if sizes else 0
                except FileNotFoundError:
                    continue   # deleted meanwhile
                yield full.relative_to(self.root).as_posix(), size

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass

    def remove_temp_files(self) -> int:
        """Delete temporary files left by killed writers.  Only safe under an exclusive
        lock, and even then not in ``locks/``: a process trying to take a lock writes
        its lock object before it knows of ours, so a temporary file there is removed
        only when it is older than any write could take (``TEMP_LOCK_AGE``)."""
        removed = 0
        locks = self.root / "locks"
        cutoff = time.time() - TEMP_LOCK_AGE
        for dirpath, _dirnames, filenames in os.walk(self.root):
            in_locks = Path(dirpath) == locks
            for filename in filenames:
                if TEMP_MARKER in filename:
                    path = os.path.join(dirpath, filename)
                    try:
                        if in_locks and os.stat(path).st_mtime > cutoff:
                            continue
                        os.unlink(path)
                        removed += 1
                    except OSError:
                        pass
        return removed

    def _makedirs(self, path: Path) -> None:
        if path.is_dir():
            return
        self._makedirs(path.parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _storage_error(exc, f"creating {path}", self.root) from exc
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError, doing: str, root: Path) -> FpvaultError:
    if exc.errno == errno.ENOSPC:
        return FpvaultError(f"No space left on the device of {root} while {doing}; "
                            "free some space (or run 'fpvault prune') and try again. "
                            "Nothing was committed.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = ("Read-only file system" if exc.errno == errno.EROFS else "Permission denied")
        lock = (" (every command but list and show writes a lock there)"
                if doing.startswith(("writing", "creating")) else "")
        return FpvaultError(f"{what} while {doing} in {root}. Check the repository's owner "
                            f"and mode{lock}.")
    return FpvaultError(f"Storage error while {doing} in {root}: {exc.strerror or exc}.")


class CachingBackend:
    """A remote backend with a local cache of its index files and manifests.

    Those objects are written once and never change (their names are hashes
    of their content), so a cached copy is good for as long as the remote
    still lists the name.  Listing always asks the remote, so the cache
    follows it: a name the remote no longer lists is dropped from the cache.
    Each cached copy carries the BLAKE3 of its bytes; a copy that does not
    match (a damaged cache disk) is fetched again, never trusted.
    """

    CACHED = ("index/", "snapshots/")

    def __init__(self, inner: Backend, directory: str | os.PathLike[str]):
        self.inner = inner
        self.cache = LocalBackend(directory)
        self.parallel_reads = getattr(inner, "parallel_reads", False)

    def describe(self) -> str:
        return self.inner.describe()

    def _cached(self, name: str) -> bool:
        return name.startswith(self.CACHED)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if not self._cached(name) or offset or length is not None:
            return self.inner.get(name, offset, length)
        try:
            stored = self.cache.get(name)
            digest, data = stored[:32], stored[32:]
            if _digest(data) == digest:
                return data
        except FpvaultError:
            pass
        data = self.inner.get(name)
        try:
            self.cache.put(name, _digest(data) + data)
        except FpvaultError:
            pass  # a cache that cannot be written only costs speed
        return data

    def list(self, prefix: str) -> Iterator[str]:
        names = list(self.inner.list(prefix))
        if prefix.startswith(self.CACHED) or prefix in ("index/", "snapshots/"):
            live = set(names)
            for cached in list(self.cache.list(prefix)):
                if cached not in live:
                    self.cache.delete(cached)
        return iter(names)

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        return self.inner.list_sizes(prefix)

    def put(self, name: str, data: bytes) -> None:
        self.inner.put(name, data)

    def delete(self, name: str) -> None:
        self.inner.delete(name)
        if self._cached(name):
            self.cache.delete(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def size(self, name: str) -> int:
        return self.inner.size(name)


def _digest(data: bytes) -> bytes:
    import blake3
    return blake3.blake3(data).digest()
