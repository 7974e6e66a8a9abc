"""The chunk store: put and get blobs by the hash of their content.

``put`` hashes a blob, skips it when the repository (or this session) already
has it, compresses it, checks that the compressed bytes decode back to the
same content, and adds it to the open pack.  ``flush`` writes the open pack
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
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

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
# Trained dictionaries (packs.DICT, one per large table): at most this size (zstd's
# default; on the sample's largest tables 110 KiB beat 64 KiB by 4-5%), and kept only if
# the sample it was trained on, compressed with it, shrinks by more than the
# dictionary's own stored size plus this share.
DICT_MAX_SIZE = 110 * 1024
DICT_MIN_GAIN = 0.03
# Compression and decompression contexts loaded with a dictionary, per thread.
DICT_CONTEXTS = 8
# Decoded blobs kept for reuse: delta bases are shared by neighbouring chunks and by
# successive versions, so a small cache saves most re-reads when restoring a table.
CACHE_BYTES = 32 * 1024 * 1024


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

    _RECORD = struct.Struct("<IBQIIBH")
    _SIZE = _RECORD.size
    _unpack = _RECORD.unpack_from

    def __init__(self) -> None:
        self._records: dict[bytes, bytes] = {}
        self._packs: list[bytes] = []
        self._pack_numbers: dict[bytes, int] = {}

    def __setitem__(self, blob: bytes, value: tuple[bytes, BlobEntry]) -> None:
        pack_id, e = value
        number = self._pack_numbers.get(pack_id)
        if number is None:
            number = self._pack_numbers[pack_id] = len(self._packs)
            self._packs.append(pack_id)
        self._records[blob] = self._RECORD.pack(
            number, e.type, e.offset, e.length, e.raw_length, e.encoding,
            e.generation) + b"".join(e.bases)

    def _bases(self, record: bytes) -> list[bytes]:
        size = self._SIZE
        if len(record) == size:        # the usual cases first: no base, or one
            return []
        if len(record) == size + 32:
            return [record[size:]]
        return [record[i:i + 32] for i in range(size, len(record), 32)]

    def _entry(self, blob: bytes, record: bytes) -> tuple[bytes, BlobEntry]:
        number, type_, offset, length, raw_length, encoding, generation = self._unpack(record)
        return self._packs[number], BlobEntry(blob, type_, offset, length, raw_length, encoding,
                                              self._bases(record), generation)

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
        self._trained: dict[bytes, bytes] = {}  # dictionaries added this session: id -> bytes
        self._prefetched: OrderedDict[bytes, bytes] = OrderedDict()  # id -> stored bytes
        self._prefetched_bytes = 0
        self._builder = packs.PackBuilder()
        self._unindexed: list[tuple[bytes, list[BlobEntry]]] = []
        self._cache = BlobCache(CACHE_BYTES)
        self._uploader: ThreadPoolExecutor | None = None
        self._uploads: list[Future] = []
        self._upload_slots = threading.BoundedSemaphore(MAX_PENDING_UPLOADS)

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
            blob: bytes | None = None, dictionary: bytes | None = None) -> bytes:
        """Store ``data`` unless it is already stored; return its id.

        ``similar``: ids of stored blobs likely to resemble ``data`` (the chunk at
        the same place in the previous snapshot first, then the one after it).
        When given, the blob may be stored as a delta against them.  ``blob``:
        the id, if the caller already hashed ``data``.  ``dictionary``: a trained
        dictionary (from ``train_dictionary``) to compress it with when it is not
        stored as a delta.
        """
        blob = blob or self.codec.blob_id(data)
        with self._lock:
            if blob in self.index or blob in self._pending:
                return blob
            self._pending.add(blob)
        try:
            delta = self._delta(data, similar) if similar else None
            if delta is not None and len(delta[0]) <= len(data) * DELTA_CLEARLY_WORTH:
                stored, bases, generation = delta   # no need to compress it on its own too
                encoding = packs.DELTA
            else:
                if dictionary is not None:
                    stored = self._dict_contexts(dictionary)[0].compress(data)
                    encoding, bases, generation = packs.ZDICT, [dictionary], 0
                else:
                    stored = self._cctx().compress(data)
                    encoding, bases, generation = packs.ZSTD, [], 0
                if delta is not None and len(delta[0]) <= len(stored) * DELTA_WORTH:
                    stored, bases, generation = delta
                    encoding = packs.DELTA
            if encoding in (packs.ZSTD, packs.ZDICT) and len(stored) >= len(data):
                stored, encoding, bases = bytes(data), packs.RAW, []
            stored = self.codec.seal(stored)
            if encoding != packs.RAW or self.codec.encrypted:
                entry = BlobEntry(blob, type, 0, len(stored), len(data), encoding, bases, generation)
                self.decode(blob, entry, stored)  # raises unless it decodes to exactly data
        except BaseException:
            with self._lock:
                self._pending.discard(blob)
            raise
        with self._lock:
            self._builder.add(blob, type, stored, len(data), encoding, bases, generation)
            self.stats.blobs_added += 1
            self.stats.raw_bytes_added += len(data)
            if encoding == packs.DELTA:
                self.stats.deltas_added += 1
            if len(self._builder) >= packs.PACK_TARGET_SIZE:
                self._write_pack()
        return blob

    def train_dictionary(self, samples: list[bytes]) -> bytes | None:
        """Train a zstd dictionary on ``samples`` (the first chunks of a stream) and
        store it, if it pays; return its id, or None.

        Each chunk is compressed on its own, so what recurs across a table (JSON
        keys, repeated names, common values) is paid for again in every chunk;
        a dictionary trained on the table's first chunks carries it instead.  On
        the sample's largest tables it cut their stored size by 14-15%.  Fixed
        fastCOVER parameters (k=256, d=8, accel=10) train in about 20 ms on 2 MiB;
        zstd's parameter search took 2-4 s for 2% more.  Whether it pays is
        judged on every fourth sample, compressed both ways.
        """
        size = min(DICT_MAX_SIZE, sum(map(len, samples)) // 16)
        if len(samples) < 8 or size < 4096:
            return None
        try:
            trained = zstandard.train_dictionary(size, samples, k=256, d=8, accel=10,
                                                 level=self.level, threads=1)
            zdict = zstandard.ZstdCompressionDict(trained.as_bytes(),
                                                  dict_type=zstandard.DICT_TYPE_FULLDICT)
            zdict.precompute_compress(level=self.level)
        except zstandard.ZstdError:
            return None  # too little or too uniform data to train on
        raw = trained.as_bytes()
        with_dict = zstandard.ZstdCompressor(level=self.level, dict_data=zdict)
        judged = samples[::4]
        plain = sum(len(self._cctx().compress(s)) for s in judged)
        cost = (sum(len(with_dict.compress(s)) for s in judged)
                + len(self._cctx().compress(raw)) * len(judged) / len(samples))
        if cost > plain * (1 - DICT_MIN_GAIN):
            return None
        dictionary = self.codec.blob_id(raw)
        with self._lock:
            self._trained[dictionary] = raw
        return self.put(raw, packs.DICT, blob=dictionary)

    def _dict_contexts(self, dictionary: bytes) -> tuple[zstandard.ZstdCompressor,
                                                         zstandard.ZstdDecompressor]:
        """This thread's compressor and decompressor loaded with a trained dictionary."""
        contexts = getattr(self._local, "dicts", None)
        if contexts is None:
            contexts = self._local.dicts = OrderedDict()
        found = contexts.get(dictionary)
        if found is not None:
            contexts.move_to_end(dictionary)
            return found
        raw = self._trained.get(dictionary)
        if raw is None:
            raw = self.get(dictionary)
        try:
            zdict = zstandard.ZstdCompressionDict(raw, dict_type=zstandard.DICT_TYPE_FULLDICT)
            zdict.precompute_compress(level=self.level)
        except zstandard.ZstdError as exc:
            raise BlobDamaged(dictionary, f"it is not a zstd dictionary ({exc})") from exc
        found = contexts[dictionary] = (zstandard.ZstdCompressor(level=self.level, dict_data=zdict),
                                        zstandard.ZstdDecompressor(dict_data=zdict))
        if len(contexts) > DICT_CONTEXTS:
            contexts.popitem(last=False)
        return found

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
            base = self._ancestor(b, target)
            if base is not None and base not in bases:
                bases.append(base)
        if not bases:
            return None
        try:
            dictionary = b"".join(self._base(b) for b in bases)
        except RepositoryDamaged:
            return None  # never build on damage; store it whole
        cdict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        stored = zstandard.ZstdCompressor(level=self.level, dict_data=cdict).compress(data)
        return stored, bases, generation

    def _ancestor(self, blob: bytes, target: int) -> bytes | None:
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
        try:
            pack_id, e = self.index.blobs[blob]
        except KeyError:
            raise BlobDamaged(blob, "it is not in the index") from None
        with self._lock:
            stored = self._prefetched.pop(blob, None)
            if stored is not None:
                self._prefetched_bytes -= len(stored)
        if stored is None:
            stored = self.backend.get(packs.pack_name(pack_id), e.offset, e.length)
        return self.decode(blob, e, stored)

    def prefetch_bases(self, likely: list[bytes], pool: Executor) -> None:
        """Read ahead what storing deltas against ``likely`` (the next chunks of a
        stream's previous version) will decode: the ancestor ``_delta`` would pick
        for each, and what decoding that needs, in coalesced ranged reads run on
        ``pool``.  On a remote backend this turns a round trip per changed chunk
        into a few per window."""
        need: list[bytes] = []
        seen: set[bytes] = set()
        for blob in likely:
            found = self.index.blobs.get(blob)
            if found is None:
                continue
            generation = found[1].generation + 1
            todo = [self._ancestor(blob, generation & (generation - 1))]
            while todo:
                b = todo.pop()
                if b is None or b in seen or self._cache.get(b) is not None:
                    continue
                seen.add(b)
                bases = self.index.blobs.bases(b)
                if bases is None:
                    continue
                need.append(b)
                todo.extend(bases)
        if not need:
            return
        def where(b: bytes) -> tuple[bytes, int]:
            pack_id, e = self.index.blobs[b]
            return pack_id, e.offset

        need.sort(key=where)
        for got in pool.map(self._read_stored, self.runs(need, REMOTE_RUN_GAP, REMOTE_RUN_SPAN)):
            with self._lock:
                for blob, _, stored in got:
                    if blob not in self._prefetched:
                        self._prefetched[blob] = stored
                        self._prefetched_bytes += len(stored)
                while self._prefetched_bytes > PREFETCH_BYTES:
                    self._prefetched_bytes -= len(self._prefetched.popitem(last=False)[1])

    def _read_stored(self, run: list[bytes]) -> list[tuple[bytes, BlobEntry, bytes]]:
        """(id, entry, stored bytes) of blobs stored one after another in one pack, read
        with a single ranged read; the bytes are still encoded."""
        entries = []
        for blob in run:
            try:
                entries.append(self.index.blobs[blob])
            except KeyError:
                raise BlobDamaged(blob, "it is not in the index") from None
        start = entries[0][1].offset
        end = max(e.offset + e.length for _, e in entries)
        data = self.backend.get(packs.pack_name(entries[0][0]), start, end - start)
        return [(blob, e, data[e.offset - start:e.offset - start + e.length])
                for blob, (_, e) in zip(run, entries)]

    def get_run(self, blobs: list[bytes]) -> list[bytes]:
        """Blobs stored one after another in one pack, read with a single ranged read."""
        return [self.decode(blob, e, stored) for blob, e, stored in self._read_stored(blobs)]

    def runs(self, blobs: list[bytes], max_gap: int, max_span: int) -> list[list[bytes]]:
        """Split ``blobs`` (in stream order) into runs that ``get_run`` can read at once:
        same pack, each after the previous, with gaps, stored span and plaintext
        size bounded."""
        out: list[list[bytes]] = []
        prev = None   # (pack, last entry, run start offset, plaintext bytes in the run)
        for blob in blobs:
            found = self.index.blobs.get(blob)
            if found is not None and prev is not None and out:
                pack_id, e = found
                ppack, pe, start, raw = prev
                if (pack_id == ppack and pe.offset + pe.length <= e.offset
                        <= pe.offset + pe.length + max_gap
                        and e.offset + e.length - start <= max_span
                        and raw + e.raw_length <= max_span):
                    out[-1].append(blob)
                    prev = (pack_id, e, start, raw + e.raw_length)
                    continue
            out.append([blob])
            prev = (found[0], found[1], found[1].offset, found[1].raw_length) if found else None
        return out

    def _base(self, blob: bytes) -> bytes:
        """A delta base: read through the cache, since its neighbours share it."""
        data = self.get(blob)
        self._cache.put(blob, data)
        return data

    def decode(self, blob: bytes, e: BlobEntry, stored: bytes) -> bytes:
        if self.codec.encrypted:
            try:
                stored = self.codec.open(stored, f"blob {blob.hex()[:16]}")
            except RepositoryDamaged:
                raise BlobDamaged(blob, "it failed authentication (damaged or tampered with)") from None
        if e.encoding == packs.RAW:
            data = stored
        elif e.encoding == packs.ZSTD:
            try:
                data = self._dctx().decompress(stored, max_output_size=e.raw_length)
            except zstandard.ZstdError as exc:
                raise BlobDamaged(blob, f"it does not decompress ({exc})") from exc
        elif e.encoding == packs.DELTA:
            try:
                dictionary = b"".join(self._base(b) for b in e.bases)
            except BlobDamaged as exc:
                raise BlobDamaged(blob, f"it is stored as a delta against blob "
                                        f"{exc.blob.hex()[:16]}, which is damaged: {exc.why}") from exc
            ddict = zstandard.ZstdCompressionDict(dictionary,
                                                  dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            try:
                data = zstandard.ZstdDecompressor(dict_data=ddict).decompress(
                    stored, max_output_size=e.raw_length)
            except zstandard.ZstdError as exc:
                raise BlobDamaged(blob, f"it does not decompress ({exc})") from exc
        elif e.encoding == packs.ZDICT:
            if len(e.bases) != 1:
                raise BlobDamaged(blob, "its entry names no single dictionary")
            try:
                dctx = self._dict_contexts(e.bases[0])[1]
            except BlobDamaged as exc:
                raise BlobDamaged(blob, f"it is compressed with dictionary blob "
                                        f"{exc.blob.hex()[:16]}, which is damaged: {exc.why}") from exc
            try:
                data = dctx.decompress(stored, max_output_size=e.raw_length)
            except zstandard.ZstdError as exc:
                raise BlobDamaged(blob, f"it does not decompress ({exc})") from exc
        else:
            raise BlobDamaged(blob, f"unknown encoding {e.encoding} (written by a newer fpvault?)")
        if len(data) != e.raw_length or self.codec.blob_id(data) != blob:
            raise BlobDamaged(blob, "its content does not match its hash")
        return data

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
