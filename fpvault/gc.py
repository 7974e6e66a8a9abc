"""Garbage collection: prune unreferenced data, rebuild the index.

A blob is *live* when a snapshot that exists refers to it: its schema streams,
table and large-object streams, their chunk lists and the chunks those list.
Prune runs under an exclusive lock, so no snap is adding data meanwhile; that
is what makes a pack no index names (left by a killed snap) safe to delete.

Prune's order keeps the repository valid at every moment, so a kill at any
point leaves something the next command can use:

1. compute the live set; refuse if a live blob is not in the index (deleting
   "unindexed" packs then could delete live data: repair the index first);
2. write packs holding the live blobs of packs that are mostly garbage
   (*repacking*), copying each blob's stored bytes from a pack that matches its
   hash and whose trailer says of the blob what the index says;
3. write one new index file naming every blob of the packs that stay and of
   the new packs;
4. delete the old index files (until this ends, old and new index files
   overlap; every pack either names still exists);
5. delete packs no index names any more: all-garbage packs, repacked packs,
   and packs a killed snap (or prune) left unindexed, but never a pack step 2
   wrote (a killed prune's unindexed pack has the same name as the one the next
   prune writes for the same blobs).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from . import packs
from .backend import LocalBackend
from .chunkstore import INDEX_PREFIX, SMALL_READ_THREADS, Index, encode_index
from .errors import RepositoryDamaged
from .manifest import Snapshot, SnapshotHead, Stream
from .packs import BlobEntry
from .vault import Vault

# Repack a pack when at least this share of its bytes is garbage.  Below it,
# rewriting the live part costs more I/O than the space is worth; restic's
# default (--max-unused 5% of the repository) is similar in spirit.  See
# docs/benchmarks.md ("prune") for the measurement behind the value.
REPACK_THRESHOLD = 0.25


def snapshot_streams(snap: Snapshot) -> list[tuple[str, Stream]]:
    """Every stream of a snapshot, with what it is (for messages)."""
    out = [("schema archive", snap.schema.archive), ("schema (pre-data)", snap.schema.pre_data),
           ("schema (post-data)", snap.schema.post_data)]
    out += [(f"table {t.qname}", t.data) for t in snap.tables]
    out += [(f"large object {lo.oid}", lo.data) for lo in snap.large_objects]
    return out


def live_blobs(vault: Vault, snapshots: list[SnapshotHead]) -> set[bytes]:
    # list id -> who needs it, for messages; the manifests are loaded one at a time
    first_use: dict[bytes, tuple[str, str]] = {}
    for head in snapshots:
        try:
            snap = vault.load_snapshot(head.id)
        except RepositoryDamaged as exc:
            raise RepositoryDamaged(f"{exc} Prune stopped without deleting anything.") from exc
        for what, stream in snapshot_streams(snap):
            list_id = bytes.fromhex(stream.list)
            if list_id not in first_use:
                first_use[list_id] = (head.id, what)
    live: set[bytes] = set(first_use)
    read = set()
    for list_id, refs in vault.store.read_lists(first_use):
        read.add(list_id)
        if isinstance(refs, RepositoryDamaged):
            sid, what = first_use[list_id]
            raise RepositoryDamaged(
                f"Snapshot {sid[:8]}, {what}: its chunk list cannot be read ({refs}). "
                "Prune stopped without deleting anything; run 'fpvault verify' and "
                "'fpvault repair index'.") from refs
        live.update(ref.id for ref in refs)
    if read != set(first_use):   # never delete what a list not read would have kept
        raise RepositoryDamaged(f"{len(set(first_use) - read)} chunk lists were not read; prune "
                                "stopped without deleting anything.")
    return with_bases(vault.store.index, live)


def with_bases(index: Index, blobs: set[bytes]) -> set[bytes]:
    """``blobs`` and every blob their deltas are built on: a base a live delta needs is live."""
    out = set(blobs)
    todo = list(blobs)
    while todo:
        for base in index.blobs.bases(todo.pop()) or ():
            if base not in out:
                out.add(base)
                todo.append(base)
    return out


@dataclass
class PruneStats:
    packs_before: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    orphan_packs: int = 0
    blobs_removed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {k: getattr(self, k) for k in (
            "packs_before", "packs_deleted", "packs_repacked", "packs_written", "orphan_packs",
            "blobs_removed", "bytes_before", "bytes_after", "seconds", "dry_run")}


def prune(vault: Vault, dry_run: bool = False, threshold: float = REPACK_THRESHOLD,
          forgotten: set[str] = frozenset()) -> PruneStats:
    """Delete what no snapshot needs.  The caller holds the exclusive lock (a shared
    one for a dry run).  ``forgotten``: snapshots to count as gone (what a dry run of
    forget --prune would leave)."""
    started = time.monotonic()
    stats = PruneStats(dry_run=dry_run)
    backend = vault.backend
    index = Index.load(backend, vault.codec, strict=True)
    vault.reset_index(index)
    snapshots = [s for s in vault.snapshots(strict=True, but=forgotten)
                 if s.id not in forgotten]
    live = live_blobs(vault, snapshots)
    missing = [b for b in live if b not in index]
    if missing:
        raise RepositoryDamaged(
            f"{len(missing)} blobs that snapshots need are not in the index; prune stopped "
            "without deleting anything. Run 'fpvault repair index', then 'fpvault verify'.")

    # Blob ids per pack; entries are rebuilt from the compact index when needed, so a
    # million-blob index is not held twice while packs are read and written.
    by_pack: dict[bytes, list[bytes]] = {}
    for pack_id, entry in index.blobs.values():
        by_pack.setdefault(pack_id, []).append(entry.id)
    # A frame's blobs share their stored bytes: the frame is kept (whole, with all its
    # blobs) while any of them is live, and counted once.
    ranges: dict[bytes, dict[tuple[int, int], list[bytes]]] = {}
    # (A file there that is no pack's name is not ours to delete.)
    sizes = {name: size for name, size in backend.list_sizes("data/")
             if packs.pack_id_of(name)}
    files = {name.rsplit("/", 1)[-1]: name for name in sizes}
    stats.packs_before = len(files)
    stats.bytes_before = sum(sizes.values())

    keep: list[bytes] = []
    repack: list[bytes] = []
    delete: list[str] = []
    garbage = 0   # bytes repacking drops
    for pack_id, blobs in by_pack.items():
        name = packs.pack_name(pack_id)
        if name not in sizes:
            raise RepositoryDamaged(f"Pack {pack_id.hex()[:16]} is in the index but missing; prune "
                                    "stopped without deleting anything. Run 'fpvault verify'.")
        stored: dict[tuple[int, int], list[bytes]] = {}
        for blob in blobs:
            e = index.blobs[blob][1]
            stored.setdefault((e.offset, e.length), []).append(blob)
        live_bytes = total = 0
        for (_, length), members in stored.items():
            total += length
            if any(blob in live for blob in members):
                live_bytes += length
        if live_bytes == 0:
            delete.append(name)
            stats.blobs_removed += len(blobs)
        elif (total - live_bytes) / max(total, 1) >= threshold:
            repack.append(pack_id)
            garbage += total - live_bytes
            ranges[pack_id] = stored
            stats.blobs_removed += sum(len(members) for members in stored.values()
                                       if not any(blob in live for blob in members))
        else:
            keep.append(pack_id)
    indexed = {packs.pack_name(p) for p in by_pack}
    orphans = [name for name in files.values() if name not in indexed]
    stats.orphan_packs = len(orphans)
    stats.packs_deleted = len(delete) + len(orphans)
    stats.packs_repacked = len(repack)
    if dry_run:   # (repacked packs: less their garbage; trailers aside)
        stats.bytes_after = (stats.bytes_before - sum(sizes[n] for n in delete + orphans)
                             - garbage)
        stats.seconds = time.monotonic() - started
        return stats

    # 2. repack
    new_packs: list[tuple[bytes, list[BlobEntry]]] = []
    builder = packs.PackBuilder()

    def write_builder() -> None:
        nonlocal builder
        pack_id, data = builder.finish(vault.codec if vault.codec.encrypted else None)
        backend.put(packs.pack_name(pack_id), data)
        new_packs.append((pack_id, builder.entries))
        builder = packs.PackBuilder()

    copied: set[bytes] = set()
    for pack_id in repack:
        data = backend.get(packs.pack_name(pack_id))
        trailer = _intact_pack(vault, pack_id, data)
        for (offset, length), members in ranges[pack_id].items():
            if not any(blob in live for blob in members) or members[0] in copied:
                continue
            entries = [index.blobs[blob][1] for blob in members]
            if any(trailer.get(e.id) != e for e in entries):
                raise RepositoryDamaged(
                    f"Pack {pack_id.hex()[:16]} does not hold blob {entries[0].id.hex()[:16]} "
                    "where the index says; prune stopped without deleting anything. Run "
                    "'fpvault repair index', then 'fpvault verify'.")
            builder.add_stored(data[offset:offset + length], entries)
            copied.update(members)
            if len(builder) >= packs.PACK_TARGET_SIZE:
                write_builder()
    if builder.entries:
        write_builder()
    stats.packs_written = len(new_packs)
    ranges.clear()

    # 3 and 4: one index for what stays, then drop the old ones.
    old_index_files = list(index.files)
    entries = [(p, [index.blobs[b][1] for b in by_pack[p]]) for p in keep] + new_packs
    if entries:
        name, blob = encode_index(entries, vault.codec)
        if name not in old_index_files:
            backend.put(name, blob)
    else:
        name = None
    for old in old_index_files:
        if old != name:
            backend.delete(old)

    # 5. packs nothing names any more.  Not one this prune just wrote: a pack's name is
    # the hash of its bytes, so a prune killed before its index file was written left
    # an "orphan" with the very name this one's repacking gave the same blobs again.
    written = {packs.pack_name(pack_id) for pack_id, _ in new_packs}
    for pack_name in delete + orphans + [packs.pack_name(p) for p in repack]:
        if pack_name not in written:
            backend.delete(pack_name)
    rewritten = len(written & set(orphans))   # not deleted after all: in use again
    stats.orphan_packs -= rewritten
    stats.packs_deleted -= rewritten
    if isinstance(backend, LocalBackend):
        backend.remove_temp_files()
    stats.bytes_after = sum(size for _, size in backend.list_sizes("data/"))
    stats.seconds = time.monotonic() - started
    vault.reset_index(None)
    return stats


def _intact_pack(vault: Vault, pack_id: bytes, data: bytes) -> dict[bytes, BlobEntry]:
    """A pack read whole for repacking, proved to be exactly what was written (its
    name is the hash of its bytes, and every blob was checked to decode when it was
    stored), so its blobs are copied without decoding them: decoding a delta means
    decoding its bases' frames, which made prune three times slower.  Returns its
    trailer's entries."""
    if packs.blob_id(data) != pack_id:
        raise RepositoryDamaged(f"Pack {pack_id.hex()[:16]} does not match its hash; prune "
                                "stopped without deleting anything. Run 'fpvault verify'.")
    try:
        return {e.id: e for e in packs.read_trailer(
            data, vault.codec if vault.codec.encrypted else None)}
    except packs.PackFormatError as exc:
        raise RepositoryDamaged(f"Pack {pack_id.hex()[:16]}: {exc}; prune stopped without "
                                "deleting anything. Run 'fpvault verify'.") from exc


@dataclass
class RepairStats:
    packs: int = 0
    blobs: int = 0
    unreadable: list[str] = field(default_factory=list)
    kept: int = 0                 # entries of unreadable packs taken from the old index
    index_files_removed: int = 0


def repair_index(vault: Vault) -> RepairStats:
    """Rebuild the index from the pack trailers.  The caller holds the exclusive lock.

    A pack whose trailer cannot be read may still hold intact blobs, which the old
    index (what of it can be read) describes: those entries are kept, so that the
    repair never makes data unreachable that was reachable before; but not those
    past the end of a pack cut short, so that the next snapshot stores them again."""
    backend = vault.backend
    stats = RepairStats()
    entries: list[tuple[bytes, list[BlobEntry]]] = []
    unreadable: list[bytes] = []
    ids: dict[str, bytes] = {}
    sizes: dict[str, int] = {}   # by name, as listed
    for name, size in backend.list_sizes("data/"):
        if (pack_id := packs.pack_id_of(name)) is not None:
            ids[name], sizes[name] = pack_id, size
    names = sorted(ids)
    for name, pack_entries in zip(names, read_pack_trailers(backend, names, vault.codec,
                                                            sizes)):
        if isinstance(pack_entries, Exception):
            stats.unreadable.append(f"{name}: {pack_entries}")
            unreadable.append(ids[name])
            continue
        entries.append((ids[name], pack_entries))
        stats.packs += 1
        stats.blobs += len(pack_entries)
    if unreadable:
        before: dict[bytes, list[BlobEntry]] = {p: [] for p in unreadable}
        for pack_id, e in Index.load(backend, vault.codec).blobs.values():
            # (Not what lay past the end of a pack cut short: that is lost.)
            if pack_id in before and e.offset + e.length <= sizes[packs.pack_name(pack_id)]:
                before[pack_id].append(e)
        for pack_id, kept in before.items():
            if kept:
                entries.append((pack_id, kept))
                stats.kept += len(kept)
    old = list(backend.list(INDEX_PREFIX))
    new_name = None
    if entries:
        new_name, blob = encode_index(entries, vault.codec)
        backend.put(new_name, blob)
    for name in old:
        if name != new_name:
            backend.delete(name)
            stats.index_files_removed += 1
    vault.reset_index(None)
    return stats


def in_order(pool: ThreadPoolExecutor, fn, items: list, ahead: int) -> Iterator:
    """fn(item) for each item, in order, run by ``pool`` at most ``ahead`` beyond the
    one the caller waits for (their results wait in memory until taken)."""
    pending: deque[Future] = deque()
    todo = iter(items)

    def more() -> None:
        for item in todo:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                return

    try:
        more()
        while pending:
            result = pending.popleft().result()
            more()
            yield result
    finally:
        for f in pending:
            f.cancel()


def read_pack_trailers(backend, names: list[str], codec=None, sizes: dict[str, int] | None = None
                       ) -> Iterator[list[BlobEntry] | Exception]:
    """``read_pack_trailer`` of each pack named, in order, several at once: for a pack
    whose trailer cannot be read, the exception instead.  ``sizes``: the packs' sizes
    by name, from a listing, which spares a request each."""
    def one(name: str) -> list[BlobEntry] | Exception:
        try:
            return read_pack_trailer(backend, name, codec, (sizes or {}).get(name))
        except (RepositoryDamaged, packs.PackFormatError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=SMALL_READ_THREADS,
                            thread_name_prefix="fpvault-trailers") as pool:
        yield from in_order(pool, one, names, SMALL_READ_THREADS * 4)


def read_pack_trailer(backend, name: str, codec=None, size: int | None = None
                      ) -> list[BlobEntry]:
    """A pack's entries, from ranged reads of its head and tail (``size``: the pack's,
    if a listing gave it)."""
    if size is None:
        size = backend.size(name)
    if size < len(packs.MAGIC) + 12:
        raise packs.PackFormatError("too short to be a pack")
    if backend.get(name, 0, len(packs.MAGIC)) != packs.MAGIC:
        raise packs.PackFormatError("not a pack file")
    tail = backend.get(name, size - 12, 12)
    if tail[4:] != packs.TRAILER_MAGIC:
        raise packs.PackFormatError("no trailer (truncated?)")
    tlen = int.from_bytes(tail[:4], "little")
    start = size - 12 - tlen
    if start < len(packs.MAGIC):
        raise packs.PackFormatError("trailer length out of range")
    return packs.decode_trailer(backend.get(name, start, tlen), start,
                                codec if codec is not None and codec.encrypted else None)
