"""Small tables' COPY streams asked for in one query (pgsource.CopyOuts)."""

import json
import os
import threading
import time

import psycopg
import pytest

from conftest import run
from fpvault import pgsource, snapshot
from fpvault.errors import FpvaultError
from fpvault.vault import StreamWriter

TABLES = """
CREATE TABLE a (id int PRIMARY KEY, v text);
INSERT INTO a SELECT g, repeat(md5(g::text), 40) FROM generate_series(1, 3000) g;
CREATE TABLE b (id int PRIMARY KEY, v text);
INSERT INTO b VALUES (1, E'tab\\there'), (2, NULL), (3, '\\.');
CREATE TABLE c (id int PRIMARY KEY, v text);
CREATE TABLE d (id int PRIMARY KEY, v text);
INSERT INTO d SELECT g, md5(g::text) FROM generate_series(1, 50) g;
"""


@pytest.fixture
def conn(pg, db):
    pg.execute(db, TABLES)
    conn = pgsource.connect(pg.dsn(db))
    pgsource.setup_session(conn)
    yield conn
    conn.close()


def infos(conn, *names):
    oids = [conn.execute("SELECT %s::regclass::oid", ("public." + n,)).fetchone()[0] for n in names]
    by_oid = {t.oid: t for t in pgsource.table_infos(conn, oids)}
    return [by_oid[o] for o in oids]


def one_at_a_time(conn, tables):
    out = []
    for t in tables:
        rows = []
        out.append((b"".join(pgsource.copy_out(conn, t, rows=rows)), rows))
    return out


def test_streams_asked_for_at_once_are_each_tables_own(conn):
    tables = infos(conn, "a", "b", "c", "d")
    copies = pgsource.CopyOuts(conn, tables)
    got = []
    try:
        for t in tables:
            rows = []
            got.append((b"".join(copies.stream(t, rows)), rows))
    finally:
        copies.close()
    assert got == one_at_a_time(conn, tables)
    assert [rows for _, rows in got] == [[3000], [3], [0], [50]]
    assert len(got[0][0]) > 2 * pgsource.COPY_BATCH   # several buffers
    assert conn.execute("SELECT 1").fetchone() == (1,)   # the connection is free


def test_streams_left_unread_are_skipped(conn):
    a, b, c, d = infos(conn, "a", "b", "c", "d")
    expected = dict(zip("abcd", one_at_a_time(conn, [a, b, c, d])))
    copies = pgsource.CopyOuts(conn, [a, b, c, d])
    try:
        partly = copies.stream(a, [])
        first = next(partly)
        assert expected["a"][0].startswith(first) and len(first) < len(expected["a"][0])
        partly.close()   # the consumer stops early
        rows = []
        assert b"".join(copies.stream(c, rows)) == expected["c"][0]   # b is skipped
        with pytest.raises(RuntimeError, match="read already"):
            next(copies.stream(b, []))
    finally:
        copies.close()   # and d is read and dropped
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_failing_statement_fails_its_own_stream(conn):
    a, b, d = infos(conn, "a", "b", "d")
    b.condition = "WHERE 1 / (id - 2) > 0"   # division by zero on its second row
    copies = pgsource.CopyOuts(conn, [a, b, d])
    rows_a = []
    assert b"".join(copies.stream(a, rows_a)) and rows_a == [3000]
    with pytest.raises(psycopg.errors.DivisionByZero):
        b"".join(copies.stream(b, []))
    copies.close()   # the server ran nothing after it; nothing more to raise
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_closing_unread_streams_frees_the_connection(conn):
    copies = pgsource.CopyOuts(conn, infos(conn, "a", "b", "c"))
    copies.close()
    copies.close()
    assert conn.execute("SELECT count(*) FROM public.a").fetchone() == (3000,)


def test_a_batch_whose_table_is_refused_names_that_table(pg, db, repo):
    """Row level security refuses one table of a batch: snap fails naming it, and
    writes nothing."""
    with pg.connect() as conn:
        conn.execute("""DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fpv_batch') THEN
              CREATE ROLE fpv_batch LOGIN NOSUPERUSER NOBYPASSRLS;
            END IF; END $$""")
    pg.execute(db, TABLES + """
        ALTER TABLE a OWNER TO fpv_batch; ALTER TABLE b OWNER TO fpv_batch;
        ALTER TABLE c OWNER TO fpv_batch; ALTER TABLE d OWNER TO fpv_batch;
        ALTER TABLE c ENABLE ROW LEVEL SECURITY; ALTER TABLE c FORCE ROW LEVEL SECURITY;
        CREATE POLICY none ON c USING (false)""")
    r = run("snap", "-r", repo, "-d", pg.dsn(db, user="fpv_batch"))
    assert r.code == 5, r.err
    assert "row-level security policy for table \"c\"" in r.err, r.err
    assert "No snapshot was written" in r.err, r.err
    r = run("list", "-r", repo, "--json")
    assert r.code == 0 and json.loads(r.out) == []


def test_batches_are_read_with_one_query_each(pg, db, repo, monkeypatch):
    """The small tables of a snapshot go in batches, each one query, on the leader
    and on workers alike; what is stored is what one query per table stores."""
    pg.execute(db, TABLES + "DO $$ BEGIN FOR i IN 1..40 LOOP EXECUTE format("
                   "'CREATE TABLE m%s (id int PRIMARY KEY, v text); "
                   "INSERT INTO m%s SELECT g, md5(g::text) FROM generate_series(1, %s) g', "
                   "i, i, i); END LOOP; END $$")
    batches = []
    real = pgsource.CopyOuts.__init__

    def spy(self, conn, tables, key_range=None):
        batches.append(len(tables))
        real(self, conn, tables, key_range)

    monkeypatch.setattr(pgsource.CopyOuts, "__init__", spy)
    results = []
    for args in ([], ["--reread", "-j", "2"]):
        batches.clear()
        r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", *args)
        assert r.code == 0, r.err
        results.append(json.loads(r.out))
        assert sum(n for n in batches if n > 1) == 43, batches   # a goes through psql
        assert max(batches) <= snapshot.BATCH_TABLES
    # Read one statement at a time: the same streams, nothing new stored.
    monkeypatch.setattr(snapshot, "BATCH_TABLES", 1)
    batches.clear()
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", "--reread")
    assert r.code == 0, r.err
    assert batches and set(batches) == {1}
    assert json.loads(r.out)["bytes_added"] < 16 * 1024
    target = pg.createdb()
    assert run("restore", results[1]["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    for table in ("a", "b", "m40"):
        q = f"SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM {table} t"
        assert pg.query(target, q) == pg.query(db, q)


def blocked_while(pg, db, hold, *snap_args, repo):
    """Run snap while another session holds the lock that ``hold`` takes in an open
    transaction; if snap is still running after 15 s, say whether a backend of ours
    waits for that session, and let go.  (snap, whether it waited)."""
    waited = []
    with psycopg.connect(pg.dsn(db), autocommit=True) as other:
        for statement in hold:
            other.execute(statement)
        holder = other.info.backend_pid

        def watchdog():
            with psycopg.connect(pg.dsn(db), autocommit=True) as look:
                waited.extend(look.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND %s = ANY(pg_blocking_pids(pid))", (holder,)).fetchall())
                look.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                             "WHERE wait_event_type = 'Lock'")

        timer = threading.Timer(15, watchdog)
        timer.start()
        try:
            r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", *snap_args)
        finally:
            timer.cancel()
        other.execute("ROLLBACK")
    return r, waited


def test_another_sessions_temporary_table_does_not_hold_up_a_snapshot(pg, db, repo):
    """pg_dump leaves other sessions' temporary tables out, and so must everything
    snap asks of the catalog: such a table's session may hold its lock for long."""
    pg.execute(db, TABLES)
    r, waited = blocked_while(pg, db, ["CREATE TEMPORARY TABLE scratch (id int)", "BEGIN",
                                       "LOCK TABLE scratch IN ACCESS EXCLUSIVE MODE"], repo=repo)
    assert not waited and r.code == 0, (waited, r.err)
    assert sorted(t["name"] for t in json.loads(
        run("show", json.loads(r.out)["id"], "-r", repo, "--json").out)["tables"]) == [f"public.{n}" for n in "abcd"]


def test_a_table_left_out_does_not_hold_up_a_snapshot(pg, db, repo):
    pg.execute(db, TABLES)
    r, waited = blocked_while(pg, db, ["BEGIN", "LOCK TABLE c IN ACCESS EXCLUSIVE MODE"],
                              "--exclude-table", "public.c", repo=repo)
    assert not waited and r.code == 0, (waited, r.err)


def test_connection_lost_in_a_batch_writes_nothing(pg, db, repo, monkeypatch):
    pg.execute(db, "DO $$ BEGIN FOR i IN 1..30 LOOP EXECUTE format("
                   "'CREATE TABLE s%s (id int PRIMARY KEY, v text); "
                   "INSERT INTO s%s SELECT g, md5(g::text) FROM generate_series(1, 500) g', "
                   "i, i); END LOOP; END $$")
    killed = threading.Event()
    real = pgsource.CopyOuts.stream

    def stream(self, table, rows=None):   # slow enough for the backend to be killed meanwhile
        if not killed.is_set():
            with pg.connect() as conn:
                if conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s AND query LIKE 'COPY%%; COPY%%'",
                                (db,)).fetchall():
                    killed.set()
                    time.sleep(0.2)
        yield from real(self, table, rows)

    monkeypatch.setattr(pgsource.CopyOuts, "stream", stream)
    r = run("snap", "-r", repo, "-d", pg.dsn(db))
    assert killed.is_set()
    assert r.code == 5, r.err
    assert "No snapshot was written" in r.err and "Traceback" not in r.err, r.err
    assert json.loads(run("list", "-r", repo, "--json").out) == []
    monkeypatch.setattr(pgsource.CopyOuts, "stream", real)
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 0 and json.loads(r.out)["rows"] == 30 * 500


@pytest.mark.parametrize("failure", ["store", "interrupt"])
def test_a_failure_while_a_batch_is_stored_is_that_failure(pg, db, repo, monkeypatch, failure):
    """Storing a batch's table fails while it holds the table's last (here only)
    buffer: the snapshot fails with that error, and the rest of the batch is not
    mistaken for it."""
    pg.execute(db, TABLES)
    real = StreamWriter.write

    def write(self, buf):
        if b"tab\\there" in bytes(buf):   # table b's rows
            if failure == "store":
                raise FpvaultError("No space left on the device of the repository")
            raise KeyboardInterrupt()
        return real(self, buf)

    monkeypatch.setattr(StreamWriter, "write", write)
    r = run("snap", "-r", repo, "-d", pg.dsn(db))
    if failure == "store":
        assert r.code == 1 and r.err.strip() == "fpvault: No space left on the device of the " \
            "repository", r.err
    else:
        assert r.code == 130 and r.err.strip() == "Interrupted.", r.err
    assert json.loads(run("list", "-r", repo, "--json").out) == []
    monkeypatch.setattr(StreamWriter, "write", real)
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 0 and json.loads(r.out)["tables"] == 4, r.err


def test_a_refusal_in_a_sql_ascii_batch_is_the_refusal(pg, repo):
    """In a SQL_ASCII database each COPY switches the session's encoding and back:
    not in a transaction that the refusal aborted, which would hide it."""
    db = f"ascii_{os.getpid()}"
    with pg.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}"')
        conn.execute(f"CREATE DATABASE \"{db}\" TEMPLATE template0 ENCODING 'SQL_ASCII' "
                     "LC_COLLATE 'C' LC_CTYPE 'C'")
        conn.execute("""DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fpv_batch') THEN
              CREATE ROLE fpv_batch LOGIN NOSUPERUSER NOBYPASSRLS;
            END IF; END $$""")
    pg.execute(db, TABLES + """
        ALTER TABLE a OWNER TO fpv_batch; ALTER TABLE b OWNER TO fpv_batch;
        ALTER TABLE c OWNER TO fpv_batch; ALTER TABLE d OWNER TO fpv_batch;
        ALTER TABLE c ENABLE ROW LEVEL SECURITY; ALTER TABLE c FORCE ROW LEVEL SECURITY;
        CREATE POLICY none ON c USING (false)""")
    r = run("snap", "-r", repo, "-d", pg.dsn(db, user="fpv_batch"))
    assert r.code == 5, r.err
    assert "row-level security policy for table \"c\"" in r.err, r.err


def test_a_table_in_information_schema_does_not_hold_up_a_snapshot(pg, db, repo):
    """pg_dump skips the system schemas, where a superuser may still make a table."""
    pg.execute(db, TABLES + "CREATE TABLE information_schema.scratch_fpv (id int)")
    try:
        r, waited = blocked_while(
            pg, db, ["BEGIN", "LOCK TABLE information_schema.scratch_fpv IN ACCESS EXCLUSIVE MODE"],
            repo=repo)
    finally:
        pg.execute(db, "DROP TABLE information_schema.scratch_fpv")
    assert not waited and r.code == 0, (waited, r.err)
