"""The PostgreSQL side: connections, the exported snapshot, the catalog, COPY out.

Terms:

- *conninfo*: what the user gave with ``-d``: a database name, ``key=value``
  pairs or a ``postgresql://`` URI; libpq fills in the rest from ``PG*``
  variables, ``~/.pgpass`` and service files, as psql does.
- *leader*: the connection that exports the snapshot and holds it (and the
  ACCESS SHARE locks) open until every reader is done, as pg_dump -j does.
- *worker*: a further connection that joins the exported snapshot.

Sessions are set up like pg_dump's (see ``SESSION_SETTINGS``).  In particular
``row_security = off``: with it on, FORCE ROW LEVEL SECURITY would silently
drop rows; off, a role that cannot bypass RLS gets an error, which is what a
backup wants.  And an empty ``search_path`` and ``TimeZone`` UTC, whatever the
role, the database or the environment say: the same rows print the same
wherever snap runs (but for ``money``, which follows ``lc_monetary`` as with
pg_dump), and reg* values restore.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import blake3
import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import DatabaseError, SnapshotFailed, UsageError
from .pgtools import python_codec

# Every reading session's settings.  An empty search_path, as pg_dump's own session
# has: reg* values (regclass, regtype, ...) print schema-qualified, as a restore, whose
# search_path the archive empties, needs them to load.  TimeZone UTC: timestamptz
# prints in the session's zone, and the same instant must print the same each time
# (pg_dump, which deparses defaults the same way, gets PGTZ: tool_conninfo).  bytea
# in hex, identifiers quoted only where needed (in reg* values), whatever the role
# says (pg_dump's schema text still follows the role's bytea_output and
# quote_all_identifiers: a change there reads every table instead of looking at
# it).  money prints as lc_monetary says, as with pg_dump: not pinned, since a
# restore parses it with the target's.  A snapshot records these
# (manifest.Snapshot.session); tables are taken unread only from a snapshot read
# with the same.
SESSION_SETTINGS = {
    "search_path": "",
    "TimeZone": "UTC",
    "bytea_output": "hex",
    "quote_all_identifiers": "off",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "synchronize_seqscans": "off",
    "statement_timeout": "0",
    "lock_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "row_security": "off",
}

# What snapshots read with before they recorded their settings (an empty
# Snapshot.session): search_path and TimeZone were the environment's.
LEGACY_SESSION_SETTINGS = {k: v for k, v in SESSION_SETTINGS.items()
                           if k not in ("search_path", "TimeZone", "bytea_output",
                                        "quote_all_identifiers")}

# Large objects are read in pieces of this size, to bound memory.
LO_READ_SIZE = 1024 * 1024


def normalize_conninfo(conninfo: str) -> str:
    """psql's rule: a URI or a string with ``=`` is a connection string, anything
    else is a database name."""
    text = conninfo or ""
    if text and "=" not in text and not text.startswith(("postgresql://", "postgres://")):
        return make_conninfo(dbname=text)
    return text


def conninfo_params(conninfo: str) -> dict[str, str]:
    try:
        return conninfo_to_dict(normalize_conninfo(conninfo))
    except psycopg.ProgrammingError as exc:   # a malformed argument: a usage error
        raise UsageError(f"Cannot read the connection string: {str(exc).strip()}. Give a "
                         "database name, key=value pairs or a postgresql:// URI.") from None


def safe_conninfo(conninfo: str) -> tuple[str, str | None]:
    """The conninfo without its password, and the password (for PGPASSWORD)."""
    params = conninfo_params(conninfo)
    password = params.pop("password", None)
    return make_conninfo(**params), password


def tool_conninfo(conninfo: str) -> tuple[str, dict[str, str]]:
    """For pg_dump and psql: the conninfo without its password (it would show in
    ``ps``), and an environment that carries the password instead."""
    safe, password = safe_conninfo(conninfo)
    # pg_dump prints column defaults as the server deparses them: timestamptz in the
    # session's zone.  (A startup parameter that poolers such as PgBouncer accept, as
    # they would not a PGOPTIONS.)
    env = {**os.environ, "PGTZ": SESSION_SETTINGS["TimeZone"]}
    if password is not None:
        env["PGPASSWORD"] = password
    return safe, env


def connect(conninfo: str, purpose: str = "", option: str = "-d/--dbname") -> psycopg.Connection:
    params = conninfo_params(conninfo)
    try:
        conn = psycopg.connect(normalize_conninfo(conninfo), autocommit=True,
                               connect_timeout=params.get("connect_timeout") or 30)
    except psycopg.Error as exc:
        where = describe(conninfo)
        msg = pg_message(exc)
        raise DatabaseError(f"Cannot connect to {where}{' ' + purpose if purpose else ''}: {msg}. "
                            f"Check {option} and the PG* environment variables.") from None
    if conn.info.encoding == "ascii":
        # SQL_ASCII, which libpq takes by default from such a database: psycopg would
        # hand every text value over as bytes.  COPY switches back (copy_out).
        conn.execute("SET client_encoding = 'UTF8'")
    return conn


def pg_message(exc: psycopg.Error) -> str:
    """The first line of what PostgreSQL (or libpq) said, for one-line messages."""
    diag = getattr(exc, "diag", None)
    msg = (diag.message_primary if diag and diag.message_primary else str(exc)).strip()
    return msg.splitlines()[0] if msg else type(exc).__name__


def connection_lost(exc: psycopg.Error) -> bool:
    """Whether the error means the connection is gone (libpq's own errors, class 08,
    the server shutting down), rather than a statement the server failed: psycopg
    raises OperationalError for both, and for "out of shared memory" too."""
    state = getattr(exc, "sqlstate", None)
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def out_of_locks(exc: psycopg.Error) -> bool:
    """The server's lock table is full (each session's locks last until its
    transaction ends; the table holds max_locks_per_transaction per connection)."""
    diag = getattr(exc, "diag", None)
    return (getattr(exc, "sqlstate", None) == "53200"
            and "max_locks_per_transaction" in ((diag and diag.message_hint) or ""))


def describe(conninfo: str) -> str:
    """Where a conninfo points, for messages (never the password)."""
    p = conninfo_params(conninfo)
    db = p.get("dbname") or p.get("user") or "the default database"
    host = p.get("host") or p.get("hostaddr") or ""
    port = p.get("port") or ""
    where = f"{host}:{port}" if host and port else host or (f"port {port}" if port else "")
    return f"database {db!r}" + (f" on {where}" if where else "")


def setup_session(conn: psycopg.Connection, encoding: str | None = None,
                  settings: dict[str, str] | None = None) -> None:
    """``settings`` (else ``SESSION_SETTINGS``); with ``encoding``, COPY streams
    come in it (the database's own encoding, which a restore declares), whatever
    PGCLIENTENCODING says."""
    if encoding == "SQL_ASCII":
        encoding = "UTF8"   # for catalog text; copy_out reads the rows as they are stored
    with conn.cursor() as cur:
        for statement in session_statements(settings or SESSION_SETTINGS, encoding):
            cur.execute(statement)


def session_statements(settings: dict[str, str], encoding: str | None) -> list[sql.Composed]:
    """set_config() calls, as pg_dump empties search_path (SET cannot: ``SET
    search_path = ''`` names a schema called "")."""
    every = {**settings, **({"client_encoding": encoding} if encoding else {})}
    return [sql.SQL("SELECT pg_catalog.set_config({}, {}, false)").format(
                sql.Literal(name), sql.Literal(value)) for name, value in every.items()]


def database_encoding(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT pg_catalog.pg_encoding_to_char(encoding) FROM "
                        "pg_catalog.pg_database WHERE datname = "
                        "pg_catalog.current_database()").fetchone()[0]


@dataclass(frozen=True)
class ServerIdentity:
    system: str
    timeline: int
    started: str
    database_oid: int
    recovered: str   # when the statistics were last reset: crash recovery resets them


def server_identity(conn: psycopg.Connection) -> ServerIdentity | None:
    """Which server, timeline and postmaster start this is, and since when it runs
    without a crash; None on a standby, or if the server does not say (call it
    outside a transaction: an error here aborts nothing).

    After a crash (a backend killed, say), the postmaster stays and restarts the
    rest: its start time is the same, but recovery emptied the unlogged tables,
    and may have lost commits made with synchronous_commit off, without any
    transaction ending.  It also resets the cumulative statistics, so their
    reset time tells.  (pg_stat_reset_shared() moves it too: a snapshot then
    reads what it would have taken unread, which is only slower.)"""
    try:
        row = conn.execute("""
            SELECT pg_catalog.pg_is_in_recovery(),
                   (SELECT system_identifier::text FROM pg_catalog.pg_control_system()),
                   pg_catalog.pg_postmaster_start_time()::text,
                   (SELECT oid::bigint FROM pg_catalog.pg_database
                     WHERE datname = pg_catalog.current_database()),
                   pg_catalog.pg_stat_get_bgwriter_stat_reset_time()::text""").fetchone()
        in_recovery, system, started, db_oid, recovered = row
        if in_recovery or not system:
            return None
        # The timeline is the first 8 hex digits of the current WAL segment's name.
        segment = conn.execute("SELECT pg_catalog.pg_walfile_name("
                               "pg_catalog.pg_current_wal_lsn())").fetchone()[0]
    except psycopg.Error:
        return None
    return ServerIdentity(system, int(segment[:8], 16), started, int(db_oid), recovered or "")


def snapshot_xids(conn: psycopg.Connection) -> str:
    """In the snapshot's transaction: the transactions it sees running (xmin:xmax:xips)."""
    return conn.execute("SELECT pg_catalog.txid_current_snapshot()::text").fetchone()[0]


def begin_snapshot(conn: psycopg.Connection, snapshot: str | None = None) -> str:
    """Start the repeatable-read transaction; export or join a snapshot."""
    with conn.cursor() as cur:
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if snapshot is None:
            cur.execute("SELECT pg_catalog.pg_export_snapshot()")
            return cur.fetchone()[0]
        cur.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        return snapshot


@dataclass
class TableInfo:
    oid: int
    schema: str
    name: str
    qname: str
    relkind: str
    persistence: str
    parent: str | None
    columns: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    related_oids: list[int] = field(default_factory=list)
    owned_sequences: list[str] = field(default_factory=list)
    size: int = 0
    key_kinds: list[str] = field(default_factory=list)
    access_method: str = "heap"
    # A configuration table of an extension (extension_config): the extension's
    # name, and the WHERE clause choosing the rows a dump holds ("": all of them).
    extension: str = ""
    condition: str = ""
    # Read in physical order although it has a key (snap: its first snapshot, when
    # the statistics say the heap is in key order; see in_key_order).
    physical: bool = False

    def copy_statement(self, key_range: tuple[int | None, int | None] | None = None
                       ) -> sql.Composed:
        """COPY of the whole table (of the rows its ``condition`` chooses), or with
        ``key_range`` (lo, hi) of the rows whose single integer key k has
        lo <= k < hi (None: unbounded; not with a condition).  In ``physical``
        order, ``key_range`` is of block numbers: the rows whose ctid is in
        blocks lo <= b < hi (block_ranges)."""
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
        table = sql.SQL(self.qname)
        # As pg_dump pastes it: the extension wrote it as a WHERE clause.
        cond = sql.SQL(" " + self.condition if self.condition else "")
        if key_range is not None and self.condition:
            raise ValueError(f"{self.qname}: a key range of a table with a condition")
        if self.physical:
            if self.condition or not self.columns:
                raise ValueError(f"{self.qname}: physical order needs columns and no condition")
            if key_range is None:
                return sql.SQL("COPY {} ({}) TO STDOUT").format(table, cols)
            # A TID range scan (PostgreSQL 14 and later) reads just those blocks.
            conds = [sql.SQL("ctid {} {}::pg_catalog.tid").format(sql.SQL(op),
                                                                  sql.Literal(f"({block},0)"))
                     for op, block in ((">=", key_range[0]), ("<", key_range[1]))
                     if block is not None]
            return sql.SQL("COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT").format(
                cols, table, sql.SQL(" AND ").join(conds))
        if self.key:
            order = sql.SQL(", ").join(sql.Identifier(c) for c in self.key)
            where = cond
            if key_range is not None:
                k = sql.Identifier(self.key[0])
                conds = ([sql.SQL("{} >= {}").format(k, sql.Literal(key_range[0]))]
                         if key_range[0] is not None else [])
                conds += ([sql.SQL("{} < {}").format(k, sql.Literal(key_range[1]))]
                          if key_range[1] is not None else [])
                where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds)
            # ONLY: an inheritance parent's COPY stream holds its own rows, not its children's.
            return sql.SQL("COPY (SELECT {} FROM ONLY {}{} ORDER BY {}) TO STDOUT").format(
                cols, table, where, order)
        if self.condition:
            return sql.SQL("COPY (SELECT {} FROM ONLY {}{}) TO STDOUT").format(
                cols if self.columns else sql.SQL("*"), table, cond)
        if not self.columns:
            return sql.SQL("COPY {} TO STDOUT").format(table)
        return sql.SQL("COPY {} ({}) TO STDOUT").format(table, cols)


def relations(conn: psycopg.Connection, oids: list[int]) -> dict[int, tuple[str, str, str, str]]:
    """oid -> (relkind, schema, name, qname) for the given pg_class oids."""
    with conn.cursor() as cur:
        cur.execute("""
            SELECT c.oid, c.relkind, n.nspname, c.relname, format('%%I.%%I', n.nspname, c.relname)
            FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = ANY(%s)""", (oids,))
        return {row[0]: tuple(row[1:]) for row in cur.fetchall()}


def table_infos(conn: psycopg.Connection, oids: list[int], *, missing_ok: bool = False
                ) -> list[TableInfo]:
    """What we need to know of each table to copy it and restore it (of those that
    exist, with ``missing_ok``; else all must)."""
    if not oids:
        return []
    with conn.cursor() as cur:
        cur.execute("""
            SELECT c.oid, n.nspname, c.relname, format('%%I.%%I', n.nspname, c.relname),
                   c.relkind, c.relpersistence,
                   (SELECT format('%%I.%%I', pn.nspname, pc.relname)
                      FROM pg_catalog.pg_inherits i
                      JOIN pg_catalog.pg_class pc ON pc.oid = i.inhparent
                      JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
                     WHERE i.inhrelid = c.oid AND pc.relkind = 'p'),
                   pg_catalog.pg_relation_size(c.oid),
                   (SELECT amname FROM pg_catalog.pg_am WHERE oid = c.relam)
            FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = ANY(%s)""", (oids,))
        infos = {r[0]: TableInfo(r[0], r[1], r[2], r[3], r[4], r[5], r[6], size=r[7],
                                 access_method=r[8] or "")
                 for r in cur.fetchall()}
        cur.execute("""
            SELECT attrelid, attname FROM pg_catalog.pg_attribute
            WHERE attrelid = ANY(%s) AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
            ORDER BY attrelid, attnum""", (oids,))
        for relid, attname in cur.fetchall():
            infos[relid].columns.append(attname)
        # The ordering key: the primary key, else the unique, non-partial index on plain
        # NOT NULL columns with the fewest columns.  With it a table's stream is a function
        # of its contents; without it the stream follows physical order.
        cur.execute("""
            SELECT i.indrelid,
                   ARRAY(SELECT a.attname FROM unnest((i.indkey::int2[])[0:i.indnkeyatts - 1])
                         WITH ORDINALITY AS k(attnum, ord)
                         JOIN pg_catalog.pg_attribute a
                           ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                         ORDER BY k.ord)
            FROM pg_catalog.pg_index i
            WHERE i.indrelid = ANY(%s) AND i.indisunique AND i.indisvalid AND i.indimmediate
              AND i.indpred IS NULL AND i.indexprs IS NULL
              AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) k(attnum)
                              JOIN pg_catalog.pg_attribute a
                                ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                              WHERE NOT a.attnotnull OR a.attnum <= 0)
            ORDER BY i.indrelid, i.indisprimary DESC, i.indnkeyatts, i.indexrelid""", (oids,))
        for relid, key in cur.fetchall():
            if not infos[relid].key:
                infos[relid].key = list(key)
        # How Python can order each key column exactly as ORDER BY does, if it can:
        # integers, numeric, uuid, and strings under a bytewise (C-like) collation
        # (char(n) apart: it compares without its trailing blanks).
        cur.execute("""
            SELECT a.attrelid, a.attname,
                   CASE WHEN t.typname IN ('int2', 'int4', 'int8', 'oid') THEN 'int'
                        WHEN t.typname = 'numeric' THEN 'numeric'
                        WHEN t.typname = 'uuid' THEN 'bytes'
                        WHEN t.typname NOT IN ('text', 'varchar', 'bpchar', 'name') THEN ''
                        WHEN CASE WHEN co.collname = 'default'
                                  -- datlocprovider is new in 15; before it, always libc
                                  THEN coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') = 'c'
                                       AND d.datcollate IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8')
                                  ELSE co.collprovider = 'c'
                                       AND co.collcollate IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8')
                             END THEN CASE WHEN t.typname = 'bpchar' THEN 'bpchar'
                                           ELSE 'bytes' END
                        ELSE '' END
            FROM pg_catalog.pg_attribute a
            JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
            LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
            JOIN pg_catalog.pg_database d ON d.datname = pg_catalog.current_database()
            WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped""", (oids,))
        kinds = {(relid, name): kind for relid, name, kind in cur.fetchall()}
        for info in infos.values():
            info.key_kinds = [kinds.get((info.oid, k), "") for k in info.key]
        cur.execute("""
            SELECT indrelid, indexrelid FROM pg_catalog.pg_index WHERE indrelid = ANY(%(o)s)
            UNION ALL SELECT conrelid, oid FROM pg_catalog.pg_constraint WHERE conrelid = ANY(%(o)s)
            UNION ALL SELECT tgrelid, oid FROM pg_catalog.pg_trigger
                      WHERE tgrelid = ANY(%(o)s) AND NOT tgisinternal
            UNION ALL SELECT polrelid, oid FROM pg_catalog.pg_policy WHERE polrelid = ANY(%(o)s)
            UNION ALL SELECT ev_class, oid FROM pg_catalog.pg_rewrite WHERE ev_class = ANY(%(o)s)
            UNION ALL SELECT adrelid, oid FROM pg_catalog.pg_attrdef WHERE adrelid = ANY(%(o)s)
            UNION ALL SELECT stxrelid, oid FROM pg_catalog.pg_statistic_ext
                      WHERE stxrelid = ANY(%(o)s)
            ORDER BY 1, 2""", {"o": oids})
        for relid, oid in cur.fetchall():
            infos[relid].related_oids.append(oid)
        cur.execute("""
            SELECT d.refobjid, s.oid, format('%%I.%%I', n.nspname, s.relname)
            FROM pg_catalog.pg_depend d
            JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
            JOIN pg_catalog.pg_namespace n ON n.oid = s.relnamespace
            WHERE d.classid = 'pg_catalog.pg_class'::regclass
              AND d.refclassid = 'pg_catalog.pg_class'::regclass
              AND d.deptype IN ('a', 'i') AND d.refobjid = ANY(%s)
            ORDER BY 1, 3""", (oids,))
        for relid, seqoid, qname in cur.fetchall():
            infos[relid].owned_sequences.append(qname)
            infos[relid].related_oids.append(seqoid)
    missing = set(oids) - set(infos)
    if missing and not missing_ok:
        raise SnapshotFailed(f"{len(missing)} table(s) in pg_dump's list are not in the catalog "
                             "of the snapshot; take the snapshot again.")
    return [infos[o] for o in oids if o in infos]


# -- extensions' configuration tables

PG_EXTENSION = 3079   # pg_extension's oid: the catalog of an EXTENSION entry in pg_dump's list


@dataclass(frozen=True)
class ConfigRelation:
    """A table or sequence an extension registered with pg_extension_config_dump:
    CREATE EXTENSION makes it (and may fill it with rows of its own), so the schema
    has no entry for it, and a dump holds its data: the rows ``condition`` (a WHERE
    clause, or "") chooses, or the sequence's value."""

    oid: int
    extension: str
    condition: str


def extension_config(conn: psycopg.Connection, dumped_extensions: set[int], *,
                     schemas: tuple[str, ...] = (), exclude_schemas: tuple[str, ...] = (),
                     tables: tuple[str, ...] = (), exclude_tables: tuple[str, ...] = ()
                     ) -> list[ConfigRelation]:
    """The configuration relations whose data pg_dump, given these -n/-N/-t/-T
    patterns, would dump: those of an extension the dump creates (``dumped_extensions``,
    from its list), else those -t names or whose schema -n names (an extension's own
    schema aside); never one -T names or in a schema -N names.  This is pg_dump's
    processExtensionTables, with its patterns matched as pg_dump matches them
    (``name_pattern``)."""
    rows = conn.execute("""
        SELECT c.oid, e.oid, e.extname, x.cond, n.nspname,
               EXISTS (SELECT FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass
                          AND d.objid = n.oid AND d.deptype = 'e')
        FROM pg_catalog.pg_extension e
        CROSS JOIN LATERAL unnest(e.extconfig, e.extcondition) AS x(rel, cond)
        JOIN pg_catalog.pg_class c ON c.oid = x.rel
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'S')
        ORDER BY c.oid""").fetchall()
    if not rows:
        return []
    rels = [r[0] for r in rows]
    named = _matching(conn, rels, tables, "table")
    excluded = _matching(conn, rels, exclude_tables, "table")
    in_schemas = _matching(conn, rels, schemas, "schema")
    in_excluded = _matching(conn, rels, exclude_schemas, "schema")
    out = []
    for oid, ext_oid, extname, cond, nspname, nsp_of_extension in rows:
        if ext_oid in dumped_extensions:
            dump = True
        elif tables:
            dump = oid in named   # -t: no schema is dumped whole
        elif schemas:
            dump = oid in in_schemas and not nsp_of_extension
        else:
            # Only a built-in extension is not created by a whole dump: its
            # tables in a schema the dump holds (not a system schema) are.
            dump = not (nsp_of_extension or nspname.startswith("pg_")
                        or nspname == "information_schema")
        if dump and oid not in excluded and oid not in in_excluded:
            out.append(ConfigRelation(oid, extname, cond or ""))
    return out


def _matching(conn: psycopg.Connection, oids: list[int], patterns: tuple[str, ...],
              what: str) -> set[int]:
    """Of the relations ``oids``, those a -t/-T pattern (``what`` "table") names, or
    whose schema a -n/-N pattern (``what`` "schema") names, as pg_dump matches them:
    by regular expression, under the database's default collation, and an
    unqualified table pattern only among the tables visible on the role's own
    search_path (pg_dump resets it to match)."""
    if not patterns:
        return set()
    out: set[int] = set()
    conn.execute("RESET search_path")
    try:
        for pattern in patterns:
            schema_re, name_re = name_pattern(pattern, qualified=what == "table")
            conds = [sql.SQL("c.oid = ANY(%s)")]
            target = sql.SQL("c.relname" if what == "table" else "n.nspname")
            if name_re != "^(.*)$":
                conds.append(sql.SQL("{} OPERATOR(pg_catalog.~) {} COLLATE pg_catalog.default")
                             .format(target, sql.Literal(name_re)))
            if what == "table":
                if schema_re is None:
                    conds.append(sql.SQL("pg_catalog.pg_table_is_visible(c.oid)"))
                elif schema_re != "^(.*)$":
                    conds.append(sql.SQL(
                        "n.nspname OPERATOR(pg_catalog.~) {} COLLATE pg_catalog.default")
                        .format(sql.Literal(schema_re)))
            query = sql.SQL("SELECT c.oid FROM pg_catalog.pg_class c JOIN "
                            "pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE ")
            out |= {r[0] for r in conn.execute(query + sql.SQL(" AND ").join(conds),
                                               (oids,)).fetchall()}
    finally:
        conn.execute(sql.SQL("SELECT pg_catalog.set_config('search_path', {}, false)").format(
            sql.Literal(SESSION_SETTINGS["search_path"])))
    return out


# Characters that quote marks make literal in a pattern (outside them, they keep
# their meaning in a regular expression).
_REGEX_SPECIAL = set("|*+?()[]{}.^$\\")


def name_pattern(pattern: str, qualified: bool) -> tuple[str | None, str]:
    """How pg_dump reads a -t (``qualified``: [[database.]schema.]name) or -n pattern,
    as regular expressions for the schema (None: not given) and the name.  Outside
    double quotes, letters fold to lower case, ``*`` and ``?`` are wildcards and a
    dot separates the parts; inside them (``""`` is a quote mark) every character
    is itself.  A ``$``, and ``[]``, are always literal.  (psql's
    patternToSQLRegex, of which this is a reading, not a copy.)"""
    parts: list[list[str]] = [[]]
    most = 3 if qualified else 1
    inquotes = False
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        cur = parts[-1]
        if ch == '"':
            if inquotes and pattern[i + 1:i + 2] == '"':
                cur.append('"')
                i += 1
            else:
                inquotes = not inquotes
        elif not inquotes and "A" <= ch <= "Z":
            cur.append(ch.lower())
        elif not inquotes and ch == "*":
            cur.append(".*")
        elif not inquotes and ch == "?":
            cur.append(".")
        elif not inquotes and ch == ".":
            if len(parts) < most:
                parts.append([])
            else:
                cur.append(ch)
        elif ch == "$":
            cur.append("\\$")
        elif inquotes and ch in _REGEX_SPECIAL:
            cur.append("\\" + ch)
        elif ch == "[" and pattern[i + 1:i + 2] == "]":
            cur.append("\\[")
        else:
            cur.append(ch)
        i += 1
    regexes = ["^(" + "".join(p) + ")$" for p in parts]
    return (regexes[-2] if len(regexes) >= 2 else None), regexes[-1]


def _lock_statements(tables: list[TableInfo], nowait: bool) -> list[sql.Composed]:
    batch = 500  # names per LOCK statement: keeps statements a sane size
    return [sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE{}").format(
                sql.SQL(", ").join(sql.SQL(t.qname) for t in tables[i:i + batch]),
                sql.SQL(" NOWAIT" if nowait else ""))
            for i in range(0, len(tables), batch)]


def lock_tables(conn: psycopg.Connection, tables: list[TableInfo], nowait: bool = False) -> None:
    """ACCESS SHARE locks, so concurrent DDL waits for us instead of breaking the snapshot."""
    with conn.cursor() as cur:
        for statement in _lock_statements(tables, nowait):
            cur.execute(statement)


def lock_tables_nowait(conn: psycopg.Connection, tables: list[TableInfo]) -> bool:
    """lock_tables with NOWAIT, in a savepoint: False, and the transaction (and its
    snapshot) as it was, if another session holds or awaits a conflicting lock.
    One round trip (a worker locks each table it reads: 3,400 of them took 0.4 s
    more as three)."""
    statements = [sql.SQL("SAVEPOINT fpvault_lock"), *_lock_statements(tables, nowait=True),
                  sql.SQL("RELEASE SAVEPOINT fpvault_lock")]
    try:
        conn.execute(sql.SQL("; ").join(statements))   # no parameters: one simple query
    except psycopg.errors.LockNotAvailable:
        conn.execute("ROLLBACK TO SAVEPOINT fpvault_lock; RELEASE SAVEPOINT fpvault_lock")
        return False
    return True


def rewritten_since_snapshot(conn: psycopg.Connection, oids: list[int]) -> list[str]:
    """Tables truncated or rewritten after our snapshot began.

    TRUNCATE and rewriting ALTER TABLE are not MVCC-safe: an older snapshot sees
    such a table as empty.  The catalog row seen by our snapshot and the one in
    the relation cache (always current) then name different files.
    """
    with conn.cursor() as cur:
        cur.execute("""
            SELECT format('%%I.%%I', n.nspname, c.relname)
            FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = ANY(%s) AND c.relfilenode <> 0
              AND c.relfilenode IS DISTINCT FROM pg_catalog.pg_relation_filenode(c.oid)""",
                    (oids,))
        return [r[0] for r in cur.fetchall()]


def altered_since_snapshot(conn: psycopg.Connection, tables: list[TableInfo]) -> list[str]:
    """Tables whose name or columns a transaction changed after our snapshot began
    (and committed before our locks, which keep them as they are from then on).

    COPY is planned against the current catalog but reads the rows our snapshot
    sees, with the columns our snapshot's catalog names: a column renamed or
    dropped since, or two swapped, would be read as another column or fail, and
    a name given to another table would read that one.  (A column added since is
    not read, as the schema in our snapshot does not have it.)  pg_dump waits for
    its own locks, and DDL queued behind them commits the moment it exits.

    Our snapshot's catalog answers from pg_catalog's tables; the current one
    through to_regclass() and pg_identify_object_as_address(), which read the
    catalog caches.  Neither plans a query on the tables, which would lock each
    one's indexes until the snapshot ends: 3,000 tables of two indexes each did
    not fit a lock table that held pg_dump's 3,000 locks."""
    changed: set[int] = set()
    with conn.cursor() as cur:
        for i in range(0, len(tables), 1000):
            batch = tables[i:i + 1000]
            cur.execute("SELECT n, pg_catalog.to_regclass(n)::pg_catalog.oid "
                        "FROM unnest(%s::pg_catalog.text[]) n", ([t.qname for t in batch],))
            now = dict(cur.fetchall())
            moved = {t.oid for t in batch if now.get(t.qname) != t.oid}
            cur.execute("""
                SELECT a.attrelid, a.attname,
                       (pg_catalog.pg_identify_object_as_address(
                           'pg_catalog.pg_class'::pg_catalog.regclass, a.attrelid,
                           a.attnum)).object_names[3]
                FROM pg_catalog.pg_attribute a
                WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped""",
                        ([t.oid for t in batch if t.oid not in moved],))
            changed |= moved | {oid for oid, then, current in cur.fetchall() if then != current}
    return [t.qname for t in tables if t.oid in changed]


# Types whose values print the names of catalog objects.
CATALOG_NAME_TYPES = ("regclass", "regcollation", "regconfig", "regdictionary", "regnamespace",
                      "regoper", "regoperator", "regproc", "regprocedure", "regrole", "regtype")


def print_outside_the_dump(conn: psycopg.Connection, oids: list[int], dumped_types: set[int],
                           dumped_tables: set[int]) -> set[int]:
    """The tables with a column whose values print what neither their rows nor the
    dumped schema record, so that it changes with a rename or an ALTER TYPE outside
    them: names of catalog objects (regclass, regrole, ...), and the labels of an
    enum or the attributes of a composite type that the dump does not define
    (``dumped_types``: pg_type oids of its TYPE entries; ``dumped_tables``: pg_class
    oids of its tables, whose row types it defines) because filters left it out or
    an extension makes it.  Also inside a domain, an array, a composite type or a
    range."""
    # The recursive query's estimate is high enough for JIT, whose compilation took
    # 35 of its 36 ms on 17 tables: off for it alone (then as it was).
    (jit,) = conn.execute("SELECT pg_catalog.current_setting('jit')").fetchone()
    conn.execute("SELECT pg_catalog.set_config('jit', 'off', true)")
    try:
        rows = _printed_types(conn, oids)
    finally:
        conn.execute("SELECT pg_catalog.set_config('jit', %s, true)", (jit,))
    return {rel for rel, typ, kind, typrelid, catalog_name in rows
            if catalog_name
            or (kind == "e" and typ not in dumped_types)
            or (kind == "c" and typ not in dumped_types and typrelid not in dumped_tables)}


def _printed_types(conn: psycopg.Connection, oids: list[int]
                   ) -> list[tuple[int, int, str, int, bool]]:
    """(table, type, typtype, typrelid, prints catalog names) of the enum, composite
    and reg* types the tables' columns print, down domains, arrays, composites,
    ranges and (PostgreSQL 14 and later) multiranges."""
    multirange = (sql.SQL("UNION ALL SELECT r.rngtypid FROM pg_catalog.pg_range r "
                          "WHERE r.rngmultitypid = ty.oid")
                  if conn.info.server_version >= 140000 else sql.SQL(""))
    return conn.execute(sql.SQL("""
        WITH RECURSIVE t(rel, typ) AS (
            SELECT a.attrelid, a.atttypid FROM pg_catalog.pg_attribute a
            WHERE a.attrelid = ANY(%(oids)s) AND a.attnum > 0 AND NOT a.attisdropped
          UNION
            SELECT t.rel, x.sub FROM t JOIN pg_catalog.pg_type ty ON ty.oid = t.typ
            CROSS JOIN LATERAL (
                SELECT ty.typbasetype WHERE ty.typtype = 'd'
                UNION ALL SELECT ty.typelem WHERE ty.typelem <> 0 AND ty.typlen = -1
                UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a
                          WHERE ty.typtype = 'c' AND a.attrelid = ty.typrelid AND a.attnum > 0
                            AND NOT a.attisdropped
                UNION ALL SELECT r.rngsubtype FROM pg_catalog.pg_range r
                          WHERE r.rngtypid = ty.oid
                {}) x(sub)),
        names AS (SELECT pg_catalog.to_regtype(n) AS typ
                  FROM unnest(%(names)s::pg_catalog.text[]) n)
        SELECT DISTINCT t.rel, t.typ::int8, ty.typtype::text, ty.typrelid::int8,
               t.typ IN (SELECT typ FROM names)
        FROM t JOIN pg_catalog.pg_type ty ON ty.oid = t.typ
        WHERE ty.typtype IN ('e', 'c') OR t.typ IN (SELECT typ FROM names)
        """).format(multirange), {"oids": oids, "names": list(CATALOG_NAME_TYPES)}).fetchall()


# age() counts back from the newest xid in 32 bits: compare only snapshots this close.
XID_HORIZON = 1 << 30
# rows_unchanged looks at a sample (this percentage of the pages) of a table this
# large before scanning all of it.
PROBE_MIN_BYTES = 8 * 1024 * 1024
PROBE_PERCENT = 1


def rows_unchanged(conn: psycopg.Connection, tables: list[tuple[TableInfo, int]], before: int,
                   newest: int) -> set[int]:
    """Of ``tables``, each with the rows an earlier snapshot of the same running server
    counted in it, the oids of those whose rows our snapshot sees exactly as that one
    did, given its xmin ``before`` and our snapshot's xmax ``newest`` (64-bit txids).

    Every transaction older than an xmin had ended when its snapshot began.  So a
    row version we see whose xmin is older than ``before`` was committed, and not
    yet deleted, when the earlier snapshot began: it saw it too.  Anything written
    since (an insert, or an update's new version) has a newer xmin.  If every row
    we see is that old, we see a subset of what it saw, and if there are as many,
    the same rows: nothing was deleted either.  One sequential scan per table that
    reads no column, all of them in one statement (a schema of 3,400 small tables
    spent 0.9 s on a round trip each).  Only heap tables have such xmins; age()
    gives a frozen or otherwise special xid the largest age, and a very old raw
    xmin may wrap around to look new, which only makes us read the table.
    """
    if not _comparable(before, newest):
        return set()
    age = _age_of(before)
    scans, counted = [], {}
    for table, rows in tables:
        if table.access_method != "heap":
            continue
        name = sql.SQL(table.qname)
        if table.size >= PROBE_MIN_BYTES:
            # A sample of the pages first: rows updated here and there show up in it,
            # at a hundredth of the cost of the scan.
            (new,) = conn.execute(sql.SQL(
                "SELECT EXISTS (SELECT FROM ONLY {} TABLESAMPLE SYSTEM ({}) "
                "WHERE pg_catalog.age(xmin) <= {})").format(
                    name, sql.Literal(PROBE_PERCENT), age)).fetchone()
            if new:
                continue
        scans.append(sql.SQL(
            "SELECT {}::pg_catalog.oid, count(*), coalesce(min(pg_catalog.age(xmin)) > {}, true) "
            "FROM ONLY {}").format(sql.Literal(table.oid), age, name))
        counted[table.oid] = rows
    if not scans:
        return set()
    found = conn.execute(sql.SQL(" UNION ALL ").join(scans)).fetchall()
    return {oid for oid, count, old in found if old and count == counted[oid]}


# The catalog fingerprint (catalog_fingerprint).  Left out: catalog columns that
# change without DDL (VACUUM, ANALYZE, TRUNCATE, a rewrite) and that pg_dump prints in
# no schema dump (but with --binary-upgrade, or statistics, which snap never asks
# for: _dump_schema), and catalogs of data (large objects' pages, planner statistics).
CATALOG_VOLATILE = {"pg_class": {"relpages", "reltuples", "relallvisible", "relfrozenxid",
                                 "relminmxid", "relfilenode"},
                    "pg_database": {"datfrozenxid", "datminmxid"}}
CATALOG_DATA = {"pg_largeobject", "pg_statistic", "pg_statistic_ext_data"}
# Shared catalogs' rows of other databases, which pg_dump does not read.
CATALOG_ROWS = {
    "pg_database": "t.datname = pg_catalog.current_database()",
    "pg_shdepend": "t.dbid IN (0, (SELECT oid FROM pg_catalog.pg_database "
                   "WHERE datname = pg_catalog.current_database()))",
    "pg_db_role_setting": "t.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database "
                          "WHERE datname = pg_catalog.current_database()))"}
# Catalogs only a superuser may read, and the view pg_dump reads instead.
CATALOG_VIEWS = {"pg_authid": "pg_roles", "pg_user_mapping": "pg_user_mappings"}
CATALOG_FINGERPRINT_VERSION = "1"


def catalog_fingerprint(conn: psycopg.Connection, *more: psycopg.Connection) -> str:
    """A digest of every row of every catalog (pg_catalog's tables, shared ones too)
    that our snapshot sees, but for what CATALOG_VOLATILE, CATALOG_DATA and
    CATALOG_ROWS leave out: two snapshots with the same one see the same catalog,
    of which pg_dump's schema dump is a function (with the same server and pg_dump
    versions, role, options).

    Rows are compared by content, not by xmin: VACUUM updates pg_class rows in
    place, keeping their xmin, and before PostgreSQL 13 so did CREATE INDEX
    CONCURRENTLY when it marked its index valid.  Per catalog, the SHA-256 of its
    rows' SHA-256s in order (a multiset hash that a role with DDL rights cannot make
    collide, as it could a sum of 64-bit hashes).  "" where it cannot be told: a
    catalog the role may not read (a non-superuser and pg_subscription), or a
    server before 13 (a catalog's oid was a hidden column before 12, and index
    flags changed in place before 13).  One scan of each catalog: 0.24 s for the
    217,000 catalog rows of 3,400 tables, 0.06 s for a schema of 15.  With ``more``
    connections (in the same snapshot), the scans are shared among them, the
    largest catalogs first, each to the one with the fewest bytes to scan so far."""
    if conn.info.server_version < 130000:
        return ""
    cats = conn.execute("""
        SELECT c.relname, pg_catalog.array_agg(a.attname::text ORDER BY a.attnum),
               pg_catalog.pg_relation_size(c.oid)
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
                                      AND NOT a.attisdropped
        WHERE c.relnamespace = 'pg_catalog'::pg_catalog.regnamespace AND c.relkind = 'r'
        GROUP BY c.relname, c.oid ORDER BY c.relname""").fetchall()
    scans, names = [], []
    for name, columns, size in cats:
        if name in CATALOG_DATA:
            continue
        source = CATALOG_VIEWS.get(name, name)
        volatile = CATALOG_VOLATILE.get(name, set())
        row = (sql.SQL("({})").format(sql.SQL(", ").join(
                   sql.SQL("t.{}").format(sql.Identifier(c)) for c in columns if c not in volatile))
               if volatile else sql.SQL("t"))
        names.append(sql.Literal(f"pg_catalog.{source}"))
        scans.append((size, sql.SQL(
            "SELECT {}, count(*), pg_catalog.encode(pg_catalog.sha256(coalesce("
            "pg_catalog.string_agg(h, ''::bytea ORDER BY h), ''::bytea)), 'hex') "
            "FROM (SELECT pg_catalog.sha256(pg_catalog.convert_to({}::text, "
            "pg_catalog.getdatabaseencoding())) h FROM pg_catalog.{} t WHERE {}) rows").format(
                sql.Literal(name), row, sql.Identifier(source),
                sql.SQL(CATALOG_ROWS.get(name, "true")))))
    (readable,) = conn.execute(sql.SQL(
        "SELECT pg_catalog.bool_and(pg_catalog.has_table_privilege(n, 'SELECT')) "
        "FROM pg_catalog.unnest(ARRAY[{}]) n").format(sql.SQL(", ").join(names))).fetchone()
    if not readable:
        return ""
    conns = [conn, *more]
    parts: list[list[sql.Composed]] = [[] for _ in conns]
    loads = [0] * len(conns)
    for size, scan in sorted(scans, key=lambda s: -s[0]):
        least = loads.index(min(loads))
        parts[least].append(scan)
        loads[least] += size

    def scanned(c: psycopg.Connection, part: list[sql.Composed]) -> list[tuple]:
        return c.execute(sql.SQL(" UNION ALL ").join(part)).fetchall() if part else []

    if len(conns) == 1:
        found = scanned(conn, parts[0])
    else:
        with ThreadPoolExecutor(max_workers=len(conns) - 1) as pool:
            others = [pool.submit(scanned, c, part) for c, part in zip(conns[1:], parts[1:])]
            found = scanned(conn, parts[0])
            for job in others:
                found += job.result()
    digest = blake3.blake3()
    for name, count, rows in sorted(found):
        digest.update(f"{name} {count} {rows}\n".encode())
    return f"{CATALOG_FINGERPRINT_VERSION}:{digest.hexdigest()}"


def large_object_pages(conn: psycopg.Connection, oids: list[int], before: int | None,
                       newest: int) -> dict[int, tuple[int, bool]] | None:
    """Per large object: how many pages (rows of pg_largeobject) our snapshot sees,
    and whether all of them are older than ``before`` (an earlier snapshot's xmin,
    as in ``rows_unchanged``: then that snapshot saw them too; False when
    ``before`` is None or too far back).  None where the role may not read
    pg_largeobject (only superusers may, unless granted).  One scan of it, reading
    no data."""
    (allowed,) = conn.execute("SELECT pg_catalog.has_table_privilege("
                              "'pg_catalog.pg_largeobject', 'SELECT')").fetchone()
    if not allowed:
        return None
    comparable = before is not None and _comparable(before, newest)
    old = (sql.SQL("min(pg_catalog.age(xmin)) > {}").format(_age_of(before)) if comparable
           else sql.SQL("false"))
    rows = conn.execute(sql.SQL(
        "SELECT loid, count(*), {} FROM pg_catalog.pg_largeobject "
        "WHERE loid = ANY(%s::pg_catalog.oid[]) GROUP BY loid").format(old), (oids,)).fetchall()
    # An object with no page (created, never written) is empty now and was then.
    return {oid: (0, comparable) for oid in oids} | {oid: (pages, is_old)
                                                      for oid, pages, is_old in rows}


def _comparable(before: int, newest: int) -> bool:
    """Whether age() can tell rows older than ``before`` (64-bit txids) from newer."""
    return 0 <= newest - before < XID_HORIZON


def _age_of(before: int) -> sql.Composed:
    """SQL for the age of the (32-bit) xid of the 64-bit txid ``before``."""
    return sql.SQL("pg_catalog.age({}::pg_catalog.xid)").format(
        sql.Literal(str(before % (1 << 32))))


# Tables at least this large on disk are read by a psql process (``PsqlReader``), which
# costs about 20 ms to start and connect: below this, libpq's per-row loop here is cheaper.
PSQL_MIN_BYTES = 8 * 1024 * 1024

# COPY sends one message per row; gathering rows into buffers of about this size
# keeps the per-row work to one append, instead of a trip through the chunker,
# the hasher and the progress bar for every row.
COPY_BATCH = 1024 * 1024


def key_ranges(conn: psycopg.Connection, table: TableInfo, parts: int
               ) -> list[tuple[int | None, int | None]] | None:
    """``parts`` ranges of the table's single integer key, of equal width between its
    smallest and largest value in the snapshot (two index probes), covering every
    row; None if the table has no such key or too few distinct values."""
    if len(table.key) != 1 or table.key_kinds[:1] != ["int"] or parts < 2 or table.condition:
        return None
    k = sql.Identifier(table.key[0])
    lo, hi = conn.execute(sql.SQL("SELECT min({}), max({}) FROM ONLY {}").format(
        k, k, sql.SQL(table.qname))).fetchone()
    if lo is None or hi - lo < parts * 2:
        return None
    return _ranges([lo + (hi - lo + 1) * i // parts for i in range(1, parts)])


def _ranges(bounds: list[int]) -> list[tuple[int | None, int | None]]:
    """Adjacent ranges split at ``bounds``, the first and last unbounded."""
    edges: list[int | None] = [None, *bounds, None]
    return list(zip(edges[:-1], edges[1:]))


# The statistics' correlation of a key's leading column from which a table's heap is
# taken to be in key order (1: the sampled rows are exactly in order).
KEY_ORDER_CORRELATION = 0.999


def in_key_order(conn: psycopg.Connection, tables: list[TableInfo]) -> set[int]:
    """The tables (oids) whose rows the server's statistics say lie in the heap in
    key order: a key whose leading column's correlation, at the last ANALYZE, is
    at least KEY_ORDER_CORRELATION, and no row updated or deleted since the
    statistics were reset.  (An update, even a HOT one, puts the row's new
    version elsewhere, and a correlation from a sample does not notice one row
    in a hundred out of place.)  Of a key of several columns, the leading one
    must be unique in the sample (n_distinct -1): its correlation says nothing
    of the order within a run of equal values, which ANALYZE ranks by position
    (a key (day, uuid) appended day by day scores 1).  So: tables only ever
    appended to in key order, or loaded in it.  Statistics are a sample and may
    be stale: a wrong guess costs only the next snapshot's deduplication (and
    memory in a diff --rows against it), never correctness."""
    keyed = [t for t in tables if t.key and not t.condition and t.columns]
    if not keyed:
        return set()
    # pg_stats is read once and matched here: joined to the tables in SQL, the
    # planner could re-read the view for each table (3,000 tables: 170 s).
    want = {(t.schema, t.name, t.key[0]): t for t in keyed}
    stats = conn.execute("""
        SELECT schemaname, tablename, attname, n_distinct FROM pg_catalog.pg_stats
        WHERE NOT inherited AND correlation >= %s
          AND schemaname = ANY(%s::pg_catalog.name[]) AND attname = ANY(%s::pg_catalog.name[])""",
        (KEY_ORDER_CORRELATION, sorted({t.schema for t in keyed}),
         sorted({t.key[0] for t in keyed}))).fetchall()
    found = [t.oid for nsp, rel, col, n_distinct in stats
             if (t := want.get((nsp, rel, col))) is not None
             and (len(t.key) == 1 or n_distinct == -1)]
    rows = conn.execute("""
        SELECT k.oid FROM unnest(%s::pg_catalog.oid[]) AS k(oid)
        WHERE pg_catalog.pg_stat_get_tuples_updated(k.oid) = 0
          AND pg_catalog.pg_stat_get_tuples_deleted(k.oid) = 0""", (found,)).fetchall()
    return {r[0] for r in rows}


def block_ranges(conn: psycopg.Connection, table: TableInfo, parts: int
                 ) -> list[tuple[int | None, int | None]] | None:
    """``parts`` ranges of the table's blocks, of equal width, covering every row
    (the first and last unbounded), for reading it in ``physical`` order; None
    where a range cannot be read on its own (no TID range scans before
    PostgreSQL 14, or not a heap table) or the table has too few blocks."""
    if (conn.info.server_version < 140000 or table.access_method != "heap" or parts < 2
            or table.condition):
        return None
    blocks = conn.execute("SELECT pg_catalog.pg_relation_size(%s) / "
                          "pg_catalog.current_setting('block_size')::int",
                          (table.oid,)).fetchone()[0]
    if blocks < parts * 2:
        return None
    return _ranges([blocks * i // parts for i in range(1, parts)])


def copy_out(conn: psycopg.Connection, table: TableInfo,
             key_range: tuple[int | None, int | None] | None = None,
             rows: list[int] | None = None) -> Iterator[bytearray]:
    """The table's COPY stream (or the part in ``key_range``), in buffers of about
    COPY_BATCH bytes, each a new bytearray the consumer may keep.  At the end, the
    number of rows the server sent is appended to ``rows``."""
    copies = CopyOuts(conn, [table], key_range)
    try:
        yield from copies.stream(table, rows)
    finally:
        copies.close()


class CopyOuts:
    """The COPY streams of several tables, asked for in one query and read one after
    the other (``stream``, in the order given): one round trip for all of them, where
    a statement each costs one per table (3,400 small tables: 0.11 s against 0.31 s,
    docs/benchmarks.md).  ``close`` reads what is left and frees the connection.

    This talks to libpq directly: psycopg's ``Copy.read()`` costs about 0.6 us
    per row in Python, libpq's ``PQgetCopyData`` loop half that, which on a
    table of narrow rows halves the time of a snapshot.  The connection is
    non-blocking (psycopg sets it so) and we wait for the socket with select,
    which releases the GIL, so ``-j`` readers run in parallel.  Errors are
    raised as the same psycopg exceptions a cursor would raise, each from the
    stream of the table it is about; the server runs none of the statements
    after one that fails.

    Where the results are is kept here, not in the stream generators: a consumer
    may drop a stream anywhere (an exception while it holds a buffer), and the
    next stream, or ``close``, goes on from where that one stopped.
    """

    def __init__(self, conn: psycopg.Connection, tables: list[TableInfo],
                 key_range: tuple[int | None, int | None] | None = None):
        if key_range is not None and len(tables) != 1:
            raise ValueError("a key range is of one table")
        self.conn = conn
        self.pgconn = conn.pgconn
        self.oids = [t.oid for t in tables]
        self.read = 0           # statements whose results have been read to their end
        self.open = False       # statement ``read`` has begun (its COPY_OUT taken)
        self.rows_sent = False  # ... and its rows were all read
        self.failed = False     # a statement failed: the server runs none after it
        self.closed = False
        query = b"; ".join(t.copy_statement(key_range).as_bytes(conn) for t in tables)
        # In a SQL_ASCII database the session reads text as UTF-8 (connect), against
        # which the server would check the rows: they go out as stored, unchecked.
        self.raw = conn.info.parameter_status("server_encoding") == "SQL_ASCII"
        if self.raw:
            conn.execute("SET client_encoding = 'SQL_ASCII'")
        conn.lock.acquire()
        try:
            if not self.pgconn.send_query(query) and self.pgconn.error_message:
                raise psycopg.OperationalError(self.pgconn.get_error_message())
            while self.pgconn.flush():
                select.select([], [self.pgconn.socket], [])
        except BaseException:
            self.closed = True
            conn.lock.release()
            raise

    def stream(self, table: TableInfo, rows: list[int] | None = None) -> Iterator[bytearray]:
        """``table``'s rows; at their end, how many the server sent is appended to
        ``rows``.  The streams of the tables before it that were not read are
        skipped."""
        index = self.oids.index(table.oid)
        if self.closed or index < self.read + self.open:
            raise RuntimeError(f"{table.qname}'s COPY stream was read already")
        while self.read < index:
            self._skip()
        self._begin()
        try:
            yield from self._rows()
        finally:
            if self.open and self.read == index and not self.closed:
                self._end(rows)

    def close(self, cancel: bool = False) -> None:
        """Read the rest of the results (an error among them is raised), so the
        connection is usable again.  ``cancel``: the consumer is giving up (an
        exception is on its way): the server is asked to stop, and nothing more
        is raised."""
        if self.closed:
            return
        self.closed = True
        try:
            if cancel:
                with contextlib.suppress(Exception):
                    if self.read < len(self.oids) and not self.failed:
                        self.conn.cancel()
                    while (res := self._next_result()) is not None:
                        if res.status == pq.ExecStatus.COPY_OUT:
                            self.open, self.rows_sent = True, False
                        if self.open:
                            for _ in self._rows():
                                pass
                            self.open = False
                return
            while self.read < len(self.oids) and not self.failed:
                self._skip()
            while (res := self._next_result()) is not None:   # only the end to come
                self._check(res, pq.ExecStatus.COMMAND_OK)
            if self.pgconn.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError(self.pgconn.get_error_message()
                                               or "connection lost")
        finally:
            self.conn.lock.release()
            if (self.raw and self.pgconn.status == pq.ConnStatus.OK
                    and self.pgconn.transaction_status in (pq.TransactionStatus.IDLE,
                                                           pq.TransactionStatus.INTRANS)):
                self.conn.execute("SET client_encoding = 'UTF8'")

    def _skip(self) -> None:
        """Read the next unread statement's results (its rows are dropped)."""
        if not self.open:
            self._begin()
        for _ in self._rows():
            pass
        self._end(None)

    def _begin(self) -> None:
        if self.open:   # a stream dropped before its end: finish it first
            self._skip()
        res = self._next_result()
        if res is None:
            self.failed = True
            raise psycopg.OperationalError(self.pgconn.get_error_message()
                                           or "the server ended the COPY statements early")
        self._check(res, pq.ExecStatus.COPY_OUT)
        self.open, self.rows_sent = True, False

    def _rows(self) -> Iterator[bytearray]:
        """The rest of the open statement's rows, in buffers of about COPY_BATCH."""
        get = self.pgconn.get_copy_data
        buf = bytearray()
        while not self.rows_sent:
            nbytes, data = get(1)
            if nbytes > 0:
                buf += data
                if len(buf) >= COPY_BATCH:
                    yield buf
                    buf = bytearray()
            elif nbytes == 0:
                self._wait_readable()
            else:
                self.rows_sent = True
        if buf:
            yield buf

    def _end(self, rows: list[int] | None) -> None:
        """Finish the open statement: the rest of its rows dropped, its result read."""
        for _ in self._rows():
            pass
        self.open = False
        res = self._next_result()
        if res is None:
            self.failed = True
            raise psycopg.OperationalError(self.pgconn.get_error_message() or "connection lost")
        self._check(res, pq.ExecStatus.COMMAND_OK)
        self.read += 1
        if rows is not None:
            rows.append(res.command_tuples or 0)

    def _wait_readable(self) -> None:
        select.select([self.pgconn.socket], [], [])
        self.pgconn.consume_input()

    def _next_result(self):
        while self.pgconn.is_busy():
            self._wait_readable()
        return self.pgconn.get_result()

    def _check(self, res, status: pq.ExecStatus) -> None:
        if res.status != status:
            self.failed = True
            if res.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.NONFATAL_ERROR):
                raise psycopg.errors.error_from_result(res, encoding=self.conn.info.encoding)
            raise psycopg.OperationalError(
                f"unexpected result of COPY: {pq.ExecStatus(res.status).name}")


class PsqlUnavailable(Exception):
    """psql could not be started or could not connect; read through libpq instead."""


@dataclass
class PsqlReader:
    """Reads COPY streams through ``psql`` processes that join the exported snapshot.

    libpq hands a COPY stream over one row at a time, and however tight the
    Python loop around ``PQgetCopyData`` is, it costs about as much client CPU
    as chunking, hashing and compressing the rows together (5 million narrow
    rows: 3.4 s of CPU against 1.0 s for psql, docs/benchmarks.md).  psql runs
    that loop in C, in a process of its own, so the rows are gathered on
    another core and the snapshot reads a pipe in 1 MiB pieces.  Each table
    gets its own psql (about 20 ms to start and connect), so only tables of at
    least ``PSQL_MIN_BYTES`` go this way.

    Each psql sets up its session as ``setup_session`` does, begins a
    REPEATABLE READ, READ ONLY transaction on ``snapshot`` and takes its
    ACCESS SHARE lock with NOWAIT, as a worker connection does.  Its errors
    come back as the psycopg exceptions of their SQLSTATE."""

    psql: str
    conninfo: str            # without the password: that goes in the environment
    env: dict[str, str]
    snapshot: str
    encoding: str
    disabled: bool = False   # psql could not connect once: libpq from then on

    def script(self, table: TableInfo, key_range: tuple[int | None, int | None] | None) -> bytes:
        lines = ["\\set ON_ERROR_STOP on", "\\set VERBOSITY verbose"]
        lines += ["\\o /dev/null", *(s.as_string(None) for s in
                                     session_statements(SESSION_SETTINGS, self.encoding)), "\\o"]
        lines += ["BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                  sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                      sql.Literal(self.snapshot)).as_string(None),
                  f"LOCK TABLE {table.qname} IN ACCESS SHARE MODE NOWAIT",
                  table.copy_statement(key_range).as_string(None),
                  "COMMIT"]
        # In the session's client encoding, which the script sets first: a LATIN1 table's
        # name sent as UTF-8 names no table.  (SQL_ASCII: names are read as UTF-8.)
        codec = "utf-8" if self.encoding == "SQL_ASCII" else python_codec(self.encoding)
        return "".join(line + ("\n" if line.startswith("\\") else ";\n")
                       for line in lines).encode(codec)

    def copy_out(self, table: TableInfo, key_range: tuple[int | None, int | None] | None = None,
                 rows: list[int] | None = None) -> Iterator[bytearray]:
        """As ``copy_out``; raises PsqlUnavailable, before yielding anything, if psql
        cannot be run or cannot connect."""
        try:
            proc = subprocess.Popen(
                [self.psql, "-X", "-q", "-w", "-d", self.conninfo, "-f", "-"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self.env, bufsize=0)
        except OSError as exc:
            raise PsqlUnavailable(str(exc)) from exc
        try:
            with contextlib.suppress(OSError, AttributeError):
                # Larger pipe: psql writes 4 KiB at a time, we read 1 MiB at a time.
                fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, COPY_BATCH)
            # A stderr that fills up would stall psql: drain it on the side.
            errors: list[bytes] = []
            drain = threading.Thread(target=lambda: errors.append(proc.stderr.read()),
                                     daemon=True)
            drain.start()
            proc.stdin.write(self.script(table, key_range))
            proc.stdin.close()
            newlines = 0
            got_any = False
            out = proc.stdout
            while True:
                buf = bytearray(COPY_BATCH)
                view = memoryview(buf)
                n = 0
                while n < COPY_BATCH:
                    k = out.readinto(view[n:])
                    if not k:
                        break
                    n += k
                view.release()
                if n == 0:
                    break
                del buf[n:]
                newlines += buf.count(b"\n")
                got_any = True
                yield buf
                if n < COPY_BATCH:
                    break
            code = proc.wait()
            drain.join()
            if code != 0:
                text = b"".join(errors).decode("utf-8", "replace")
                if code == 2 and not got_any and text.lstrip().startswith("psql: error: "):
                    raise PsqlUnavailable(text.strip())   # it never connected
                raise _psql_error(code, text)
            if rows is not None:
                rows.append(newlines)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    f.close()


def _psql_error(code: int, text: str) -> psycopg.Error:
    """The psycopg exception for what psql printed (VERBOSITY verbose gives the SQLSTATE)."""
    m = re.search(r"(?:ERROR|FATAL):\s+([0-9A-Z]{5}):\s+(.*)", text)
    if m:
        try:
            cls = psycopg.errors.lookup(m.group(1))
        except KeyError:
            cls = psycopg.DatabaseError
        return cls(m.group(2).strip())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = [line for line in lines if "error: " in line]
    msg = ((said or lines)[0].split("error: ", 1)[-1] if lines
           else f"psql exited with status {code}")
    # psql exits 2 when the connection to the server went bad.
    return (psycopg.OperationalError if code == 2 else psycopg.DatabaseError)(msg)


def sequence_state(conn: psycopg.Connection, qname: str) -> tuple[int, bool]:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(sql.SQL(qname)))
        last_value, is_called = cur.fetchone()
        return int(last_value), bool(is_called)


def large_object(conn: psycopg.Connection, oid: int) -> Iterator[bytes]:
    with conn.cursor() as cur:
        offset = 0
        while True:
            cur.execute("SELECT pg_catalog.lo_get(%s::oid, %s, %s)", (oid, offset, LO_READ_SIZE))
            piece = cur.fetchone()[0]
            if piece:
                yield bytes(piece)
            if len(piece) < LO_READ_SIZE:
                return
            offset += len(piece)
