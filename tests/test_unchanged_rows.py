"""After a commit, snap takes a table unread when all its rows are older than the
previous snapshot and as many (pgsource.rows_unchanged).  Each test compares what
snap stored with what reading every table (--reread) stores at the same moment."""

import json
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run
from test_unchanged import reads, snap
from fpvault import pgsource, snapshot
from fpvault.vault import Vault

SCHEMA = ("CREATE TYPE mood AS ENUM ('calm', 'cross'); "
          "CREATE TABLE a (id int PRIMARY KEY, v text, m mood DEFAULT 'calm'); "
          "INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 2000) g; "
          "CREATE TABLE b (v text); INSERT INTO b VALUES ('x'), ('x'), (NULL); "
          "CREATE TABLE c (id int PRIMARY KEY); INSERT INTO c VALUES (1), (2);")


@pytest.fixture(autouse=True)
def _probe_small_tables(monkeypatch):
    """Tables of 8 MiB and more get a sampled look before the scan: here, all do."""
    monkeypatch.setattr(pgsource, "PROBE_MIN_BYTES", 0)


def tables(repo, sid):
    return {t.name: (t.data.hash, t.rows) for t in Vault.open(repo).resolve(sid)[1].tables}


def snap_and_compare(pg, repo, db, monkeypatch, *args):
    """Snap; the tables it read; and check that what it stored is what a full read
    stores now (nothing changes in between: the test is the only writer)."""
    seen = reads(monkeypatch)
    doc = snap(pg, repo, db, *args)
    read = sorted(seen)
    full = snap(pg, repo, db, "--reread")
    assert tables(repo, doc["id"]) == tables(repo, full["id"])
    assert doc["tables_reused"] == 3 - len(read)
    return read


@pytest.mark.parametrize("change", [
    "UPDATE a SET v = 'changed' WHERE id = 7",
    "UPDATE a SET v = v WHERE id = 7",                       # same text, a new row version
    "DELETE FROM a WHERE id = 7",
    "DELETE FROM a WHERE id = 7; INSERT INTO a VALUES (7, md5('7'))",   # as many rows
    "INSERT INTO a VALUES (-1, 'new')",
    "BEGIN; TRUNCATE a; INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 2000) g; "
    "COMMIT",
])
def test_a_changed_table_is_read_and_the_rest_taken(pg, db, repo, monkeypatch, change):
    pg.execute(db, SCHEMA)
    snap(pg, repo, db)
    pg.execute(db, change)
    assert snap_and_compare(pg, repo, db, monkeypatch) == ["a"]


def test_looks_run_on_every_reading_connection(pg, db, repo, monkeypatch):
    """With -j, a table is looked at by the connection that would read it, so the
    scans run at once; what is stored is as with -j 1.  (Tables this small are
    looked at in one batch, but for this test.)"""
    monkeypatch.setattr(snapshot, "BATCH_TABLES", 1)
    pg.execute(db, SCHEMA)
    snap(pg, repo, db, "-j", "3")
    pg.execute(db, "UPDATE a SET v = 'changed' WHERE id = 7")
    pids = []
    real = pgsource.rows_unchanged

    def spy(conn, *args):
        pids.append(conn.info.backend_pid)
        time.sleep(0.3)     # long enough for every connection to take a table
        return real(conn, *args)

    monkeypatch.setattr(pgsource, "rows_unchanged", spy)
    assert snap_and_compare(pg, repo, db, monkeypatch, "-j", "3") == ["a"]
    assert len(pids) == 3 and len(set(pids)) == 3


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_small_tables_are_looked_at_together(pg, db, repo, monkeypatch, jobs):
    """Small tables are looked at BATCH_TABLES to a statement, by the leader and
    by -j's workers; a table changed among them is still found, and read."""
    pg.execute(db, "DO $$ BEGIN FOR i IN 1..40 LOOP EXECUTE format("
                   "'CREATE TABLE s%s (id int PRIMARY KEY, v text); INSERT INTO s%s "
                   "SELECT g, md5(g::text) FROM generate_series(1, 50) g', i, i); END LOOP; END $$")
    snap(pg, repo, db, "-j", jobs)
    pg.execute(db, "UPDATE s17 SET v = 'changed' WHERE id = 3")
    batches = []
    real = pgsource.rows_unchanged
    monkeypatch.setattr(pgsource, "rows_unchanged",
                        lambda conn, ts, *args: batches.append(len(ts)) or real(conn, ts, *args))
    seen = reads(monkeypatch)
    doc = snap(pg, repo, db, "-j", jobs)
    assert sorted(batches) == [8, 32] and seen == ["s17"] and doc["tables_reused"] == 39
    full = snap(pg, repo, db, "--reread")
    assert tables(repo, doc["id"]) == tables(repo, full["id"])


@pytest.mark.parametrize("passive", [False, True])
def test_ddl_queued_on_unchanged_tables_does_not_fail_a_parallel_snapshot(pg, db, repo,
                                                                          monkeypatch, passive):
    """A worker cannot lock a table behind an ALTER queued after the leader's lock; the
    leader, which holds every lock, looks at that table itself (as it looked at all
    of them before -j looked at once), and the unchanged ones are taken unread.
    (``passive``: the worker takes every task, here the batch of all three tables,
    whose lock fails as a whole: each is then taken on its own.)"""
    if passive:
        monkeypatch.setattr(snapshot, "LEADER_READS_MAX_TABLES", 2)
    pg.execute(db, SCHEMA)
    snap(pg, repo, db, "-j", "2")
    pg.execute(db, "UPDATE a SET v = 'changed' WHERE id = 7")
    waiting = []

    def alter(table):
        with pg.connect(db) as conn:
            conn.execute("SET lock_timeout = '60s'")
            conn.execute(f"ALTER TABLE {table} ADD COLUMN z int")

    real = pgsource.rewritten_since_snapshot

    def locks_taken(conn, oids):   # the leader holds its locks now: queue DDL behind them
        for table in ("b", "c"):
            waiting.append(threading.Thread(target=alter, args=(table,)))
            waiting[-1].start()
        with pg.connect(db) as other:
            while other.execute("SELECT count(*) FROM pg_locks l JOIN pg_database d "
                                "ON d.oid = l.database AND d.datname = current_database() "
                                "WHERE NOT l.granted").fetchone()[0] < 2:
                time.sleep(0.02)
        return real(conn, oids)

    monkeypatch.setattr(pgsource, "rewritten_since_snapshot", locks_taken)
    looks = []
    real_looks = pgsource.rows_unchanged
    monkeypatch.setattr(pgsource, "rows_unchanged",
                        lambda conn, ts, *args: looks.append(sorted(t.name for t, _ in ts))
                        or real_looks(conn, ts, *args))
    doc = snap(pg, repo, db, "-j", "2")
    for thread in waiting:
        thread.join()
    assert doc["tables_reused"] == 2
    if passive:   # the worker looked at a alone (and read it), the leader at b and c
        assert sorted(looks) == [["a"], ["b"], ["c"]], looks


def test_rewrites_and_freezing_keep_the_rows(pg, db, repo, monkeypatch):
    """VACUUM FULL and CLUSTER move rows to new files with their xmins; freezing
    marks them; none of it changes a row: nothing is read, and it restores."""
    pg.execute(db, SCHEMA + "ALTER TABLE c CLUSTER ON c_pkey")   # the dump says so
    snap(pg, repo, db)
    pg.execute(db, "VACUUM FULL a")
    pg.execute(db, "CLUSTER c")
    pg.execute(db, "VACUUM FREEZE b")
    pg.execute(db, "CREATE TEMP TABLE t (x int)")   # a commit, so the xids differ
    seen = reads(monkeypatch)
    doc = snap(pg, repo, db)
    assert seen == [] and doc["tables_reused"] == 3
    target = pg.createdb()
    assert run("restore", doc["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    for q in ("SELECT count(*), md5(string_agg(v || m, ',' ORDER BY id)) FROM a",
              "SELECT count(*), count(v) FROM b", "SELECT array_agg(id ORDER BY id) FROM c"):
        assert pg.query(target, q) == pg.query(db, q), q


@pytest.mark.parametrize("change", [
    "ALTER TYPE mood RENAME VALUE 'calm' TO 'serene'",     # a's text, not its rows
    "ALTER TABLE c ADD COLUMN w int DEFAULT 5",            # c's text, not its rows
    "COMMENT ON TABLE b IS 'any schema change'",
])
def test_a_schema_change_reads_every_table(pg, db, repo, monkeypatch, change):
    pg.execute(db, SCHEMA)
    snap(pg, repo, db)
    pg.execute(db, change)
    assert snap_and_compare(pg, repo, db, monkeypatch) == ["a", "b", "c"]


def test_snapshots_far_apart_in_xids_are_read(pg, db, repo, monkeypatch):
    """age() compares xids modulo 2^32: past the horizon, a table is read."""
    pg.execute(db, SCHEMA)
    snap(pg, repo, db)
    pg.execute(db, "CREATE TEMP TABLE t (x int)")
    monkeypatch.setattr(pgsource, "XID_HORIZON", 1)
    seen = reads(monkeypatch)
    snap(pg, repo, db)
    assert sorted(seen) == ["a", "b", "c"]


def test_only_heap_tables_are_looked_at(pg, db):
    pg.execute(db, SCHEMA)
    with pg.connect(db) as conn:
        (table,) = pgsource.table_infos(conn, [pg.query(db, "SELECT 'a'::regclass::oid")[0][0]])
        assert table.access_method == "heap"
        xmax = int(conn.execute("SELECT txid_current_snapshot()::text").fetchone()[0]
                   .split(":")[1])
        assert pgsource.rows_unchanged(conn, [(table, 2000)], xmax, xmax) == {table.oid}
        assert pgsource.rows_unchanged(conn, [(table, 1999)], xmax, xmax) == set()
        table.access_method = "columnar"
        assert pgsource.rows_unchanged(conn, [(table, 2000)], xmax, xmax) == set()


def test_a_table_changed_last_time_is_read_without_a_look(pg, db, repo, monkeypatch):
    pg.execute(db, SCHEMA)
    snap(pg, repo, db)
    pg.execute(db, "UPDATE a SET v = 'changed' WHERE id = 7")
    snap(pg, repo, db)                                  # a is read: it changed
    pg.execute(db, "CREATE TEMP TABLE t (x int)")
    seen = reads(monkeypatch)
    looked = []
    real = pgsource.rows_unchanged
    monkeypatch.setattr(pgsource, "rows_unchanged",
                        lambda conn, ts, *args: looked.extend(t.name for t, _ in ts)
                        or real(conn, ts, *args))
    snap(pg, repo, db)                                  # changed last time: read again
    assert seen == ["a"] and sorted(looked) == ["b", "c"]
    seen.clear(), looked.clear()
    pg.execute(db, "CREATE TEMP TABLE t (x int)")
    doc = snap(pg, repo, db)                            # the same twice: looked at
    assert seen == [] and sorted(looked) == ["a", "b", "c"] and doc["tables_reused"] == 3


class Statements:
    """A connection that records what it is asked to execute."""

    def __init__(self, conn):
        self.conn, self.seen = conn, []

    def execute(self, query, *args):
        self.seen.append(query.as_string(self.conn))
        return self.conn.execute(query, *args)


def test_the_sample_finds_scattered_updates_without_the_scan(pg, db, monkeypatch):
    pg.execute(db, "CREATE TABLE big (id int PRIMARY KEY, v text); "
                   "INSERT INTO big SELECT g, 'v' FROM generate_series(1, 20000) g")
    monkeypatch.setattr(pgsource, "PROBE_PERCENT", 100)
    with pg.connect(db) as conn:
        oid = conn.execute("SELECT 'big'::regclass::oid").fetchone()[0]
        (table,) = pgsource.table_infos(conn, [oid])
        xids = conn.execute("SELECT txid_current_snapshot()::text").fetchone()[0]
        before, newest = int(xids.split(":")[0]), int(xids.split(":")[1])
        rec = Statements(conn)
        assert pgsource.rows_unchanged(rec, [(table, 20000)], before, newest) == {table.oid}
        assert len(rec.seen) == 2 and "TABLESAMPLE" in rec.seen[0]   # the sample, the scan
        conn.execute("UPDATE big SET v = 'w' WHERE id % 100 = 0")
        rec.seen.clear()
        assert not pgsource.rows_unchanged(rec, [(table, 20000)], before, newest + 1)
        assert len(rec.seen) == 1                                     # the sample alone


# Random edits between snapshots; after each snapshot, what it stored must be what a
# full read stores.  Rows: key in 0..30, so edits collide.
edit = st.one_of(
    st.tuples(st.just("INSERT INTO a VALUES ({k}, 'i{v}') ON CONFLICT (id) DO NOTHING"),
              st.integers(0, 30), st.integers(0, 3)),
    st.tuples(st.just("UPDATE a SET v = 'u{v}' WHERE id = {k}"), st.integers(0, 30),
              st.integers(0, 3)),
    st.tuples(st.just("DELETE FROM a WHERE id = {k}"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("INSERT INTO b VALUES ('b{v}')"), st.just(0), st.integers(0, 2)),
    st.tuples(st.just("DELETE FROM b WHERE ctid = (SELECT min(ctid) FROM b)"), st.just(0),
              st.just(0)),
    st.tuples(st.sampled_from(["VACUUM a", "VACUUM FULL b", "SELECT 1"]), st.just(0),
              st.just(0)),
)


@given(rounds=st.lists(st.lists(edit, max_size=4), min_size=1, max_size=4))
@settings(max_examples=8, deadline=None)
def test_random_edits_store_what_a_full_read_stores(pg, tmp_path_factory, rounds):
    db = pg.createdb()
    repo = str(tmp_path_factory.mktemp("r") / "repo")
    assert run("init", "-r", repo).code == 0
    pg.execute(db, "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (v text); "
                   "CREATE TABLE c (id int PRIMARY KEY); "
                   "INSERT INTO a SELECT g, 's' FROM generate_series(0, 30, 3) g; "
                   "INSERT INTO c VALUES (1)")
    snap(pg, repo, db)
    for edits in rounds:
        for statement, k, v in edits:
            pg.execute(db, statement.format(k=k, v=v))
        pg.execute(db, "CREATE TEMP TABLE t (x int)")   # a commit, whatever the edits
        doc = snap(pg, repo, db)
        full = snap(pg, repo, db, "--reread")
        assert tables(repo, doc["id"]) == tables(repo, full["id"])
        assert doc["tables_reused"] >= 1   # c never changes


# -- large objects

LARGE_OBJECTS = (
    "SELECT lo_from_bytea(9001, 'untouched'); "
    "SELECT lo_from_bytea(9002, decode(repeat('ab', 5000), 'hex')); "        # 3 pages
    "SELECT lo_from_bytea(9003, decode(repeat('cd', 4196), 'hex')); "        # 3 pages
    "SELECT lo_from_bytea(9004, decode(repeat('ef', 3000), 'hex')); "
    "SELECT lo_from_bytea(9005, 'to be unlinked'); "
    "SELECT lo_create(9006); "                                               # no page
    "SELECT lo_create(9008); SELECT lo_put(9008, 10000, 'sparse'); "         # one page, 4
    "COMMENT ON LARGE OBJECT 9001 IS E'a comment\\non two lines'; ")


def lo_reads(monkeypatch):
    seen = []
    real = pgsource.large_object

    def spy(conn, oid):
        seen.append(oid)
        return real(conn, oid)

    monkeypatch.setattr(pgsource, "large_object", spy)
    return seen


def large_objects(repo, sid):
    return {lo.oid: (lo.data.hash, lo.pages) for lo in Vault.open(repo).resolve(sid)[1].large_objects}


def test_large_objects_are_looked_at_like_tables(pg, db, repo, monkeypatch):
    """After a commit, a large object with as many pages as the previous snapshot
    counted, all older than it, is taken unread; a written, truncated or new one
    is read.  Creating or unlinking one changes pg_dump's schema, but not how any
    table prints: the tables are still looked at, not read."""
    pg.execute(db, SCHEMA + LARGE_OBJECTS)
    first = snap(pg, repo, db)
    assert large_objects(repo, first["id"])[9002][1] == 3
    pg.execute(db, "SELECT lo_put(9004, 10, 'X'); "
                   "BEGIN; SELECT lo_truncate(lo_open(9003, 131072), 4096); COMMIT; "
                   "SELECT lo_unlink(9005); SELECT lo_from_bytea(9007, 'new')")
    seen = lo_reads(monkeypatch)
    doc = snap(pg, repo, db)
    assert sorted(seen) == [9003, 9004, 9007] and doc["tables_reused"] == 3
    monkeypatch.undo()
    full = snap(pg, repo, db, "--reread")
    assert large_objects(repo, doc["id"]) == large_objects(repo, full["id"])

    target = pg.createdb()
    assert run("restore", doc["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    q = ("SELECT m.oid, md5(lo_get(m.oid)) FROM pg_largeobject_metadata m ORDER BY 1")
    assert pg.query(target, q) == pg.query(db, q)
    assert [r[0] for r in pg.query(target, q)] == [9001, 9002, 9003, 9004, 9006, 9007, 9008]

    # With a change that does print rows another way, tables are read as before.
    pg.execute(db, "ALTER TYPE mood RENAME VALUE 'calm' TO 'serene'; SELECT lo_create(9009)")
    changed = snap(pg, repo, db)
    assert changed["tables_reused"] == 0
    assert tables(repo, changed["id"]) == tables(repo, snap(pg, repo, db, "--reread")["id"])


def test_large_objects_of_a_role_that_cannot_see_their_pages_are_read(pg, db, repo, monkeypatch):
    """Only a superuser may read pg_largeobject unless granted: for any other role
    every large object is read, as before."""
    pg.execute(db, "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fpv_lo') "
                   "THEN CREATE ROLE fpv_lo LOGIN; END IF; END $$; "
                   f"GRANT ALL ON DATABASE {db} TO fpv_lo; GRANT ALL ON SCHEMA public TO fpv_lo")
    with pg.connect(db, user="fpv_lo") as conn:
        conn.execute("SELECT lo_from_bytea(9101, 'mine'); SELECT lo_from_bytea(9102, 'also')")
    dsn = pg.dsn(db, user="fpv_lo")
    assert run("snap", "-r", repo, "-d", dsn).code == 0
    pg.execute("postgres", "SELECT txid_current()")      # a commit, elsewhere
    seen = lo_reads(monkeypatch)
    r = run("snap", "-r", repo, "-d", dsn, "--json")
    assert r.code == 0, r.err
    assert sorted(seen) == [9101, 9102]
    assert large_objects(repo, json.loads(r.out)["id"])[9101][1] is None


def test_tables_that_print_catalog_names_are_read(pg, db, repo, monkeypatch):
    """A regrole (or regclass, ... also in a domain or an array) value prints a
    name: renaming a role, which is not in the dump, changes the table's text
    without touching a row or the schema.  Such tables are read, not looked at."""
    pg.execute(db, "DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'fpv_ren_b') "
                   "THEN DROP ROLE fpv_ren_b; END IF; "
                   "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fpv_ren_a') "
                   "THEN CREATE ROLE fpv_ren_a; END IF; END $$; "
                   "CREATE DOMAIN role_name AS regrole; "
                   "CREATE TABLE grants (id int PRIMARY KEY, r regrole); "
                   "INSERT INTO grants VALUES (1, 'fpv_ren_a'); "
                   "CREATE TABLE teams (id int PRIMARY KEY, members role_name[]); "
                   "INSERT INTO teams VALUES (1, ARRAY['fpv_ren_a']::role_name[]); "
                   "CREATE TABLE plain (id int PRIMARY KEY); INSERT INTO plain VALUES (1)")
    snap(pg, repo, db)
    pg.execute(db, "ALTER ROLE fpv_ren_a RENAME TO fpv_ren_b")
    try:
        seen = reads(monkeypatch)
        doc = snap(pg, repo, db)
        assert sorted(seen) == ["grants", "teams"] and doc["tables_reused"] == 1
        monkeypatch.undo()
        target = pg.createdb()
        r = run("restore", doc["id"], "-r", repo, "--to", pg.dsn(target))
        assert r.code == 0, r.err
        assert pg.query(target, "SELECT r::text FROM grants") == [("fpv_ren_b",)]
    finally:
        pg.execute(db, "DROP TABLE grants, teams; DROP ROLE fpv_ren_b")


def test_tables_printing_types_the_dump_leaves_out_are_read(pg, db, repo, monkeypatch):
    """With -t (or -n, -N) the dump may not define an enum or composite type a column
    prints: renaming a label or adding an attribute changes the table's text, not
    its rows, nor the schema the dump holds.  Such tables are read; a table whose
    types the dump defines is still looked at, and taken unread."""
    pg.execute(db, "CREATE TYPE status AS ENUM ('new', 'done'); "
                   "CREATE TYPE pair AS (a int, b text); "
                   "CREATE TABLE orders (id int PRIMARY KEY, s status); "
                   "INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 10) g; "
                   "CREATE TABLE pairs (id int PRIMARY KEY, p pair[]); "
                   "INSERT INTO pairs VALUES (1, ARRAY[ROW(1, 'x')::pair]); "
                   "CREATE TYPE span AS RANGE (subtype = status); "
                   "CREATE TABLE spans (id int PRIMARY KEY, s span_multirange); "
                   "INSERT INTO spans VALUES (1, '{[new,done]}'); "
                   "CREATE TABLE plain (id int PRIMARY KEY); INSERT INTO plain VALUES (1)")
    only = ["-t", "orders", "-t", "pairs", "-t", "plain", "-t", "spans"]
    snap(pg, repo, db, *only)
    pg.execute(db, "ALTER TYPE status RENAME VALUE 'new' TO 'open'; "
                   "ALTER TYPE pair ADD ATTRIBUTE c int CASCADE")
    seen = reads(monkeypatch)
    doc = snap(pg, repo, db, *only)
    assert sorted(seen) == ["orders", "pairs", "spans"] and doc["tables_reused"] == 1
    monkeypatch.undo()
    r = run("restore", doc["id"], "-r", repo, "-o", "-")
    assert r.code == 0 and "\topen\n" in r.out and '{"(1,x,)"}' in r.out, r.out
    assert "{[open,done]}" in r.out, r.out
    # Without filters the dump defines both: a change to them changes its schema.
    pg.execute("postgres", "SELECT txid_current()")
    seen = reads(monkeypatch)
    snap(pg, repo, db)                  # (new filters: everything read)
    pg.execute("postgres", "SELECT txid_current()")
    seen.clear()
    doc = snap(pg, repo, db)
    assert seen == [] and doc["tables_reused"] == 4


def test_a_label_imitating_a_large_object_entry_hides_no_change(pg, db, repo, monkeypatch):
    """Large objects' entries are left out of the schema comparison, found by the
    headers pg_restore writes; an enum label can imitate one.  What it would hide
    (a later label renamed) still counts: the table is read."""
    pg.execute(db, "CREATE TYPE e AS ENUM ('a', E'\\n--\\n-- Name: x; Type: BLOB; "
                   "Schema: -; Owner: -\\n--\\n', 'b'); "
                   "CREATE TABLE t (id int PRIMARY KEY, v e); INSERT INTO t VALUES (1, 'b')")
    snap(pg, repo, db)
    pg.execute(db, "ALTER TYPE e RENAME VALUE 'b' TO 'c'")
    seen = reads(monkeypatch)
    doc = snap(pg, repo, db)
    assert seen == ["t"], seen
    monkeypatch.undo()
    r = run("restore", doc["id"], "-r", repo, "-o", "-")
    assert r.code == 0 and "1\tc\n" in r.out
