"""Round-trip fidelity: what fpvault restores is indistinguishable from what it snapped.

Every comparison is made by ``pgcompare`` from the databases themselves
(pg_dump --schema-only text, row multisets, sequences, large objects), never
from fpvault's own view of them.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import run
from pgcompare import (assert_same_data, assert_same_database, assert_same_schema, capture,
                       large_objects, sequence_states, table_fingerprints)

AWKWARD_SQL = Path(__file__).resolve().parent / "sql" / "awkward.sql"
AUDIT_ROWS = 60      # 50 inserts + 10 updates of public.accounts in awkward.sql
SECRETS_ROWS = 100   # public.secrets, of which FORCE ROW LEVEL SECURITY shows 10
WEIRD = '"Weird Schema"."Order ""Items"""'
_clones = itertools.count()


# -- helpers

def snap(repo: str, dsn: str, *extra: str) -> str:
    r = run("snap", "-r", repo, "-d", dsn, "--json", *extra)
    assert r.code == 0, f"snap failed ({r.code}): {r.err}"
    return json.loads(r.out)["id"]


def restore_into(pg, repo: str, ref: str, *extra: str, target: str | None = None) -> str:
    """Restore ``ref`` live into ``target`` (a fresh database unless given); return its name."""
    target = target or pg.createdb("rt")
    r = run("restore", ref, "-r", repo, "--to", pg.dsn(target), *extra)
    assert r.code == 0, f"restore {ref} {' '.join(extra)} failed ({r.code}): {r.err}"
    return target


def restore_script(pg, repo: str, ref: str, path: Path, *extra: str,
                   target: str | None = None) -> str:
    """Write ``ref`` as a script, load it with psql -X -v ON_ERROR_STOP=1 -f; return the db."""
    r = run("restore", ref, "-r", repo, "-o", str(path), *extra)
    assert r.code == 0, f"restore {ref} -o {path} failed ({r.code}): {r.err}"
    target = target or pg.createdb("rs")
    try:
        pg.psql_file(target, path)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"psql could not load the script of {ref}: "
                    f"{exc.stderr.decode(errors='replace')}")
    return target


def clone(pg, source: str) -> str:
    """A copy of ``source`` (CREATE DATABASE ... TEMPLATE); nobody may be connected to it."""
    name = f"clone_{os.getpid()}_{next(_clones)}"
    with pg.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
    return name


def count(pg, dbname: str, table: str) -> int:
    return pg.query(dbname, f"SELECT count(*) FROM ONLY {table}")[0][0]


def show(repo: str, ref: str) -> dict:
    r = run("show", ref, "-r", repo, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


# -- fixtures

@pytest.fixture(scope="module")
def awkward(pg):
    """tests/sql/awkward.sql loaded once per module; read-only (clone it to change it).
    Analyzed, so that a first snapshot reads the tables whose heap the statistics say
    is in key order as it lies, and the rest in key order: both ways are covered."""
    name = pg.createdb("awkward")
    pg.psql_file(name, AWKWARD_SQL)
    pg.execute(name, "ANALYZE")
    return name


@pytest.fixture(scope="module")
def awkward_state(pg, awkward):
    """What pgcompare sees of the awkward database, read once."""
    return capture(pg, awkward)


@pytest.fixture(scope="module")
def awkward_snap(pg, awkward, tmp_path_factory):
    """(repo, snapshot id) of the awkward database."""
    repo = str(tmp_path_factory.mktemp("awkward") / "repo")
    assert run("init", "-r", repo).code == 0
    return repo, snap(repo, pg.dsn(awkward), "-j", "2")


# -- whole databases, live and as a script

def test_awkward_roundtrip(pg, awkward, awkward_state, awkward_snap, tmp_path):
    repo, sid = awkward_snap
    assert count(pg, awkward, "public.audit_log") == AUDIT_ROWS

    live = restore_into(pg, repo, sid)
    assert_same_database(pg, awkward_state, live)

    parallel = restore_into(pg, repo, sid, "-j", "3")
    assert_same_database(pg, awkward_state, parallel)

    script = restore_script(pg, repo, sid[:10], tmp_path / "awkward.sql")
    assert_same_database(pg, awkward_state, script)

    # FORCE ROW LEVEL SECURITY hides 90 of the 100 rows from the owner: the snapshot
    # has them all, and the restores did not let the audit trigger write a row.
    tables = {t["name"]: t for t in show(repo, sid)["tables"]}
    keyed = {t["order"] for t in tables.values() if t["key"]}
    assert keyed == {"key", "physical"}, keyed
    assert tables["public.secrets"]["rows"] == SECRETS_ROWS
    assert tables["public.audit_log"]["rows"] == AUDIT_ROWS
    assert tables[WEIRD]["rows"] == 300
    assert "public.measurements" not in tables           # partitioned: its leaves hold the rows
    assert tables["public.measurements_2024_eu"]["rows"] > 0
    for target in (live, script):
        assert count(pg, target, "public.secrets") == SECRETS_ROWS
        assert count(pg, target, "public.audit_log") == AUDIT_ROWS
        assert pg.query(target, "SELECT max(touched) FROM public.accounts") == [(2,)]


def test_factory_pulse_roundtrip(pg, factory_pulse, repo, tmp_path):
    source = capture(pg, factory_pulse)
    sid = snap(repo, pg.dsn(factory_pulse), "-j", "2")
    assert_same_database(pg, source, restore_into(pg, repo, sid))
    assert_same_database(pg, source, restore_script(pg, repo, "latest",
                                                    tmp_path / "factory_pulse.sql"))


# -- history: an old snapshot restores to the old state

def test_history_restores_old_and_new(pg, awkward, repo):
    work = clone(pg, awkward)
    before = clone(pg, work)
    old = snap(repo, pg.dsn(work))
    pg.execute(work, """
        UPDATE public.events SET amount = amount + 1, kind = 'changed' WHERE id % 97 = 0;
        DELETE FROM public.events WHERE id BETWEEN 1000 AND 1500;
        INSERT INTO public.events
            SELECT g, 'new', md5(g::text), 1 FROM generate_series(40001, 40500) g;
        DELETE FROM public.bag WHERE a = 1;
        INSERT INTO public.bag VALUES (1, 'x'), (99, E'new\\tline');
        UPDATE public.accounts SET balance = 0 WHERE id = 5;
        INSERT INTO public.accounts (id, owner, balance) VALUES (51, 'new owner', 1);
        REFRESH MATERIALIZED VIEW public.account_totals;
        ALTER TABLE public.people ADD COLUMN nickname text DEFAULT 'nick';
        UPDATE public.people SET nickname = NULL WHERE id = 7;
        UPDATE public.all_types SET c_text = E'changed\\n\\\\N' WHERE id = 3;
        SELECT setval('public.seq_advanced', 99999);
        SELECT nextval('public.seq_not_called');
        DROP TABLE many.t005;
        CREATE TABLE public.added_later (id int PRIMARY KEY);
        INSERT INTO public.added_later VALUES (1), (2);
        SELECT lo_put(91001, 0, '\\x4348414e474544');
        SELECT lo_unlink(91003);
        """)
    new = snap(repo, pg.dsn(work))
    assert old != new

    before = capture(pg, before)
    assert_same_database(pg, before, restore_into(pg, repo, old))
    assert_same_database(pg, before, restore_into(pg, repo, "latest~1"))
    assert_same_database(pg, work, restore_into(pg, repo, new[:8]))
    # The changes are visible to the comparison: old and new state really differ.
    with pytest.raises(AssertionError, match="public.events"):
        assert_same_data(pg, before, work)


# -- consistency under a concurrent write load

def test_snapshots_under_pgbench_are_consistent(pg, repo):
    db = pg.createdb("bench")
    conn_args = ["-h", pg.base["host"], "-p", str(pg.base["port"]), "-U", pg.base["user"]]
    subprocess.run([pg.tool("pgbench"), *conn_args, "-i", "-s", "2", "-q", db], check=True,
                   capture_output=True)
    # Writes run until the three snapshots are taken; each is read by two connections.
    bench = subprocess.Popen([pg.tool("pgbench"), *conn_args, "-n", "-c", "4", "-j", "2",
                              "-T", "60", db], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sids = []
    try:
        for _ in range(3):
            time.sleep(0.7)
            assert bench.poll() is None, bench.stderr.read().decode(errors="replace")
            sids.append(snap(repo, pg.dsn(db), "-j", "2"))
    finally:
        bench.terminate()
        bench.communicate(timeout=60)

    history = []
    for sid in sids:
        target = restore_into(pg, repo, sid)
        sums = pg.query(target, """
            SELECT (SELECT sum(abalance) FROM pgbench_accounts),
                   (SELECT sum(bbalance) FROM pgbench_branches),
                   (SELECT sum(tbalance) FROM pgbench_tellers),
                   (SELECT coalesce(sum(delta), 0) FROM pgbench_history),
                   (SELECT count(*) FROM pgbench_history),
                   (SELECT count(*) FROM pgbench_accounts)""")[0]
        assert sums[0] == sums[1] == sums[2] == sums[3], (
            f"snapshot {sid[:8]} is not consistent: sum(abalance)={sums[0]}, "
            f"sum(bbalance)={sums[1]}, sum(tbalance)={sums[2]}, sum(delta)={sums[3]}")
        assert sums[5] == 200000
        history.append(sums[4])
    # The snapshots were taken while pgbench wrote: each saw more transactions.
    assert 0 < history[0] < history[1] < history[2], history


# -- options

def test_schema_only_then_data_only(pg, awkward_state, awkward_snap, tmp_path):
    repo, sid = awkward_snap
    live = restore_into(pg, repo, sid, "--schema-only")
    script = restore_script(pg, repo, sid, tmp_path / "schema.sql", "--schema-only")
    for target in (live, script):
        assert_same_schema(pg, awkward_state, target)
        fps = table_fingerprints(pg, target)
        assert "public.audit_log" in fps and WEIRD in fps
        not_empty = [q for q, fp in fps.items() if fp != ("not populated",) and fp[0] != 0]
        assert not not_empty, f"--schema-only restored rows into {not_empty}"
        assert sequence_states(pg, target)["public.seq_advanced"] == (3, False)

    # Data into that schema: the circular foreign keys and the triggers are in place,
    # so this only works with triggers and FK checks off.
    restore_into(pg, repo, sid, "--data-only", target=live)
    restore_script(pg, repo, sid, tmp_path / "data.sql", "--data-only", target=script)
    for target in (live, script):
        assert count(pg, target, "public.audit_log") == AUDIT_ROWS
        assert_same_database(pg, awkward_state, target)


def test_one_table(pg, awkward, awkward_state, awkward_snap):
    repo, sid = awkward_snap
    # Into an empty database: the table with its sequences, defaults, indexes,
    # constraints, comments and grants, and its data.
    target = restore_into(pg, repo, sid, "-t", "public.serial_t")
    assert_same_schema(pg, awkward, target, "-t", "public.serial_t")
    fps = table_fingerprints(pg, target)
    assert list(fps) == ["public.serial_t"]
    assert fps["public.serial_t"] == awkward_state.tables["public.serial_t"]
    assert sequence_states(pg, target) == {
        "public.serial_t_big_seq": (9000, True), "public.serial_t_id_seq": (500, True)}
    assert pg.query(target, "SELECT nextval('public.serial_t_id_seq')") == [(501,)]

    # Data only, for two tables of an existing database (one with awkward names).
    work = clone(pg, awkward)
    pg.execute(work, f"TRUNCATE {WEIRD}, public.serial_t; "
                     "SELECT setval('public.serial_t_id_seq', 1)")
    restore_into(pg, repo, sid, "--data-only", "-t", WEIRD, "-t", "public.serial_t", target=work)
    assert_same_database(pg, awkward_state, work)


def test_no_owner(pg, awkward_state, awkward_snap, tmp_path):
    repo, sid = awkward_snap
    target = restore_into(pg, repo, sid, "--no-owner")
    owners = dict(pg.query(target, "SELECT tablename, tableowner FROM pg_tables "
                                   "WHERE tablename IN ('serial_t', 'secrets')"))
    assert owners == {"serial_t": "postgres", "secrets": "postgres"}
    assert large_objects(pg, target)[91002][0] == "postgres"
    assert pg.query(target, "SELECT has_table_privilege('fpv_reader', 'public.all_types', "
                            "'SELECT')") == [(True,)]
    assert_same_data(pg, awkward_state, target, owners=False)
    r = run("restore", sid, "-r", repo, "--no-owner", "-o", str(tmp_path / "no_owner.sql"))
    assert r.code == 0, r.err
    text = (tmp_path / "no_owner.sql").read_text()
    assert "GRANT SELECT ON TABLE public.all_types TO fpv_reader" in text
    assert "OWNER TO" not in text


def test_at_time_and_stdout(pg, db, repo):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'first')")
    first = snap(repo, pg.dsn(db))
    between = datetime.now(timezone.utc)
    time.sleep(0.05)
    pg.execute(db, "INSERT INTO t VALUES (2, 'second')")
    second = snap(repo, pg.dsn(db))

    def at(when: datetime):
        return run("restore", "--at", when.isoformat(), "-r", repo, "-o", "-")

    r = at(between)
    assert r.code == 0, r.err
    assert f"-- snapshot {first} " in r.out and "first" in r.out and "second" not in r.out
    # The script on stdout loads as it is.
    path = Path(repo).parent / "at.sql"
    path.write_text(r.out)
    target = pg.createdb()
    pg.psql_file(target, path)
    assert pg.query(target, "SELECT id, v FROM t") == [(1, "first")]

    r = at(datetime.now(timezone.utc) + timedelta(hours=1))
    assert r.code == 0 and f"-- snapshot {second} " in r.out and "second" in r.out
    r = run("restore", "--at", (between - timedelta(hours=1)).isoformat(), "-r", repo, "-o", "-")
    assert r.code == 2 and "No snapshot was taken at or before" in r.err and r.out == ""


def test_plain_database_name_and_environment(pg, db, repo):
    """-d takes a bare database name; host, port and user come from PG* variables."""
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
    env = {"PGHOST": pg.base["host"], "PGPORT": str(pg.base["port"]), "PGUSER": pg.base["user"]}
    r = run("snap", "-r", repo, "-d", db, "--json", env=env)
    assert r.code == 0, r.err
    target = pg.createdb()
    r = run("restore", "latest", "-r", repo, "--to", target, env=env)
    assert r.code == 0, r.err
    assert_same_database(pg, db, target)


def test_data_only_needs_superuser(pg, awkward_snap):
    repo, sid = awkward_snap
    target = restore_into(pg, repo, sid, "--schema-only")
    with pg.connect() as conn:
        conn.execute("""DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fpv_plain') THEN
              CREATE ROLE fpv_plain LOGIN NOSUPERUSER;
            END IF; END $$""")
        conn.execute(f'ALTER DATABASE "{target}" OWNER TO fpv_plain')
    before = capture(pg, target)
    r = run("restore", sid, "-r", repo, "--data-only", "--to", pg.dsn(target, user="fpv_plain"))
    assert r.code == 5, (r.code, r.err)    # refused for lack of privilege, as snap is
    assert "needs a superuser" in r.err and "Traceback" not in r.err
    assert capture(pg, target) == before
    # A whole restore the role may not make (the objects belong to other roles): exit 5,
    # rolled back, with or without -j.
    for extra in ((), ("-j", "2")):
        empty = pg.createdb("rt")
        with pg.connect() as conn:
            conn.execute(f'ALTER DATABASE "{empty}" OWNER TO fpv_plain')
        r = run("restore", sid, "-r", repo, "--to", pg.dsn(empty, user="fpv_plain"), *extra)
        assert r.code == 5 and "lacks that privilege" in r.err, (extra, r.code, r.err)


def test_force_rls_is_never_silently_filtered(pg, db, repo):
    """A role that cannot bypass row level security gets an error, not a partial table."""
    with pg.connect() as conn:
        conn.execute("""DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fpv_rls_owner') THEN
              CREATE ROLE fpv_rls_owner LOGIN NOSUPERUSER NOBYPASSRLS;
            END IF; END $$""")
    pg.execute(db, """
        CREATE TABLE hidden (id int PRIMARY KEY, visible bool NOT NULL);
        INSERT INTO hidden SELECT g, g % 10 = 0 FROM generate_series(1, 100) g;
        ALTER TABLE hidden OWNER TO fpv_rls_owner;
        ALTER TABLE hidden ENABLE ROW LEVEL SECURITY;
        ALTER TABLE hidden FORCE ROW LEVEL SECURITY;
        CREATE POLICY only_visible ON hidden USING (visible);""")
    with pg.connect(db) as conn:
        conn.execute("SET ROLE fpv_rls_owner")
        assert conn.execute("SELECT count(*) FROM hidden").fetchone() == (10,)
    r = run("snap", "-r", repo, "-d", pg.dsn(db, user="fpv_rls_owner"), "--json")
    assert r.code == 5, (r.code, r.out, r.err)
    assert "row-level security" in r.err and "No snapshot was written" in r.err, r.err
    assert json.loads(run("list", "-r", repo, "--json").out) == []


POST_DATA_SQL = """
CREATE TABLE parent (id int PRIMARY KEY, code text UNIQUE, n int CHECK (n >= 0));
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent (id), note text,
                    CONSTRAINT child_note_len CHECK (length(note) < 100) NOT VALID);
CREATE INDEX child_parent ON child (parent_id);
CREATE INDEX child_note_lower ON child (lower(note)) WHERE note IS NOT NULL;
CREATE UNIQUE INDEX parent_code_n ON parent (code, n);
COMMENT ON INDEX child_parent IS 'the foreign key''s index';
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER child_touch BEFORE UPDATE ON child FOR EACH ROW EXECUTE FUNCTION touch();
ALTER TABLE child CLUSTER ON child_parent;
INSERT INTO parent SELECT g, 'c' || g, g FROM generate_series(1, 2000) g;
INSERT INTO child SELECT g, g % 2000 + 1, 'n' || g FROM generate_series(1, 20000) g;
"""


def test_parallel_restore_builds_indexes_and_keys_at_once(pg, db, repo):
    """restore -j builds indexes and key constraints over several connections, then
    foreign keys, triggers and comments: the same database as a one-connection restore."""
    from fpvault.restore import entry_table, split_post_data
    from fpvault.vault import Vault

    pg.execute(db, POST_DATA_SQL)
    source = capture(pg, db)
    sid = snap(repo, pg.dsn(db))
    vault = Vault.open(repo)
    post = vault.read_bytes(vault.resolve(sid)[1].schema.post_data)
    preamble, parallel, rest = split_post_data(post)
    assert len(parallel) == 6                     # 2 primary keys, a unique key, 3 indexes
    assert b"FOREIGN KEY" in rest and b"CREATE TRIGGER" in rest and b"COMMENT ON INDEX" in rest
    assert not any(b"FOREIGN KEY" in p or b"TRIGGER" in p for p in parallel)
    assert rest.startswith(preamble) and b"search_path" in preamble
    # Each is scheduled right after its own table's data.
    assert sorted(entry_table(p) for p in parallel) == [
        "public.child", "public.child", "public.child", "public.parent", "public.parent",
        "public.parent"]
    assert_same_database(pg, source, restore_into(pg, repo, sid, "-j", "3"))


def test_parallel_restore_is_not_misled_by_a_header_in_a_string(pg, db, repo):
    """A policy's expression holding a line like pg_restore's entry header: cutting
    post-data there split the statement, and what followed the fake header ran as
    SQL of its own (here: CREATE TABLE pwned), with a quoted name holding a quote on
    either side to defeat counting quotes.  Headers are only found outside strings,
    quoted names and comments."""
    fake = "\\n--\\n-- Name: a_fake; Type: INDEX; Schema: public; Owner: postgres\\n--\\n"
    pg.execute(db, "CREATE TABLE a (id int PRIMARY KEY, note text, \"x'\" int); "
                   "INSERT INTO a VALUES (1, 'x', 1); "
                   "CREATE TABLE b (id int PRIMARY KEY); INSERT INTO b VALUES (1); "
                   "ALTER TABLE a ENABLE ROW LEVEL SECURITY; "
                   f"CREATE POLICY p ON a USING (\"x'\" IS NOT NULL AND note <> E'{fake}"
                   "CREATE TABLE public.pwned (); --' AND \"x'\" > 0); "
                   f"CREATE POLICY q ON a USING (note <> $q${fake.replace(chr(92) * 2 + 'n', chr(10))}$q$); "
                   "COMMENT ON TABLE b IS '/* not a comment'")
    source = capture(pg, db)
    sid = snap(repo, pg.dsn(db))
    target = restore_into(pg, repo, sid, "-j", "2")
    assert pg.query(target, "SELECT to_regclass('public.pwned') IS NULL") == [(True,)]
    assert_same_database(pg, source, target)
    from fpvault.restore import split_post_data
    from fpvault.vault import Vault

    vault = Vault.open(repo)
    _, parallel, _ = split_post_data(vault.read_bytes(vault.resolve(sid)[1].schema.post_data))
    assert len(parallel) == 2            # the two primary keys: still built in parallel


def test_parallel_restore_commits_the_schema_in_parts(pg, db, repo, monkeypatch):
    """restore -j commits pre-data (and the post-data it runs on one connection) every
    SCHEMA_ENTRIES entries (a schema of thousands of tables did not fit the server's
    lock table in one transaction),
    cut only at real entry headers: the parts are the whole, in order, the first
    with the preamble's settings."""
    from fpvault import pgtools, restore
    from fpvault.vault import Vault

    pg.execute(db, POST_DATA_SQL)
    pg.execute(db, "CREATE TABLE m (id int PRIMARY KEY, note text DEFAULT E'\\n--\\n-- Name: "
                   "x; Type: TABLE; Schema: public; Owner: postgres\\n--\\n'); "
                   "INSERT INTO m VALUES (1)")
    source = capture(pg, db)
    sid = snap(repo, pg.dsn(db))
    vault = Vault.open(repo)
    pre = vault.read_bytes(vault.resolve(sid)[1].schema.pre_data)
    monkeypatch.setattr(restore, "SCHEMA_ENTRIES", 2)
    parts = restore.schema_parts(pre)
    heads = pgtools.entry_headers(pre)
    assert not any(b"Name: x;" in m.group(0) for m in heads)   # in a string: not a cut
    assert len(parts) == (len(heads) + 1) // 2 >= 2
    assert b"".join(parts) == pre and b"search_path" in parts[0].split(b"-- Name:")[0]
    assert all(p.startswith(b"--\n-- Name: ") for p in parts[1:])
    assert all(len(pgtools.entry_headers(p)) <= 2 for p in parts)
    monkeypatch.setattr(restore, "SCHEMA_ENTRIES", 1)
    assert_same_database(pg, source, restore_into(pg, repo, sid, "-j", "2"))


def all_frozen(pg, dbname: str) -> dict[str, bool]:
    """Per table of public: whether the visibility map has every page all-frozen
    (pg_visibility, from contrib)."""
    with pg.connect(dbname) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_visibility")
        rows = conn.execute(
            "SELECT c.relname, s.all_frozen, pg_catalog.pg_relation_size(c.oid) / "
            "current_setting('block_size')::int FROM pg_catalog.pg_class c, "
            "pg_visibility_map_summary(c.oid) s "
            "WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace").fetchall()
    return {name: pages > 0 and frozen == pages for name, frozen, pages in rows}


def test_restored_rows_are_loaded_frozen(pg, db, repo, monkeypatch):
    """A restore loads the tables it just created with COPY FREEZE, so the restored
    database needs no VACUUM FREEZE of every page later: with -j 1 every table (one
    transaction); with -j a table loaded whole, emptied first in its transaction as
    pg_restore -j does, not one loaded in parts.  --data-only loads into tables that
    exist: it never empties them, nor freezes."""
    pg.execute(db, "CREATE TABLE big (id int PRIMARY KEY, v text); "
                   "INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 20000) g; "
                   "CREATE TABLE small (id int PRIMARY KEY, v text); "
                   "INSERT INTO small SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
    sid = snap(repo, pg.dsn(db))
    q = "SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM {}"
    one, two = restore_into(pg, repo, sid), restore_into(pg, repo, sid, "-j", "2")
    for target in (one, two):
        for t in ("big", "small"):
            assert pg.query(target, q.format(t)) == pg.query(db, q.format(t))
    # COPY FREEZE marks pages all-frozen in the visibility map from PostgreSQL 14 on.
    marks = int(pg.query(db, "SHOW server_version_num")[0][0]) >= 140000
    if marks:
        assert all_frozen(pg, one) == {"big": True, "small": True}
        assert all_frozen(pg, two) == {"big": False, "small": True}   # big: in two parts

    # A table under FREEZE_MIN_BYTES is loaded as it is with -j: its TRUNCATE would
    # cost more than freezing its pages later.
    from fpvault import restore
    monkeypatch.setattr(restore, "FREEZE_MIN_BYTES", 1024 * 1024)
    four = restore_into(pg, repo, sid, "-j", "2")
    assert pg.query(four, q.format("small")) == pg.query(db, q.format("small"))
    if marks:
        assert all_frozen(pg, four) == {"big": False, "small": False}

    three = restore_into(pg, repo, sid, "--schema-only")
    pg.execute(three, "INSERT INTO small VALUES (-1, 'was there')")
    restore_into(pg, repo, sid, "--data-only", "-j", "2", target=three)
    assert count(pg, three, "small") == 2001 and count(pg, three, "big") == 20000
    assert all_frozen(pg, three) == {"big": False, "small": False}



@pytest.mark.parametrize("ddl", [
    # A column rebuilt under its own name: the old rows have no value in the new one.
    "ALTER TABLE t ADD COLUMN a_new bigint; UPDATE t SET a_new = a; ALTER TABLE t DROP COLUMN a; "
    "ALTER TABLE t RENAME COLUMN a_new TO a",
    "ALTER TABLE t RENAME COLUMN a TO tmp; ALTER TABLE t RENAME COLUMN b TO a; "
    "ALTER TABLE t RENAME COLUMN tmp TO b",
    "ALTER TABLE t RENAME TO tmp; ALTER TABLE u RENAME TO t; ALTER TABLE tmp RENAME TO u",
])
def test_ddl_committed_as_the_snapshot_begins_fails_it(pg, db, repo, monkeypatch, ddl):
    """DDL that waited for pg_dump's locks commits the moment pg_dump exits, before
    snap has locked the tables.  COPY would then be planned against the new catalog
    and read the rows of the snapshot: columns swapped, NULLs, another table's rows,
    and exit 0.  Snap sees the names and columns changed and fails instead."""
    from fpvault import pgtools
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, a int, b int); "
                   "INSERT INTO t SELECT g, g * 10, g * 100 FROM generate_series(1, 3) g; "
                   "CREATE TABLE u (id int PRIMARY KEY, a int, b int); INSERT INTO u VALUES (1, -1, -2)")
    real = pgtools.run_tool

    def dump_then_ddl(tool, args, **kwargs):
        out = real(tool, args, **kwargs)
        if any(a.startswith("--section") for a in args):      # pg_dump of the schema
            pg.execute(db, f"BEGIN; {ddl}; COMMIT")
        return out

    monkeypatch.setattr(pgtools, "run_tool", dump_then_ddl)
    r = run("snap", "-r", repo, "-d", pg.dsn(db))
    assert r.code != 0 and "take the snapshot again" in r.err, r.err
    monkeypatch.undo()
    assert json.loads(run("list", "-r", repo, "--json").out) == []
    # Taken again, it is the database as it now is.
    sid = snap(repo, pg.dsn(db))
    target = restore_into(pg, repo, sid)
    for table in ("t", "u"):
        q = f"SELECT * FROM {table} ORDER BY id"
        assert pg.query(target, q) == pg.query(db, q)


def database_in(pg, encoding: str, prefix: str) -> str:
    name = f"{prefix}_{encoding.lower()}_{os.getpid()}_{next(_clones)}"
    with pg.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING {encoding} '
                     "LC_COLLATE 'C' LC_CTYPE 'C'")
    return name


def test_a_latin1_database_restores_every_way(pg, repo, tmp_path):
    """Names and data outside ASCII in a LATIN1 database: -j reads pg_dump's SQL (in
    the database's encoding) to schedule index builds, and the script's own COPY and
    setval lines follow its SET client_encoding."""
    def latin1_db(prefix):
        return database_in(pg, "LATIN1", prefix)

    source = latin1_db("latin1")
    # (Over 64 KiB: the tests' psql reader takes "tést", by its name in LATIN1.)
    pg.execute(source, 'CREATE TABLE public."tést" (id int PRIMARY KEY, "cöl" text); '
                       'CREATE INDEX "tést_cöl" ON public."tést" ("cöl"); '
                       """INSERT INTO public."tést" SELECT g, 'café ' || g FROM generate_series(1, 9000) g; """
                       'CREATE SEQUENCE "séq"; SELECT setval(\'"séq"\', 42); '
                       'CREATE TABLE "ñu" (id serial PRIMARY KEY); INSERT INTO "ñu" VALUES (1); '
                       """COMMENT ON TABLE "ñu" IS 'là'; COMMENT ON COLUMN "ñu".id IS 'ïd'; """
                       'GRANT SELECT ON "ñu" TO PUBLIC')
    sid = snap(repo, pg.dsn(source))
    # One table: its comments, grant and sequence come with it (pg_restore lists their
    # names in LATIN1, which the restore matches to the table's).
    one = restore_into(pg, repo, sid, "-t", '"ñu"', target=latin1_db("rt"))
    meta = ["SELECT obj_description('\"ñu\"'::regclass), col_description('\"ñu\"'::regclass, 1)",
            "SELECT relacl::text FROM pg_class WHERE relname = 'ñu'",
            "SELECT pg_get_serial_sequence('\"ñu\"', 'id')"]
    assert [pg.query(one, q) for q in meta] == [pg.query(source, q) for q in meta]
    queries = ['SELECT count(*), md5(string_agg("cöl", \',\' ORDER BY id)) FROM "tést"',
               'SELECT last_value FROM "séq"',
               "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"]
    want = [pg.query(source, q) for q in queries]
    targets = [restore_into(pg, repo, sid, target=latin1_db("rt")),
               restore_into(pg, repo, sid, "-j", "2", target=latin1_db("rt")),
               restore_script(pg, repo, sid, tmp_path / "latin1.sql", target=latin1_db("rs"))]
    for target in targets:
        assert [pg.query(target, q) for q in queries] == want


def test_a_sql_ascii_database_keeps_its_bytes(pg, repo, tmp_path):
    """SQL_ASCII stores bytes unchecked.  libpq gives such a session SQL_ASCII, in
    which psycopg hands text over as bytes: snap reads the catalog in UTF-8 and the
    rows as stored (UTF-8 would have the server reject them), through libpq and
    through psql, and restore puts the same bytes back."""
    source = database_in(pg, "SQL_ASCII", "sqlascii")
    with pg.connect(source) as conn:
        conn.execute("SET client_encoding = 'SQL_ASCII'")
        conn.execute(b"CREATE TABLE t (id int PRIMARY KEY, v text); "
                     b"INSERT INTO t VALUES (1, 'caf\xe9 latin-1'), (2, 'caf\xc3\xa9 utf-8'), "
                     b"(3, '\xff\xfe'); CREATE TABLE big AS SELECT g AS id, 'x\xe9' || g AS v "
                     b"FROM generate_series(1, 20000) g")   # big: over 64 KiB, read by psql
    sid = snap(repo, pg.dsn(source))
    q = "SELECT md5(string_agg(convert_to(v, 'SQL_ASCII')::text, ',' ORDER BY id)) FROM {}"
    want = [pg.query(source, q.format(t)) for t in ("t", "big")]
    for target in (restore_into(pg, repo, sid, "-j", "2", target=database_in(pg, "SQL_ASCII", "rt")),
                   restore_script(pg, repo, sid, tmp_path / "ascii.sql",
                                  target=database_in(pg, "SQL_ASCII", "rs"))):
        assert [pg.query(target, q.format(t)) for t in ("t", "big")] == want
    # A name that is not UTF-8: fpvault reads names as UTF-8, and says so.
    with pg.connect(source) as conn:
        conn.execute("SET client_encoding = 'SQL_ASCII'")
        conn.execute(b'CREATE TABLE "t\xe9" (id int)')
    r = run("snap", "-r", repo, "-d", pg.dsn(source))
    assert r.code == 1 and "not valid UTF-8" in r.err and "rename it" in r.err, r.err


def test_entry_headers_are_found_only_outside_strings_names_and_comments():
    from fpvault.pgtools import entry_headers

    def head(name):
        return f"--\n-- Name: {name}; Type: INDEX; Schema: public; Owner: me\n--\n"

    hidden = [f"'{head('in_string')}'", f"E'it\\'s {head('in_e_string')}'",
              f"'it''s {head('in_doubled')}'", f'"a""{head("in_name")}"',
              f"$f${head('in_dollar')}$f$", f"$${head('in_empty_dollar')}$$",
              f"/* /* nested */ {head('in_block')} */", f"x$y\n{head('after_dollar_in_name')}"]
    sql = head("first") + "CREATE INDEX i ON t (c);\n"
    for h in hidden:
        sql += "SELECT " + h + ";\n" + head("real") + "SELECT 1;\n"
    found = [m.group(1).decode() for m in entry_headers(sql.encode())]
    # (An unquoted $ inside a name does not start a dollar quote: that header counts.)
    assert found == ["first"] + ["real"] * 7 + ["after_dollar_in_name", "real"], found


def test_entry_headers_that_cannot_be_read_for_sure():
    """Cases a review found: a name holding a header's separators (a schema named
    's; Type: BLOB; Schema: x' made every entry in it read as a large object's), an
    e' after a name's last letter (not an escape string), a -- comment ended by a
    lone carriage return."""
    from fpvault.pgtools import entry_headers, without_large_objects

    real = b"--\n-- Name: t; Type: TABLE; Schema: public; Owner: me\n--\n"
    odd = b"--\n-- Name: mood; Type: TYPE; Schema: s; Type: BLOB; Schema: x; Owner: me\n--\n"
    assert entry_headers(real + b"CREATE TABLE t ();\n" + odd + b"CREATE TYPE mood;\n") is None
    assert without_large_objects(real + odd) is None
    fake = b"--\n-- Name: f; Type: INDEX; Schema: public; Owner: me\n--\n"
    for hiding in (b"SELECT name'x\\', '\n" + fake + b"SELECT 42; --';\n",
                   b"SELECT 1 -- c\r, '\n" + fake + b"SELECT 42; --';\n"):
        found = entry_headers(real + hiding + real)
        assert [m.group(1) for m in found] == [b"t", b"t"], (hiding, found)
