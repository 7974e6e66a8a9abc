"""-j: a table larger than its share of the work is read in key ranges at once (snap)
and loaded in parts at once (restore)."""

import json

import psycopg
from hypothesis import given
from hypothesis import strategies as st

from conftest import run
from fpvault import restore, snapshot
from fpvault.chunkstore import ChunkRef
from fpvault.vault import Vault


def snap(pg, repo, db, *args):
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", *args)
    assert r.code == 0, r.err
    return json.loads(r.out)


def spy_on_copy(monkeypatch, fail_range=False):
    """Record (table, key range) of every COPY; optionally fail the later ranges."""
    seen = []
    real = snapshot.copy_out

    def copy_out(conn, reader, table, key_range, rows, copies=None):
        seen.append((table.name, key_range))
        if fail_range and key_range is not None and key_range[0] is not None:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real(conn, reader, table, key_range, rows, copies)

    monkeypatch.setattr(snapshot, "copy_out", copy_out)
    return seen


def test_a_split_table_stores_the_same_stream(pg, db, repo, monkeypatch):
    pg.execute(db, "CREATE TABLE big (id bigint PRIMARY KEY, v text); "
                   "INSERT INTO big SELECT g * 3, md5(g::text) FROM generate_series(1, 200000) g; "
                   "CREATE TABLE small (id int PRIMARY KEY, v text); "
                   "INSERT INTO small SELECT g, 'x' FROM generate_series(1, 500) g; "
                   "CREATE TABLE keyless (v text); "
                   "INSERT INTO keyless SELECT md5(g::text) FROM generate_series(1, 5000) g")
    whole = snap(pg, repo, db, "-j", "1")
    monkeypatch.setattr(snapshot, "SPLIT_MIN_BYTES", 0)
    seen = spy_on_copy(monkeypatch)
    split = snap(pg, repo, db, "-j", "3", "--reread")

    ranges = sorted((r for name, r in seen if name == "big"),
                    key=lambda r: -1 if r[0] is None else r[0])   # spools start first
    assert len(ranges) == 3 and ranges[0][0] is None and ranges[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))   # adjacent, no gap
    assert [r for name, r in seen if name != "big"] == [None, None]  # small ones whole
    vault = Vault.open(repo)
    tables = {sid: {t.name: t for t in vault.resolve(sid)[1].tables}
              for sid in (whole["id"], split["id"])}
    for name in ("big", "small", "keyless"):
        a, b = tables[whole["id"]][name], tables[split["id"]][name]
        assert (a.data.list, a.data.hash, a.rows) == (b.data.list, b.data.hash, b.rows), name
    assert split["bytes_added"] < 64 * 1024      # nothing new: the same chunks

    target = pg.createdb()
    assert run("restore", split["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    assert pg.query(target, "SELECT count(*), sum(id) FROM big") == \
        pg.query(db, "SELECT count(*), sum(id) FROM big")
    assert tables[split["id"]]["big"].rows == 200000      # the ranges' counts, summed


def test_a_failed_range_fails_the_snapshot(pg, db, repo, monkeypatch):
    pg.execute(db, "CREATE TABLE big (id int PRIMARY KEY, v text); "
                   "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
    first = snap(pg, repo, db)
    monkeypatch.setattr(snapshot, "SPLIT_MIN_BYTES", 0)
    spy_on_copy(monkeypatch, fail_range=True)
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "-j", "2", "--reread")
    assert r.code == 5, (r.code, r.err)
    assert "server closed the connection" in r.err and "No snapshot was written" in r.err
    listed = json.loads(run("list", "-r", repo, "--json").out)
    assert [s["id"] for s in listed] == [first["id"]]


# -- restore -j: parts of one table loaded at once

def spy_on_parts(monkeypatch):
    """Record (table, part) of every COPY restore makes; LOAD_SPLIT_MIN_BYTES off."""
    seen = []
    real = restore.table_chunks

    def table_chunks(vault, plan, table, part=None):
        seen.append((table.name, part))
        return real(vault, plan, table, part)

    monkeypatch.setattr(restore, "table_chunks", table_chunks)
    monkeypatch.setattr(restore, "LOAD_SPLIT_MIN_BYTES", 0)
    return seen


def digest(pg, db, table):
    return pg.query(db, f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM {table} t")


def test_restore_j_loads_a_large_table_in_parts(pg, db, repo, monkeypatch):
    pg.execute(db, "CREATE TABLE big (id bigint PRIMARY KEY, v text); "
                   "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 100000) g; "
                   "CREATE INDEX big_v ON big (v); "
                   "CREATE TABLE child (id int PRIMARY KEY, big_id bigint REFERENCES big); "
                   "INSERT INTO child SELECT g, g * 7 FROM generate_series(1, 1000) g")
    sid = snap(pg, repo, db)["id"]
    seen = spy_on_parts(monkeypatch)
    target = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target), "-j", "3")
    assert r.code == 0, r.err

    (entry,) = [t for t in Vault.open(repo).resolve(sid)[1].tables if t.name == "big"]
    refs = Vault.open(repo).store.get_list(bytes.fromhex(entry.data.list))
    parts = sorted((part for name, part in seen if name == "big"), key=lambda p: refs.index(p[0]))
    assert len(parts) == 3 and [r for part in parts for r in part] == refs  # all, once
    for table in ("big", "child"):
        assert digest(pg, target, table) == digest(pg, db, table), table
    # The index and the key built once all parts were in; the foreign key holds.
    assert pg.query(target, "SELECT indexname FROM pg_indexes WHERE tablename = 'big' "
                            "ORDER BY 1") == [("big_pkey",), ("big_v",)]
    assert pg.query(target, "SELECT count(*) FROM pg_constraint WHERE contype = 'f'") == [(1,)]

    # One table on its own goes over several connections too.
    seen.clear()
    alone = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(alone), "-t", "big", "-j", "2")
    assert r.code == 0, r.err
    assert len([name for name, _ in seen]) == 2 and digest(pg, alone, "big") == digest(pg, db, "big")


def test_restore_j_never_splits_a_row(pg, db, repo, monkeypatch):
    # Rows of 600 KiB are longer than a chunk may grow to reach a row's end, so their
    # chunks end inside rows; a part may only end where a row does.
    pg.execute(db, "CREATE TABLE wide (id int PRIMARY KEY, v text); "
                   "INSERT INTO wide SELECT g, repeat(md5(g::text), 19200) "
                   "FROM generate_series(1, 12) g")
    sid = snap(pg, repo, db)["id"]
    (entry,) = Vault.open(repo).resolve(sid)[1].tables
    refs = Vault.open(repo).store.get_list(bytes.fromhex(entry.data.list))
    assert any(ref.cut_in_row for ref in refs)
    seen = spy_on_parts(monkeypatch)
    target = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target), "-j", "4")
    assert r.code == 0, r.err
    assert len(seen) > 1 and all(not part[-1].cut_in_row for _, part in seen)
    assert digest(pg, target, "wide") == digest(pg, db, "wide")


@given(st.lists(st.tuples(st.integers(1, 1000), st.booleans()), max_size=60),
       st.integers(1, 8))
def test_load_parts_cuts_whole_rows_in_order(items, parts):
    refs = [ChunkRef(i.to_bytes(32, "big"), size, cut) for i, (size, cut) in enumerate(items)]
    out = restore.load_parts(refs, parts)
    assert [r for part in out for r in part] == refs
    assert 1 <= len(out) <= parts
    assert all(part and not part[-1].cut_in_row for part in out[:-1])
    if refs and not any(r.cut_in_row for r in refs) and len(refs) >= parts:
        # Cut where the share is reached: no part but the last holds more than a
        # share plus one chunk.
        share = sum(r.size for r in refs) / parts
        assert all(sum(r.size for r in part) <= share + part[-1].size for part in out[:-1])


def test_workers_give_back_their_locks_and_stay_in_the_snapshot(pg, db, repo, monkeypatch):
    """A -j worker commits every WORKER_TABLES_PER_TRANSACTION tables (the locks it took
    would otherwise fill the server's lock table on a schema of thousands of tables)
    and joins the same snapshot again: a row committed in between is not in it."""
    pg.execute(db, "DO $$ BEGIN FOR i IN 1..40 LOOP EXECUTE format("
                   "'CREATE TABLE w%s (id int PRIMARY KEY, v text); "
                   "INSERT INTO w%s SELECT g, md5(g::text) FROM generate_series(1, 2000) g', i, i);"
                   " END LOOP; END $$")
    monkeypatch.setattr(snapshot, "WORKER_TABLES_PER_TRANSACTION", 1)
    joins = []
    real_begin = snapshot.pgsource.begin_snapshot

    def begin(conn, name=None):
        if name is not None:
            joins.append(name)
            if len(joins) == 3:   # a worker renewing its transaction: commit a change now
                with psycopg.connect(pg.dsn(db), autocommit=True) as other:
                    other.execute("INSERT INTO w1 SELECT g, 'late' FROM generate_series(-9, 0) g")
                    other.execute("UPDATE w40 SET v = 'late'")
        return real_begin(conn, name)

    monkeypatch.setattr(snapshot.pgsource, "begin_snapshot", begin)
    doc = snap(pg, repo, db, "-j", "3")
    assert len(joins) >= 3 and len(set(joins)) == 1, joins
    target = pg.createdb()
    assert run("restore", doc["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    assert pg.query(target, "SELECT count(*) FROM w1")[0][0] == 2000
    assert pg.query(target, "SELECT count(*) FROM w40 WHERE v = 'late'")[0][0] == 0
    assert pg.query(db, "SELECT count(*) FROM w40 WHERE v = 'late'")[0][0] == 2000


def test_a_worker_holds_no_more_table_locks_than_a_transaction_allows(pg, db, repo, monkeypatch):
    """A worker commits before a batch that would take it past
    WORKER_TABLES_PER_TRANSACTION tables locked, not after (which let it hold 54 of
    32 with batches of 27)."""
    pg.execute(db, "DO $$ BEGIN FOR i IN 1..60 LOOP EXECUTE format("
                   "'CREATE TABLE s%s (id int PRIMARY KEY, v text); INSERT INTO s%s "
                   "SELECT g, md5(g::text) FROM generate_series(1, 50) g', i, i); END LOOP; END $$")
    monkeypatch.setattr(snapshot, "LEADER_READS_MAX_TABLES", 2)   # every table on the worker
    monkeypatch.setattr(snapshot, "BATCH_BYTES", 27 * 8192)       # batches of 27 tables
    held = []
    real = snapshot.pgsource.lock_tables_nowait

    def locked(conn, tables):
        ok = real(conn, tables)
        held.append(conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE l.pid = pg_backend_pid() AND c.relname ~ '^s[0-9]+$'").fetchone()[0])
        return ok

    monkeypatch.setattr(snapshot.pgsource, "lock_tables_nowait", locked)
    doc = json.loads(run("snap", "-r", repo, "-d", pg.dsn(db), "--json").out)
    assert doc["tables"] == 60 and len(held) == 3, held
    assert max(held) <= snapshot.WORKER_TABLES_PER_TRANSACTION, held


def test_with_many_tables_the_leader_only_holds_the_snapshot(pg, db, repo, monkeypatch):
    """Past LEADER_READS_MAX_TABLES, even -j 1 reads through a worker connection (which
    gives back its locks as it goes) and the leader, which cannot, reads nothing: not
    for a first snapshot, and not to look at tables after a commit elsewhere."""
    pg.execute(db, "DO $$ BEGIN FOR i IN 1..9 LOOP EXECUTE format("
                   "'CREATE TABLE m%s (id int PRIMARY KEY, v text); "
                   "CREATE INDEX ON m%s (v); "
                   "INSERT INTO m%s SELECT g, md5(g::text) FROM generate_series(1, 300) g', "
                   "i, i, i); END LOOP; END $$")
    monkeypatch.setattr(snapshot, "LEADER_READS_MAX_TABLES", 2)
    monkeypatch.setattr(snapshot, "WORKER_TABLES_PER_TRANSACTION", 3)
    conns, read_on = [], []
    real_connect, real_copy = snapshot.pgsource.connect, snapshot.copy_out

    def connect(*args, **kwargs):
        if "to read the catalog" in args:   # the catalog's fingerprint: reads no table
            return real_connect(*args, **kwargs)
        conns.append(real_connect(*args, **kwargs))
        return conns[-1]

    def copy_out(conn, reader, table, key_range, rows, copies=None):
        read_on.append(conns.index(conn))
        return real_copy(conn, reader, table, key_range, rows, copies)

    def looked_on(monkeypatch):
        on = []
        real = snapshot.Looks.unchanged

        def unchanged(self, conn, tables):
            on.extend(conns.index(conn) for _ in tables)
            return real(self, conn, tables)

        monkeypatch.setattr(snapshot.Looks, "unchanged", unchanged)
        return on

    monkeypatch.setattr(snapshot.pgsource, "connect", connect)
    monkeypatch.setattr(snapshot, "copy_out", copy_out)
    first = snap(pg, repo, db)
    assert len(conns) == 2 and read_on and 0 not in read_on, read_on
    pg.execute("postgres", "CREATE TABLE IF NOT EXISTS elsewhere (n int); "
                           "INSERT INTO elsewhere VALUES (1)")
    conns.clear()
    looks = looked_on(monkeypatch)
    second = snap(pg, repo, db, "-j", "2")
    assert len(conns) == 3 and len(looks) >= 9 and 0 not in looks, looks
    assert second["tables_reused"] == first["tables"]
    target = pg.createdb()
    assert run("restore", second["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    for i in (1, 9):
        q = f"SELECT md5(string_agg(v, ',' ORDER BY id)) FROM m{i}"
        assert pg.query(target, q) == pg.query(db, q)
