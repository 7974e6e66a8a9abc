"""The chunk store: put and get blobs by the hash of their content.

``put`` hashes a blob, skips it when the repository (or this session) already
has it, compresses it (as a delta against its previous version, or together
with the stream's next new chunks in a *frame*), checks that the compressed
bytes decode back to the same content, and adds it to the open pack.  ``flush`` writes the open pack
and an *index* file naming every blob added since the last flush: the index
is what makes blobs findable, so a blob is only part of the repository once
the index file that names it exists.  ``get`` reads a blob back and re-hashes
it before returning it.

The *index* maps blob id -> (pack id, entry).  It is the union of all
``index/<id>`` objects, each a zstd-compressed msgpack list of
``(pack id, [entry, ...])``, named by the hash of its bytes.

The store is safe to use from several threads: hashing and compression run
outside the lock (blake3 and zstd release the GIL), only the bookkeeping runs
inside it.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import msgspec
import zstandard

from . import packs
from .backend import Backend
from .errors import RepositoryDamaged
from .crypto import Plain
from .packs import BlobEntry

INDEX_PREFIX = "index/"

# A delta is kept only if it is at most this share of the blob compressed on its own:
# below that it is not worth the extra reads a restore makes for its bases.
DELTA_WORTH = 0.8
# A delta this small next to the plaintext is kept without compressing the blob on its
# own to compare (saves a compression per changed chunk in the common case).
DELTA_CLEARLY_WORTH = 0.05
# Chains restart with a whole copy after this many versions; with skip-deltas a chain
# of this length is at most 10 deltas deep.
MAX_GENERATION = 1023
# Remote reads of several blobs: skip at most this much between two wanted ones,
# and read at most this much at once (stored, and decoded).
REMOTE_RUN_GAP = 256 * 1024
REMOTE_RUN_SPAN = 4 * 1024 * 1024
# Full packs waiting for upload (each up to PACK_TARGET_SIZE in memory) while the
# next one fills: enough to overlap uploading with reading and compressing.
MAX_PENDING_UPLOADS = 2
# Delta bases read ahead on a remote backend (``prefetch_bases``): their stored bytes
# wait here until decoded, at most this much.
PREFETCH_BYTES = 32 * 1024 * 1024
# Small reads (pack trailers, chunk lists) are made by this many threads at once from
# a remote backend: each is a round trip or more (a trailer takes four: size, head,
# tail, trailer), and one after another they added up to most of a verify or a
# repair (S3 with 20 ms of latency, 40 snapshots: docs/benchmarks.md, "verify on S3").
SMALL_READ_THREADS = 8
# New chunks of a stream that are not stored as deltas are compressed together, in
# zstd frames of about this much plaintext: 64 KiB chunks compressed one by one stored
# the bench database's first snapshot 30% larger than 4 MiB frames (docs/benchmarks.md,
# "frames"), and a restore or diff decodes a frame once for all its chunks.
FRAME_TARGET = 4 * 1024 * 1024
# What a frame may decode to at most (a damaged frame header cannot ask for more).
FRAME_MAX = 64 * 1024 * 1024
# Frames are compressed by these threads, off the thread that reads and chunks the
# stream (zstd releases the GIL); at most FRAMES_IN_FLIGHT wait or run at once, which
# bounds their memory (each holds its plaintext and its compressed bytes).
FRAME_WORKERS = 2
FRAMES_IN_FLIGHT = 4
# Decoded blobs kept for reuse: delta bases are shared by neighbouring chunks and by
# successive versions, so a small cache saves most re-reads when restoring a table.
CACHE_BYTES = 32 * 1024 * 1024
# Decoded frames kept for their other blobs: a reader going through a stream decodes
# each frame once, and revisits a frame or two (a delta's base may be in the frame
# before); this much per stream read at once (``size_caches``), for at least two
# streams (a frame may be 4 MiB and a bit; the cache keeps items up to a quarter of
# its size).  48 MiB for every reader cost 35-50 MiB of peak RSS and no fewer decodes.
FRAME_CACHE_PER_STREAM = 12 * 1024 * 1024
# A snapshot decodes delta bases from each stream's previous version once, in order:
# with this blob cache instead of CACHE_BYTES, a churned snapshot of the bench database
# with -j 2 peaked at 134-161 MiB instead of 255-258 (with 48 MiB of frames), and took
# less CPU (fewer pages faulted in); the frames were decoded as often (once each).
SNAP_CACHE_BYTES = 8 * 1024 * 1024


class Frame:
    """New blobs of one stream waiting to be compressed together (``ChunkStore.put``)."""

    def __init__(self) -> None:
        self.members: list[tuple[bytes, int, bytes]] = []   # (id, type, plaintext)
        self.size = 0

    def add(self, blob: bytes, type: int, data: bytes) -> None:
        self.members.append((blob, type, data))
        self.size += len(data)


class BlobCache:
    """A byte-bounded LRU cache of decoded blobs; thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, blob: bytes) -> bytes | None:
        with self._lock:
            data = self._data.get(blob)
            if data is not None:
                self._data.move_to_end(blob)
            return data

    def put(self, blob: bytes, data: bytes) -> None:
        if len(data) > self.capacity // 4:
            return
        with self._lock:
            if blob in self._data:
                return
            self._data[blob] = data
            self.size += len(data)
            while self.size > self.capacity:
                _, old = self._data.popitem(last=False)
                self.size -= len(old)

_index_encoder = msgspec.msgpack.Encoder()
_index_decoder = msgspec.msgpack.Decoder(list[tuple[bytes, list[BlobEntry]]])


class BlobDamaged(RepositoryDamaged):
    """A blob is missing from the index, or does not match its hash."""

    def __init__(self, blob: bytes, why: str):
        super().__init__(f"blob {blob.hex()[:16]} is damaged: {why}")
        self.blob = blob
        self.why = why


@dataclass
class StoreStats:
    blobs_added: int = 0
    deltas_added: int = 0
    bytes_added: int = 0      # stored bytes written: packs and index files
    raw_bytes_added: int = 0  # plaintext bytes of new blobs


class BlobMap:
    """blob id -> (pack id, entry), kept compact: one small bytes record per blob.

    A repository of a million blobs has a million index entries in memory in
    every command.  As (pack id, ``BlobEntry``) tuples they took about 410
    bytes a blob; packed here (pack number, type, offset, lengths, encoding,
    generation, then the bases' ids) about half that.  Entries are rebuilt on
    access, which costs a microsecond."""

    _RECORD = struct.Struct("<IBQIIBHI")
    _SIZE = _RECORD.size
    _unpack = _RECORD.unpack_from

    def __init__(self) -> None:
        self._records: dict[bytes, bytes] = {}
        self._packs: list[bytes] = []
        self._pack_numbers: dict[bytes, int] = {}
        self._ends: list[int] = []   # per pack: where the last blob indexed in it ends
        # Blobs that cannot be decoded from what is indexed (undecodable), and the
        # bases they miss; None until asked for, and again when a blob indexed could
        # change the answer.
        self._undecodable: set[bytes] | None = None
        self._missing_bases: set[bytes] = set()

    def __setitem__(self, blob: bytes, value: tuple[bytes, BlobEntry]) -> None:
        """Index a blob; a blob stored twice (stored again whole after its delta's base
        was lost) keeps the copy that needs no other blob, whichever comes last."""
        pack_id, e = value
        old = self._records.get(blob)
        if old is not None and e.bases and len(old) == self._SIZE:
            return
        if self._undecodable is not None and (
                blob in self._missing_bases or blob in self._undecodable
                or any(b in self._undecodable or b not in self._records for b in e.bases)):
            self._undecodable = None
        number = self._pack_numbers.get(pack_id)
        if number is None:
            number = self._pack_numbers[pack_id] = len(self._packs)
            self._packs.append(pack_id)
            self._ends.append(0)
        self._ends[number] = max(self._ends[number], e.offset + e.length)
        self._records[blob] = self._RECORD.pack(
            number, e.type, e.offset, e.length, e.raw_length, e.encoding,
            e.generation, e.start) + b"".join(e.bases)

    def undecodable(self) -> set[bytes]:
        """The indexed blobs that cannot be decoded from what is indexed: a delta one of
        whose bases, down its chain, is not indexed (an index file lost, or a pack
        lost and the index repaired).  Usually none: found in one pass over the
        records with bases, and kept until a blob indexed could change it."""
        bad = self._undecodable
        if bad is None:
            size, records = self._SIZE, self._records
            bad = set()
            missing: set[bytes] = set()
            for blob, record in records.items():
                if len(record) > size:
                    lost = [b for b in self._bases(record) if b not in records]
                    if lost:
                        bad.add(blob)
                        missing.update(lost)
            while bad:   # and what is built on those, until nothing more is found
                more = {blob for blob, record in records.items()
                        if len(record) > size and blob not in bad
                        and any(b in bad for b in self._bases(record))}
                if not more:
                    break
                bad |= more
            self._undecodable, self._missing_bases = bad, missing
        return bad

    def _bases(self, record: bytes) -> list[bytes]:
        size = self._SIZE
        if len(record) == size:        # the usual cases first: no base, or one
            return []
        if len(record) == size + 32:
            return [record[size:]]
        return [record[i:i + 32] for i in range(size, len(record), 32)]

    def _entry(self, blob: bytes, record: bytes) -> tuple[bytes, BlobEntry]:
        number, type_, offset, length, raw_length, encoding, generation, start = \
            self._unpack(record)
        return self._packs[number], BlobEntry(blob, type_, offset, length, raw_length, encoding,
                                              self._bases(record), generation, start)

    def beyond(self, sizes: dict[bytes, int]) -> tuple[list[bytes], list[bytes], int]:
        """Packs that do not hold what the index says they do, given each pack's size
        (``sizes``; a pack not in it is missing): (missing packs, packs shorter than
        the end of a blob they should hold, how many blobs those packs hold)."""
        limit = [sizes.get(pack_id, -1) for pack_id in self._packs]
        if all(end <= size for end, size in zip(self._ends, limit)):
            return [], [], 0
        unpack = struct.Struct("<IBQI").unpack_from
        hit: dict[int, int] = {}
        for record in self._records.values():
            number, _, offset, length = unpack(record)
            if offset + length > limit[number]:
                hit[number] = hit.get(number, 0) + 1
        missing = [self._packs[n] for n in sorted(hit) if limit[n] < 0]
        cut = [self._packs[n] for n in sorted(hit) if limit[n] >= 0]
        return missing, cut, sum(hit.values())

    def bases(self, blob: bytes) -> list[bytes] | None:
        """The blob's bases (without building its entry); None if it is not indexed."""
        record = self._records.get(blob)
        return None if record is None else self._bases(record)

    def __getitem__(self, blob: bytes) -> tuple[bytes, BlobEntry]:
        return self._entry(blob, self._records[blob])

    def get(self, blob: bytes, default=None):
        record = self._records.get(blob)
        return default if record is None else self._entry(blob, record)

    def __contains__(self, blob: object) -> bool:
        return blob in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._records)

    def values(self) -> Iterator[tuple[bytes, BlobEntry]]:
        for blob, record in self._records.items():
            yield self._entry(blob, record)

    def items(self) -> Iterator[tuple[bytes, tuple[bytes, BlobEntry]]]:
        for blob, record in self._records.items():
            yield blob, self._entry(blob, record)


class Index:
    """Which blob lives in which pack, loaded from every index file."""

    def __init__(self) -> None:
        self.blobs = BlobMap()
        self.files: list[str] = []
        self.damaged: list[str] = []   # index files that could not be read

    @classmethod
    def load(cls, backend: Backend, codec=None, strict: bool = False) -> "Index":
        """The union of all index files.  A damaged one is skipped (and listed in
        ``damaged``) unless ``strict``: what it named is then simply not found."""
        index = cls()
        for name in sorted(backend.list(INDEX_PREFIX)):
            try:
                index.add_file(name, backend.get(name), codec or Plain())
            except (RepositoryDamaged, msgspec.DecodeError) as exc:
                if strict:
                    raise RepositoryDamaged(f"Index file {name} is damaged ({exc}); run "
                                            "'fpvault repair index'.") from exc
                index.damaged.append(name)
        return index

    def add_file(self, name: str, data: bytes, codec) -> None:
        for pack_id, entries in decode_index(name, data, codec):
            self.add_pack(pack_id, entries)
        self.files.append(name)

    def add_pack(self, pack_id: bytes, entries: Iterable[BlobEntry]) -> None:
        for e in entries:
            self.blobs[e.id] = (pack_id, e)

    def __contains__(self, blob: bytes) -> bool:
        return blob in self.blobs

    def __len__(self) -> int:
        return len(self.blobs)


def encode_index(packs_entries: list[tuple[bytes, list[BlobEntry]]], codec) -> tuple[str, bytes]:
    raw = _index_encoder.encode(packs_entries)
    name = INDEX_PREFIX + codec.blob_id(raw).hex()
    return name, codec.seal(zstandard.ZstdCompressor(level=3).compress(raw))


def decode_index(name: str, data: bytes, codec) -> list[tuple[bytes, list[BlobEntry]]]:
    data = codec.open(data, f"index file {name}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise RepositoryDamaged(f"index file {name} does not decompress ({exc}); "
                                "rebuild it from the packs.") from exc
    if codec.blob_id(raw).hex() != name.rsplit("/", 1)[-1]:
        raise RepositoryDamaged(f"index file {name} does not match its hash; "
                                "rebuild it from the packs.")
    return _index_decoder.decode(raw)


class ChunkStore:
    """Content-addressed blobs over a backend."""

    def __init__(self, backend: Backend, index: Index, level: int = 3, codec=None):
        self.backend = backend
        self.codec = codec or Plain()
        self.index = index
        self.level = level
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pending: set[bytes] = set()     # added this session, maybe not yet indexed
        # (pack id, offset) -> stored bytes read ahead (a frame's blobs share theirs)
        self._prefetched: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
        self._prefetched_bytes = 0
        self._builder = packs.PackBuilder()
        self._unindexed: list[tuple[bytes, list[BlobEntry]]] = []
        self._cache: BlobCache        # checked blobs
        self._frames: BlobCache       # (pack id, offset) -> frame plaintext
        self._decoding: dict[tuple[bytes, int], Future] = {}   # frames being decoded
        self._unchecked: BlobCache    # delta bases, as read (_base_to_decode)
        self.size_caches(2)
        self._uploader: ThreadPoolExecutor | None = None
        self._uploads: list[Future] = []
        self._upload_slots = threading.BoundedSemaphore(MAX_PENDING_UPLOADS)
        self._compressor: ThreadPoolExecutor | None = None
        self._frame_jobs: list[Future] = []
        self._frame_slots = threading.BoundedSemaphore(FRAMES_IN_FLIGHT)

    def size_caches(self, streams: int, *, snapshot: bool = False) -> None:
        """Size the caches for ``streams`` streams read at once (FRAME_CACHE_PER_STREAM),
        and for a snapshot's reading of delta bases (SNAP_CACHE_BYTES); call before
        reading or storing anything."""
        blobs = SNAP_CACHE_BYTES if snapshot else CACHE_BYTES
        self._cache = BlobCache(blobs)
        self._frames = BlobCache(max(2, streams) * FRAME_CACHE_PER_STREAM)
        self._unchecked = BlobCache(blobs // 2)

    # -- codecs, one per thread (zstd contexts are not thread-safe)

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return c

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    # -- writing

    def put(self, data: bytes, type: int = packs.DATA, similar: list[bytes] | None = None,
            blob: bytes | None = None, frame: "Frame | None" = None) -> bytes:
        """Store ``data`` unless it is already stored; return its id.

        ``similar``: ids of stored blobs likely to resemble ``data`` (the chunk at
        the same place in the previous snapshot first, then the one after it).
        When given, the blob may be stored as a delta against them.  ``blob``:
        the id, if the caller already hashed ``data``.  ``frame``: the caller's
        open frame; a blob not stored as a delta joins it, and is stored when
        the frame is (``write_frame``), compressed together with its neighbours.
        Until then it is pending: ``put`` of the same content returns at once.
        """
        blob = blob or self.codec.blob_id(data)
        claimed, similar = self._claim(blob, similar)
        if not claimed:
            return blob
        if not self._encode_claimed(data, type, similar, blob, whole=frame is None):
            self.add_to_frame(frame, blob, type, data)
        return blob

    def put_delta_async(self, data: bytes, type: int, similar: list[bytes], blob: bytes
                        ) -> Future | None:
        """``put`` of a blob that may be stored as a delta against ``similar``, the
        delta encoded on a compressor thread: None if there is nothing to do (stored,
        or pending), else a future of whether it was stored.  False: it was not worth
        a delta, and the caller hands it to ``add_to_frame`` (in stream order, so a
        frame holds its chunks in order whatever the threads' timing)."""
        claimed, similar = self._claim(blob, similar)
        if not claimed:
            return None
        if not similar:
            done: Future = Future()
            done.set_result(False)
            return done
        return self._compressor_pool().submit(self._encode_claimed, data, type, similar, blob,
                                              False)

    def add_to_frame(self, frame: "Frame", blob: bytes, type: int, data: bytes) -> None:
        """Add a claimed blob (``put_delta_async`` said False) to the stream's frame."""
        frame.add(blob, type, data)
        if frame.size >= FRAME_TARGET:
            self.write_frame(frame)

    def release(self, blobs: list[bytes]) -> None:
        """Give up claims (``_claim``) on blobs that will not be stored after all."""
        with self._lock:
            self._pending.difference_update(blobs)

    def _claim(self, blob: bytes, similar: list[bytes] | None
               ) -> tuple[bool, list[bytes] | None]:
        """Mark ``blob`` pending, unless it is stored or pending already (then False):
        whoever claims a blob stores it.  Also the bases still worth offering."""
        with self._lock:
            if blob in self._pending or self.stored(blob):
                return False, similar
            if blob in self.index:
                similar = None   # a delta on a base the index lost: stored again, whole
            self._pending.add(blob)
        return True, similar

    def _encode_claimed(self, data: bytes, type: int, similar: list[bytes] | None,
                        blob: bytes, whole: bool) -> bool:
        """Store a claimed blob as a delta if that pays, else (``whole``) compressed on
        its own; False if it was left for a frame."""
        try:
            delta = self._delta(data, similar) if similar else None
            if delta is not None and len(delta[0]) > len(data) * DELTA_CLEARLY_WORTH:
                # Worth it only if clearly smaller than the blob compressed on its own.
                if len(delta[0]) > len(self._cctx().compress(data)) * DELTA_WORTH:
                    delta = None
            if delta is None and not whole:
                return False
            if delta is not None:
                stored, bases, generation = delta
                encoding = packs.DELTA
            else:
                stored = self._cctx().compress(data)
                encoding, bases, generation = packs.ZSTD, [], 0
                if len(stored) >= len(data):
                    stored, encoding = bytes(data), packs.RAW
            stored = self.codec.seal(stored)
            entry = BlobEntry(blob, type, 0, len(stored), len(data), encoding, bases, generation)
            self._check_encoded([entry], stored, data)
        except BaseException:
            self.release([blob])
            raise
        self._add_stored(stored, [entry])
        return True

    def stored(self, blob: bytes) -> bool:
        """Whether ``blob`` is indexed and so is every blob it is decoded against (its
        delta bases, down their chains): only then may a snapshot take it as stored.
        A delta whose base the index lost (an index file lost, or a pack lost and the
        index repaired) would leave the snapshot unrestorable; ``put`` stores it again."""
        blobs = self.index.blobs
        return blob in blobs and blob not in blobs.undecodable()

    def write_frame(self, frame: "Frame") -> None:
        """Hand the frame's blobs to a compressor thread, to be stored as one zstd
        frame (a frame of one blob as that blob alone); the frame is empty afterwards.
        ``flush`` waits for them, and raises what went wrong.

        Chunks compressed one by one lose what recurs across a table; a frame of
        ``FRAME_TARGET`` bytes keeps most of it (docs/benchmarks.md, "frames"),
        while each chunk keeps its own id for dedup and deltas."""
        members, frame.members, frame.size = frame.members, [], 0
        if not members:
            return
        acquired = False
        try:
            self._check_frame_jobs()
            self._frame_slots.acquire()
            acquired = True
            pool = self._compressor_pool()
            with self._lock:
                self._frame_jobs.append(pool.submit(self._store_frame, members))
        except BaseException:
            if acquired:
                self._frame_slots.release()
            self.release([blob for blob, _, _ in members])
            raise

    def _compressor_pool(self) -> ThreadPoolExecutor:
        """The threads that compress frames and encode deltas."""
        with self._lock:
            if self._compressor is None:
                self._compressor = ThreadPoolExecutor(max_workers=FRAME_WORKERS,
                                                      thread_name_prefix="fpvault-frame")
            return self._compressor

    def _check_frame_jobs(self, wait_all: bool = False) -> None:
        """Forget the frame jobs that are done; raise the first one's error, if any."""
        with self._lock:
            jobs = self._frame_jobs
            self._frame_jobs = [] if wait_all else [f for f in jobs if not f.done()]
            done = jobs if wait_all else [f for f in jobs if f.done()]
        futures_wait(done)   # all of them, even after one failed
        for f in done:
            f.result()

    def _store_frame(self, members: list[tuple[bytes, int, bytes]]) -> None:
        try:
            self._encode_frame(members)
        finally:
            self._frame_slots.release()

    def _encode_frame(self, members: list[tuple[bytes, int, bytes]]) -> None:
        try:
            if len(members) == 1:
                blob, type, data = members[0]
                stored = self._cctx().compress(data)
                encoding = packs.ZSTD if len(stored) < len(data) else packs.RAW
                stored = self.codec.seal(stored if encoding == packs.ZSTD else bytes(data))
                entries = [BlobEntry(blob, type, 0, len(stored), len(data), encoding)]
                self._check_encoded(entries, stored, data)
                self._add_stored(stored, entries)
                return
            plain = b"".join(data for _, _, data in members)
            stored = self._cctx().compress(plain)
            if len(stored) >= len(plain):   # incompressible: each as is
                for blob, type, data in members:
                    raw = self.codec.seal(bytes(data))
                    entries = [BlobEntry(blob, type, 0, len(raw), len(data), packs.RAW)]
                    self._check_encoded(entries, raw, data)
                    self._add_stored(raw, entries)
                return
            stored = self.codec.seal(stored)
            entries, start = [], 0
            for blob, type, data in members:
                entries.append(BlobEntry(blob, type, 0, len(stored), len(data), packs.FRAME,
                                         start=start))
                start += len(data)
            self._check_encoded(entries, stored, plain)
        except BaseException:
            self.release([blob for blob, _, _ in members])
            raise
        self._add_stored(stored, entries)

    def _check_encoded(self, entries: list[BlobEntry], stored: bytes, plain: bytes) -> None:
        """Raise unless ``stored`` decodes to exactly ``plain`` (the blob, or the frame's
        blobs back to back): a compressor or codec fault must not reach the pack."""
        if entries[0].encoding == packs.RAW and not self.codec.encrypted:
            return
        decoded = self._open(entries[0], stored)
        if decoded != plain:
            raise BlobDamaged(entries[0].id, "it did not decode to what was written; "
                                             "nothing was stored")

    def _add_stored(self, stored: bytes, entries: list[BlobEntry]) -> None:
        with self._lock:
            self._builder.add_stored(stored, entries)
            for e in entries:
                self.stats.blobs_added += 1
                self.stats.raw_bytes_added += e.raw_length
                if e.encoding == packs.DELTA:
                    self.stats.deltas_added += 1
            if len(self._builder) >= packs.PACK_TARGET_SIZE:
                self._write_pack()

    def _delta(self, data: bytes, similar: list[bytes]) -> tuple[bytes, list[bytes], int] | None:
        """(stored, bases, generation) of ``data`` as a delta, if that pays.

        Skip-deltas (as Subversion's FSFS): a blob of generation g is a delta
        against the ancestors, at generation g with its lowest set bit cleared,
        of the similar blobs.  A chain of versions is then at most log2(g) deltas
        deep, so reading any version decodes a handful of blobs, while each
        delta still spans few versions and stays small.
        """
        known = [b for b in similar if b in self.index.blobs]
        if not known:
            return None
        primary = self.index.blobs[known[0]][1]
        generation = primary.generation + 1
        if generation > MAX_GENERATION:
            return None  # start a new chain with a whole copy
        target = generation & (generation - 1)
        bases = []
        for b in known:
            base = self.ancestor(b, target)
            if base is not None and base not in bases:
                bases.append(base)
        if not bases:
            return None
        try:
            dictionary = b"".join(self._base(b) for b in bases)   # checked: never build on damage
        except RepositoryDamaged:
            return None  # never build on damage; store it whole
        cdict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        stored = zstandard.ZstdCompressor(level=self.level, dict_data=cdict).compress(data)
        return stored, bases, generation

    def ancestor(self, blob: bytes, target: int) -> bytes | None:
        """Follow primary bases from ``blob`` down to generation <= target."""
        for _ in range(MAX_GENERATION.bit_length() + 2):
            found = self.index.blobs.get(blob)
            if found is None:
                return None
            e = found[1]
            if e.generation <= target:
                return blob
            if not e.bases:
                return None
            blob = e.bases[0]
        return None

    def _write_pack(self) -> None:
        """Close the open pack and upload it in the background (called with the lock held).

        At most ``MAX_PENDING_UPLOADS`` full packs wait for upload; beyond that the
        writer waits, which bounds memory whatever the speed of the backend."""
        builder, self._builder = self._builder, packs.PackBuilder()
        pack_id, data = builder.finish(self.codec if self.codec.encrypted else None)
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(max_workers=MAX_PENDING_UPLOADS,
                                                thread_name_prefix="fpvault-upload")
        self._upload_slots.acquire()
        self._uploads.append(self._uploader.submit(self._upload, packs.pack_name(pack_id), data))
        self.stats.bytes_added += len(data)
        self._unindexed.append((pack_id, builder.entries))

    def _upload(self, name: str, data: bytes) -> None:
        try:
            self.backend.put(name, data)
        finally:
            self._upload_slots.release()

    def flush(self) -> None:
        """Write the open pack and an index file for every pack written since.

        The index file is written only once every pack it names is stored: an
        upload that failed fails the flush, and no index names its pack."""
        self._check_frame_jobs(wait_all=True)
        with self._lock:
            if self._builder.entries:
                self._write_pack()
            uploads, self._uploads = self._uploads, []
            for f in uploads:
                f.result()
            if not self._unindexed:
                return
            name, data = encode_index(self._unindexed, self.codec)
            self.backend.put(name, data)
            self.stats.bytes_added += len(data)
            for pack_id, entries in self._unindexed:
                self.index.add_pack(pack_id, entries)
            self.index.files.append(name)
            self._unindexed = []
            self._pending.clear()

    # -- reading

    def get(self, blob: bytes) -> bytes:
        """The plaintext of ``blob``, checked against its hash."""
        cached = self._cache.get(blob)
        if cached is not None:
            return cached
        pack_id, e = self._locate(blob)
        return self._checked(blob, e, lambda: self._plaintext(pack_id, e))

    def _where(self, blob: bytes) -> tuple[bytes, int]:
        """Where an indexed blob is stored: (pack id, offset), to sort reads by."""
        pack_id, e = self.index.blobs[blob]
        return pack_id, e.offset

    def _locate(self, blob: bytes) -> tuple[bytes, BlobEntry]:
        try:
            return self.index.blobs[blob]
        except KeyError:
            raise BlobDamaged(blob, "it is not in the index") from None

    def _stored(self, pack_id: bytes, e: BlobEntry) -> bytes:
        """A blob's stored bytes (a frame's blobs: the frame's), read ahead or now."""
        with self._lock:
            stored = self._prefetched.pop((pack_id, e.offset), None)
            if stored is not None:
                self._prefetched_bytes -= len(stored)
        if stored is None:
            stored = self.backend.get(packs.pack_name(pack_id), e.offset, e.length)
        return stored

    def _plaintext(self, pack_id: bytes, e: BlobEntry, stored: bytes | None = None) -> bytes:
        """A blob's plaintext, not yet checked; a frame is decoded once, for all its
        blobs, and kept in the frame cache."""
        if e.encoding != packs.FRAME:
            return self._open(e, self._stored(pack_id, e) if stored is None else stored)
        key = (pack_id, e.offset)
        frame = self._frames.get(key)
        if frame is None:
            # One thread decodes a frame; others that want it meanwhile wait for that
            # (the delta encoders want the same frames at once: a churned table's
            # snapshot decoded 192 frames instead of 114).
            mine: Future | None = None
            try:   # from the claim on: an interrupt anywhere must not strand the waiters
                with self._lock:
                    decoding = self._decoding.get(key)
                    if decoding is None:
                        mine = self._decoding[key] = Future()
                if decoding is not None:
                    return decoding.result()[e.start:e.start + e.raw_length]
                frame = self._open(e, self._stored(pack_id, e) if stored is None else stored)
                self._frames.put(key, frame)
                mine.set_result(frame)
            except BaseException as exc:
                if mine is not None and not mine.done():
                    mine.set_exception(exc)
                raise
            finally:
                if mine is not None:
                    with self._lock:
                        self._decoding.pop(key, None)
        return frame[e.start:e.start + e.raw_length]

    def _checked(self, blob: bytes, e: BlobEntry, plaintext: Callable[[], bytes]) -> bytes:
        """``plaintext()`` checked against the blob's hash; a delta that fails it names a
        damaged base if it has one."""
        try:
            return self._check(blob, e, plaintext())
        except BlobDamaged:
            if e.encoding == packs.DELTA:
                self._blame_bases(blob, e)
            raise

    def prefetch_bases(self, likely: list[bytes], pool: Executor) -> None:
        """Read ahead what storing deltas against ``likely`` (the next chunks of a
        stream's previous version) will decode: the ancestor ``_delta`` would pick
        for each, and what decoding that needs (``prefetch``).  On a remote backend
        this turns a round trip per changed chunk into a few per window."""
        ancestors = []
        for blob in likely:
            found = self.index.blobs.get(blob)
            if found is not None:
                generation = found[1].generation + 1
                ancestors.append(self.ancestor(blob, generation & (generation - 1)))
        self.prefetch(ancestors, pool)

    def prefetch(self, blobs: list[bytes | None], pool: Executor) -> None:
        """Read ahead the stored bytes of ``blobs`` and of what decoding them needs
        (their bases, and theirs), but for what is cached, in coalesced ranged
        reads run on ``pool``.  They wait to be decoded, up to PREFETCH_BYTES
        in all; one call reads ahead at most half that (two readers may share
        it) but one run, the first in pack order: the rest is read when needed,
        as it would be without a read-ahead, rather than read ahead and dropped."""
        need: list[bytes] = []
        seen: set[bytes] = set()
        todo = list(blobs)
        while todo:
            b = todo.pop()
            if (b is None or b in seen or self._cache.get(b) is not None
                    or self._unchecked.get(b) is not None):
                continue
            seen.add(b)
            bases = self.index.blobs.bases(b)
            if bases is None:
                continue
            need.append(b)
            todo.extend(bases)
        if not need:
            return
        need.sort(key=self._where)
        runs, budget = [], PREFETCH_BYTES // 2
        for run in self.runs(need, REMOTE_RUN_GAP, REMOTE_RUN_SPAN):
            first, last = self.index.blobs[run[0]][1], self.index.blobs[run[-1]][1]
            budget -= last.offset + last.length - first.offset
            if budget < 0 and runs:
                break
            runs.append(run)
        for got in pool.map(self._read_stored, runs):
            with self._lock:
                for _, pack_id, e, stored in got:
                    key = (pack_id, e.offset)
                    if key not in self._prefetched and self._frames.get(key) is None:
                        self._prefetched[key] = stored
                        self._prefetched_bytes += len(stored)
                while self._prefetched_bytes > PREFETCH_BYTES:
                    self._prefetched_bytes -= len(self._prefetched.popitem(last=False)[1])

    def _read_stored(self, run: list[bytes]) -> list[tuple[bytes, bytes, BlobEntry, bytes]]:
        """(id, pack id, entry, stored bytes) of blobs stored one after another in one
        pack, read with a single ranged read; the bytes are still encoded, and the
        blobs of one frame share theirs."""
        entries = []
        for blob in run:
            try:
                entries.append(self.index.blobs[blob])
            except KeyError:
                raise BlobDamaged(blob, "it is not in the index") from None
        pack_id = entries[0][0]
        start = entries[0][1].offset
        end = max(e.offset + e.length for _, e in entries)
        data = self.backend.get(packs.pack_name(pack_id), start, end - start)
        pieces: dict[tuple[int, int], bytes] = {}
        out = []
        for blob, (_, e) in zip(run, entries):
            piece = pieces.get((e.offset, e.length))
            if piece is None:
                piece = data[e.offset - start:e.offset - start + e.length]
                pieces[e.offset, e.length] = piece
            out.append((blob, pack_id, e, piece))
        return out

    def get_run(self, blobs: list[bytes]) -> list[bytes]:
        """Blobs stored one after another in one pack, read with a single ranged read."""
        return [self.decode(blob, e, stored, pack_id)
                for blob, pack_id, e, stored in self._read_stored(blobs)]

    def runs(self, blobs: list[bytes], max_gap: int, max_span: int) -> list[list[bytes]]:
        """Split ``blobs`` (in stream order) into runs that ``get_run`` can read at once:
        same pack, each after the previous (or in the same frame), with gaps, stored
        span and plaintext size bounded."""
        out: list[list[bytes]] = []
        prev = None   # (pack, last entry, run start offset, plaintext bytes in the run)
        for blob in blobs:
            found = self.index.blobs.get(blob)
            if found is not None and prev is not None and out:
                pack_id, e = found
                ppack, pe, start, raw = prev
                same_frame = (e.encoding == packs.FRAME and e.offset == pe.offset
                              and e.length == pe.length)
                if pack_id == ppack and (same_frame or (
                        pe.offset + pe.length <= e.offset <= pe.offset + pe.length + max_gap
                        and e.offset + e.length - start <= max_span
                        and raw + e.raw_length <= max_span)):
                    out[-1].append(blob)
                    prev = (pack_id, e, start, raw + (0 if same_frame else e.raw_length))
                    continue
            out.append([blob])
            prev = (found[0], found[1], found[1].offset, found[1].raw_length) if found else None
        return out

    def _base(self, blob: bytes) -> bytes:
        """A delta base to build on, checked: read through the cache, since its
        neighbours share it."""
        data = self.get(blob)
        self._cache.put(blob, data)
        return data

    def _base_to_decode(self, blob: bytes) -> bytes:
        """A delta base's plaintext to decode a delta with, not checked against its hash
        (the decoded delta is: a wrong base cannot give the right bytes, and
        ``_checked`` then finds which base is to blame).  Restoring a churned table
        reads every chunk's base; hashing each cost a fifth of the restore's CPU.
        Only checked data goes into the shared cache."""
        data = self._cache.get(blob)
        if data is None:
            data = self._unchecked.get(blob)
        if data is None:
            data = self._plaintext(*self._locate(blob))
            self._unchecked.put(blob, data)
        return data

    def _blame_bases(self, blob: bytes, e: BlobEntry) -> None:
        """A delta did not decode to its hash: if one of its bases is damaged, say so."""
        for base in e.bases:
            try:
                self.get(base)
            except BlobDamaged as exc:
                raise BlobDamaged(blob, f"it is stored as a delta against blob "
                                        f"{exc.blob.hex()[:16]}, which is damaged: "
                                        f"{exc.why}") from exc

    def decode(self, blob: bytes, e: BlobEntry, stored: bytes,
               pack_id: bytes | None = None) -> bytes:
        """The plaintext of a blob from its stored bytes, checked against its hash.
        With ``pack_id``, a frame's plaintext is kept for its other blobs."""
        if pack_id is None:
            return self._checked(blob, e, lambda: self._slice(e, self._open(e, stored)))
        return self._checked(blob, e, lambda: self._plaintext(pack_id, e, stored))

    @staticmethod
    def _slice(e: BlobEntry, opened: bytes) -> bytes:
        return opened[e.start:e.start + e.raw_length] if e.encoding == packs.FRAME else opened

    def decode_stored(self, entries: list[BlobEntry], stored: bytes
                      ) -> Iterator[tuple[BlobEntry, BlobDamaged | None]]:
        """Check every blob of one stored range (a frame's blobs, or a single blob)
        against its hash, decoding ``stored`` itself, never a cached copy: what verify
        and prune read from a pack is what they judge."""
        if entries[0].encoding != packs.FRAME:
            for e in entries:
                try:
                    data = self._check(e.id, e, self._open(e, stored))
                except BlobDamaged as exc:
                    yield e, exc
                    continue
                if e.encoding == packs.DELTA:
                    # Checked: a later version's base, when verify goes chain by chain.
                    self._unchecked.put(e.id, data)
                yield e, None
            return
        try:
            frame = self._open(entries[0], stored)
        except BlobDamaged as exc:
            for e in entries:
                yield e, BlobDamaged(e.id, f"its frame is damaged: {exc.why}")
            return
        for e in entries:
            try:
                self._check(e.id, e, frame[e.start:e.start + e.raw_length])
                yield e, None
            except BlobDamaged as exc:
                yield e, exc

    def _check(self, blob: bytes, e: BlobEntry, data: bytes) -> bytes:
        if len(data) != e.raw_length or self.codec.blob_id(data) != blob:
            raise BlobDamaged(blob, "its content does not match its hash")
        return data

    def _open(self, e: BlobEntry, stored: bytes) -> bytes:
        """Decrypt and decompress stored bytes (a frame's: the whole frame), unchecked."""
        blob = e.id
        if self.codec.encrypted:
            try:
                stored = self.codec.open(stored, f"blob {blob.hex()[:16]}")
            except RepositoryDamaged:
                raise BlobDamaged(blob, "it failed authentication (damaged or tampered "
                                        "with)") from None
        if e.encoding == packs.RAW:
            return stored
        if e.encoding in (packs.ZSTD, packs.FRAME):
            limit = e.raw_length if e.encoding == packs.ZSTD else FRAME_MAX
            try:
                data = self._dctx().decompress(stored, max_output_size=limit)
            except zstandard.ZstdError as exc:
                raise BlobDamaged(blob, f"it does not decompress ({exc})") from exc
            if e.encoding == packs.FRAME and e.start + e.raw_length > len(data):
                raise BlobDamaged(blob, "its frame is shorter than its entry says")
            return data
        if e.encoding == packs.DELTA:
            try:
                dictionary = b"".join(self._base_to_decode(b) for b in e.bases)
            except BlobDamaged as exc:
                raise BlobDamaged(blob, f"it is stored as a delta against blob "
                                        f"{exc.blob.hex()[:16]}, which is damaged: "
                                        f"{exc.why}") from exc
            except RepositoryDamaged as exc:
                # A base's pack missing, or shorter than the index says.
                raise BlobDamaged(blob, "it is stored as a delta against a blob that "
                                        f"cannot be read: {str(exc).rstrip('.')}") from exc
            ddict = zstandard.ZstdCompressionDict(dictionary,
                                                  dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            try:
                return zstandard.ZstdDecompressor(dict_data=ddict).decompress(
                    stored, max_output_size=e.raw_length)
            except zstandard.ZstdError as exc:
                raise BlobDamaged(blob, f"it does not decompress ({exc})") from exc
        raise BlobDamaged(blob, f"unknown encoding {e.encoding} (written by a newer fpvault?)")

    def get_many(self, blobs: Iterable[bytes]) -> Iterator[bytes]:
        """Blobs in order; on a remote backend, adjacent ones share one ranged read."""
        blobs = list(blobs)
        if not getattr(self.backend, "parallel_reads", False):
            for blob in blobs:
                yield self.get(blob)
            return
        for run in self.runs(blobs, REMOTE_RUN_GAP, REMOTE_RUN_SPAN):
            yield from self.get_run(run)

    # -- chunk lists

    def put_list(self, chunks: list[ChunkRef]) -> bytes:
        return self.put(encode_list(chunks), packs.LIST)

    def get_list(self, blob: bytes) -> list[ChunkRef]:
        return decode_list(blob, self.get(blob))

    def read_lists(self, list_ids: Iterable[bytes]
                   ) -> Iterator[tuple[bytes, list[ChunkRef] | RepositoryDamaged]]:
        """Each of these chunk lists (once, in pack order), or why it cannot be read.
        Neighbours are read together (a list written after a small table lies next
        to the one before it), and on a remote backend several runs at once: not a
        round trip after another for each (a quiet snapshot of 150 tables took 12 s
        on S3 at 20 ms a request)."""
        wanted = set(list_ids)
        indexed = sorted((blob for blob in wanted if blob in self.index), key=self._where)
        runs = self.runs(indexed, REMOTE_RUN_GAP, REMOTE_RUN_SPAN)
        runs += [[blob] for blob in wanted if blob not in self.index]   # get() says why

        def read_run(run: list[bytes]) -> list[tuple[bytes, list[ChunkRef] | RepositoryDamaged]]:
            try:
                got = list(zip(run, self.get_run(run) if len(run) > 1 else [self.get(run[0])]))
            except RepositoryDamaged:   # which of them: one at a time
                got = []
                for blob in run:
                    try:
                        got.append((blob, self.get(blob)))
                    except RepositoryDamaged as exc:
                        got.append((blob, exc))
            out = []
            for blob, data in got:
                try:
                    out.append((blob, data if isinstance(data, RepositoryDamaged)
                                else decode_list(blob, data)))
                except RepositoryDamaged as exc:
                    out.append((blob, exc))
            return out

        if not getattr(self.backend, "parallel_reads", False) or len(runs) < 2:
            for run in runs:
                yield from read_run(run)
            return
        with ThreadPoolExecutor(max_workers=SMALL_READ_THREADS,
                                thread_name_prefix="fpvault-lists") as pool:
            for got in pool.map(read_run, runs):
                yield from got

    def complete_lists(self, list_ids: Iterable[bytes]) -> set[bytes]:
        """Of these chunk lists, those that are stored intact and whose chunks are all
        stored (``read_lists``, ``stored``)."""
        return {blob for blob, refs in self.read_lists(list_ids)
                if not isinstance(refs, RepositoryDamaged)
                and all(self.stored(ref.id) for ref in refs)}


class ChunkRef(NamedTuple):
    """One entry of a chunk list."""

    id: bytes
    size: int
    cut_in_row: bool = False   # the chunk does not end with a newline (a row longer than the slack)


# A chunk list is the concatenation of (32-byte id, 4-byte little-endian word); the word's
# low 31 bits are the chunk's size, its top bit is ``cut_in_row``.
_LIST_ITEM = 36
_CUT_IN_ROW = 1 << 31


def encode_list(chunks: list[ChunkRef]) -> bytes:
    out = bytearray()
    for ref in chunks:
        out += ref.id
        out += (ref.size | (_CUT_IN_ROW if ref.cut_in_row else 0)).to_bytes(4, "little")
    return bytes(out)


def decode_list(blob: bytes, data: bytes) -> list[ChunkRef]:
    if len(data) % _LIST_ITEM:
        raise BlobDamaged(blob, "chunk list has a partial entry")
    refs = []
    for i in range(0, len(data), _LIST_ITEM):
        word = int.from_bytes(data[i + 32:i + 36], "little")
        refs.append(ChunkRef(data[i:i + 32], word & ~_CUT_IN_ROW, bool(word & _CUT_IN_ROW)))
    return refs
