"""A table's first snapshot in a repository is read as its heap lies when the
statistics say that is key order (pgsource.in_key_order), and in key order from
then on; whichever order a stream is in, it restores, verifies and diffs exactly."""

import json
import time

from conftest import run
from fpvault import pgsource, snapshot
from pgcompare import assert_same_data, capture


def snap(pg, repo, db, *args):
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", *args)
    assert r.code == 0, r.err
    return json.loads(r.out)


def orders(repo, sid):
    r = run("show", sid, "-r", repo, "--json")
    assert r.code == 0, r.err
    return {t["name"]: t["order"] for t in json.loads(r.out)["tables"]}


def spy_on_copy(monkeypatch):
    """Record (table, physical, range) of every COPY snap makes."""
    seen = []
    real = snapshot.copy_out

    def copy_out(conn, reader, table, key_range, rows, copies=None):
        seen.append((table.name, table.physical, key_range))
        return real(conn, reader, table, key_range, rows, copies)

    monkeypatch.setattr(snapshot, "copy_out", copy_out)
    return seen


def wait_for_update_counts(pg, db, *tables):
    """Statistics of updates reach the server's counters when the updating backend
    reports them: wait until they have."""
    for _ in range(100):
        counts = pg.query(db, "SELECT min(pg_stat_get_tuples_updated(c::regclass)) "
                              "FROM unnest(%s::text[]) c", (list(tables),))
        if counts[0][0]:
            return
        time.sleep(0.1)
    raise AssertionError(f"no update counted on {tables}")


def test_first_snapshot_reads_an_ordered_heap_as_it_lies(pg, db, repo, monkeypatch):
    pg.execute(db, """
        CREATE TABLE ordered (id bigint PRIMARY KEY, v text);
        INSERT INTO ordered SELECT g, md5(g::text) FROM generate_series(1, 200000) g;
        CREATE TABLE shuffled (id int PRIMARY KEY, v text);
        INSERT INTO shuffled SELECT g, md5(g::text) FROM generate_series(1, 20000) g
            ORDER BY md5(g::text);
        CREATE TABLE updated (id int PRIMARY KEY, v text);
        INSERT INTO updated SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
        CREATE TABLE keyless (v text);
        INSERT INTO keyless SELECT md5(g::text) FROM generate_series(1, 1000) g""")
    pg.execute(db, "UPDATE updated SET v = 'x' WHERE id % 100 = 0")
    pg.execute(db, "ANALYZE")
    wait_for_update_counts(pg, db, "updated")
    before = capture(pg, db)
    monkeypatch.setattr(snapshot, "SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(snapshot, "CORES", 6)    # two per part
    seen = spy_on_copy(monkeypatch)

    first = snap(pg, repo, db, "-j", "3")
    assert orders(repo, first["id"]) == {"public.ordered": "physical", "public.shuffled": "key",
                                         "public.updated": "key", "public.keyless": "physical"}
    # The ordered table, far larger than its share, in block ranges (adjacent, covering).
    parts = sorted((r for name, physical, r in seen if name == "ordered"),
                   key=lambda r: -1 if r[0] is None else r[0])
    assert {physical for name, physical, _ in seen if name == "ordered"} == {True}
    assert len(parts) == 3 and parts[0][0] is None and parts[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))

    # The next snapshot reads it in key order: the same bytes, so nothing new.
    seen.clear()
    second = snap(pg, repo, db, "-j", "3", "--reread")
    assert orders(repo, second["id"])["public.ordered"] == "key"
    assert {physical for _, physical, _ in seen} == {False}
    assert second["bytes_added"] < 64 * 1024
    assert run("diff", first["id"], second["id"], "-r", repo, "--json").code == 0

    # With fewer than two cores per part, fewer parts: a physical read's backend is
    # not what limits it (snapshot.CORES).
    monkeypatch.setattr(snapshot, "CORES", 4)
    seen.clear()
    other = str(repo) + "-other"
    assert run("init", "-r", other).code == 0
    snap(pg, other, db, "-j", "3")
    assert len([r for name, _, r in seen if name == "ordered"]) == 2

    for sid in (first["id"], second["id"]):
        for jobs in ("1", "3"):
            target = pg.createdb()
            r = run("restore", sid, "-r", repo, "--to", pg.dsn(target), "-j", jobs)
            assert r.code == 0, r.err
            assert_same_data(pg, before, target)
        verify = pg.createdb()
        r = run("verify", sid, "-r", repo, "--restore-test", pg.dsn(verify))
        assert r.code == 0, r.out + r.err


def test_a_first_snapshot_out_of_key_order_diffs_and_verifies(pg, db, repo):
    """Statistics sample: a heap that is nearly in key order passes for it.  The
    physical stream is then out of key order, and diff and verify must not care."""
    pg.execute(db, """
        CREATE TABLE t (id int PRIMARY KEY, v text);
        INSERT INTO t SELECT g * 2, md5(g::text) FROM generate_series(1, 50000) g;
        INSERT INTO t SELECT g * 2 + 1, 'late' FROM generate_series(49950, 49989) g;
        ANALYZE t""")
    first = snap(pg, repo, db)
    assert orders(repo, first["id"]) == {"public.t": "physical"}
    assert pg.query(db, "SELECT count(*) FROM (SELECT id < lag(id) OVER (ORDER BY ctid) AS back "
                        "FROM t) x WHERE back") == [(1,)]    # truly out of key order
    state = capture(pg, db)
    # The same rows, read again in key order: other bytes, no change.
    again = snap(pg, repo, db, "--reread")
    assert orders(repo, again["id"]) == {"public.t": "key"}
    r = run("diff", first["id"], again["id"], "-r", repo, "--json", "--exit-code")
    assert r.code == 0, r.out + r.err
    assert [t["status"] for t in json.loads(r.out)["tables"]] == ["unchanged"]
    pg.execute(db, "UPDATE t SET v = 'new' WHERE id IN (99903, 1000, 70000); "
                   "DELETE FROM t WHERE id IN (99905, 2000); INSERT INTO t VALUES (0, 'zero')")
    second = snap(pg, repo, db)
    assert orders(repo, second["id"]) == {"public.t": "key"}

    r = run("diff", first["id"], second["id"], "-r", repo, "--rows", "--json")
    assert r.code == 0, r.err
    [table] = json.loads(r.out)["tables"]
    changes = sorted((row["op"], int(row["key"]["id"])) for row in table["rows"])
    assert changes == [("delete", 2000), ("delete", 99905), ("insert", 0), ("update", 1000),
                       ("update", 70000), ("update", 99903)]

    target = pg.createdb()
    assert run("restore", first["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    assert_same_data(pg, state, target)
    for sid in (first["id"], second["id"]):
        r = run("verify", sid, "-r", repo, "--restore-test", pg.dsn(pg.createdb()))
        assert r.code == 0, r.out + r.err


def test_statistics_choose_the_order(pg, db):
    """pgsource.in_key_order: correlation of the key's leading column (unique, if the
    key has more), no update or delete counted; no statistics, no guess."""
    pg.execute(db, """
        CREATE TABLE fresh (id int PRIMARY KEY);
        INSERT INTO fresh SELECT generate_series(1, 5000);
        CREATE TABLE analyzed (a int, b int, PRIMARY KEY (a, b));
        INSERT INTO analyzed SELECT g, g % 10 FROM generate_series(1, 5000) g;
        CREATE TABLE runs (day int, u uuid, PRIMARY KEY (day, u));
        INSERT INTO runs SELECT g / 100, md5(g::text)::uuid FROM generate_series(1, 5000) g;
        CREATE TABLE backwards (id int PRIMARY KEY);
        INSERT INTO backwards SELECT generate_series(5000, 1, -1);
        CREATE TABLE deleted (id int PRIMARY KEY);
        INSERT INTO deleted SELECT generate_series(1, 5000);
        DELETE FROM deleted WHERE id = 7;
        ANALYZE analyzed, runs, backwards, deleted""")
    for _ in range(100):
        if pg.query(db, "SELECT pg_stat_get_tuples_deleted('deleted'::regclass)")[0][0]:
            break
        time.sleep(0.1)
    with pg.connect(db) as conn:
        oids = [r[0] for r in conn.execute(
            "SELECT oid FROM pg_class WHERE relname IN "
            "('fresh', 'analyzed', 'runs', 'backwards', 'deleted') ORDER BY relname").fetchall()]
        tables = pgsource.table_infos(conn, oids)
        chosen = pgsource.in_key_order(conn, tables)
    assert sorted(t.name for t in tables if t.oid in chosen) == ["analyzed"]
