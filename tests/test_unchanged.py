"""A snapshot of a database on which nothing was committed since the last one reads
no table: the same transactions running prove nothing changed (manifest.XactMark).
After a commit, only the tables whose rows changed are read (test_unchanged_rows.py)."""

import dataclasses
import json
import os
import signal
import time

import psycopg
import pytest

from conftest import run
from fpvault import pgsource, snapshot
from fpvault.vault import Vault

SCHEMA = ("CREATE TABLE a (id int PRIMARY KEY, v text); "
          "INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 3000) g; "
          "CREATE TABLE b (v text); INSERT INTO b VALUES ('x'), ('x'), (NULL); "
          "CREATE UNLOGGED TABLE u (id int PRIMARY KEY); INSERT INTO u VALUES (1); "
          "CREATE SEQUENCE s; SELECT nextval('s'); SELECT nextval('s'); "
          "SELECT lo_from_bytea(4242, 'large object');")


def snap(pg, repo, db, *args):
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", *args)
    assert r.code == 0, r.err
    return json.loads(r.out)


def reads(monkeypatch):
    """The tables snap reads."""
    seen = []
    real = snapshot.copy_out

    def spy(conn, reader, table, key_range, rows, copies=None):
        seen.append(table.name)
        return real(conn, reader, table, key_range, rows, copies)

    monkeypatch.setattr(snapshot, "copy_out", spy)
    return seen


def pg_dump_runs(monkeypatch):
    """pg_dump's runs, as snap starts them."""
    runs = []
    real = snapshot._dump_schema

    def counted(*args):
        runs.append(args)
        return real(*args)

    monkeypatch.setattr(snapshot, "_dump_schema", counted)
    return runs


def manifest(repo, sid):
    return Vault.open(repo).resolve(sid)[1]


def quiet_pair(pg, repo, db, monkeypatch):
    """Two snapshots with nothing committed in between, and the tables the second
    read.  (On a server of FPVAULT_TEST_DSN autovacuum may commit meanwhile: then
    the marks differ, and the pair is taken again.)"""
    for _ in range(10):
        first = snap(pg, repo, db)
        seen = reads(monkeypatch)
        second = snap(pg, repo, db)
        monkeypatch.undo()
        marks = [manifest(repo, d["id"]).xact for d in (first, second)]
        assert marks[0] is not None
        if marks[0] == marks[1]:
            return first, second, seen
    raise AssertionError("transactions kept ending between two snapshots")


def test_nothing_committed_nothing_read(pg, db, repo, monkeypatch):
    pg.execute(db, SCHEMA)
    first, second, seen = quiet_pair(pg, repo, db, monkeypatch)
    assert seen == [] and second["tables_reused"] == 3 and second["bytes_read"] == 0
    assert second["bytes_added"] < 16 * 1024
    one, two = manifest(repo, first["id"]), manifest(repo, second["id"])
    assert [(t.qname, t.data, t.rows) for t in one.tables] == \
        [(t.qname, t.data, t.rows) for t in two.tables]
    assert one.large_objects == two.large_objects

    # Restorable and verified like any other.
    assert run("verify", "-r", repo, "--read-data").code == 0
    target = pg.createdb()
    assert run("restore", second["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    for q in ("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM a",
              "SELECT count(*) FROM b", "SELECT last_value FROM s",
              "SELECT convert_from(lo_get(4242), 'UTF8')"):
        assert pg.query(target, q) == pg.query(db, q), q

    # --reread reads everything anyway (and stores nothing new).
    seen = reads(monkeypatch)
    third = snap(pg, repo, db, "--reread")
    assert sorted(seen) == ["a", "b", "u"] and third["tables_reused"] == 0
    assert [t.data.list for t in manifest(repo, third["id"]).tables] == \
        [t.data.list for t in two.tables]


def checks(monkeypatch):
    """The tables snap looks at row by row (pgsource.rows_unchanged)."""
    seen = []
    real = pgsource.rows_unchanged

    def spy(conn, tables, *args):
        seen.extend(table.name for table, _rows in tables)
        return real(conn, tables, *args)

    monkeypatch.setattr(pgsource, "rows_unchanged", spy)
    return seen


def test_after_a_commit_anywhere_each_table_is_looked_at(pg, db, repo, monkeypatch):
    """A commit ends the shortcut: every table's rows are looked at, and only the
    tables whose rows changed are read."""
    pg.execute(db, SCHEMA)
    snap(pg, repo, db)
    seen, looked = reads(monkeypatch), checks(monkeypatch)
    # An unlogged table writes no WAL for its rows, but its commit is logged.
    pg.execute(db, "INSERT INTO u VALUES (2)")
    doc = snap(pg, repo, db)
    assert sorted(looked) == ["a", "b", "u"] and seen == ["u"] and doc["tables_reused"] == 2
    target = pg.createdb()
    assert run("restore", doc["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    assert pg.query(target, "SELECT count(*) FROM u") == [(2,)]
    # A commit in another database of the cluster: u changed last time, so it is read
    # again without a look; the next time, it is looked at like the rest.
    other = pg.createdb()
    for read in (["u"], []):
        seen.clear(), looked.clear()
        pg.execute(other, "CREATE TABLE IF NOT EXISTS elsewhere (x int); "
                          "INSERT INTO elsewhere VALUES (1)")
        doc = snap(pg, repo, db)
        assert seen == read and sorted(looked + read) == ["a", "b", "u"]
    assert doc["tables_reused"] == 3
    # The large object is looked at too (test_unchanged_rows.py): nothing is read.
    assert doc["bytes_read"] == 0 and doc["bytes_added"] < 16 * 1024


def test_a_sequence_moved_without_wal_is_still_read(pg, db, repo):
    pg.execute(db, SCHEMA)
    first = snap(pg, repo, db)
    pg.execute(db, "SELECT nextval('s')")   # the 3rd value: logged ahead with the 1st
    doc = snap(pg, repo, db)
    # nextval ends no transaction: the tables are taken unread (unless autovacuum, on a
    # server of FPVAULT_TEST_DSN, committed meanwhile).
    quiet = manifest(repo, doc["id"]).xact == manifest(repo, first["id"]).xact
    assert doc["tables_reused"] == (3 if quiet else 0)
    (seq,) = manifest(repo, doc["id"]).sequences
    assert (seq.last_value, seq.is_called) == (3, True)


def test_a_transaction_running_across_the_snapshots(pg, db, repo, monkeypatch):
    """Still running: both snapshots leave it out, so the tables are taken unread.
    Committed in between: the table it wrote is read again.  Rolled back: nothing
    changed."""
    pg.execute(db, SCHEMA)
    seen = reads(monkeypatch)
    for end in ("COMMIT", "ROLLBACK"):
        with pg.connect(db) as conn:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO a VALUES (-1, 'not yet')")   # holds an xid
            snap(pg, repo, db)
            seen.clear()
            doc = quiet_snap(pg, repo, db)
            assert doc["tables_reused"] == 3 and doc["bytes_read"] == 0
            conn.execute(end)
        seen.clear()
        doc = snap(pg, repo, db)
        # Committed: its row is new, so a is read.  Rolled back: a's rows are the ones
        # the last snapshot saw, so nothing is read.
        assert seen == (["a"] if end == "COMMIT" else [])
        assert doc["tables_reused"] == (2 if end == "COMMIT" else 3)
        target = pg.createdb()
        assert run("restore", doc["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
        assert pg.query(target, "SELECT count(*) FROM a WHERE id = -1") == \
            [(1 if end == "COMMIT" else 0,)]
        pg.execute(db, "DELETE FROM a WHERE id = -1")


def quiet_snap(pg, repo, db, *args):
    """A snapshot taken with nothing committed since the latest one (autovacuum, on a
    server of FPVAULT_TEST_DSN, may commit meanwhile: then take another)."""
    for _ in range(10):
        before = manifest(repo, "latest").xact
        doc = snap(pg, repo, db, *args)
        if manifest(repo, doc["id"]).xact == before:
            return doc
    raise AssertionError("transactions kept ending between two snapshots")


def test_other_filters_or_lost_chunks_are_not_reused(pg, db, repo, tmp_path):
    pg.execute(db, SCHEMA)
    snap(pg, repo, db)
    assert quiet_snap(pg, repo, db, "-t", "a")["tables_reused"] == 0   # filters differ
    assert quiet_snap(pg, repo, db, "-t", "a")["tables_reused"] == 1
    # The packs are lost and the index rebuilt without them: nothing can be taken
    # from the old snapshots, so everything is read and stored again.
    vault = Vault.open(repo)
    for name in list(vault.backend.list("data/")):
        vault.backend.delete(name)
    assert run("repair", "index", "-r", repo).code == 0
    doc = snap(pg, repo, db, "-t", "a")
    assert doc["tables_reused"] == 0 and doc["bytes_read"] > 0
    target = pg.createdb()
    assert run("restore", doc["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    assert pg.query(target, "SELECT count(*) FROM a") == [(3000,)]


def test_another_role_is_not_given_what_it_was_never_shown(pg, db, repo):
    """A role that row level security would refuse gets the refusal, even when the
    tables are exactly what a superuser's snapshot a moment ago read."""
    pg.execute(db, "CREATE TABLE r (id int PRIMARY KEY, owner text); "
                   "INSERT INTO r SELECT g, 'u' || g FROM generate_series(1, 50) g; "
                   "ALTER TABLE r ENABLE ROW LEVEL SECURITY; ALTER TABLE r FORCE ROW LEVEL SECURITY; "
                   "CREATE POLICY p ON r USING (owner = current_user); "
                   "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fpv_rls2') "
                   "THEN CREATE ROLE fpv_rls2 LOGIN; END IF; END $$; GRANT SELECT ON r TO fpv_rls2")
    snap(pg, repo, db)
    r = run("snap", "-r", repo, "-d", pg.dsn(db, user="fpv_rls2"))
    assert r.code != 0 and "row-level security" in r.err


def test_a_restarted_server_is_read_again(pg, db, repo, monkeypatch):
    """A restart can empty unlogged tables without any transaction: a snapshot of a
    server that started since the last one reads every table."""
    pg.execute(db, SCHEMA)
    snap(pg, repo, db)
    real = pgsource.server_identity
    monkeypatch.setattr(pgsource, "server_identity", lambda conn: dataclasses.replace(
        real(conn), started="2099-01-01 00:00:00+00"))
    assert snap(pg, repo, db)["tables_reused"] == 0


# -- how the rows print: the reading session's settings

REFS = ("CREATE SCHEMA app; CREATE TABLE app.t (id int PRIMARY KEY); "
        "CREATE TABLE refs (id int PRIMARY KEY, rel regclass, typ regtype, "
        "at timestamptz DEFAULT '2020-06-01 12:00:00+00', b bytea); "
        "INSERT INTO refs SELECT g, CASE WHEN g % 2 = 0 THEN 'app.t' ELSE 'public.refs' END, "
        "'app.t', '2026-01-01 00:00:00+00'::timestamptz + g * interval '7 hours', "
        "decode(md5(g::text), 'hex') FROM generate_series(1, 2000) g")


def test_what_is_stored_does_not_depend_on_the_session(pg, db, repo):
    """search_path, TimeZone, bytea_output and quote_all_identifiers, from the
    environment, the role or the database, change how the same rows print (reg*
    names lose their schema or gain quotes, timestamptz moves to another zone, in
    the data and in pg_dump's defaults, bytea escapes).  Snap pins them: the same
    database stores the same text wherever it is read from, and restores.  (A
    role's quote_all_identifiers still reaches pg_dump's schema text.)"""
    pg.execute(db, REFS)
    first = snap(pg, repo, db)
    pg.execute(db, f"ALTER DATABASE {db} SET search_path = app, public; "
                   f"ALTER DATABASE {db} SET TimeZone = 'Asia/Tokyo'; "
                   f"ALTER DATABASE {db} SET bytea_output = escape")
    second = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", "--reread",
                 env={"PGTZ": "America/St_Johns",
                      "PGOPTIONS": "-c search_path=app -c quote_all_identifiers=on"})
    assert second.code == 0, second.err
    third = snap(pg, repo, db, "--reread")
    one, two, three = (manifest(repo, d["id"]) for d in (first, json.loads(second.out), third))
    for other in (two, three):
        assert [(t.qname, t.data.hash) for t in other.tables] == \
            [(t.qname, t.data.hash) for t in one.tables]
    assert (three.schema.pre_data.hash, three.schema.post_data.hash) == \
        (one.schema.pre_data.hash, one.schema.post_data.hash)
    assert three.session == pgsource.SESSION_SETTINGS

    target = pg.createdb()
    r = run("restore", third["id"], "-r", repo, "--to", pg.dsn(target))
    assert r.code == 0, r.err
    q = ("SELECT count(*), md5(string_agg(concat_ws(',', id, rel, typ, at, b), ';' ORDER BY id)) "
         "FROM public.refs")
    fixed = "-c search_path= -c TimeZone=UTC -c bytea_output=hex"  # same values, same text
    with pg.connect(target, options=fixed) as a, pg.connect(db, options=fixed) as b:
        assert a.execute(q).fetchall() == b.execute(q).fetchall()
    scratch = pg.createdb()
    r = run("verify", "-r", repo, "--restore-test", pg.dsn(scratch), env={"PGTZ": "Asia/Kolkata"})
    assert r.code == 0, r.out + r.err


def test_tables_read_with_other_settings_are_read_again(pg, db, repo, monkeypatch):
    """A snapshot read with other settings (one written before they were recorded
    left search_path and TimeZone to the environment) is no source of unread
    tables: its text may not be what the same rows print now, nor restore."""
    pg.execute(db, REFS)
    monkeypatch.setattr(pgsource, "SESSION_SETTINGS",
                        {**pgsource.LEGACY_SESSION_SETTINGS, "TimeZone": "Asia/Tokyo"})
    snap(pg, repo, db)
    monkeypatch.undo()
    seen = reads(monkeypatch)
    doc = snap(pg, repo, db)
    assert doc["tables_reused"] == 0 and sorted(seen) == ["refs", "t"]
    monkeypatch.undo()
    assert snap(pg, repo, db)["tables_reused"] == 2    # and from then on, as before


def test_nothing_committed_takes_the_schema_too(pg, db, repo, monkeypatch):
    """With no transaction ended since the previous snapshot, not even pg_dump runs:
    the schema is that snapshot's, and only the sequences are read.  A pg_dump of
    another version, or DDL, dumps the schema again."""
    pg.execute(db, SCHEMA)
    dumps = pg_dump_runs(monkeypatch)
    for _ in range(10):
        first = snap(pg, repo, db)
        dumps.clear()
        pg.execute(db, "SELECT nextval('s')")   # the 3rd value: logged ahead with the 1st
        second = snap(pg, repo, db)
        one, two = manifest(repo, first["id"]), manifest(repo, second["id"])
        if one.xact == two.xact:
            break
        pg.execute(db, "SELECT setval('s', 2)")
    else:
        raise AssertionError("transactions kept ending between two snapshots")
    assert dumps == [] and second["tables_reused"] == 3 and second["bytes_read"] == 0
    assert second["bytes_added"] < 16 * 1024
    assert (two.schema, two.tables, two.large_objects) == (one.schema, one.tables,
                                                           one.large_objects)
    assert two.source == one.source and two.filters == one.filters
    (seq,) = two.sequences
    assert (seq.last_value, seq.is_called) == (3, True)
    target = pg.createdb()
    assert run("restore", second["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    for q in ("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM a",
              "SELECT last_value FROM s", "SELECT convert_from(lo_get(4242), 'UTF8')"):
        assert pg.query(target, q) == pg.query(db, q), q

    # Another pg_dump version may print the schema otherwise: it is dumped.
    real_find = snapshot.pgtools.find_tool

    def newer_pg_dump(name, *args):
        tool = real_find(name, *args)
        return dataclasses.replace(tool, version=tool.version + ".1") if name == "pg_dump" \
            else tool

    monkeypatch.setattr(snapshot.pgtools, "find_tool", newer_pg_dump)
    dumps.clear()
    third = quiet_snap(pg, repo, db)
    assert len(dumps) == 1 and third["tables_reused"] == 3
    monkeypatch.setattr(snapshot.pgtools, "find_tool", real_find)
    # DDL ends a transaction: the schema is dumped and the new table read.
    pg.execute(db, "CREATE TABLE c (id int PRIMARY KEY); INSERT INTO c VALUES (7)")
    dumps.clear()
    seen = reads(monkeypatch)
    fourth = snap(pg, repo, db)
    assert len(dumps) == 1 and "c" in seen   # (another schema: every table is read)
    assert "CREATE TABLE public.c" in Vault.open(repo).read_bytes(
        manifest(repo, fourth["id"]).schema.pre_data).decode()


def test_a_crash_restart_is_not_the_same_server(pg, db, repo):
    """A backend that dies makes the server restart without a new postmaster start
    time, and recovery empties unlogged tables without any transaction ending: the
    next snapshot must not take them from the last one."""
    if os.environ.get("FPVAULT_TEST_DSN"):
        pytest.skip("crashes the server: only the session's own")
    pg.execute(db, SCHEMA)
    pg.execute(db, "CHECKPOINT")   # the session's server commits asynchronously
    first = snap(pg, repo, db)
    with pg.connect(db) as conn:
        os.kill(conn.execute("SELECT pg_backend_pid()").fetchone()[0], signal.SIGKILL)
    for _ in range(300):   # until crash recovery is over
        try:
            if pg.query(db, "SELECT count(*) FROM u") == [(0,)]:
                break
        except psycopg.OperationalError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("the server did not come back with u emptied")
    second = snap(pg, repo, db)
    before, after = manifest(repo, first["id"]), manifest(repo, second["id"])
    assert after.xact.started == before.xact.started   # the postmaster stayed
    assert after.xact.recovered != before.xact.recovered
    assert second["tables_reused"] == 0
    assert {t.name: t.rows for t in after.tables}["u"] == 0
