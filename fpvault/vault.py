"""Open or create a repository: config, backend, chunk store, manifests.

A *vault* is an opened repository.  It owns the backend, the loaded index and
the chunk store, reads and writes snapshot manifests, resolves snapshot
references (``latest``, ``latest~N``, an id or a unique prefix of one) and
turns byte streams into stored chunk lists and back.
"""

from __future__ import annotations

import bisect
import gc
import os
import re
import secrets
import socket
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, TypeVar

import blake3
import msgspec
import zstandard

from . import crypto, packs
from .backend import Backend, CachingBackend, LocalBackend
from .chunker import DEFAULT_AVG_SIZE, DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, Chunker
from .chunkstore import (INDEX_PREFIX, REMOTE_RUN_GAP, REMOTE_RUN_SPAN, ChunkRef, ChunkStore,
                         Frame, Index)
from .crypto import Plain
from .errors import (FpvaultError, RepositoryDamaged, RepositoryExists, RepositoryNotFound,
                     SnapshotNotFound, UsageError)
from .manifest import (FORMAT_VERSION, ChunkerParams, Config, Snapshot, SnapshotHead, Stream,
                       decode_config, decode_head, decode_snapshot, json_encoder)

CONFIG = "config"
SNAPSHOTS = "snapshots/"
# Reading references by prefix: shorter prefixes collide too easily.
MIN_PREFIX = 4
T = TypeVar("T", Snapshot, SnapshotHead)   # what a manifest decodes into

# Reading a stream: runs of chunks (a frame, or chunks stored next to each other) in
# flight per stream, and the threads that read and decode them; a remote ranged GET
# costs a round trip, so more are kept going there.  zstd and BLAKE3 release the GIL,
# so on a local disk too the runs after the one being consumed decode on other cores.
# Memory: that many runs of at most REMOTE_RUN_SPAN (chunkstore.py), each.
READ_AHEAD = 8
LOCAL_READ_AHEAD = 3
READ_THREADS = 4
# Snap on a remote backend: the delta bases of this many chunks of a stream's previous
# version are read ahead at once, when a changed chunk first needs them.
BASE_READ_AHEAD = 64
# Chunks of a stream whose deltas are being encoded on the compressor threads while
# the reading thread goes on; past this, it waits for the oldest (each holds a
# chunk, up to 256 KiB, and its bases while encoding).
DELTAS_IN_FLIGHT = 8


def default_repo() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "fpvault")


def backend_for(location: str) -> Backend:
    if location.startswith("s3://"):
        from .s3 import S3Backend
        return S3Backend(location)
    if re.match(r"^[a-z][a-z0-9+]*://", location):
        raise UsageError(f"Repository {location!r}: give a local path or an s3://bucket/prefix URL.")
    return LocalBackend(Path(location).expanduser())


def is_remote(location: str) -> bool:
    return location.startswith("s3://")


def cache_dir(repo_id: str) -> str:
    """Where index files and manifests of a remote repository are cached."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fpvault", repo_id)


def now_iso() -> str:
    return utc_iso(datetime.now(timezone.utc))


def utc_iso(when: datetime) -> str:
    """A time as manifests and --json spell it: UTC, microseconds, 'Z'."""
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is local time."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"Cannot read the time {text!r}; use ISO 8601, such as "
                         "2026-11-25T14:30 or 2026-11-25T14:30:00+01:00.") from None
    return t.astimezone() if t.tzinfo is None else t


class Vault:
    def __init__(self, backend: Backend, config: Config, codec=None):
        self.backend = backend
        self.config = config
        self.codec = codec or Plain()
        self._index: Index | None = None
        self._store: ChunkStore | None = None
        self._snapshots: dict[str, tuple[SnapshotHead, bytes]] | None = None
        self.damaged_snapshots: list[tuple[str, str]] = []
        self._readers: ThreadPoolExecutor | None = None
        self._readers_lock = threading.Lock()
        # The index and the store are made on first use, once, whichever thread asks
        # first (two stores would each keep blobs the other never writes).
        self._lazy_lock = threading.RLock()

    # -- opening

    @classmethod
    def create(cls, location: str, chunker: ChunkerParams | None = None,
               password: str | None = None) -> "Vault":
        """A new repository; encrypted under ``password`` when one is given."""
        backend = backend_for(location)
        if backend.exists(CONFIG):
            raise RepositoryExists(f"A repository already exists at {backend.describe()}.")
        if is_remote(location):
            if next(iter(backend.list("")), None) is not None:
                raise RepositoryExists(f"{location} already holds objects; choose an empty prefix "
                                       "for the repository.")
        else:
            path = Path(location).expanduser()
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise RepositoryExists(f"{path} exists and is not an empty directory; "
                                       "choose a new path for the repository.")
        config = Config(
            id=secrets.token_hex(16), created=now_iso(),
            chunker=chunker or ChunkerParams(avg_size=DEFAULT_AVG_SIZE, min_size=DEFAULT_MIN_SIZE,
                                             max_size=DEFAULT_MAX_SIZE),
            encrypted=password is not None)
        codec = None
        if password is not None:
            master = crypto.new_master()
            # The key first: a config that says "encrypted" must never lack a key.
            backend.put(crypto.KEYS + secrets.token_hex(16), crypto.wrap(master, password, now_iso()))
            codec = crypto.Crypto(master)
        backend.put(CONFIG, json_encoder.encode(config))
        return cls(backend, config, codec)

    @classmethod
    def open(cls, location: str, create: bool = False,
             password: Callable[[], str] | None = None) -> "Vault":
        """Open a repository; ``password`` is asked for only if it is encrypted."""
        backend = backend_for(location)
        if not backend.exists(CONFIG):
            if any(next(iter(backend.list(prefix)), None) is not None
                   for prefix in (SNAPSHOTS, INDEX_PREFIX, "data/")):
                raise RepositoryDamaged(
                    f"The repository at {backend.describe()} has lost its config file (its "
                    "snapshots, index and packs are there). Put back the config from a copy "
                    "of the repository; 'fpvault init' there would not read them.")
            if create:
                return cls.create(location)
            raise RepositoryNotFound(
                f"There is no fpvault repository at {backend.describe()}; check -r/--repo "
                "(or FPVAULT_REPO), or create one with 'fpvault init'.")
        try:
            config = decode_config(backend.get(CONFIG))
        except Exception as exc:
            raise RepositoryDamaged(f"The repository config at {backend.describe()} does not "
                                    f"decode ({exc}).") from exc
        if config.version > FORMAT_VERSION:
            raise FpvaultError(f"The repository at {backend.describe()} has format version "
                               f"{config.version}; this fpvault reads up to {FORMAT_VERSION}. "
                               "Upgrade fpvault.")
        if is_remote(location):
            backend = CachingBackend(backend, cache_dir(config.id))
        codec = None
        if config.encrypted:
            if password is None:
                raise FpvaultError(f"The repository at {backend.describe()} is encrypted; give its "
                                   "password (FPVAULT_PASSWORD or --password-file).")
            codec, _ = crypto.open_keys(backend, password())
        return cls(backend, config, codec)

    def upgrade(self) -> None:
        """Before a snapshot writes: a repository of an older format version is marked
        with this one (a whole-object put of ``config``), so that an older fpvault
        refuses what it could not read, such as frames, instead of misreading it."""
        if self.config.version < FORMAT_VERSION:
            self.config.version = FORMAT_VERSION
            self.backend.put(CONFIG, json_encoder.encode(self.config))

    @property
    def index(self) -> Index:
        if self._index is None:
            with self._lazy_lock:
                if self._index is None:
                    self._index = Index.load(self.backend, self.codec)
        return self._index

    def check_index_usable(self) -> None:
        """Before a snapshot writes: raise RepositoryDamaged unless the index can be
        trusted to say what is stored.  A snapshot takes every blob the index names as
        stored: one in a pack that is missing (deleted or lost by hand, never copied)
        or cut short (a partial copy) would leave it unrestorable, while it said it
        succeeded; and an index file that cannot be read hides which packs are
        whose.  One listing of ``data/``, with sizes, taken after the index is loaded:
        a pack is written before the index file naming it, so another snap saving
        meanwhile cannot make one of its packs look missing."""
        index = self.index
        sizes = {pack_id: size for name, size in self.backend.list_sizes("data/")
                 if (pack_id := packs.pack_id_of(name)) is not None}
        missing, cut, blobs = index.blobs.beyond(sizes)
        where = f"the repository at {self.backend.describe()}"
        if missing or cut:
            first = packs.pack_name((missing or cut)[0])
            more = ", ..." if len(missing) + len(cut) > 1 else ""
            parts = ([f"{len(missing)} pack(s) missing from {where}"] if missing else []) + \
                ([f"{len(cut)} pack(s) shorter than the index says"] if cut else [])
            what = " and ".join(parts)
            raise RepositoryDamaged(
                f"{blobs} blobs the index names are in {what} ({first}{more}); a snapshot "
                "would take them as stored and could not be restored. Run 'fpvault repair "
                "index' (it indexes what the packs that are there hold, so that the next "
                "snapshot stores the rest again), then 'fpvault verify' to see which "
                "snapshots the loss damaged. Nothing was written.")
        if index.damaged:
            more = f" (and {len(index.damaged) - 1} more)" if len(index.damaged) > 1 else ""
            raise RepositoryDamaged(
                f"Index file {index.damaged[0]} in {where} cannot be read{more}; run 'fpvault "
                "repair index' (it rebuilds the index from the packs), then snap again. "
                "Nothing was written.")

    def reset_index(self, index: Index | None) -> None:
        """Use ``index`` (or reload it on next use): after prune or repair changed it."""
        with self._lazy_lock:
            self._index = index
            self._store = None

    @property
    def store(self) -> ChunkStore:
        if self._store is None:
            with self._lazy_lock:
                if self._store is None:
                    self._store = ChunkStore(self.backend, self.index,
                                             self.config.compression_level, self.codec)
        return self._store

    def chunker(self) -> Chunker:
        p = self.config.chunker
        return Chunker(p.avg_size, p.min_size, p.max_size)

    # -- streams

    def write_stream(self, buffers: Iterable[bytes | bytearray | memoryview],
                     previous: Stream | None = None, count_rows: bool = True,
                     deltas_off_thread: bool = False) -> tuple[Stream, int]:
        """Chunk, store and list a stream; return it and its newline count (0 unless
        ``count_rows``).

        ``previous``: the same stream in an earlier snapshot, whose chunks new
        chunks may be stored as deltas against; ``deltas_off_thread``: encode
        those deltas on the compressor threads (StreamWriter)."""
        prev_refs = None
        if previous is not None:
            try:
                prev_refs = self.store.get_list(bytes.fromhex(previous.list))
            except RepositoryDamaged:
                prev_refs = None  # no deltas against damage
        writer = StreamWriter(self, prev_refs, count_rows, deltas_off_thread)
        try:
            for buf in buffers:
                writer.write(buf)
            return writer.close()
        except BaseException:
            writer.abandon()
            raise

    def read_stream(self, stream: Stream) -> Iterator[bytes]:
        """The stream's chunks in order, each checked against its hash."""
        return self.read_refs(self.store.get_list(bytes.fromhex(stream.list)))

    def read_refs(self, refs: list[ChunkRef]) -> Iterator[bytes]:
        """These chunks in order (a chunk list, or a run of one), each checked against
        its hash.

        Chunks are read and decoded by several threads, a few runs of adjacent
        chunks (one read each: on a remote backend, one ranged GET) ahead of
        the reader."""
        if len(refs) < 2:
            for ref in refs:
                yield self.store.get(ref.id)
            return
        readers = self.read_pool()
        depth = READ_AHEAD if getattr(self.backend, "parallel_reads", False) else LOCAL_READ_AHEAD
        # Chunks stored next to each other in a pack (the usual case: a table's
        # chunks are written in order) are read at once.
        runs = self.store.runs([ref.id for ref in refs], REMOTE_RUN_GAP, REMOTE_RUN_SPAN)
        ahead: deque[Future] = deque()
        todo = iter(runs)
        try:
            for run in todo:
                ahead.append(readers.submit(self.store.get_run, run))
                if len(ahead) >= depth:
                    break
            while ahead:
                chunks = ahead.popleft().result()
                run = next(todo, None)
                if run is not None:
                    ahead.append(readers.submit(self.store.get_run, run))
                yield from chunks
        finally:
            for f in ahead:
                f.cancel()

    def read_pool(self) -> ThreadPoolExecutor:
        """The threads that read and decode runs of chunks."""
        with self._readers_lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(max_workers=READ_THREADS,
                                                   thread_name_prefix="fpvault-read")
            return self._readers

    def read_bytes(self, stream: Stream) -> bytes:
        return b"".join(self.read_stream(stream))

    # -- snapshots

    def snapshots(self, strict: bool = False, but: Collection[str] = ()) -> list[SnapshotHead]:
        """The heads of all snapshots, oldest first (``load_snapshot`` gives one whole).
        A manifest that cannot be read is left out (and listed in ``damaged_snapshots``)
        unless ``strict``, which raises (but for the ids in ``but``: those about to be
        forgotten)."""
        snaps = self._load_heads()
        damaged = [(sid, why) for sid, why in self.damaged_snapshots if sid not in but]
        if strict and damaged:
            sid, why = damaged[0]
            raise RepositoryDamaged(f"Snapshot {sid[:8]}: its manifest cannot be read ({why}). "
                                    "Nothing was changed; run 'fpvault verify', and 'fpvault "
                                    f"forget {sid[:8]}' to drop it.")
        return sorted((head for head, _ in snaps.values()), key=lambda s: (s.time, s.id))

    def _load_heads(self) -> dict[str, tuple[SnapshotHead, bytes]]:
        """Each snapshot's head, with its manifest as stored but decrypted (compressed,
        a thirtieth of it decoded), so that ``load_snapshot`` does not fetch it again."""
        if self._snapshots is None:
            found = {}
            self.damaged_snapshots: list[tuple[str, str]] = []
            for name in self.backend.list(SNAPSHOTS):
                sid = name[len(SNAPSHOTS):]
                try:
                    data = self._manifest(sid)
                    found[sid] = (self._decode(sid, data, decode_head), data)
                except (RepositoryDamaged, msgspec.DecodeError,
                        msgspec.ValidationError) as exc:
                    self.damaged_snapshots.append((sid, str(exc)))
            self._snapshots = found
        return self._snapshots

    def forget_snapshot(self, sid: str) -> None:
        self.backend.delete(SNAPSHOTS + sid)
        if self._snapshots is not None:
            self._snapshots.pop(sid, None)
            self.damaged_snapshots = [d for d in self.damaged_snapshots if d[0] != sid]

    def load_snapshot(self, sid: str) -> Snapshot:
        """The whole manifest of snapshot ``sid``.  One whose head decoded but whose
        lists do not (its hash matches: a bug wrote it, not the disk) is damaged from
        then on: left out of ``snapshots()`` and listed in ``damaged_snapshots``."""
        known = self._snapshots and self._snapshots.get(sid)
        data = known[1] if known else self._manifest(sid)
        # Decoding makes many objects and no reference cycles: the collector, which
        # would scan them again and again as they accumulate, waits.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._decode(sid, data, decode_snapshot)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if known:
                del self._snapshots[sid]
                self.damaged_snapshots.append((sid, str(exc)))
            raise RepositoryDamaged(f"Snapshot {sid[:8]}: its manifest cannot be read ({exc}). "
                                    "Run 'fpvault verify', and 'fpvault forget "
                                    f"{sid[:8]}' to drop it.") from exc
        finally:
            if collecting:
                gc.enable()

    def _manifest(self, sid: str) -> bytes:
        return self.codec.open(self.backend.get(SNAPSHOTS + sid), f"snapshot {sid[:8]}'s manifest")

    def _decode(self, sid: str, data: bytes, decode: Callable[[bytes], T]) -> T:
        try:
            raw = zstandard.ZstdDecompressor().decompress(data)
        except zstandard.ZstdError as exc:
            raise RepositoryDamaged(f"Snapshot {sid[:8]}: its manifest does not decompress "
                                    f"({exc}).") from exc
        if self.codec.blob_id(raw).hex() != sid:
            raise RepositoryDamaged(f"Snapshot {sid[:8]}: its manifest does not match its hash.")
        out = decode(raw)
        out.id = sid
        return out

    def save_snapshot(self, snap: Snapshot) -> str:
        raw = json_encoder.encode(snap)
        sid = self.codec.blob_id(raw).hex()
        data = zstandard.ZstdCompressor(level=10).compress(raw)
        self.backend.put(SNAPSHOTS + sid, self.codec.seal(data))
        snap.id = sid
        if self._snapshots is not None:
            head = decode_head(raw)
            head.id = sid
            self._snapshots[sid] = (head, data)
        return sid

    def _undecidable(self, ref: str) -> RepositoryDamaged:
        """A relative reference cannot be resolved past a manifest that cannot be read:
        it may be the newest snapshot, or the one at that time."""
        sid, why = self.damaged_snapshots[0]
        return RepositoryDamaged(
            f"Snapshot {sid[:8]}'s manifest cannot be read ({why.rstrip('.')}), so which "
            f"snapshot {ref} is cannot be told. Name the snapshot by its id ('fpvault list'), "
            f"or drop the damaged one ('fpvault verify', then 'fpvault forget {sid[:8]}').")

    def resolve(self, ref: str) -> tuple[str, Snapshot]:
        """The snapshot ``ref`` names (an id, a unique prefix, latest, latest~N), whole."""
        sid, _ = self.resolve_head(ref)
        return sid, self.load_snapshot(sid)

    def resolve_head(self, ref: str) -> tuple[str, SnapshotHead]:
        snaps = self.snapshots()
        m = re.fullmatch(r"latest(?:~(\d+))?", ref)
        if m:
            if self.damaged_snapshots:
                raise self._undecidable(f"'{ref}'")
            back = int(m.group(1) or 0)
            if not snaps:
                raise SnapshotNotFound(f"The repository at {self.backend.describe()} has no "
                                       "snapshots yet; take one with 'fpvault snap'.")
            if back >= len(snaps):
                raise SnapshotNotFound(f"{ref}: there are only {len(snaps)} snapshots.")
            snap = snaps[-1 - back]
            return snapshot_id(snap), snap
        if not re.fullmatch(r"[0-9a-fA-F]+", ref):
            raise SnapshotNotFound(f"{ref!r} is not a snapshot reference; use an id, a unique "
                                   "prefix of 4 or more hex digits, 'latest' or 'latest~N'.")
        if len(ref) < MIN_PREFIX:
            raise SnapshotNotFound(f"Snapshot prefix {ref!r} is too short; give at least "
                                   f"{MIN_PREFIX} hex digits.")
        ref = ref.lower()
        hits = [s for s in snaps if snapshot_id(s).startswith(ref)]
        damaged = [(sid, why) for sid, why in self.damaged_snapshots if sid.startswith(ref)]
        if len(hits) + len(damaged) > 1:
            ids = ", ".join([snapshot_id(s)[:12] for s in hits[:5]]
                            + [f"{sid[:12]} (damaged)" for sid, _ in damaged[:5]])
            raise SnapshotNotFound(f"Snapshot prefix {ref!r} is ambiguous ({ids}); "
                                   "give more digits.")
        if damaged:
            sid, why = damaged[0]
            raise RepositoryDamaged(f"Snapshot {sid[:8]}'s manifest cannot be read "
                                    f"({why.rstrip('.')}); run 'fpvault verify'.")
        if not hits:
            raise SnapshotNotFound(f"No snapshot matches {ref!r}; 'fpvault list' shows them.")
        return snapshot_id(hits[0]), hits[0]

    def resolve_at(self, when: str) -> tuple[str, Snapshot]:
        """The latest snapshot taken at or before ``when``, whole."""
        t = parse_time(when)
        best = None
        snaps = self.snapshots()
        if self.damaged_snapshots:
            raise self._undecidable(f"at {t.isoformat()}")
        for snap in snaps:
            if parse_time(snap.time) <= t:
                best = snap
        if best is None:
            raise SnapshotNotFound(f"No snapshot was taken at or before {t.isoformat()}.")
        return best.id, self.load_snapshot(best.id)


def snapshot_id(snap: Snapshot | SnapshotHead) -> str:
    return snap.id


class StreamWriter:
    """Chunks a stream as it is written and stores each chunk.

    With ``previous`` (the chunk list of the same stream in an earlier snapshot),
    each new chunk is offered the chunks at the same place in that stream (the
    one holding its first byte, and the next) as delta bases.  "The same place" is the same offset, corrected by the drift
    seen at the last chunk both streams share, so rows inserted or deleted
    earlier in the table do not throw the alignment off.

    New chunks not stored as deltas go into the stream's open frame, and are
    compressed together when it is full (``ChunkStore.write_frame``).

    With ``deltas_off_thread``, deltas are encoded on the compressor threads
    (``ChunkStore.put_delta_async``) while this thread reads on; their results
    are taken in stream order, so a chunk not worth a delta joins the frame in
    its place and the frames are the same whatever the threads' timing.

    *Matching ahead.*  Where the stream is aligned with its previous version
    (the next chunk would start where an old chunk starts), the bytes the old
    chunk would span are hashed before anything is cut: if they are that
    chunk, the chunker would have cut exactly there (a cut depends only on the
    bytes from the chunk's start to the end of the row it falls in), so the
    chunk is taken as it is, without running FastCDC over it or copying it.
    An unchanged table costs one BLAKE3 pass for its chunks and one for the
    stream's hash.  After a miss, chunks are cut until one is found in the
    previous version again (dedup realigns the two), so a table that changed
    everywhere pays for one failed guess, not one per chunk.
    """

    def __init__(self, vault: Vault, previous: list[ChunkRef] | None = None,
                 count_rows: bool = True, deltas_off_thread: bool = False):
        self.vault = vault
        self.count_rows = count_rows
        self.deltas_off_thread = deltas_off_thread
        self.frame = Frame()
        self._remote = bool(previous) and getattr(vault.backend, "parallel_reads", False)
        self._read_ahead_to = 0   # bases of previous chunks before this one are read ahead
        self.chunker = vault.chunker()
        self.hasher = blake3.blake3(max_threads=1)
        self.chunks: list[ChunkRef] = []
        self.size = 0
        self.newlines = 0
        self._offset = 0   # where the next chunk starts
        self._prev = previous or []
        self._prev_starts: list[int] = []
        self._prev_where: dict[bytes, int] = {}
        pos = 0
        for i, ref in enumerate(self._prev):
            self._prev_starts.append(pos)
            self._prev_where.setdefault(ref.id, i)
            pos += ref.size
        self._drift = 0
        self._prev_total = pos
        self._guess = bool(self._prev)   # aligned with the previous version: match ahead
        # Chunks whose delta is being encoded on a compressor thread (job, id, chunk),
        # and chunks queued behind them for the frame (no job), in stream order.
        self._deltas: deque[tuple[Future | None, bytes, bytes]] = deque()

    def write(self, buf: bytes | memoryview) -> None:
        self.hasher.update(buf)
        self.size += len(buf)
        self.chunker.push(buf)
        self._drain(final=False)
        self.chunker.compact()

    def _drain(self, final: bool) -> None:
        chunker = self.chunker
        while chunker.pending():
            if self._guess:
                known = self._known_next(final)
                if known is not None:
                    if known < 0:
                        return   # the old chunk reaches past what has arrived: wait
                    continue
            if not final and not chunker.ready():
                return
            self._put(chunker.cut(final))

    def _known_next(self, final: bool) -> int | None:
        """Take the next chunk if it is the old chunk starting at the same place: its
        size; -1 to wait for more bytes; None (and stop guessing) if it is not."""
        pos = self._offset + self._drift
        at = bisect.bisect_left(self._prev_starts, pos)
        chunker = self.chunker
        if at == len(self._prev) or self._prev_starts[at] != pos:
            self._guess = False
            return None
        ref = self._prev[at]
        # A chunk cut inside a long row ended where the bytes after it decided, and
        # the old stream's last chunk where the stream ended: the first is never
        # taken whole, the second only if this stream ends there too.
        last = pos + ref.size == self._prev_total
        if ref.cut_in_row or (final and last and chunker.pending() != ref.size):
            self._guess = False
            return None
        if last and not final and chunker.ready() and chunker.pending() > ref.size:
            self._guess = False   # this stream goes on past the old one's end: cut
            return None
        if chunker.pending() < ref.size or (last and not final):
            if final:
                self._guess = False
                return None
            return -1   # bounded: a chunk, or the lookahead a cut needs anyway
        with chunker.view(ref.size) as view:
            blob = self.vault.codec.blob_id(view)
            if blob != ref.id:
                self._guess = False
                return None
            lost = not self.vault.store.stored(ref.id)   # lost from the repository
            if lost and self._deltas:   # store it again, after the chunks before it
                self._deltas.append((None, blob, bytes(view)))
            elif lost:
                self.vault.store.put(bytes(view), packs.DATA, blob=blob, frame=self.frame)
        if lost:
            self._settle()
        if self.count_rows:
            self.newlines += chunker.count(b"\n", ref.size)
        chunker.skip(ref.size)
        self.chunks.append(ChunkRef(blob, ref.size, False))
        self._offset += ref.size
        return ref.size

    def _put(self, chunk: bytes) -> None:
        if self.count_rows:
            self.newlines += chunk.count(b"\n")
        self._store(chunk, self.vault.codec.blob_id(chunk))

    def _store(self, chunk: bytes, blob: bytes) -> None:
        similar = None
        if self._prev:
            same = self._prev_where.get(blob)
            if same is not None:
                self._drift = self._prev_starts[same] - self._offset
                self._guess = True   # aligned again
            else:
                at = bisect.bisect_right(self._prev_starts, self._offset + self._drift) - 1
                at = min(max(at, 0), len(self._prev) - 1)
                # The old chunk holding this chunk's start, and the next one if this
                # chunk reaches into it: a chunk spans at most those two when
                # boundaries move a little.  (A third, the one before, made deltas no
                # smaller and cost 40% more CPU.)  A chunk within one old chunk, as
                # after same-length updates, gains nothing from the second base, which
                # would cost its id twice (pack trailer and index) and a third of the
                # delta's compression time.
                similar = [self._prev[at].id]
                end = self._offset + self._drift + len(chunk)
                if at + 1 < len(self._prev) and end > self._prev_starts[at + 1]:
                    similar.append(self._prev[at + 1].id)
                if self._remote and at + 2 > self._read_ahead_to:
                    self.vault.store.prefetch_bases(
                        [ref.id for ref in self._prev[at:at + BASE_READ_AHEAD]],
                        self.vault.read_pool())
                    self._read_ahead_to = at + BASE_READ_AHEAD
        store = self.vault.store
        if similar and self.deltas_off_thread:
            job = store.put_delta_async(chunk, packs.DATA, similar, blob)
            if job is not None:
                self._deltas.append((job, blob, chunk))
        elif self._deltas:
            self._deltas.append((None, blob, chunk))   # into the frame after those before it
        else:
            store.put(chunk, packs.DATA, similar=similar, blob=blob, frame=self.frame)
        self._settle()
        self.chunks.append(ChunkRef(blob, len(chunk), not chunk.endswith(b"\n")))
        self._offset += len(chunk)

    def _settle(self, all: bool = False) -> None:
        """Take the results of the delta jobs that are done, in stream order (all of
        them, or until at most DELTAS_IN_FLIGHT remain): a chunk not worth a delta
        joins the frame in its place."""
        store = self.vault.store
        while self._deltas:
            job, blob, chunk = self._deltas[0]
            if not (all or job is None or job.done() or len(self._deltas) > DELTAS_IN_FLIGHT):
                return
            if job is None:
                store.put(chunk, packs.DATA, blob=blob, frame=self.frame)
            elif not job.result():
                store.add_to_frame(self.frame, blob, packs.DATA, chunk)
            self._deltas.popleft()   # only now: abandon() must see a job interrupted here

    def abandon(self) -> None:
        """After a failure: wait for the delta jobs still running (not for their results),
        and give up the claims on the blobs this stream will not store (those whose job
        said False, and its open frame's), so that no later stream takes them as pending."""
        jobs = [job for job, _, _ in self._deltas if job is not None]
        futures_wait(jobs)
        unstored = [blob for job, blob, _ in self._deltas
                    if job is not None and job.exception() is None and not job.result()]
        unstored += [blob for blob, _, _ in self.frame.members]
        self._deltas.clear()
        self.frame = Frame()
        self.vault.store.release(unstored)

    def close(self) -> tuple[Stream, int]:
        self._drain(final=True)
        self.chunker.finish()
        self._settle(all=True)
        self.vault.store.write_frame(self.frame)
        list_id = self.vault.store.put_list(self.chunks)
        stream = Stream(list=list_id.hex(), bytes=self.size, hash=self.hasher.hexdigest(),
                        chunks=len(self.chunks))
        return stream, self.newlines


def client_hostname() -> str:
    return socket.gethostname()
