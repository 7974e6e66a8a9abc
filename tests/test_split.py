"""snap -j: a table larger than its share of the work is read in key ranges at once."""

import json

import psycopg

from conftest import run
from fpvault import snapshot
from fpvault.vault import Vault


def snap(pg, repo, db, *args):
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", *args)
    assert r.code == 0, r.err
    return json.loads(r.out)


def spy_on_copy(monkeypatch, fail_range=False):
    """Record (table, key range) of every COPY; optionally fail the later ranges."""
    seen = []
    real = snapshot.copy_out

    def copy_out(conn, reader, table, key_range, rows):
        seen.append((table.name, key_range))
        if fail_range and key_range is not None and key_range[0] is not None:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real(conn, reader, table, key_range, rows)

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
