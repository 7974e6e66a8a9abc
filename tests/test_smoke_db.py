"""The end-to-end spine: init, snap, list, show, restore on a real server."""

import json

from conftest import run


def test_snap_list_show_restore(pg, db, repo):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g")
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert set(doc) == {"id", "time", "tables", "rows", "bytes_read", "bytes_added",
                        "tables_reused", "seconds"}
    assert doc["tables"] == 1 and doc["rows"] == 1000
    r = run("list", "-r", repo, "--json")
    assert [s["id"] for s in json.loads(r.out)] == [doc["id"]]
    r = run("show", "latest", "-r", repo, "--json")
    assert json.loads(r.out)["tables"][0]["name"] == "public.t"
    target = pg.createdb()
    r = run("restore", doc["id"][:8], "-r", repo, "--to", pg.dsn(target))
    assert r.code == 0, r.err
    assert pg.query(target, "SELECT count(*), sum(id) FROM t") == [(1000, 500500)]
