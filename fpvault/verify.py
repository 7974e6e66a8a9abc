"""Verify: prove that what the repository keeps is intact and restorable.

Levels, each including the one before:

- *structure* (always): the config, every manifest and index file decodes and
  matches its hash; every pack the index names exists and its trailer agrees
  with the index; every chunk list of every snapshot reads back, and every
  chunk it lists is in the index.
- *read data* (``--read-data``, or a random ``--read-data-subset N%`` of the
  packs): every byte of those packs is read, the pack hashed against its name
  and every blob decoded and hashed against its id.
- *restore test* (``--restore-test CONNINFO``): the snapshot is restored into
  a scratch database inside one transaction, each table is read back with
  COPY in the same order as snap read it (key order, or physical order, which
  after a load in one transaction is load order), and its row count and
  stream hash compared with the manifest (or, where the order differs, its
  rows as a multiset); then the transaction is rolled back.

Every problem is attributed to the snapshots and tables it affects.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import blake3
import psycopg
from psycopg import sql

from . import packs, pgsource
from . import restore as restore_mod
from .errors import RepositoryDamaged
from .chunkstore import ChunkRef
from .gc import in_order, read_pack_trailers, snapshot_streams, with_bases
from .manifest import Snapshot, SnapshotHead, TableEntry
from .vault import Vault


T = TypeVar("T")

# Whole packs (--read-data) by this many, each holding one pack (up to
# packs.PACK_TARGET_SIZE) while it checks it: a remote backend's downloads overlap,
# and on any backend the decoding runs on more than one core.
READ_THREADS = 2


@dataclass
class _PackRead:
    """What reading one pack found (verify's read_pack)."""
    read: bool = False
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    bad: list[tuple[bytes, str]] = field(default_factory=list)
    deltas: list[tuple[bytes, packs.BlobEntry]] = field(default_factory=list)


@dataclass
class Report:
    snapshots: int = 0
    packs: int = 0
    packs_read: int = 0
    blobs_checked: int = 0
    tables_restored: int = 0
    problems: list[str] = field(default_factory=list)
    affected: dict[str, set[str]] = field(default_factory=dict)   # snapshot id -> what

    @property
    def ok(self) -> bool:
        return not self.problems

    def hit(self, sid: str, what: str) -> None:
        self.affected.setdefault(sid, set()).add(what)

    def as_json(self) -> dict:
        return {"ok": self.ok, "snapshots": self.snapshots, "packs": self.packs,
                "packs_read": self.packs_read, "blobs_checked": self.blobs_checked,
                "tables_restored": self.tables_restored, "problems": self.problems,
                "affected": {sid: sorted(w) for sid, w in sorted(self.affected.items())}}


def verify(vault: Vault, *, read_data: bool = False, subset: float | None = None,
           restore_test: str | None = None, restore_snapshots: list[str] | None = None,
           progress=None) -> Report:
    say = progress or (lambda _msg: None)
    report = Report()
    backend = vault.backend
    index = vault.index
    for name in index.damaged:
        report.problems.append(f"index file {name} is damaged; 'fpvault repair index' rebuilds "
                               "the index from the packs")
    snapshots, lists = _loadable(vault, vault.snapshots())
    for sid, why in vault.damaged_snapshots:
        report.problems.append(f"snapshot {sid[:8]}: manifest damaged ({why})")
        report.hit(sid, "manifest")
    report.snapshots = len(snapshots) + len(vault.damaged_snapshots)

    # Every blob each snapshot needs must be indexed.  Each chunk list is read once,
    # however many snapshots share it, and a chunk and its bases found complete once
    # are not walked again for the next list that holds them.
    complete: set[bytes] = set()

    def missing_of(_list_id: bytes, refs: list[ChunkRef]) -> list[bytes]:
        out = []
        for ref in refs:
            if ref.id in complete:
                continue
            needed = with_bases(index, {ref.id})
            missing = [blob for blob in needed if blob not in index]
            out += missing
            if not missing:
                complete.update(needed)
        return out

    say("checking snapshots")
    for snap, what, _, found in _per_stream(vault, snapshots, lists, missing_of):
        if isinstance(found, RepositoryDamaged):
            report.problems.append(f"snapshot {snap.id[:8]}, {what}: chunk list "
                                   f"unreadable ({found})")
            report.hit(snap.id, what)
            continue
        for blob in found:
            report.problems.append(f"snapshot {snap.id[:8]}, {what}: chunk "
                                   f"{blob.hex()[:16]} is not in the index")
            report.hit(snap.id, what)
    del complete

    # Damaged blobs, and why; the snapshots they belong to are named at the end (a map
    # of every blob's users would grow with blobs times snapshots).
    bad: dict[bytes, list[str]] = {}

    def damaged(blob: bytes, why: str) -> None:
        bad.setdefault(blob, []).append(why)

    say("checking packs")
    by_pack: dict[bytes, list[packs.BlobEntry]] = {}
    for pack_id, entry in index.blobs.values():
        by_pack.setdefault(pack_id, []).append(entry)
    listed = {name: size for name, size in backend.list_sizes("data/")
              if packs.pack_id_of(name)}
    present = {name.rsplit("/", 1)[-1] for name in listed}
    report.packs = len(present)

    # In pack order, as one pack after another would report them.
    stored_packs = [p for p in sorted(by_pack) if p.hex() in present]
    trailers = read_pack_trailers(backend, [packs.pack_name(p) for p in stored_packs],
                                  vault.codec, listed)
    with contextlib.closing(trailers):
        for pack_id in sorted(by_pack):
            entries = by_pack[pack_id]
            if pack_id.hex() not in present:
                report.problems.append(f"pack {pack_id.hex()[:16]} is missing "
                                       f"({len(entries)} blobs)")
                for e in entries:
                    damaged(e.id, f"its data was in missing pack {pack_id.hex()[:16]}")
                continue
            trailer = next(trailers)
            if isinstance(trailer, Exception):
                report.problems.append(f"pack {pack_id.hex()[:16]} is damaged: {trailer}")
                for e in entries:
                    damaged(e.id, f"its pack {pack_id.hex()[:16]} is damaged")
                continue
            held = {e.id: e for e in trailer}
            for e in entries:
                if held.get(e.id) != e:
                    report.problems.append(f"pack {pack_id.hex()[:16]} does not hold blob "
                                           f"{e.id.hex()[:16]} where the index says")
                    damaged(e.id, "the index and its pack disagree")

    def check(members: list[packs.BlobEntry], stored: bytes) -> list[tuple[bytes, str]]:
        """The damaged blobs of one stored range, and why."""
        out = []
        for e, exc in vault.store.decode_stored(members, stored):
            if exc is not None:
                out.append((e.id, f"chunk {e.id.hex()[:16]} is damaged ({exc.why})"))
        return out

    # On a local backend deltas are checked after the packs, in chain order, with
    # ranged reads (cheap here; on a remote backend, a request each).
    local = not getattr(backend, "parallel_reads", False)
    deltas: list[tuple[bytes, packs.BlobEntry]] = []

    def read_pack(pack_id: bytes) -> _PackRead:
        """Read one pack whole and check what it stores, but for the deltas a local
        backend checks afterwards (in a reader thread: zstd and BLAKE3 release the GIL)."""
        result = _PackRead()
        try:
            data = backend.get(packs.pack_name(pack_id))
        except RepositoryDamaged as exc:
            result.problems.append(f"pack {pack_id.hex()[:16]}: {exc}")
            return result
        result.read = True
        if blake3.blake3(data).digest() != pack_id:
            result.problems.append(f"pack {pack_id.hex()[:16]} does not match its hash")
        if not local:
            # The bases its deltas decode against are in other packs: a ranged read
            # each, one after another, unless read ahead together.  (A damaged one
            # is named when its delta is decoded.)
            with contextlib.suppress(RepositoryDamaged):
                vault.store.prefetch([b for e in by_pack[pack_id] if e.encoding == packs.DELTA
                                      for b in e.bases], vault.read_pool())
        for (offset, length), members in packs.stored_ranges(by_pack[pack_id]).items():
            if members[0].encoding == packs.DELTA and local:
                result.deltas.append((pack_id, members[0]))
                continue
            # A frame's blobs share their stored bytes: decoded once for all.
            result.bad += check(members, data[offset:offset + length])
            result.checked += len(members)
        return result

    if read_data or subset is not None:
        chosen = sorted(by_pack)
        if subset is not None:
            n = max(1, round(len(chosen) * subset / 100)) if chosen else 0
            chosen = sorted(random.sample(chosen, min(n, len(chosen))))
        stored = [p for p in chosen if p.hex() in present]
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="fpvault-verify") as pool:
            results = in_order(pool, read_pack, stored, READ_THREADS)
            for i, pack_id in enumerate(chosen):
                if pack_id.hex() not in present:
                    continue
                say(f"reading pack {i + 1}/{len(chosen)}")
                result = next(results)
                report.packs_read += result.read
                report.blobs_checked += result.checked
                report.problems += result.problems
                for blob, why in result.bad:
                    damaged(blob, why)
                deltas += result.deltas
        # Deltas, chain by chain: in pack order every snapshot's pack would decode its
        # deltas' bases (and the frames they are in) once more for each dependent.
        rank = {pack_id: i for i, pack_id in enumerate(sorted(by_pack))}
        deltas.sort(key=lambda d: _chain_order(vault, rank, d[1]))
        for pack_id, e in deltas:
            try:
                stored = backend.get(packs.pack_name(pack_id), e.offset, e.length)
            except RepositoryDamaged as exc:
                report.problems.append(f"pack {pack_id.hex()[:16]}: {exc}")
                continue
            report.blobs_checked += 1
            for blob, why in check([e], stored):
                damaged(blob, why)

    if bad:
        _name_victims(vault, snapshots, lists, bad, report)

    if restore_test:
        targets = restore_snapshots or (["latest"] if snapshots else [])
        for ref in targets:
            try:
                sid, snap = vault.resolve(ref)
            except RepositoryDamaged as exc:
                report.problems.append(f"restore test of {ref}: {exc}")
                continue
            say(f"restore test of {sid[:8]}")
            _restore_test(vault, sid, snap, restore_test, report)
    # A problem seen through several paths is reported once, and without the advice,
    # meant for other commands, to run verify.
    report.problems = list(dict.fromkeys(_without_verify_advice(p) for p in report.problems))
    return report


_VERIFY_ADVICE = re.compile(r"(?:[;,.]\s*|\s+)(?:[Rr]un |then )'fpvault verify'"
                            r"(?: to see what[^.;]*)?(?=[.;,)]|$)")


def _without_verify_advice(problem: str) -> str:
    """A damage message as verify reports it: "...; run 'fpvault verify'" is what the
    other commands that meet damage say."""
    return _VERIFY_ADVICE.sub("", problem.replace("run 'fpvault verify', and ", "run "))


def _chain_order(vault: Vault, rank: dict[bytes, int], e: packs.BlobEntry) -> int:
    """Where a delta's chain starts (the blob its primary bases lead down to: its
    pack's rank, offset and place in its frame), then its generation, as one int: the
    versions of one chunk one after another, each decoded after its bases, and the
    chains in the order of their roots' frames."""
    root = vault.store.ancestor(e.bases[0], 0)
    found = vault.index.blobs.get(root) if root is not None else None
    if found is None:
        return e.generation   # a missing base: reported as damage when decoded
    pack_id, r = found
    return ((((rank.get(pack_id, len(rank)) << 40) | r.offset) << 27 | r.start) << 11
            | e.generation)


def _loadable(vault: Vault, heads: list[SnapshotHead]
              ) -> tuple[list[SnapshotHead], set[bytes]]:
    """Those of ``heads`` whose manifests load whole, and the distinct chunk lists of
    their streams.  A manifest whose head decodes but whose lists do not is damaged
    too: it joins ``vault.damaged_snapshots``."""
    loaded, lists = [], set()
    for head in heads:
        try:
            snap = vault.load_snapshot(head.id)
        except RepositoryDamaged:
            continue
        loaded.append(head)
        lists.update(bytes.fromhex(stream.list) for _, stream in snapshot_streams(snap))
    return loaded, lists


def _per_stream(vault: Vault, snaps: list[SnapshotHead], lists: set[bytes],
                inspect: Callable[[bytes, list[ChunkRef]], T]
                ) -> Iterator[tuple[SnapshotHead, str, bytes, T | RepositoryDamaged]]:
    """(snapshot, what, list id, finding) for each stream of each of ``snaps``, in
    order: what ``inspect`` found in its chunk list, or why the list cannot be read.  Each
    of ``lists``, the distinct ones (an unchanged table's is shared by every snapshot
    since it last changed; _loadable), is read and inspected once, neighbours together
    and, on a remote backend, by a few threads (ChunkStore.read_lists); only the
    findings are kept.  The manifests are loaded again one at a time: a list of every
    stream of every snapshot would grow with tables times snapshots."""
    found: dict[bytes, T | RepositoryDamaged] = {}
    for list_id, refs in vault.store.read_lists(lists):
        found[list_id] = refs if isinstance(refs, RepositoryDamaged) else inspect(list_id, refs)
    for head in snaps:
        for what, stream in snapshot_streams(vault.load_snapshot(head.id)):
            list_id = bytes.fromhex(stream.list)
            yield head, what, list_id, found[list_id]


def _name_victims(vault: Vault, snapshots: list[SnapshotHead], lists: set[bytes],
                  bad: dict[bytes, list[str]], report: Report) -> None:
    """Report each damaged blob once for every snapshot stream that needs it (itself,
    or as a delta base, or as its chunk list)."""
    index = vault.index

    def hits(list_id: bytes, refs: list[ChunkRef] | None) -> list[bytes]:
        ids = {list_id, *(ref.id for ref in refs or ())}
        return sorted(blob for blob in with_bases(index, ids) if blob in bad)

    for snap, what, list_id, found in _per_stream(vault, snapshots, lists, hits):
        if isinstance(found, RepositoryDamaged):
            found = hits(list_id, None)
        for blob in found:
            for why in bad[blob]:
                report.problems.append(f"snapshot {snap.id[:8]}, {what}: {why}")
        if found:
            report.hit(snap.id, what)


def _restore_test(vault: Vault, sid: str, snap: Snapshot, conninfo: str, report: Report) -> None:
    plan = restore_mod.make_plan(vault, sid, snap, restore_mod.Options())

    def check(cur: psycopg.Cursor) -> None:
        # Read back as the snapshot read (the restore chose the encoding).
        pgsource.setup_session(cur.connection,
                               settings=snap.session or pgsource.LEGACY_SESSION_SETTINGS)
        for table in snap.tables:
            if table.condition:
                report.tables_restored += 1
                stored, missing = _stored_rows_missing(cur, vault, table)
                if stored != table.rows or missing:
                    report.problems.append(
                        f"snapshot {sid[:8]}, table {table.qname}: {missing} of the {stored} "
                        f"rows stored (the manifest says {table.rows}) are not in it restored")
                    report.hit(sid, f"table {table.qname}")
                continue
            rows, digest = _read_back(cur, table)
            report.tables_restored += 1
            if rows != table.rows:
                report.problems.append(f"snapshot {sid[:8]}, table {table.qname}: {rows} rows "
                                       f"restored, the manifest says {table.rows}")
                report.hit(sid, f"table {table.qname}")
            elif digest != table.data.hash and (
                    (table.key and not table.physical)
                    or _read_back(cur, table, MultisetDigest())[1] != _sorted_hash(vault, table)):
                report.problems.append(f"snapshot {sid[:8]}, table {table.qname}: restored rows "
                                       "differ from the stored stream")
                report.hit(sid, f"table {table.qname}")

    try:
        restore_mod.to_database(vault, plan, conninfo, before_commit=check, commit=False)
    except restore_mod.TargetNotEmpty as exc:
        raise restore_mod.TargetNotEmpty(
            exc.where, exc.count, "--restore-test needs an empty scratch database, in which it "
            "rolls the restore back: create one (createdb NEW) and give that.") from exc
    except RepositoryDamaged as exc:
        report.problems.append(f"restore test of {sid[:8]}: {exc}")
        report.hit(sid, "restore")


def _stored_rows_missing(cur: psycopg.Cursor, vault: Vault, table: TableEntry) -> tuple[int, int]:
    """An extension's configuration table: its condition chose the stored rows when
    snap ran and may choose others now (it may call now()), and CREATE EXTENSION may
    have put rows of its own beside them, so it is not read back as snap read it.
    Instead the stored rows are loaded into a temporary table: (how many, how many
    of them the restored table lacks), compared as text, as a multiset."""
    cols = (sql.SQL(", ").join(sql.Identifier(c) for c in table.columns) if table.columns
            else sql.SQL("*"))
    # (Made in the restore's transaction: a failure rolls it back with the rest.)
    cur.execute(sql.SQL("CREATE TEMP TABLE fpvault_stored AS SELECT {} FROM ONLY {} "
                        "WITH NO DATA").format(cols, sql.SQL(table.qname)))
    with cur.copy("COPY pg_temp.fpvault_stored FROM STDIN") as copy:
        for chunk in vault.read_stream(table.data):
            copy.write(chunk)
    cur.execute(sql.SQL(
        "SELECT (SELECT count(*) FROM pg_temp.fpvault_stored), (SELECT count(*) FROM ("
        "SELECT s::text FROM pg_temp.fpvault_stored s EXCEPT ALL "
        "SELECT t::text FROM (SELECT {} FROM ONLY {}) t) missing)").format(
            cols, sql.SQL(table.qname)))
    stored, missing = cur.fetchone()
    cur.execute("DROP TABLE pg_temp.fpvault_stored")
    return stored, missing


def _read_back(cur: psycopg.Cursor, table: TableEntry, bag: "MultisetDigest | None" = None
               ) -> tuple[int, str | int]:
    """The table's row count and the BLAKE3 of its COPY stream, in the order snap
    read it; with ``bag``, the stream's rows as a multiset (MultisetDigest) instead
    of its hash."""
    info = pgsource.TableInfo(oid=0, schema=table.schema, name=table.name, qname=table.qname,
                              relkind=table.relkind, persistence=table.persistence,
                              parent=table.parent, columns=table.columns, key=table.key,
                              extension=table.extension, condition=table.condition,
                              physical=table.physical)
    h = bag or blake3.blake3()
    rows = 0
    with cur.copy(info.copy_statement()) as copy:
        while data := copy.read():
            h.update(data)
            rows += bytes(data).count(b"\n")
    return rows, bag.digest() if bag else h.hexdigest()


class MultisetDigest:
    """An order-independent digest of a stream's rows: the sum of their hashes.

    Without a key a table is a bag of rows; physical order after a load is
    normally load order, but if it is not, the rows are compared this way, in
    bounded memory.
    """

    MOD = 1 << 256

    def __init__(self) -> None:
        self.total = 0
        self.rest = b""

    def update(self, data: bytes | memoryview) -> None:
        lines = (self.rest + bytes(data)).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            self.total = (self.total + int.from_bytes(blake3.blake3(line).digest(), "big")) % self.MOD

    def digest(self) -> int:
        if self.rest:
            self.update(b"\n")
        return self.total


def _sorted_hash(vault: Vault, table: TableEntry) -> int:
    bag = MultisetDigest()
    for chunk in vault.read_stream(table.data):
        bag.update(chunk)
    return bag.digest()
