"""After a commit, a snapshot whose catalog is the previous snapshot's (the same
fingerprint: pgsource.catalog_fingerprint) takes that snapshot's schema instead of
running pg_dump; any change to the catalog, one made in place (without a new row
version) too, runs pg_dump again."""

import threading
import time

import pytest

from conftest import run
from test_unchanged import manifest, pg_dump_runs as dumps, snap
from fpvault import pgsource, snapshot
from fpvault.vault import Vault

SCHEMA = ("CREATE TABLE a (id int PRIMARY KEY, v text); "
          "INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 2000) g; "
          "CREATE TABLE b (id int PRIMARY KEY, n int); INSERT INTO b VALUES (1, 1), (2, 2);")


def commit_elsewhere(pg):
    pg.execute("postgres", "CREATE TABLE IF NOT EXISTS elsewhere (n int); "
                           "INSERT INTO elsewhere VALUES (1)")


def schema_text(repo, sid):
    vault = Vault.open(repo)
    s = manifest(repo, sid).schema
    return (vault.read_bytes(s.pre_data) + vault.read_bytes(s.post_data)).decode()


def test_a_commit_that_changes_no_catalog_keeps_the_schema(pg, db, repo, monkeypatch):
    """Rows changed, a table truncated and filled again, VACUUM (FULL) and ANALYZE
    run (new files and statistics: left out of the fingerprint), another database
    made and a table in it given to a role (shared catalogs' rows of another
    database): the schema is the previous snapshot's, pg_dump does not run, and
    the snapshot restores."""
    pg.execute(db, SCHEMA + "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE "
                   "rolname = 'fpv_cat_other') THEN CREATE ROLE fpv_cat_other; END IF; END $$")
    first = snap(pg, repo, db)
    runs = dumps(monkeypatch)
    other = pg.createdb()
    pg.execute(other, "CREATE TABLE o (n int); ALTER TABLE o OWNER TO fpv_cat_other")
    pg.execute(db, "BEGIN; TRUNCATE b; INSERT INTO b VALUES (1, 1), (2, 20); COMMIT")
    pg.execute(db, "VACUUM FULL a")
    pg.execute(db, "VACUUM ANALYZE a")
    pg.execute(db, "VACUUM ANALYZE b")
    commit_elsewhere(pg)
    second = snap(pg, repo, db)
    one, two = manifest(repo, first["id"]), manifest(repo, second["id"])
    assert runs == [] and one.catalog and two.catalog == one.catalog
    assert two.schema == one.schema and second["tables_reused"] == 1   # a; b changed
    target = pg.createdb()
    assert run("restore", second["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    for q in ("SELECT md5(string_agg(v, ',' ORDER BY id)) FROM a",
              "SELECT n FROM b ORDER BY id"):
        assert pg.query(target, q) == pg.query(db, q), q
    # --reread reads everything, the schema too.
    snap(pg, repo, db, "--reread")
    assert len(runs) == 1


@pytest.mark.parametrize("ddl, shows", [
    ("CREATE INDEX b_n ON b (n)", "CREATE INDEX b_n ON public.b"),
    ("COMMENT ON TABLE a IS 'the a table'", "'the a table'"),
    ("ALTER TABLE b ADD COLUMN extra text DEFAULT 'x'", "extra text DEFAULT 'x'"),
    ("CREATE ROLE fpv_cat_reader; GRANT SELECT ON a TO fpv_cat_reader",
     "GRANT SELECT ON TABLE public.a TO fpv_cat_reader"),
    # A shared catalog: the role that owns a table renamed, in no row of this database.
    ("ALTER ROLE fpv_cat_owner RENAME TO fpv_cat_owner2", "OWNER TO fpv_cat_owner2"),
])
def test_a_catalog_change_dumps_the_schema_again(pg, db, repo, monkeypatch, ddl, shows):
    pg.execute("postgres", "DROP ROLE IF EXISTS fpv_cat_reader; "
                           "DROP ROLE IF EXISTS fpv_cat_owner2; "
                           "DROP ROLE IF EXISTS fpv_cat_owner; CREATE ROLE fpv_cat_owner")
    pg.execute(db, SCHEMA + "ALTER TABLE b OWNER TO fpv_cat_owner")
    snap(pg, repo, db)
    runs = dumps(monkeypatch)
    try:
        pg.execute(db, ddl)
        doc = snap(pg, repo, db)
        assert len(runs) == 1 and shows in schema_text(repo, doc["id"])
    finally:
        pg.execute(db, "DROP TABLE a, b")
        pg.execute("postgres", "DROP ROLE IF EXISTS fpv_cat_reader; "
                               "DROP ROLE IF EXISTS fpv_cat_owner2; "
                               "DROP ROLE IF EXISTS fpv_cat_owner")


def test_an_index_made_valid_is_in_the_next_schema(pg, db, repo, monkeypatch):
    """A snapshot taken while CREATE INDEX CONCURRENTLY waits to mark its index
    valid (pg_dump leaves it out) is followed by one that dumps it: only pg_index
    changes (before PostgreSQL 13, in place, keeping the row's xmin)."""
    pg.execute(db, SCHEMA)
    snap(pg, repo, db)
    holder = pg.connect(db)
    holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    holder.execute("SELECT 1")   # an older snapshot: the build waits for it to end
    build = threading.Thread(target=pg.execute, args=(db, "CREATE INDEX CONCURRENTLY a_v ON a (v)"))
    build.start()
    try:
        for _ in range(600):
            state = pg.query(db, "SELECT indisready, indisvalid FROM pg_index "
                                 "WHERE indexrelid = to_regclass('a_v')")
            if state == [(True, False)]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the index build did not get to its last wait: {state}")
        during = snap(pg, repo, db)
        assert "a_v" not in schema_text(repo, during["id"])
    finally:
        holder.rollback()
        holder.close()
        build.join()
    assert pg.query(db, "SELECT indisvalid FROM pg_index "
                        "WHERE indexrelid = 'a_v'::regclass") == [(True,)]
    runs = dumps(monkeypatch)
    after = snap(pg, repo, db)
    assert len(runs) == 1 and "CREATE INDEX a_v ON public.a" in schema_text(repo, after["id"])


def test_a_role_that_cannot_read_every_catalog_always_dumps(pg, db, repo, monkeypatch):
    """A role that may not read a catalog (pg_subscription, for a non-superuser) has
    no fingerprint: pg_dump runs every time."""
    pg.execute(db, SCHEMA + "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE "
                   "rolname = 'fpv_cat_plain') THEN CREATE ROLE fpv_cat_plain LOGIN; END IF; "
                   "END $$; GRANT SELECT ON a, b TO fpv_cat_plain")
    dsn = pg.dsn(db, user="fpv_cat_plain")
    r = run("snap", "-r", repo, "-d", dsn)
    assert r.code == 0, r.err
    runs = dumps(monkeypatch)
    commit_elsewhere(pg)
    r = run("snap", "-r", repo, "-d", dsn, "--json")
    assert r.code == 0, r.err
    assert len(runs) == 1 and manifest(repo, "latest").catalog == ""
    with pg.connect(db, user="fpv_cat_plain") as conn:
        assert pgsource.catalog_fingerprint(conn) == ""
    with pg.connect(db) as conn:
        assert pgsource.catalog_fingerprint(conn).startswith("1:")


def test_a_small_database_takes_no_fingerprint(pg, db, repo, monkeypatch):
    """Below CATALOG_FINGERPRINT_MIN_TABLES tables, pg_dump costs no more than the
    fingerprint: none is taken, and pg_dump runs after every commit."""
    monkeypatch.setattr(snapshot, "CATALOG_FINGERPRINT_MIN_TABLES", 10 ** 9)
    pg.execute(db, SCHEMA)
    first = snap(pg, repo, db)
    runs = dumps(monkeypatch)
    commit_elsewhere(pg)
    second = snap(pg, repo, db)
    assert len(runs) == 1 and second["tables_reused"] == 2
    assert manifest(repo, first["id"]).catalog == manifest(repo, second["id"]).catalog == ""


def test_the_fingerprint_is_the_same_on_more_connections(pg, db):
    """Shared among connections in one snapshot, the catalogs' scans give the same
    fingerprint as on one."""
    pg.execute(db, SCHEMA)
    with pg.connect(db) as one, pg.connect(db) as two, pg.connect(db) as three:
        name = pgsource.begin_snapshot(one)
        pgsource.begin_snapshot(two, name)
        pgsource.begin_snapshot(three, name)
        alone = pgsource.catalog_fingerprint(one)
        assert alone.startswith("1:")
        assert pgsource.catalog_fingerprint(one, two) == alone
        assert pgsource.catalog_fingerprint(one, two, three) == alone
