"""The snap pipeline: one consistent snapshot of a database into the vault.

1. The leader connects, begins a REPEATABLE READ, READ ONLY transaction and
   exports its snapshot.
2. pg_dump writes the schema (pre-data and post-data sections, custom format,
   uncompressed so it deduplicates) from that same snapshot.  Its table of
   contents says exactly which tables, sequences and large objects the dump
   covers, after the -n/-N/-t/-T filters, so the data we read matches the DDL.
3. The leader takes ACCESS SHARE locks on those tables and checks that none
   was truncated or rewritten since the snapshot began.
4. Each table's COPY stream (key order where the table has a key, but for one
   the previous snapshot does not hold, read in physical order where the
   statistics say that is key order anyway) is chunked, hashed, deduplicated
   and stored, by ``jobs`` connections that all read the exported snapshot.  A
   table larger than its share is split into key ranges (block ranges, in
   physical order) read at once; the later ranges wait in spool files until the table's writer
   reaches them, so its stream is the same as if one connection had read it.
5. Sequence states and large objects are read by the leader.

*Unchanged.*  When this snapshot sees the same transactions running as the
previous snapshot of the database did, on the same running server
(manifest.XactMark), no transaction has ended since, so no row and no
catalog entry has changed: the snapshot is the previous one but for its
sequences (``_nothing_since``, ``_quiet``), and steps 2 to 4 are skipped.
Where it was not read quite the same way (another pg_dump version), the
schema is dumped and the tables are taken from it without reading them, if
the catalog says the same of them and their chunks are all in the index.
Otherwise, on the same running server with the same schema, a table whose
every row is older than the previous snapshot's xmin, as many rows as it
counted, is taken from it too (pgsource.rows_unchanged: one scan, no COPY, by
the connection that would read the table, so that -j runs the scans at once);
"the same schema" but for large objects' entries
(pgtools.without_large_objects), and not for a table whose values print
catalog names, or an enum or composite type the dump leaves out
(pgsource.print_outside_the_dump).  A large object with as many
pages as then, all older, likewise (pgsource.large_object_pages).  Sequences
are always read (nextval logs only every 32nd value).  ``--reread`` reads
everything anyway.
6. The chunk store is flushed (packs, then index), and the manifest written
   last.  Any failure before that leaves no snapshot: blobs already written
   are unreferenced, and prune removes them.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import psycopg
import zstandard

from . import __version__, interrupts, pgsource, pgtools
from .errors import DatabaseError, SnapshotFailed, Stopped, ToolError, first_cause
from .errors import RepositoryDamaged
from .manifest import (FORMAT_VERSION, LargeObject, SchemaBlobs, SequenceState, Snapshot,
                       Source, Stream, TableEntry, XactMark)
from .vault import Vault, client_hostname, now_iso

PG_CLASS = 1259
PG_TYPE = 1247
PG_LARGEOBJECT = 2613
# With -j N, a table larger than its share of the work (all tables' size / N) and at
# least this big is read in ranges by several connections at once (key ranges need a
# single integer key; block ranges, in physical order, any), so that one table does
# not serialize the snapshot.
SPLIT_MIN_BYTES = 64 * 1024 * 1024
# A table read in physical order is split in at most (this machine's cores / 2)
# parts: a sequential scan keeps its backend far less busy than a key-order read,
# so a part costs what its client side costs (psql, chunking, compressing: about two
# cores), and where there are not two per part the parts take turns while the spool
# adds its own work.  On 2 cores, bench database, first snapshot -j 2: 0.81x of
# pg_dump -Fc unsplit, 0.85x split (docs/benchmarks.md); key-order reads split
# regardless (a full re-read, -j 2: 2.56 s split, 2.65 s not).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
    os.cpu_count() or 1)
# A worker connection (-j) commits and joins the snapshot again after this many
# tables: the locks it takes to read them (the table's, and its indexes' when a
# query plans on it) are held until its transaction ends, and the server's lock
# table is shared by all sessions (max_locks_per_transaction x connections).  With
# 3,400 tables, snap -j 4 ran out of it where pg_dump -j 4 did not; the leader's
# locks on every table are what keep DDL out meanwhile.
WORKER_TABLES_PER_TRANSACTION = 32
# With more tables than this, the leader (which cannot commit: it holds the exported
# snapshot) reads none itself, even with -j 1: a query planned on a table locks its
# indexes too, and looking at 3,000 tables of two indexes each from the leader did
# not fit a lock table that held pg_dump's 3,000 table locks.
LEADER_READS_MAX_TABLES = 500
# Small tables go to a reader in batches of up to this many tables and bytes on disk
# (_batches): a worker locks a batch in one statement, and the tables of it to look
# at are looked at in one.  A round trip per table for each cost a schema of 3,400
# tables 0.25 s (locks) and 0.6 s (looks).
BATCH_TABLES = 32
BATCH_BYTES = pgsource.PROBE_MIN_BYTES
# The catalog's fingerprint (design.md, "Unchanged catalogs"), which lets a snapshot
# take the previous one's schema instead of running pg_dump, is taken in databases of
# at least this many tables, where it costs clearly less than pg_dump: 0.24 s against
# 0.7 s (and pg_restore's 0.1 s) with 3,400 tables, but 0.06-0.1 s against 0.07 s with
# the bench database's 15; and it is taken (for the next snapshot) beside every
# pg_dump that does run, which costs a first snapshot of 3,400 tables 0.2 s on two
# cores.
CATALOG_FINGERPRINT_MIN_TABLES = 1000
CATALOG_FINGERPRINT_CONNECTIONS = 2
# A changed chunk's delta is encoded on the compressor threads, off the thread that
# reads the table, where the machine has this many cores per connection reading
# (their server backend, psql and reader keep about three busy).  The hand-offs cost
# CPU: a churned pgbench_accounts stream (488 MB, 3144 deltas), stored with two
# cores free, took 0.92-1.0 s instead of 1.26 s but 1.40-1.62 CPU-s instead of
# 1.26; on 2 cores, where the server and psql want them too, the churned bench
# snapshot took 2.90 s instead of 2.82 (docs/benchmarks.md, "deltas off the reader").
DELTAS_OFF_THREAD_CORES_PER_JOB = 4


@dataclass
class Filters:
    schemas: tuple[str, ...] = ()
    exclude_schemas: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    exclude_tables: tuple[str, ...] = ()

    def pg_dump_args(self) -> list[str]:
        args = []
        for flag, values in (("--schema", self.schemas), ("--exclude-schema", self.exclude_schemas),
                             ("--table", self.tables), ("--exclude-table", self.exclude_tables)):
            args += [f"{flag}={v}" for v in values]
        return args

    def as_dict(self) -> dict[str, list[str]]:
        d = {"schema": list(self.schemas), "exclude_schema": list(self.exclude_schemas),
             "table": list(self.tables), "exclude_table": list(self.exclude_tables)}
        return {k: v for k, v in d.items() if v}


class Progress:
    """Receives progress events; the CLI draws a bar from them."""

    def start(self, tables: int, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def table_done(self, qname: str) -> None: ...

    def finish(self) -> None: ...


PROGRAM = f"fpvault {__version__}"


@dataclass
class SnapResult:
    id: str
    snapshot: Snapshot
    bytes_read: int
    bytes_added: int
    seconds: float


def take(vault: Vault, conninfo: str, *, tags: tuple[str, ...] = (), filters: Filters = Filters(),
         jobs: int = 1, progress: Progress | None = None, reread: bool = False) -> SnapResult:
    progress = progress or Progress()
    started = time.monotonic()
    vault.check_index_usable()
    leader = pgsource.connect(conninfo)
    try:
        return _take(vault, leader, conninfo, tags, filters, max(1, jobs), progress, started,
                     reread)
    except psycopg.OperationalError as exc:
        if pgsource.connection_lost(exc):
            raise DatabaseError(f"Lost the connection to {pgsource.describe(conninfo)} during "
                                f"the snapshot: {pgsource.pg_message(exc)}. No snapshot was "
                                "written.") from exc
        advice = (" The snapshot locks every table it reads until it ends, as pg_dump does: "
                  "raise max_locks_per_transaction on the server (a restart), or snap with "
                  "fewer -j connections, or fewer tables at once (-n/-t)."
                  if pgsource.out_of_locks(exc) else "")
        raise SnapshotFailed(f"The snapshot failed: {pgsource.pg_message(exc)}.{advice} "
                             "No snapshot was written.") from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseError(f"The database refused a read needed for the snapshot: "
                            f"{pgsource.pg_message(exc)}. Snap as a role that can read every table "
                            "(and bypass row level security), or narrow it with -n/-t. "
                            "No snapshot was written.") from exc
    except psycopg.errors.CharacterNotInRepertoire as exc:
        if leader.info.parameter_status("server_encoding") != "SQL_ASCII":
            raise SnapshotFailed(f"The snapshot failed: {pgsource.pg_message(exc)}. No snapshot "
                                 "was written.") from exc
        # Its rows go out as stored, but names are read as UTF-8 (design.md, step 1).
        raise SnapshotFailed(
            f"The snapshot failed: {pgsource.pg_message(exc)}. This SQL_ASCII database has a "
            "name (of a schema, table, column, role, ...) that is not valid UTF-8, which "
            "fpvault cannot read: rename it, or move the database to a real encoding. No "
            "snapshot was written.") from exc
    except psycopg.Error as exc:
        raise SnapshotFailed(f"The snapshot failed: {pgsource.pg_message(exc)}. No snapshot was "
                             "written.") from exc
    finally:
        leader.close()


def _take(vault: Vault, leader: psycopg.Connection, conninfo: str, tags, filters: Filters,
          jobs: int, progress: Progress, started: float, reread: bool) -> SnapResult:
    encoding = pgsource.database_encoding(leader)
    pgsource.setup_session(leader, encoding)
    server_num = leader.info.server_version
    server_major = server_num // 10000
    pg_dump = pgtools.find_tool("pg_dump", server_major, f"for a PostgreSQL {server_major} server")
    server = pgsource.server_identity(leader)
    snapshot_name = pgsource.begin_snapshot(leader)
    mark = (XactMark(system=server.system, timeline=server.timeline, started=server.started,
                     recovered=server.recovered, database_oid=server.database_oid,
                     xids=pgsource.snapshot_xids(leader))
            if server else None)
    safe, env = pgsource.tool_conninfo(conninfo)
    history = previous_snapshots(vault, leader.info.dbname, str(leader.info.port))
    prev = history[-1] if history else None
    user = leader.execute("SELECT current_user").fetchone()[0]
    if (not reread and prev is not None
            and _nothing_since(vault, prev, mark, user, filters, encoding, pg_dump)):
        return _quiet(vault, leader, prev, mark, tags,
                      _source(leader, conninfo, user, encoding, pg_dump), progress, started)

    # Each tool run costs a few milliseconds before the first row is read (in a snap of
    # an unchanged database, that is most of its time): what can, runs side by side.
    with ThreadPoolExecutor(max_workers=5, thread_name_prefix="fpvault-tools") as tools:
        # pg_restore and psql are needed once the schema is dumped: find them meanwhile.
        find_restore = tools.submit(pgtools.find_tool, "pg_restore", pg_dump.major,
                                    "to read pg_dump's archive")
        find_psql = tools.submit(pgtools.find_psql, pg_dump)
        # The tables pg_dump dumps, unless filters leave some out: not other sessions'
        # temporary tables, nor extensions' own (but their configuration tables), nor
        # any in the system's schemas (a superuser may make one there).
        user_tables = [r[0] for r in leader.execute("""
            SELECT c.oid FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND c.oid >= 16384 AND c.relpersistence <> 't'
              AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
              AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                              WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                AND d.objid = c.oid AND d.deptype = 'e')""")]
        # (Only where it costs less than the pg_dump it would save.)
        fingerprint = (tools.submit(_catalog_fingerprint, conninfo, encoding, snapshot_name)
                       if len(user_tables) >= CATALOG_FINGERPRINT_MIN_TABLES else None)
        # And what the catalog says of the tables pg_dump will most likely name (0.2 s
        # for 3,400 tables): those the previous snapshot held, or, for a first snapshot
        # without filters, all of them.  In our snapshot, the same whenever asked.
        # (Its size takes each table's lock for an instant: not those pg_dump skips,
        # which a long transaction may hold.)
        likely = ([t.oid for t in prev.tables] if prev is not None
                  else user_tables if not filters.as_dict() else [])
        known = tools.submit(pgsource.table_infos, leader, likely, missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="fpvault-") as tmp:
            # Where the catalog is the one the previous snapshot saw, so is pg_dump's
            # schema dump, which is then not run: its archive and text are taken from
            # that snapshot (read, with its table of contents, while the fingerprint
            # is taken: 0.07 s for 3,400 tables).
            kept = (tools.submit(_kept_schema, vault, prev, os.path.join(tmp, "kept.dump"),
                                 find_restore)
                    if fingerprint is not None and prev is not None and prev.catalog
                    and not reread else None)
            schema_kept = kept is not None and _same_catalog(
                vault, prev, fingerprint.result(), user, filters, encoding, pg_dump, server_num)
            if schema_kept:
                try:
                    archive, toc = kept.result()
                except RepositoryDamaged:
                    schema_kept = False   # (verify reports it) dumped and stored again
            if not schema_kept:
                archive_path = os.path.join(tmp, "schema.dump")
                _dump_schema(pg_dump, archive_path, snapshot_name, encoding, filters, safe, env)
                pg_restore = find_restore.result()
                toc_job = tools.submit(pgtools.archive_toc, pg_restore, archive_path)
                pre_job, post_job = (tools.submit(pgtools.archive_sql, pg_restore, archive_path,
                                                  section) for section in ("pre-data", "post-data"))
                with open(archive_path, "rb") as f:
                    archive = f.read()
                # All done with the archives (kept's too, not used) before they go.
                wait([toc_job, pre_job, post_job, *([kept] if kept is not None else [])])
                toc, pre_sql, post_sql = toc_job.result(), pre_job.result(), post_job.result()
        psql = find_psql.result()
        catalog = fingerprint.result() if fingerprint is not None else ""
        # (Its error first: it ran on the leader, whose next statement would only say
        # that the transaction is aborted.)
        known_infos = known.result()
    reader = (pgsource.PsqlReader(psql.path, safe, env, snapshot_name, encoding)
              if psql is not None else None)

    class_oids = sorted({e.oid for e in toc if e.catalog == PG_CLASS})
    lo_oids = []
    if any(e.catalog == PG_LARGEOBJECT for e in toc):
        # The dump includes large objects (pg_dump includes all or none).  pg_dump 17
        # lists them in groups, so take their oids from the catalog, in our snapshot.
        lo_oids = [r[0] for r in leader.execute(
            "SELECT oid FROM pg_catalog.pg_largeobject_metadata ORDER BY oid").fetchall()]
    # An extension's configuration tables and sequences have no entry in the schema
    # (CREATE EXTENSION makes them), but their data is the database's own.
    config = {c.oid: c for c in pgsource.extension_config(
        leader, {e.oid for e in toc if e.catalog == pgsource.PG_EXTENSION},
        schemas=filters.schemas, exclude_schemas=filters.exclude_schemas,
        tables=filters.tables, exclude_tables=filters.exclude_tables)}
    class_oids = sorted(set(class_oids) | set(config))
    rels = pgsource.relations(leader, class_oids)
    table_oids = [o for o in class_oids if rels.get(o, ("",))[0] == "r"]
    seq_oids = [o for o in class_oids if rels.get(o, ("",))[0] == "S"]
    infos = {t.oid: t for t in known_infos}
    infos |= {t.oid: t for t in pgsource.table_infos(
        leader, [o for o in table_oids if o not in infos])}
    tables = [infos[o] for o in table_oids]
    for t in tables:
        if t.oid in config:
            t.extension, t.condition = config[t.oid].extension, config[t.oid].condition
    pgsource.lock_tables(leader, tables)
    rewritten = pgsource.rewritten_since_snapshot(leader, table_oids)
    if rewritten:
        raise SnapshotFailed(f"{', '.join(rewritten[:5])} was truncated or rewritten while the "
                             "snapshot began; take the snapshot again.")
    altered = pgsource.altered_since_snapshot(leader, tables)
    if altered:
        raise SnapshotFailed(f"{', '.join(altered[:5])} was renamed or had columns changed while "
                             "the snapshot began (DDL that waited for pg_dump); take the "
                             "snapshot again.")

    vault.upgrade()
    store = vault.store
    store.size_caches(jobs, snapshot=True)
    schema = prev.schema if schema_kept else SchemaBlobs(
        archive=vault.write_stream([archive], prev and prev.schema.archive)[0],
        pre_data=vault.write_stream([pre_sql], prev and prev.schema.pre_data)[0],
        post_data=vault.write_stream([post_sql], prev and prev.schema.post_data)[0])
    prev_tables = {(t.schema, t.name): t.data for t in prev.tables} if prev else {}
    # A table the previous snapshot does not hold (its first, usually) has nothing to
    # deduplicate or delta against (that snapshot is where both come from): read it
    # in physical order, as pg_dump does, when its heap is in key order anyway (the
    # index scan of a key-ordered read costs the server a fifth more).  Its later
    # snapshots read it in key order, which is then the same bytes, and stays stable
    # as rows move in the heap.
    ordered = pgsource.in_key_order(leader, [t for t in tables
                                             if (t.schema, t.name) not in prev_tables])
    for t in tables:
        t.physical = t.oid in ordered
    prev_los = {lo.oid: lo for lo in prev.large_objects} if prev else {}
    # The same role: what it may read (privileges, row level security) was proved by
    # reading, and only a catalog change, which ends a transaction, changes it.
    # Read the same way: the settings decide how the same rows print.
    same_server = (not reread and prev is not None and prev.source.user == user
                   and prev.session == pgsource.SESSION_SETTINGS
                   and mark is not None and prev.xact is not None
                   and _same_server(prev.xact, mark))
    unchanged = same_server and prev.xact == mark and prev.filters == filters.as_dict()
    # Otherwise each table is looked at, if the schema is as it was: an enum label or a
    # composite type changes a table's text without touching its rows.
    look = same_server and not unchanged and (
        schema_kept or _same_schema(vault, prev, schema, pre_sql, post_sql))
    reusable = _reusable_tables(vault, prev, tables) if unchanged or look else {}
    # (But for a table whose rows a condition chooses, which may choose others now.)
    reuse = {oid: e for oid, e in reusable.items() if not e.condition} if unchanged else {}
    looks = Looks({})
    if look:
        # A value naming a role, or an object outside the dump, prints its new name
        # after a rename that no row records, and an enum or composite type the dump
        # does not define (filters left it out) may have been altered: such tables
        # are read.
        names = pgsource.print_outside_the_dump(
            leader, [t.oid for t in tables], {e.oid for e in toc if e.catalog == PG_TYPE},
            set(class_oids))
        # Nor is a look enough for the rows a condition chooses: it may choose other
        # rows of the same (or another) table.
        looks = _looks(history[-2:], mark,
                       [t for t in tables if t.oid not in names and not t.condition],
                       reusable)

    progress.start(len(tables), sum(t.size for t in tables))
    entries = [_reused_entry(t, reuse[t.oid], progress) for t in tables if t.oid in reuse]
    copied, looked = _copy_tables(vault, leader, conninfo, snapshot_name, encoding, reader,
                                  [t for t in tables if t.oid not in reuse], jobs, progress,
                                  prev_tables, looks)
    entries += copied
    reuse |= looked

    sequences = []
    for oid in seq_oids:
        _kind, _schema, _name, qname = rels[oid]
        last_value, is_called = pgsource.sequence_state(leader, qname)
        sequences.append(SequenceState(qname=qname, oid=oid, last_value=last_value,
                                       is_called=is_called))
    large_objects, lo_read = [], 0
    # Large objects as tables: after a commit, one that has as many pages as the
    # previous snapshot counted, all older than it, is the one it read.
    # (Their bytes do not depend on the schema.)
    pages = (pgsource.large_object_pages(
                 leader, lo_oids, prev.xact.xmin if same_server else None,
                 mark.xmax if mark else 0)
             if lo_oids and not unchanged else None)
    stored_los = _stored_lists(vault, [prev_los[oid].data for oid in lo_oids if oid in prev_los])
    for oid in lo_oids:
        old = prev_los.get(oid)
        now = pages.get(oid) if pages else None
        if (old is not None and (unchanged or (now is not None and now == (old.pages, True)))
                and old.data.list in stored_los):
            large_objects.append(LargeObject(oid=oid, data=old.data, pages=old.pages))
            continue
        stream, _ = vault.write_stream(pgsource.large_object(leader, oid), old and old.data)
        large_objects.append(LargeObject(oid=oid, data=stream, pages=now[0] if now else None))
        lo_read += stream.bytes
    progress.finish()

    bytes_read = sum(e.data.bytes for e in entries if e.oid not in reuse) + lo_read
    return _save(vault, leader, Snapshot(
        time=now_iso(), tags=sorted(set(tags)), hostname=client_hostname(),
        source=_source(leader, conninfo, user, encoding, pg_dump), filters=filters.as_dict(),
        schema=schema, tables=sorted(entries, key=lambda e: (e.schema, e.name)),
        sequences=sequences, large_objects=large_objects, xact=mark,
        tables_reused=len(reuse), session=dict(pgsource.SESSION_SETTINGS), catalog=catalog),
        bytes_read, started)


def _nothing_since(vault: Vault, prev: Snapshot, mark: XactMark | None, user: str,
                   filters: Filters, encoding: str, pg_dump: pgtools.Tool) -> bool:
    """Whether ``prev``, the previous snapshot of the database, is this one but for
    its sequences: no transaction has ended since (the same XactMark: no row and no
    catalog entry can have changed), it was read as this one would be (role,
    settings, filters, pg_dump version, by this release of fpvault), it has no
    table whose rows a condition chooses, and all it refers to is stored."""
    if not (prev.version == FORMAT_VERSION and prev.program == PROGRAM
            and mark is not None and prev.xact == mark
            and prev.source.user == user and prev.session == pgsource.SESSION_SETTINGS
            and prev.filters == filters.as_dict() and prev.source.encoding == encoding
            and prev.source.pg_dump_version == pg_dump.version
            # The rows a condition chooses may change without a transaction (now()).
            and not any(t.condition for t in prev.tables)):
        return False
    streams = [prev.schema.archive, prev.schema.pre_data, prev.schema.post_data,
               *(t.data for t in prev.tables), *(lo.data for lo in prev.large_objects)]
    stored = _stored_lists(vault, streams)
    return all(stream.list in stored for stream in streams)


def _catalog_fingerprint(conninfo: str, encoding: str, snapshot_name: str) -> str:
    """pgsource.catalog_fingerprint in the snapshot, on two connections of its own,
    so that it runs beside the leader's catalog queries, and its scans beside each
    other (on two cores, it ends the wait before a wide schema's tables are locked);
    "" (cannot tell: pg_dump runs) if a connection or a query fails."""
    conns: list[psycopg.Connection] = []
    try:
        for _ in range(CATALOG_FINGERPRINT_CONNECTIONS):
            conns.append(pgsource.connect(conninfo, "to read the catalog"))
            pgsource.setup_session(conns[-1], encoding)
            pgsource.begin_snapshot(conns[-1], snapshot_name)
        return pgsource.catalog_fingerprint(*conns)
    except (DatabaseError, psycopg.Error):
        return ""
    finally:
        for conn in conns:
            conn.close()


def _kept_schema(vault: Vault, prev: Snapshot, path: str, find_restore: Future
                 ) -> tuple[bytes, list[pgtools.TocEntry]]:
    """``prev``'s schema archive, and its table of contents (read from a copy at
    ``path``)."""
    archive = vault.read_bytes(prev.schema.archive)
    with open(path, "wb") as f:
        f.write(archive)
    return archive, pgtools.archive_toc(find_restore.result(), path)


def _same_catalog(vault: Vault, prev: Snapshot, catalog: str, user: str, filters: Filters,
                  encoding: str, pg_dump: pgtools.Tool, server_num: int) -> bool:
    """Whether pg_dump's schema dump would be ``prev``'s: the same catalog (its
    fingerprint), server and pg_dump versions, role, filters and encoding, and
    ``prev``'s schema written by this release and all stored."""
    streams = [prev.schema.archive, prev.schema.pre_data, prev.schema.post_data]
    return (catalog != "" and prev.catalog == catalog
            and prev.version == FORMAT_VERSION and prev.program == PROGRAM
            and prev.source.server_version_num == server_num
            and prev.source.pg_dump_version == pg_dump.version
            and prev.source.user == user and prev.source.encoding == encoding
            and prev.filters == filters.as_dict()
            and {s.list for s in streams} <= _stored_lists(vault, streams))


def _quiet(vault: Vault, leader: psycopg.Connection, prev: Snapshot,
           mark: XactMark, tags, source: Source, progress: Progress, started: float
           ) -> SnapResult:
    """The snapshot when nothing has happened since ``prev`` (``_nothing_since``): its
    schema, tables and large objects, without running pg_dump or reading the
    catalog; only the sequences are read (nextval ends no transaction)."""
    vault.upgrade()
    progress.start(len(prev.tables), 0)
    for t in prev.tables:
        progress.table_done(t.qname)
    sequences = []
    for seq in prev.sequences:
        last_value, is_called = pgsource.sequence_state(leader, seq.qname)
        sequences.append(SequenceState(qname=seq.qname, oid=seq.oid, last_value=last_value,
                                       is_called=is_called))
    progress.finish()
    return _save(vault, leader, Snapshot(
        time=now_iso(), tags=sorted(set(tags)), hostname=client_hostname(),
        source=source, filters=prev.filters, schema=prev.schema, tables=prev.tables,
        sequences=sequences, large_objects=prev.large_objects, xact=mark,
        tables_reused=len(prev.tables), session=dict(pgsource.SESSION_SETTINGS),
        catalog=prev.catalog), 0, started)


def _source(leader: psycopg.Connection, conninfo: str, user: str, encoding: str,
            pg_dump: pgtools.Tool) -> Source:
    params = pgsource.conninfo_params(conninfo)
    info = leader.info
    server_num = info.server_version
    return Source(host=info.host if not info.host.startswith("/") else params.get("host", "local"),
                  port=str(info.port), database=info.dbname, user=user,
                  server_version=_version_text(server_num), server_version_num=server_num,
                  encoding=encoding, pg_dump_version=pg_dump.version)


def _save(vault: Vault, leader: psycopg.Connection, snap: Snapshot,
          bytes_read: int, started: float) -> SnapResult:
    """Flush the chunk store and write the manifest; only then end the transaction."""
    store = vault.store
    store.flush()
    snap.seconds = round(time.monotonic() - started, 3)
    snap.bytes_added = store.stats.bytes_added
    snap.program = PROGRAM
    # The leader's transaction holds the snapshot and every table's lock: it must have
    # lasted until the last row was read, or a TRUNCATE or a rewrite may have come in
    # between.  A connection lost while the rows it had sent were still being read
    # shows only at the next statement: this one.
    leader.execute("SELECT 1")
    if leader.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        raise SnapshotFailed("The snapshot's transaction ended before its last row was read; "
                             "take the snapshot again. No snapshot was written.")
    # From here on the snapshot is complete: Ctrl-C or SIGTERM no longer stops snap
    # before it says so (interrupts).
    with interrupts.durable("the snapshot was written",
                            "It came as the snapshot's manifest was being written: 'fpvault "
                            "list' shows whether it was."):
        sid = vault.save_snapshot(snap)
    # The manifest is written; only now does the snapshot's transaction end.  (Read
    # only: if the connection is lost now, nothing is; nor if it is not ended, when
    # snap was asked to stop and closing the connection will do.)
    if interrupts.pending() is None:
        with contextlib.suppress(psycopg.Error):
            leader.execute("COMMIT")
    return SnapResult(sid, snap, bytes_read, store.stats.bytes_added, time.monotonic() - started)


def _dump_schema(pg_dump: pgtools.Tool, archive_path: str, snapshot_name: str, encoding: str,
                 filters: Filters, conninfo: str, env: dict[str, str]) -> None:
    """pg_dump's archive of the schema (pre- and post-data), as of the snapshot."""
    try:
        pgtools.run_tool(pg_dump, [
            "--format=custom", "--compress=0", "--section=pre-data", "--section=post-data",
            f"--snapshot={snapshot_name}", "--no-sync", f"--file={archive_path}",
            # The archive's SET client_encoding must be the one the data is read in
            # (PGCLIENTENCODING would otherwise choose it).
            f"--encoding={encoding}",
            # Planner statistics (pg_dump 18 can dump them) are not the database's
            # history, and change with every ANALYZE: the catalog fingerprint leaves
            # them out (pgsource.CATALOG_DATA), so the schema must too.
            *(["--no-statistics"] if pg_dump.major >= 18 else []),
            *filters.pg_dump_args(), f"--dbname={conninfo}"], env=env, what="dumping the schema")
    except ToolError as exc:
        text = str(exc)
        if "permission denied" in text or "connection to server" in text:
            # The database refused pg_dump: exit 5, like our own reads.
            raise DatabaseError(f"{text}. Snap as a role that can read every table, or "
                                "narrow it with -n/-t. No snapshot was written.") from exc
        raise


def _version_text(num: int) -> str:
    return f"{num // 10000}.{num % 10000}" if num >= 100000 else str(num)


def _stored_lists(vault: Vault, streams: list[Stream]) -> set[str]:
    """The chunk list ids (hex) of those of these streams whose chunks are all stored."""
    return {blob.hex() for blob in vault.store.complete_lists(
        bytes.fromhex(stream.list) for stream in streams)}


def _same_schema(vault: Vault, prev: Snapshot, schema: SchemaBlobs, pre_sql: bytes,
                 post_sql: bytes) -> bool:
    """Whether the schema (``schema``, of the text ``pre_sql`` and ``post_sql``) is
    the previous snapshot's, but for large objects created, unlinked or given
    another owner, comment or grant (which print no table's rows another way)."""
    if (schema.pre_data.hash, schema.post_data.hash) == (prev.schema.pre_data.hash,
                                                         prev.schema.post_data.hash):
        return True
    try:
        before = [vault.read_bytes(prev.schema.pre_data), vault.read_bytes(prev.schema.post_data)]
    except RepositoryDamaged:
        return False
    then = [pgtools.without_large_objects(s) for s in before]
    now = [pgtools.without_large_objects(s) for s in (pre_sql, post_sql)]
    return None not in then + now and then == now   # (None: cannot tell, so not the same)


def _same_server(a: XactMark, b: XactMark) -> bool:
    """The same database on the same server since the same start: xids only count up."""
    return (a.system, a.timeline, a.started, a.recovered, a.database_oid) == (
        b.system, b.timeline, b.started, b.recovered, b.database_oid)


@dataclass
class Looks:
    """Tables that may be taken from the previous snapshot unread: ``old`` holds each
    one's entry there, by oid, to take if pgsource.rows_unchanged(``before``,
    ``newest``) says its rows are the ones that snapshot read.  The reader that gets
    a table looks first."""
    old: dict[int, TableEntry]
    before: int = 0
    newest: int = 0

    def __contains__(self, oid: int) -> bool:
        return oid in self.old

    def unchanged(self, conn: psycopg.Connection, tables: list[pgsource.TableInfo]) -> set[int]:
        """The oids of those of ``tables`` to take unread."""
        mine = [(t, self.old[t.oid].rows) for t in tables if t.oid in self.old]
        return pgsource.rows_unchanged(conn, mine, self.before, self.newest) if mine else set()


def _looks(last: list[Snapshot], mark: XactMark, tables: list[pgsource.TableInfo],
           reusable: dict[int, TableEntry]) -> Looks:
    """Of the reusable tables, those worth a look: each is then taken unread if its
    rows are the ones the previous snapshot (``last[-1]``; ``last`` is the latest one
    or two) saw, and read otherwise.

    A table whose rows had changed in the previous snapshot, against the one before,
    is read without a look: what changes between two snapshots mostly changes again,
    and the look would cost a scan of it on top of the COPY."""
    earlier = {t.oid: t.data.hash for t in last[0].tables} if len(last) == 2 else {}
    out = {}
    for t in tables:
        old = reusable.get(t.oid)
        if old is None or earlier.get(t.oid, old.data.hash) != old.data.hash:
            continue
        out[t.oid] = old
    return Looks(out, last[-1].xact.xmin, mark.xmax)


def _reusable_tables(vault: Vault, prev: Snapshot, tables: list[pgsource.TableInfo]
                     ) -> dict[int, TableEntry]:
    """Of the previous snapshot's tables, those the catalog describes as it did then
    (same oid, name, columns, key) and whose chunks are all still stored."""
    old = {t.oid: t for t in prev.tables}
    out = {}
    for t in tables:
        e = old.get(t.oid)
        if (e is not None and (e.schema, e.name, e.columns, e.key, e.key_kinds, e.relkind,
                               e.persistence, e.parent, e.extension, e.condition)
                == (t.schema, t.name, t.columns, t.key, t.key_kinds, t.relkind, t.persistence,
                    t.parent, t.extension, t.condition)):
            out[t.oid] = e
    stored = _stored_lists(vault, [e.data for e in out.values()])
    return {oid: e for oid, e in out.items() if e.data.list in stored}


def _entry(table: pgsource.TableInfo, rows: int, data: Stream, physical: bool) -> TableEntry:
    """The manifest's entry for ``table``, whose stream is ``data``."""
    return TableEntry(schema=table.schema, name=table.name, qname=table.qname, oid=table.oid,
                      columns=table.columns, key=table.key, key_kinds=table.key_kinds,
                      rows=rows, data=data, relkind=table.relkind,
                      persistence=table.persistence, parent=table.parent,
                      related_oids=table.related_oids, owned_sequences=table.owned_sequences,
                      extension=table.extension, condition=table.condition,
                      physical=physical)


def _reused_entry(table: pgsource.TableInfo, old: TableEntry, progress: Progress) -> TableEntry:
    progress.table_done(table.qname)
    return _entry(table, old.rows, old.data, old.physical)


def previous_snapshots(vault: Vault, database: str, port: str) -> list[Snapshot]:
    """The latest one or two snapshots of the same database (of the same port, if
    any), oldest first, whole; the latest one's streams are the delta bases."""
    same = [s for s in vault.snapshots() if s.source.database == database]
    same = [s for s in same if s.source.port == port] or same
    out: list[Snapshot] = []
    for head in reversed(same):
        try:
            out.insert(0, vault.load_snapshot(head.id))
        except RepositoryDamaged:
            continue   # as if it were not there, as when its head cannot be read
        if len(out) == 2:
            break
    return out


class Spool:
    """A later key range of a split table, read by another connection while the first
    range is being stored.  Its COPY stream waits, zstd-compressed in a temporary file,
    until the table's writer reaches it, so the table's stream is byte for byte what
    one connection would have read: same chunks, same hash, same dedup."""

    def __init__(self, table: pgsource.TableInfo, key_range: tuple[int | None, int | None]):
        self.table = table
        self.key_range = key_range
        self.done = threading.Event()
        self.failed = False
        self.rows: list[int] = []
        self._file = tempfile.TemporaryFile(prefix="fpvault-spool-")

    def fill(self, conn: psycopg.Connection, reader: pgsource.PsqlReader | None,
             progress: Progress) -> None:
        try:
            with zstandard.ZstdCompressor(level=1).stream_writer(self._file, closefd=False) as out:
                for buf in copy_out(conn, reader, self.table, self.key_range, self.rows):
                    progress.advance(len(buf))
                    out.write(buf)
        except BaseException:
            self.failed = True
            raise
        finally:
            self.done.set()

    def read(self, stop: threading.Event) -> Iterator[bytes]:
        while not self.done.wait(0.1):
            if stop.is_set():
                raise Stopped()
        if self.failed:
            raise Stopped()   # the spool's own task reports why
        self._file.seek(0)
        yield from zstandard.ZstdDecompressor().read_to_iter(self._file, read_size=1 << 20,
                                                             write_size=pgsource.COPY_BATCH)

    def close(self) -> None:
        self._file.close()


def copy_out(conn: psycopg.Connection, reader: pgsource.PsqlReader | None,
             table: pgsource.TableInfo, key_range: tuple[int | None, int | None] | None,
             rows: list[int], copies: pgsource.CopyOuts | None = None) -> Iterator[bytearray]:
    """A table's COPY stream (or a key range of it): from ``copies`` if the table is
    one of a batch asked for at once, through a psql process if the table is large
    and psql can connect, else through ``conn``."""
    if copies is not None:
        yield from copies.stream(table, rows)
        return
    if reader is not None and not reader.disabled and table.size >= pgsource.PSQL_MIN_BYTES:
        stream = reader.copy_out(table, key_range, rows)
        try:
            first = next(stream, None)
        except pgsource.PsqlUnavailable:
            reader.disabled = True   # and read it here instead
        else:
            if first is not None:
                yield first
            yield from stream
            return
    yield from pgsource.copy_out(conn, table, key_range, rows)


def _copy_tables(vault: Vault, leader: psycopg.Connection, conninfo: str, snapshot_name: str,
                 encoding: str, reader: pgsource.PsqlReader | None,
                 tables: list[pgsource.TableInfo], jobs: int, progress: Progress,
                 previous: dict[tuple[str, str], Stream], looks: Looks
                 ) -> tuple[list[TableEntry], dict[int, TableEntry]]:
    """Read and store the tables, but for those that their look finds unchanged:
    (the entries of all of them, the entries taken unread by oid).  The looks
    run on the connections that read, each table's just before it would be read,
    small tables' several at once (_batches)."""
    looked: dict[int, TableEntry] = {}

    def look_or_copy(conn: psycopg.Connection, batch: list[pgsource.TableInfo],
                     spools: list[Spool] = (), first_range: tuple | None = None,
                     stop: threading.Event | None = None) -> list[TableEntry]:
        same = looks.unchanged(conn, batch)
        out = []
        for table in batch:
            if table.oid in same:
                looked[table.oid] = looks.old[table.oid]
                out.append(_reused_entry(table, looks.old[table.oid], progress))
        # Small tables' streams are asked for in one query: a round trip each cost
        # more than reading them.  Not a table psql may read, nor a condition's (an
        # extension's text): the server parses the whole query first, and a syntax
        # error in one would be the first table's.  Those go first, one by one.
        to_read = [t for t in batch if t.oid not in same]
        together = [t for t in to_read
                    if t.size < pgsource.PSQL_MIN_BYTES and not t.condition]
        if len(together) < 2:
            together = []
        alone = [t for t in to_read if t not in together]
        copies = None
        try:
            for table in alone + together:
                if stop is not None and stop.is_set():
                    raise Stopped()
                if together and table is together[0]:
                    copies = pgsource.CopyOuts(conn, together)
                out.append(_copy_table(
                    vault, conn, reader, table, progress, previous, spools, first_range, stop,
                    deltas_off_thread=CORES >= DELTAS_OFF_THREAD_CORES_PER_JOB * jobs,
                    copies=copies))
        except BaseException:
            if copies is not None:   # the snapshot fails: the server need not send the rest
                copies.close(cancel=True)
            raise
        if copies is not None:
            copies.close()
        return out

    # Largest first, so the long tables start early and the small ones fill the gaps.
    batches = _batches(sorted(tables, key=lambda t: -t.size))
    # Many tables: the leader only holds the snapshot and every table's lock, as
    # pg_dump -j's does, and worker connections (at least one) do the reading.
    passive = len(tables) > LEADER_READS_MAX_TABLES
    if (jobs == 1 and not passive) or not tables:
        return [e for batch in batches for e in look_or_copy(leader, batch)], looked

    # A table larger than its share of the work is read in key ranges by several
    # connections at once.  Their spools go first in the queue: every spool is being
    # read before any table's writer can wait for one, so nothing waits forever.  (Not
    # a table to look at first: mostly it has not changed.)
    share = sum(t.size for t in tables) / jobs
    spools: list[Spool] = []
    tasks: list[tuple[list[pgsource.TableInfo], list[Spool], tuple | None]] = []
    for batch in batches:
        table = batch[0]
        parts = (min(jobs, math.ceil(table.size / share))
                 if (share and table.size >= SPLIT_MIN_BYTES and table.oid not in looks
                     and len(batch) == 1) else 1)
        if table.physical:
            parts = min(parts, max(1, CORES // 2))
        ranges = ((pgsource.block_ranges if table.physical else pgsource.key_ranges)(
                      leader, table, parts) if parts > 1 else None)
        if ranges:
            mine = [Spool(table, r) for r in ranges[1:]]
            spools += mine
            tasks.append((batch, mine, ranges[0]))
        else:
            tasks.append((batch, [], None))
    queue: list = [*spools, *tasks]

    lock = threading.Condition()
    results: list[TableEntry] = []
    stop = threading.Event()
    # Tables to look at that a worker could not lock: the leader, which holds every
    # lock, looks at them itself, as it did at all of them before -j looked at once.
    for_leader: list = []
    busy = 0   # workers with a task, which may yet hand it to the leader

    def take(is_leader: bool):
        nonlocal busy
        with lock:
            while True:
                if is_leader and for_leader:
                    return for_leader.pop(0)
                if queue and not (is_leader and passive):
                    busy += not is_leader
                    return queue.pop(0)
                if not is_leader or stop.is_set() or not (busy or (passive and queue)):
                    return None
                lock.wait(0.1)

    def work(conn: psycopg.Connection, is_leader: bool) -> None:
        nonlocal busy
        done = 0   # tables locked in this transaction
        while not stop.is_set() and (task := take(is_leader)) is not None:
            try:
                size = 1 if isinstance(task, Spool) else len(task[0])
                if not is_leader and done and done + size > WORKER_TABLES_PER_TRANSACTION:
                    # Give back the locks taken so far (the leader holds every table's).
                    conn.execute("COMMIT")
                    pgsource.begin_snapshot(conn, snapshot_name)
                    done = 0
                done += run(conn, is_leader, task)
            finally:
                if not is_leader:
                    with lock:
                        busy -= 1
                        lock.notify_all()

    def run(conn: psycopg.Connection, is_leader: bool, task) -> int:
        """Do ``task``; the number of tables this connection locked for it."""
        batch = [task.table] if isinstance(task, Spool) else task[0]
        if not is_leader:
            # The leader holds the locks; a worker that must wait for one means someone
            # asked for an exclusive lock in between (pg_dump's parallel.c avoids the
            # same deadlock this way).
            if not pgsource.lock_tables_nowait(conn, batch):
                if len(batch) > 1:   # which of them: each on its own, next
                    with lock:
                        queue[:0] = [([t], [], None) for t in batch]
                        lock.notify_all()
                    return 0
                if batch[0].oid in looks and not isinstance(task, Spool):
                    with lock:
                        for_leader.append(task)
                    return 0
                raise lock_conflict(batch[0])
        if isinstance(task, Spool):
            task.fill(conn, reader, progress)
            return 1
        entries = look_or_copy(conn, batch, *task[1:], stop)
        with lock:
            results.extend(entries)
        return len(batch)

    def worker() -> None:
        conn = pgsource.connect(conninfo, "for a parallel worker")
        try:
            pgsource.setup_session(conn, encoding)
            pgsource.begin_snapshot(conn, snapshot_name)
            work(conn, False)
            conn.execute("COMMIT")
        finally:
            conn.close()

    try:
        workers = jobs if passive else jobs - 1
        with ThreadPoolExecutor(max_workers=workers + 1) as pool:
            futures = [pool.submit(work, leader, True)] + [pool.submit(worker)
                                                           for _ in range(workers)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                stop.set()
            wait(futures)
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise first_cause(errors)
    finally:
        for spool in spools:
            spool.close()
    return results, looked


def _batches(tables: list[pgsource.TableInfo]) -> list[list[pgsource.TableInfo]]:
    """``tables`` in order, in batches for one reader each: a table under BATCH_BYTES
    joins the batch of the last one before it, up to BATCH_TABLES tables (and no more
    than a worker reads in one transaction) and BATCH_BYTES; a larger table is a
    batch of its own."""
    most = min(BATCH_TABLES, WORKER_TABLES_PER_TRANSACTION)
    out: list[list[pgsource.TableInfo]] = []
    open_batch: list[pgsource.TableInfo] = []
    size = 0
    for table in tables:
        if table.size >= BATCH_BYTES:
            out.append([table])
            continue
        if not open_batch or len(open_batch) >= most or size + table.size > BATCH_BYTES:
            open_batch, size = [], 0
            out.append(open_batch)
        open_batch.append(table)
        size += table.size
    return out


def lock_conflict(table: pgsource.TableInfo) -> SnapshotFailed:
    """A reader that joins the snapshot takes its lock with NOWAIT: waiting behind a
    queued exclusive lock, which waits for the leader's lock, would never end."""
    return SnapshotFailed(f"Another session is waiting for an exclusive lock on {table.qname}; "
                          "take the snapshot again when that DDL is done. No snapshot was written.")


def _copy_table(vault: Vault, conn: psycopg.Connection, reader: pgsource.PsqlReader | None,
                table: pgsource.TableInfo, progress: Progress,
                previous: dict[tuple[str, str], Stream],
                spools: list[Spool] = (), first_range: tuple | None = None,
                stop: threading.Event | None = None, deltas_off_thread: bool = False,
                copies: pgsource.CopyOuts | None = None) -> TableEntry:
    """Read and store one table; when it is split, its first range from ``conn``
    and then the later ranges from their ``spools``, in order; from ``copies`` if
    it is one of them."""
    rows: list[int] = []

    def counted():
        for buf in copy_out(conn, reader, table, first_range, rows, copies):
            progress.advance(len(buf))
            yield buf
        for spool in spools:
            yield from spool.read(stop)
            rows.extend(spool.rows)

    try:
        stream, _ = vault.write_stream(counted(), previous.get((table.schema, table.name)),
                                       count_rows=False, deltas_off_thread=deltas_off_thread)
    except psycopg.Error as exc:
        exc.add_note(f"while reading {table.qname}")
        if isinstance(exc, psycopg.errors.LockNotAvailable):   # an OperationalError too
            raise lock_conflict(table) from exc
        if isinstance(exc, (psycopg.OperationalError, psycopg.errors.InsufficientPrivilege)):
            raise
        raise SnapshotFailed(f"Reading {table.qname} failed: {pgsource.pg_message(exc)}. "
                             "No snapshot was written.") from exc
    progress.table_done(table.qname)
    return _entry(table, sum(rows), stream, table.physical)
