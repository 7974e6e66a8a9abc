"""Restore: a snapshot manifest back into SQL, live or as a script.

A *plan* is the ordered list of what a restore does:

1. pre-data DDL (types, tables, functions; large objects are created here);
2. every table's data, by ``COPY ... FROM STDIN``;
3. sequence values and large object contents;
4. post-data DDL (indexes, constraints, triggers, policies, and
   ``REFRESH MATERIALIZED VIEW`` last, as pg_dump orders it).

Data is loaded before constraints and triggers exist, so triggers do not fire
and circular foreign keys do not matter.  A ``--data-only`` restore into an
existing schema sets ``session_replication_role = replica`` instead (which
needs a superuser), so triggers and foreign-key checks stay quiet.

The same plan runs against a live database (in one transaction: a failure
leaves the target as it was) or is written as a script for
``psql -X -v ON_ERROR_STOP=1 -f`` (also one transaction).  Every chunk is
re-hashed as it is read; a damaged one stops the restore, naming the table.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

from typing import TYPE_CHECKING

from . import interrupts, pgtools
from .pgtools import python_codec
from .errors import (DatabaseError, FpvaultError, RepositoryDamaged, RestoreFailed, Stopped,
                     UsageError, first_cause)
from .chunkstore import ChunkRef
from .manifest import LargeObject, SequenceState, Snapshot, Stream, TableEntry
from .vault import Vault

if TYPE_CHECKING:
    import psycopg

# psycopg (and pgsource, which needs it) is imported by the functions that talk to a
# database: writing a script needs neither, and importing psycopg takes a quarter of
# a second, a fifth of `restore -o`'s time on a small database.


@dataclass
class Options:
    schema_only: bool = False
    data_only: bool = False
    tables: tuple[str, ...] = ()
    no_owner: bool = False
    no_privileges: bool = False


@dataclass
class Plan:
    snapshot_id: str
    snapshot: Snapshot
    options: Options
    pre_data: bytes = b""
    post_data: bytes = b""
    tables: list[TableEntry] = field(default_factory=list)
    sequences: list[SequenceState] = field(default_factory=list)
    large_objects: list[LargeObject] = field(default_factory=list)


# -- choosing what to restore

def parse_name(text: str) -> tuple[str | None, str]:
    """``schema.table`` as PostgreSQL reads it: quoted parts keep case, others fold."""
    parts, i, n = [], 0, len(text)
    while i <= n:
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise UsageError(f"Unbalanced quotes in table name {text!r}.")
                buf.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            parts.append("".join(buf))
        else:
            k = text.find(".", i)
            k = n if k < 0 else k
            parts.append(text[i:k].strip().lower())
            i = k
        if i < n and text[i] != ".":
            raise UsageError(f"Cannot read table name {text!r}; write it as schema.table.")
        i += 1
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise UsageError(f"Cannot read table name {text!r}; write it as schema.table.")


def select_tables(snap: Snapshot, patterns: tuple[str, ...], sid: str = "",
                  where: str = "") -> list[TableEntry]:
    """The tables ``patterns`` name (-t), in the snapshot's order; ``where`` says which
    snapshot(s) ``snap`` stands for in messages (by default ``sid``)."""
    where = where or f"snapshot {sid[:8]}"
    if not patterns:
        return list(snap.tables)
    chosen: dict[int, TableEntry] = {}
    for pattern in patterns:
        schema, name = parse_name(pattern)
        hits = [t for t in snap.tables if t.name == name and (schema is None or t.schema == schema)]
        if not hits and pattern == pattern.strip() and '"' not in pattern:
            # Be kind to `-t MyTable`: PostgreSQL would fold it, but the user meant the case.
            schema2, name2 = (pattern.split(".", 1) if "." in pattern else (None, pattern))
            hits = [t for t in snap.tables
                    if t.name == name2 and (schema2 is None or t.schema == schema2)]
        if not hits:
            raise UsageError(f"There is no table {pattern!r} in {where}; 'fpvault show "
                             f"{sid[:8] or 'SNAPSHOT'}' lists its tables.")
        if len(hits) > 1:
            raise UsageError(f"Table name {pattern!r} is ambiguous in {where} "
                             f"({', '.join(t.qname for t in hits)}); qualify it with its schema.")
        chosen[id(hits[0])] = hits[0]
    return [t for t in snap.tables if id(t) in chosen]


def make_plan(vault: Vault, sid: str, snap: Snapshot, opts: Options) -> Plan:
    if opts.schema_only and opts.data_only:
        raise UsageError("--schema-only and --data-only exclude each other.")
    plan = Plan(sid, snap, opts)
    plan.tables = select_tables(snap, opts.tables, sid)
    if not opts.schema_only:
        if opts.tables:
            owned = {q for t in plan.tables for q in t.owned_sequences}
            plan.sequences = [s for s in snap.sequences if s.qname in owned]
        else:
            plan.sequences = list(snap.sequences)
            plan.large_objects = list(snap.large_objects)
    if not opts.data_only:
        plan.pre_data, plan.post_data = _schema_sql(vault, sid, snap, plan.tables, opts)
    elif not opts.tables:
        # pg_dump puts REFRESH MATERIALIZED VIEW in post-data, but it is data: a data-only
        # restore of the whole snapshot must refill the views that were populated.
        plan.post_data = _matview_refresh_sql(vault, sid, snap)
    if opts.schema_only:
        plan.tables = []
    return plan


def _schema_sql(vault: Vault, sid: str, snap: Snapshot, tables: list[TableEntry],
                opts: Options) -> tuple[bytes, bytes]:
    if not (opts.tables or opts.no_owner or opts.no_privileges):
        return (_read(vault, snap.schema.pre_data, "the schema", sid),
                _read(vault, snap.schema.post_data, "the schema", sid))
    # Anything but the whole schema as dumped: let pg_restore do it from the archive.
    keep = (lambda toc: _table_entries(toc, tables)) if opts.tables else None
    return _archive_sections(vault, sid, snap, keep, no_owner=opts.no_owner,
                             no_privileges=opts.no_privileges)


def _matview_refresh_sql(vault: Vault, sid: str, snap: Snapshot) -> bytes:
    """The REFRESH MATERIALIZED VIEW statements of the snapshot's post-data, alone."""
    if b"REFRESH MATERIALIZED VIEW " not in _read(vault, snap.schema.post_data, "the schema", sid):
        return b""
    return _archive_sections(vault, sid, snap,
                             lambda toc: [e for e in toc
                                          if e.rest.startswith("MATERIALIZED VIEW DATA ")])[1]


def _archive_sections(vault: Vault, sid: str, snap: Snapshot,
                      keep: Callable[[list[pgtools.TocEntry]], list[pgtools.TocEntry]] | None,
                      *, no_owner: bool = False,
                      no_privileges: bool = False) -> tuple[bytes, bytes]:
    """pre-data and post-data SQL of the snapshot's schema archive, by pg_restore;
    with ``keep``, only the archive entries it picks from the whole list."""
    major = int(snap.source.pg_dump_version.split(".")[0] or 0)
    pg_restore = pgtools.find_tool("pg_restore", major, "to read the snapshot's schema archive")
    with tempfile.TemporaryDirectory(prefix="fpvault-") as tmp:
        archive = os.path.join(tmp, "schema.dump")
        with open(archive, "wb") as f:
            f.write(_read(vault, snap.schema.archive, "the schema", sid))
        use_list = None
        if keep is not None:
            use_list = os.path.join(tmp, "toc.list")
            # Names are printed in the database's encoding: decoded as UTF-8, a LATIN1
            # table's comment or grant would not match its name, and be left out.
            codec = python_codec(snap.source.encoding)
            toc = pgtools.archive_toc(pg_restore, archive, codec)
            with open(use_list, "w", encoding=codec, errors="replace") as f:
                for e in keep(toc):
                    f.write(e.line + "\n")
        kw = {"no_owner": no_owner, "no_privileges": no_privileges, "use_list": use_list}
        return (pgtools.archive_sql(pg_restore, archive, "pre-data", **kw),
                pgtools.archive_sql(pg_restore, archive, "post-data", **kw))


def _tag_names(name: str) -> tuple[str, ...]:
    """How pg_restore -l may write a name in a comment's or grant's tag: as is, or
    quoted (pg_dump quotes names that need it there)."""
    quoted = '"' + name.replace('"', '""') + '"'
    return (name, quoted) if quoted != name else (name,)


def _table_entries(toc: list[pgtools.TocEntry], tables: list[TableEntry]
                   ) -> list[pgtools.TocEntry]:
    """The archive entries of these tables' definitions (``_belongs``), and the
    comments on their indexes, which name an index the entries so far name."""
    chosen = [e for e in toc if _belongs(e, tables)]
    comments = []
    for t in tables:
        prefix = f"INDEX {t.schema} "
        for e in chosen:
            if e.oid in t.related_oids and e.rest.startswith(prefix):
                name = e.rest[len(prefix):].rsplit(" ", 1)[0]      # "INDEX schema name owner"
                comments += [f"COMMENT {t.schema} INDEX {n} " for n in _tag_names(name)]
    if not comments:
        return chosen
    picked = {id(e) for e in chosen}
    return [e for e in toc if id(e) in picked or (e.catalog == 0 and e.oid == 0
                                                  and e.rest.startswith(tuple(comments)))]


def _belongs(entry: pgtools.TocEntry, tables: list[TableEntry]) -> bool:
    """Whether a schema archive entry is part of one of these tables' definitions."""
    for t in tables:
        if entry.oid == t.oid or entry.oid in t.related_oids:
            return True
        if entry.catalog == 0 and entry.oid == 0 and _belongs_by_tag(entry.rest, t):
            return True
    return False


def _belongs_by_tag(rest: str, t: TableEntry) -> bool:
    """Entries without an oid (comments, grants, OWNED BY) name what they belong to."""
    prefixes = []
    for name in _tag_names(t.name):
        prefixes += [f"{what} {t.schema} TABLE {name} " for what in ("COMMENT", "ACL")]
        prefixes += [f"{what} {t.schema} COLUMN {name}." for what in ("COMMENT", "ACL")]
    for qname in t.owned_sequences:
        seq_schema, seq = parse_name(qname)
        prefixes.append(f"SEQUENCE OWNED BY {seq_schema} {seq} ")
        for name in _tag_names(seq):
            prefixes += [f"{what} {seq_schema} SEQUENCE {name} " for what in ("COMMENT", "ACL")]
    if rest.startswith(tuple(prefixes)):
        return True
    # COMMENT schema CONSTRAINT|TRIGGER|POLICY|RULE name ON table owner
    for kind in ("CONSTRAINT", "TRIGGER", "POLICY", "RULE"):
        if rest.startswith(f"COMMENT {t.schema} {kind} "):
            return any(f" ON {name} " in rest for name in _tag_names(t.name))
    return False


def _read(vault: Vault, stream: Stream, what: str, sid: str = "") -> bytes:
    try:
        return vault.read_bytes(stream)
    except RepositoryDamaged as exc:
        raise RepositoryDamaged(f"Snapshot {sid[:8]}: {what} cannot be read: "
                                f"{str(exc).rstrip('.')}.") from exc


def table_chunks(vault: Vault, plan: Plan, table: TableEntry,
                 part: list[ChunkRef] | None = None) -> Iterator[bytes]:
    """The table's COPY data; with ``part``, those of its chunks only (load_parts)."""
    try:
        if part is None:
            yield from vault.read_stream(table.data)
            return
        for i, chunk in enumerate(vault.read_refs(part), 1):
            if i == len(part) and not chunk.endswith(b"\n"):
                # load_parts cuts only after a chunk that ends a row; a chunk list that
                # said so wrongly would have COPY take half a row as a row.
                raise RestoreFailed(f"Snapshot {plan.snapshot_id[:8]}, table {table.qname}: a "
                                    "part of its data loaded on its own does not end with a "
                                    "whole row, and was rolled back. The database holds a "
                                    "partial restore: drop it and restore with -j 1.")
            yield chunk
    except RepositoryDamaged as exc:
        raise RepositoryDamaged(f"Snapshot {plan.snapshot_id[:8]}, table {table.qname}: "
                                f"{str(exc).rstrip('.')}. The restore was stopped; run 'fpvault "
                                "verify' to see what else is affected.") from exc


# With -j, a table larger than its share of the data (and than this) is loaded as
# several parts at once, one COPY each, as snap reads it in key ranges: otherwise
# the largest table's COPY and then its index builds are the whole restore's
# critical path while the other connections wait (pgbench -s 50: 84% of the data
# in one table; docs/benchmarks.md, snap_bench).
LOAD_SPLIT_MIN_BYTES = 64 * 1024 * 1024
# restore -j loads a table this large or larger frozen, emptying it first in the same
# transaction (its TRUNCATE gives it new files); a smaller one is loaded as it is.  On
# 3,400 tables of 20 rows the TRUNCATEs took 10 s of a 27 s restore, to spare a later
# VACUUM FREEZE a few pages per table.
FREEZE_MIN_BYTES = 1024 * 1024
# Where the target's CONNINFO came from, for messages.
TARGET_OPTION = "the target's CONNINFO (restore --to, verify --restore-test)"


def _chunk_list(vault: Vault, plan: Plan, table: TableEntry) -> list[ChunkRef]:
    try:
        return vault.store.get_list(bytes.fromhex(table.data.list))
    except RepositoryDamaged as exc:
        raise RepositoryDamaged(f"Snapshot {plan.snapshot_id[:8]}, table {table.qname}: "
                                f"{str(exc).rstrip('.')}. Nothing was restored; run 'fpvault "
                                "verify' to see what else is affected.") from exc


def load_parts(refs: list[ChunkRef], parts: int) -> list[list[ChunkRef]]:
    """``refs`` in up to ``parts`` consecutive runs of about equal size, each of whole
    rows: a run ends only after a chunk that ends a row."""
    total = sum(ref.size for ref in refs)
    out: list[list[ChunkRef]] = [[]]
    done = 0
    for i, ref in enumerate(refs):
        out[-1].append(ref)
        done += ref.size
        if (len(out) < parts and not ref.cut_in_row and i + 1 < len(refs)
                and done >= total * len(out) / parts):
            out.append([])
    return out


def lo_chunks(vault: Vault, plan: Plan, lo: LargeObject) -> Iterator[bytes]:
    try:
        yield from vault.read_stream(lo.data)
    except RepositoryDamaged as exc:
        raise RepositoryDamaged(f"Snapshot {plan.snapshot_id[:8]}, large object {lo.oid}: "
                                f"{str(exc).rstrip('.')}. Run 'fpvault verify'.") from exc


def copy_in_statement(table: TableEntry, freeze: bool = False) -> str:
    """``freeze``: the rows go in frozen and their pages all-visible, as VACUUM
    FREEZE would leave them; only into a table created in the same transaction."""
    cols = f" ({', '.join(_identifier(c) for c in table.columns)})" if table.columns else ""
    return f"COPY {table.qname}{cols} FROM STDIN" + (" WITH (FREEZE)" if freeze else "")


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'   # as psycopg.sql.Identifier quotes it


# -- into a live database

def to_database(vault: Vault, plan: Plan, conninfo: str,
                progress: Callable[[str], None] | None = None,
                before_commit: Callable[[psycopg.Cursor], None] | None = None,
                commit: bool = True, jobs: int = 1) -> None:
    """Run the plan in one transaction.  ``before_commit`` sees the restored data
    inside that transaction; with ``commit=False`` it is rolled back afterwards
    (verify --restore-test leaves its scratch database as it found it).

    With ``jobs`` > 1, tables load over that many connections instead, each in
    a transaction of its own: faster, but a failure leaves a partial restore."""
    import psycopg

    from . import pgsource
    say = progress or (lambda _msg: None)
    if (jobs > 1 and before_commit is None and commit
            and (len(plan.tables) > 1
                 or any(t.data.bytes >= LOAD_SPLIT_MIN_BYTES for t in plan.tables))):
        return _to_database_parallel(vault, plan, conninfo, jobs, say)
    conn = pgsource.connect(conninfo, "to restore into", TARGET_OPTION)
    where = pgsource.describe(conninfo)
    step = "starting"
    try:
        _check_target(conn, plan, where)
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            _set_encoding(cur, plan)
            if plan.options.data_only:
                cur.execute("SET LOCAL session_replication_role = replica")
            if plan.pre_data:
                step = "the pre-data schema"
                say("schema (pre-data)")
                cur.execute(plan.pre_data)
                # The archive's SQL empties search_path (our COPY names are qualified) and
                # sets the client encoding it was dumped in: the data's is the database's.
                _set_encoding(cur, plan)
            # The pre-data just created every table, in this transaction: COPY FREEZE
            # spares the restored database a VACUUM FREEZE of every page later.  (Not
            # an extension's configuration table, which may hold the extension's rows.)
            freeze = bool(plan.pre_data) and not plan.options.data_only
            for table in plan.tables:
                step = f"the data of {table.qname}"
                say(table.qname)
                with cur.copy(copy_in_statement(table, freeze and not table.extension)) as copy:
                    for chunk in table_chunks(vault, plan, table):
                        copy.write(chunk)
            for seq in plan.sequences:
                step = f"sequence {seq.qname}"
                cur.execute("SELECT pg_catalog.setval(%s::regclass, %s, %s)",
                            (seq.qname, seq.last_value, seq.is_called))
            for lo in plan.large_objects:
                step = f"large object {lo.oid}"
                _restore_lo(cur, vault, plan, lo)
            if plan.post_data:
                step = "the post-data schema (indexes, constraints, triggers)"
                say("schema (post-data)")
                cur.execute(plan.post_data)
            if before_commit is not None:
                step = "the check of the restored data"
                before_commit(cur)
            step = "commit"
            if commit:
                # Once it commits, the restore is done: Ctrl-C or SIGTERM meanwhile no
                # longer makes the restore say it was rolled back (interrupts).
                with interrupts.durable("the restore was committed",
                                        "It came as the restore was committing: whether it "
                                        "did is not known; look in the database."):
                    cur.execute("COMMIT")
            else:
                cur.execute("ROLLBACK")
    except psycopg.OperationalError as exc:
        if not pgsource.connection_lost(exc):
            raise RestoreFailed(f"Restoring {step} into {where} failed: "
                                f"{pgsource.pg_message(exc)}.{_hint(exc)} The restore was rolled "
                                "back; the database is as it was.") from exc
        if step == "commit":
            raise DatabaseError(f"Lost the connection to {where} as the restore committed: "
                                f"{pgsource.pg_message(exc)}. Whether it did is not known: "
                                "look in the database.") from exc
        raise DatabaseError(f"Lost the connection to {where} while restoring {step}: "
                            f"{pgsource.pg_message(exc)}. The restore was rolled back.") from exc
    except psycopg.Error as exc:
        raise _refused(exc)(f"Restoring {step} into {where} failed: {pgsource.pg_message(exc)}."
                            f"{_hint(exc)} The restore was rolled back; the database is as it "
                            "was.") from exc
    finally:
        conn.close()


def _session(cur: psycopg.Cursor, plan: Plan) -> None:
    _set_encoding(cur, plan)
    if plan.options.data_only:
        cur.execute("SET session_replication_role = replica")


def _set_encoding(cur: psycopg.Cursor, plan: Plan) -> None:
    """COPY data is in the source database's encoding."""
    cur.execute(f"SET client_encoding = {_literal(plan.snapshot.source.encoding)}")


# Post-data entries that -j builds over several connections at once, as pg_restore -j
# does: indexes, and primary key, unique, check and exclusion constraints.  Each locks
# only its own table.  The rest (foreign keys, which need those keys; triggers, rules,
# policies, comments) follows on one connection, in the dump's order.
_PARALLEL_POST_DATA = {"INDEX", "CONSTRAINT"}
# restore -j commits pre-data, and the post-data it runs on one connection (foreign
# keys, policies, comments), after this many entries: a transaction holds a lock on
# each object it creates or alters until it commits, and either section of 3,000
# tables did not fit a lock table that pg_restore -j's statements fitted.
SCHEMA_ENTRIES = 500


def schema_parts(schema_sql: bytes) -> list[bytes]:
    """pg_restore's SQL of a section in parts of at most SCHEMA_ENTRIES entries, cut
    at entry headers (pgtools.entry_headers), for restore -j to commit one by one
    (the first with the preamble's settings, which last for the session).  Whole if
    the headers cannot be read for sure."""
    heads = pgtools.entry_headers(schema_sql)
    if not heads or len(heads) <= SCHEMA_ENTRIES:
        return [schema_sql]
    cuts = [0, *(m.start() for m in heads[SCHEMA_ENTRIES::SCHEMA_ENTRIES]), len(schema_sql)]
    return [schema_sql[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def split_post_data(post_data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(preamble, the entries that can be built in parallel, the rest with the preamble)
    of pg_restore's post-data SQL.  Nothing is split when partitioned indexes are
    attached (INDEX ATTACH): building a parent's index locks its partitions, which
    could deadlock against a partition's own constraint.  The entries are found by
    their headers, outside strings and quoted names (pgtools.entry_headers): a
    policy's expression can imitate one."""
    heads = pgtools.entry_headers(post_data)
    if not heads:   # (None: a name holds a header's separators; run it whole)
        return b"", [], post_data
    types = [m.group(2).decode("utf-8", "replace") for m in heads]
    if "INDEX ATTACH" in types:
        return b"", [], post_data
    ends = [*(m.start() for m in heads[1:]), len(post_data)]
    preamble = post_data[:heads[0].start()]
    parallel, rest = [], [preamble]
    for m, kind, end in zip(heads, types, ends):
        entry = post_data[m.start():end]
        (parallel if kind in _PARALLEL_POST_DATA else rest).append(entry)
    return preamble, parallel, b"".join(rest)


# The table a parallel post-data entry builds on, as pg_dump names it (the same quoting
# as a manifest's qname): "ALTER TABLE ONLY t ADD CONSTRAINT" or "CREATE INDEX i ON t".
_QNAME = rb'(?:"(?:[^"]|"")+"|[^\s."]+)\.(?:"(?:[^"]|"")+"|[^\s."(]+)'
_ENTRY_TABLE = re.compile(rb"^(?:ALTER TABLE ONLY (" + _QNAME + rb")\s|CREATE (?:UNIQUE )?INDEX "
                          rb".*? ON (?:ONLY )?(" + _QNAME + rb") USING )", re.M)


def entry_table(entry: bytes, encoding: str = "UTF8") -> str | None:
    """``entry`` is SQL in the database's ``encoding``, as pg_dump wrote it."""
    m = _ENTRY_TABLE.search(entry)
    return (m.group(1) or m.group(2)).decode(python_codec(encoding)) if m else None


def _to_database_parallel(vault: Vault, plan: Plan, conninfo: str, jobs: int,
                          say: Callable[[str], None]) -> None:
    """pre-data; then over ``jobs`` connections the tables, largest first (a table
    larger than its share in parts: ``load_parts``), each followed as soon as it
    is loaded by its indexes and key constraints (as pg_restore -j schedules
    them); then sequences, large objects and the rest of post-data on one
    connection.  Each step commits on its own."""
    import psycopg

    from . import pgsource
    where = pgsource.describe(conninfo)
    state: dict = {"step": "starting", "committed": False}
    stop = threading.Event()
    vault.store.size_caches(jobs)   # a stream (or part of one) per connection
    created = bool(plan.pre_data) and not plan.options.data_only   # the tables, by pre-data
    preamble, parallel, post_data = split_post_data(plan.post_data)
    restored = {t.qname for t in plan.tables}
    builds: dict[str | None, list[bytes]] = {}
    for entry in parallel:
        table = entry_table(entry, plan.snapshot.source.encoding)
        builds.setdefault(table if table in restored else None, []).append(entry)
    # Work items: ("load", (table, part)) or ("build", entry), largest loads first.  A
    # table's builds go to the front of the queue when all its parts are in; builds on
    # no restored table wait for all loads.
    loads: list[tuple[int, TableEntry, list[ChunkRef] | None]] = []
    share = sum(t.data.bytes for t in plan.tables) / jobs
    parts_left: dict[str, int] = {}
    for t in plan.tables:
        parts = (min(jobs, math.ceil(t.data.bytes / share))
                 if share and t.data.bytes >= LOAD_SPLIT_MIN_BYTES else 1)
        pieces = load_parts(_chunk_list(vault, plan, t), parts) if parts > 1 else [None]
        loads += [(sum(r.size for r in p) if p else t.data.bytes, t, p) for p in pieces]
        parts_left[t.qname] = len(pieces)
    loads.sort(key=lambda item: -item[0])
    queue: deque = deque(("load", (t, part)) for _, t, part in loads)
    loads_left = len(plan.tables)
    ready = threading.Condition()

    def next_item():
        with ready:
            while not stop.is_set():
                if queue:
                    return queue.popleft()
                if loads_left == 0:
                    return None
                ready.wait()
            return None

    def loaded(table: TableEntry) -> None:
        nonlocal loads_left
        with ready:
            parts_left[table.qname] -= 1
            if parts_left[table.qname]:
                return
            loads_left -= 1
            queue.extendleft(("build", e) for e in reversed(builds.pop(table.qname, [])))
            if loads_left == 0:
                queue.extend(("build", e) for e in builds.pop(None, []))
            ready.notify_all()

    def worker() -> None:
        item = next_item()
        if item is None:
            return
        conn = pgsource.connect(conninfo, "to restore into", TARGET_OPTION)
        try:
            with conn.cursor() as cur:
                if preamble:
                    cur.execute(preamble)
                _session(cur, plan)
                while item is not None:
                    kind, what = item
                    if kind == "load":
                        table, part = what
                        cur.execute("BEGIN")   # (a post-data entry commits as it runs)
                        try:
                            # As pg_restore -j does, a table loaded whole is emptied
                            # first in the same transaction (it is empty: pre-data
                            # made it): so it can be loaded frozen, as with -j 1.  Not
                            # an extension's configuration table: CREATE EXTENSION may
                            # have put rows of its own there, which the dump leaves out.
                            # And not a small table, where the TRUNCATE costs more
                            # than freezing its few pages later would.
                            freeze = (created and part is None and not table.extension
                                      and table.data.bytes >= FREEZE_MIN_BYTES
                                      and cur.execute(
                                          "SELECT pg_catalog.has_table_privilege(%s, "
                                          "'TRUNCATE')", (table.qname,)).fetchone()[0])
                            if freeze:
                                cur.execute(f"TRUNCATE ONLY {table.qname}")
                            with cur.copy(copy_in_statement(table, freeze)) as copy:
                                for chunk in table_chunks(vault, plan, table, part):
                                    if stop.is_set():
                                        raise Stopped()
                                    copy.write(chunk)
                        except psycopg.Error as exc:
                            exc.add_note(table.qname)
                            state["step"] = f"the data of {table.qname}"
                            raise
                    else:
                        try:
                            cur.execute(what)
                        except psycopg.Error:
                            state["step"] = "the post-data schema (indexes, constraints)"
                            raise
                    if kind == "load":
                        cur.execute("COMMIT")
                        loaded(what[0])
                    item = next_item()
        except BaseException:
            stop.set()
            with ready:
                ready.notify_all()
            raise
        finally:
            conn.close()

    conn = pgsource.connect(conninfo, "to restore into", TARGET_OPTION)
    try:
        _check_target(conn, plan, where)
        with conn.cursor() as cur:
            _session(cur, plan)
            if plan.pre_data:
                state["step"] = "the pre-data schema"
                say("schema (pre-data)")
                # In transactions of SCHEMA_ENTRIES entries: one transaction holds a
                # lock on everything it creates until it commits.
                for part in schema_parts(plan.pre_data):
                    cur.execute("BEGIN")
                    cur.execute(part)
                    cur.execute("COMMIT")
                    state["committed"] = True
            state["committed"] = True
            state["step"] = "the data"
            say("data, indexes and key constraints")
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(worker) for _ in range(jobs)]
                wait(futures)
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise first_cause(errors)
            cur.execute("BEGIN")
            for seq in plan.sequences:
                state["step"] = f"sequence {seq.qname}"
                cur.execute("SELECT pg_catalog.setval(%s::regclass, %s, %s)",
                            (seq.qname, seq.last_value, seq.is_called))
            for lo in plan.large_objects:
                state["step"] = f"large object {lo.oid}"
                _restore_lo(cur, vault, plan, lo)
            cur.execute("COMMIT")
            if post_data:
                state["step"] = "the post-data schema (indexes, constraints, triggers)"
                say("schema (post-data)")
                for part in schema_parts(post_data):
                    cur.execute("BEGIN")
                    cur.execute(part)
                    cur.execute("COMMIT")
    except psycopg.Error as exc:
        partial = (" The database now holds a partial restore (with -j, tables load in "
                   "transactions of their own): drop it and restore again, or use -j 1 to have "
                   "a failure rolled back." if state.get("committed") else
                   " The restore was rolled back; the database is as it was.")
        if isinstance(exc, psycopg.OperationalError) and pgsource.connection_lost(exc):
            raise DatabaseError(f"Lost the connection to {where} while restoring "
                                f"{state['step']}: {pgsource.pg_message(exc)}.{partial}") from exc
        raise _refused(exc)(f"Restoring {state['step']} into {where} failed: "
                            f"{pgsource.pg_message(exc)}.{_hint(exc, parallel=True)}"
                            f"{partial}") from exc
    except RepositoryDamaged as exc:
        if not state.get("committed"):
            raise
        raise RepositoryDamaged(f"{exc} The database now holds a partial restore (with -j, "
                                "tables load in transactions of their own): drop it.") from exc
    except KeyboardInterrupt as exc:   # Ctrl-C, SIGTERM: the CLI says this after its word
        if state.get("committed"):
            exc.add_note(f"{where} now holds a partial restore (with -j, tables load in "
                         "transactions of their own): drop it and restore again.")
        raise
    finally:
        conn.close()


def _check_target(conn: psycopg.Connection, plan: Plan, where: str) -> None:
    with conn.cursor() as cur:
        if plan.options.data_only:
            cur.execute("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
            if not cur.fetchone()[0]:
                raise DatabaseError(
                    f"A --data-only restore into {where} needs a superuser: it sets "
                    "session_replication_role = replica so that triggers do not fire and "
                    "foreign-key cycles load in any order. Connect as a superuser, or restore "
                    "the whole snapshot (schema and data) into an empty database.")
            return
        if plan.options.tables:
            return  # one table into an existing database: its CREATE says if it is there
        cur.execute("""
            SELECT count(*) FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_toast%%' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')""")
        count = cur.fetchone()[0]
        if count:
            raise TargetNotEmpty(where, count)


class TargetNotEmpty(RestoreFailed):
    """A full restore's target database holds tables already."""

    def __init__(self, where: str, count: int,
                 advice: str = "a full restore needs an empty database. Create one (createdb "
                               "NEW) and restore there, or use --data-only to load data into an "
                               "existing schema."):
        super().__init__(f"{where} is not empty ({count} tables, views or sequences); {advice}")
        self.where, self.count = where, count


def _restore_lo(cur: psycopg.Cursor, vault: Vault, plan: Plan, lo: LargeObject) -> None:
    # pre-data creates the large object (lo_create); a data-only restore may find it
    # missing, or present with old contents.
    for stmt in _lo_prepare(lo.oid):
        cur.execute(stmt)
    offset = 0
    for chunk in lo_chunks(vault, plan, lo):
        cur.execute("SELECT pg_catalog.lo_put(%s, %s, %s)", (lo.oid, offset, chunk))
        offset += len(chunk)


def _refused(exc: psycopg.Error) -> type[FpvaultError]:
    """The database refused for lack of privilege: exit 5, as for snap; else 1."""
    import psycopg

    return DatabaseError if isinstance(exc, psycopg.errors.InsufficientPrivilege) else RestoreFailed


def _hint(exc: psycopg.Error, parallel: bool = False) -> str:
    import psycopg

    from . import pgsource
    if isinstance(exc, psycopg.errors.UndefinedObject) and "role" in pgsource.pg_message(exc):
        return (" Roles are global, not part of a database: create them first "
                "(pg_dumpall --globals-only has them), or restore with --no-owner "
                "--no-privileges.")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return (" The role you connect as lacks that privilege: restore as a superuser, or "
                "as a role that may create what the snapshot holds (--no-owner "
                "--no-privileges help only where setting an owner or a grant is refused).")
    if pgsource.out_of_locks(exc) and parallel:
        return (" The server's lock table is full: raise max_locks_per_transaction on the "
                "server (a restart).")
    if pgsource.out_of_locks(exc):
        return (" A restore in one transaction locks everything it creates until it commits: "
                "raise max_locks_per_transaction on the server (a restart), or restore with "
                "-j 2 or more, which commits as it goes.")
    return ""


# -- as a script

def to_script(vault: Vault, plan: Plan, out: BinaryIO) -> None:
    snap = plan.snapshot
    w = out.write
    codec = python_codec(snap.source.encoding)   # what follows SET client_encoding
    w(f"-- fpvault restore script\n-- snapshot {plan.snapshot_id} taken {snap.time} "
      f"of database {snap.source.database!r} (PostgreSQL {snap.source.server_version})\n"
      "-- Load into an empty database with: psql -X -v ON_ERROR_STOP=1 -f FILE\n\n".encode())
    w(b"BEGIN;\n")
    w(f"SET client_encoding = '{snap.source.encoding}';\n".encode())
    w(b"SET standard_conforming_strings = on;\n")
    if plan.options.data_only:
        w(b"SET LOCAL session_replication_role = replica;\n")
    if plan.pre_data:
        w(plan.pre_data)
        w(f"\nSET client_encoding = '{snap.source.encoding}';\n".encode())
    for table in plan.tables:
        w(copy_in_statement(table).encode(codec) + b";\n")
        last = b"\n"
        for chunk in table_chunks(vault, plan, table):
            w(chunk)
            last = chunk[-1:] or last
        if last != b"\n":
            w(b"\n")
        w(b"\\.\n\n")
    for seq in plan.sequences:
        w(f"SELECT pg_catalog.setval({_literal(seq.qname)}, {seq.last_value}, "
          f"{'true' if seq.is_called else 'false'});\n".encode(codec))
    for lo in plan.large_objects:
        for stmt in _lo_prepare(lo.oid):
            w(stmt.encode() + b";\n")
        offset = 0
        for chunk in lo_chunks(vault, plan, lo):
            w(f"SELECT pg_catalog.lo_put({lo.oid}, {offset}, '\\x".encode() + chunk.hex().encode()
              + b"'::bytea);\n")
            offset += len(chunk)
    if plan.post_data:
        w(plan.post_data)
        w(b"\n")
    w(b"COMMIT;\n")


def _lo_prepare(oid: int) -> list[str]:
    """Create the large object if pre-data did not, and empty it (a data-only restore
    may find it with old contents).  131072 is INV_WRITE."""
    return [f"SELECT pg_catalog.lo_create({oid}) WHERE NOT EXISTS (SELECT 1 FROM "
            f"pg_catalog.pg_largeobject_metadata WHERE oid = {oid})",
            f"SELECT pg_catalog.lo_truncate(pg_catalog.lo_open({oid}, 131072), 0)"]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
