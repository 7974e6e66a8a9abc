"""Prove that two databases are indistinguishable (for round-trip tests).

``assert_same_database(pg, a, b)`` compares, independently of fpvault:

- the schema: ``pg_dump --schema-only`` text of both (same restrict key, so the
  random ``\\restrict`` line does not differ);
- every table's and materialized view's rows as a multiset: count and md5 of
  the sorted row texts, over ``ONLY`` the relation (so inheritance children are
  not counted twice), plus whether a materialized view is populated;
- every sequence's ``(last_value, is_called)``;
- every large object: oid, owner, ACL, comment, and md5 of its contents.

The pieces are also usable alone (``assert_same_data`` skips the schema text,
e.g. after ``--no-owner``).  Either side may be a ``DatabaseState`` captured
earlier (``capture``) instead of a database name, so a read-only source that
is compared many times is read once.
"""

from __future__ import annotations

import difflib
import subprocess
from dataclasses import dataclass

import psycopg
from psycopg import sql

SYSTEM_SCHEMAS = "n.nspname NOT IN ('pg_catalog', 'information_schema') " \
                 "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'"

# Fixed session settings so that row texts are comparable across connections.
SESSION = ("SET row_security = off; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = postgres; "
           "SET extra_float_digits = 3; SET TimeZone = 'UTC'; SET bytea_output = hex; "
           "SET statement_timeout = 0")


def _connect(pg, dbname: str) -> psycopg.Connection:
    conn = pg.connect(dbname)
    conn.execute(SESSION)
    return conn


def schema_dump(pg, dbname: str, *extra: str) -> str:
    """``pg_dump --schema-only`` of a database as text."""
    proc = subprocess.run([pg.tool("pg_dump"), "--schema-only", "--restrict-key=x", *extra,
                           "-d", pg.dsn(dbname)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"pg_dump of {dbname} failed: {proc.stderr}"
    return proc.stdout


def relations(conn: psycopg.Connection, kinds: str) -> dict[str, tuple[str, bool]]:
    """qualified name -> (relkind, relispopulated) of user relations of these kinds."""
    rows = conn.execute(f"""
        SELECT format('%%I.%%I', n.nspname, c.relname), c.relkind::text, c.relispopulated
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = ANY(%s) AND {SYSTEM_SCHEMAS.replace('%', '%%')}
        ORDER BY 1""", (list(kinds),)).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def table_fingerprint(conn: psycopg.Connection, qname: str) -> tuple[int, str]:
    """(row count, md5 of the sorted row texts) of ONLY this relation.

    The rows are hashed in an aggregate, so a 16 MiB value (32 MiB of hex)
    never has to travel to the client."""
    query = sql.SQL(
        "SELECT count(*), md5(coalesce(string_agg(fpv_cmp_row::text, E'\\n' "
        "ORDER BY fpv_cmp_row::text COLLATE \"C\"), '')) FROM ONLY {} AS fpv_cmp_row"
    ).format(sql.SQL(qname))
    count, digest = conn.execute(query).fetchone()
    return int(count), digest


def table_fingerprints(pg, dbname: str) -> dict[str, tuple]:
    """Every table's and materialized view's fingerprint; unpopulated views are marked."""
    with _connect(pg, dbname) as conn:
        out = {}
        for qname, (kind, populated) in relations(conn, "rm").items():
            out[qname] = table_fingerprint(conn, qname) if populated else ("not populated",)
        return out


def sequence_states(pg, dbname: str) -> dict[str, tuple[int, bool]]:
    with _connect(pg, dbname) as conn:
        out = {}
        for qname in relations(conn, "S"):
            last_value, is_called = conn.execute(
                sql.SQL("SELECT last_value, is_called FROM {}").format(sql.SQL(qname))).fetchone()
            out[qname] = (int(last_value), bool(is_called))
        return out


def large_objects(pg, dbname: str) -> dict[int, tuple]:
    """oid -> (owner, acl, comment, length, md5 of the contents)."""
    with _connect(pg, dbname) as conn:
        rows = conn.execute("""
            SELECT m.oid::bigint, m.lomowner::regrole::text, m.lomacl::text,
                   pg_catalog.obj_description(m.oid, 'pg_largeobject'),
                   length(pg_catalog.lo_get(m.oid)), md5(pg_catalog.lo_get(m.oid))
            FROM pg_catalog.pg_largeobject_metadata m ORDER BY 1""").fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


@dataclass(frozen=True)
class DatabaseState:
    """Everything ``assert_same_database`` compares, read from one database."""

    name: str
    schema: str           # "" when not read
    tables: dict
    sequences: dict
    large_objects: dict   # oid -> (owner, acl, comment, length, md5)


def capture(pg, dbname: str, schema: bool = True) -> DatabaseState:
    return DatabaseState(dbname, schema_dump(pg, dbname) if schema else "",
                         table_fingerprints(pg, dbname), sequence_states(pg, dbname),
                         large_objects(pg, dbname))


def _compare_maps(what: str, db_a: str, a: dict, db_b: str, b: dict) -> None:
    only_a, only_b = sorted(set(a) - set(b), key=str), sorted(set(b) - set(a), key=str)
    problems = []
    if only_a:
        problems.append(f"only in {db_a}: {', '.join(map(str, only_a[:20]))}")
    if only_b:
        problems.append(f"only in {db_b}: {', '.join(map(str, only_b[:20]))}")
    for key in sorted(set(a) & set(b), key=str):
        if a[key] != b[key]:
            problems.append(f"{what} {key} differs: {db_a} has {a[key]!r}, {db_b} has {b[key]!r}")
    if problems:
        raise AssertionError(f"{what}s of {db_a} and {db_b} differ:\n  "
                             + "\n  ".join(problems[:30]))


def _state(pg, db: str | DatabaseState, schema: bool = True) -> DatabaseState:
    return db if isinstance(db, DatabaseState) else capture(pg, db, schema)


def _name(db: str | DatabaseState) -> str:
    return db.name if isinstance(db, DatabaseState) else db


def _schema_text(pg, db: str | DatabaseState, extra: tuple[str, ...]) -> str:
    if isinstance(db, DatabaseState) and db.schema and not extra:
        return db.schema
    return schema_dump(pg, _name(db), *extra)


def assert_same_schema(pg, db_a: str | DatabaseState, db_b: str | DatabaseState,
                       *extra: str) -> None:
    """``pg_dump --schema-only`` (with ``extra`` options) prints the same text for both."""
    a, b = _schema_text(pg, db_a, extra), _schema_text(pg, db_b, extra)
    if a != b:
        diff = list(difflib.unified_diff(a.splitlines(), b.splitlines(), _name(db_a),
                                         _name(db_b), lineterm="", n=2))
        shown = "\n".join(diff[:150]) + ("\n..." if len(diff) > 150 else "")
        raise AssertionError(f"pg_dump --schema-only of {_name(db_a)} and {_name(db_b)} "
                             f"differ:\n{shown}")


def assert_same_data(pg, db_a: str | DatabaseState, db_b: str | DatabaseState,
                     owners: bool = True) -> None:
    """Rows of every table, sequence states and large objects are equal (with
    ``owners=False``, large objects' owners and ACLs are not compared)."""
    a, b = _state(pg, db_a, schema=False), _state(pg, db_b, schema=False)
    _compare_maps("table", a.name, a.tables, b.name, b.tables)
    _compare_maps("sequence", a.name, a.sequences, b.name, b.sequences)
    keep = slice(0, None) if owners else slice(2, None)
    _compare_maps("large object", a.name, {k: v[keep] for k, v in a.large_objects.items()},
                  b.name, {k: v[keep] for k, v in b.large_objects.items()})


def assert_same_database(pg, db_a: str | DatabaseState, db_b: str | DatabaseState) -> None:
    """The two databases are indistinguishable: schema, rows, sequences, large objects."""
    a, b = _state(pg, db_a), _state(pg, db_b)
    assert_same_schema(pg, a, b)
    assert_same_data(pg, a, b)
