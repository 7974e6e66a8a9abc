"""Every command on an s3:// repository, against a real S3-compatible server on loopback."""

import json

from conftest import run
from fpvault.locks import Lock
from fpvault.vault import Vault


def test_every_command_on_s3(pg, db, s3_server):
    repo = s3_server()
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 30000) g; "
                   "CREATE SEQUENCE s; SELECT setval('s', 7); SELECT lo_from_bytea(4242, 'lob')")
    r = run("init", "-r", repo)
    assert r.code == 0, r.err
    assert "not encrypted" in r.err
    assert run("init", "-r", repo).code == 1

    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", "--tag", "s3")
    assert r.code == 0, r.err
    first = json.loads(r.out)
    pg.execute(db, "UPDATE t SET v = 'x' WHERE id % 100 = 1; INSERT INTO t VALUES (40000, 'new')")
    second = json.loads(run("snap", "-r", repo, "-d", pg.dsn(db), "--json").out)
    assert second["bytes_added"] < first["bytes_added"] / 4

    listed = json.loads(run("list", "-r", repo, "--json").out)
    assert [s["id"] for s in listed] == [first["id"], second["id"]]
    shown = json.loads(run("show", "latest", "-r", repo, "--json").out)
    assert shown["tables"][0]["rows"] == 30001
    d = json.loads(run("diff", "latest~1", "latest", "-r", repo, "--rows", "--json").out)
    (t,) = d["tables"]
    assert (t["updated"], t["inserted"], t["deleted"]) == (300, 1, 0)

    target = pg.createdb()
    r = run("restore", first["id"][:8], "-r", repo, "--to", pg.dsn(target))
    assert r.code == 0, r.err
    assert pg.query(target, "SELECT count(*), count(*) FILTER (WHERE v = 'x') FROM t") == [(30000, 0)]
    assert pg.query(target, "SELECT last_value FROM s") == [(7,)]
    assert pg.query(target, "SELECT convert_from(lo_get(4242), 'UTF8')") == [("lob",)]
    script = run("restore", "latest", "-r", repo, "-o", "-")
    assert script.code == 0 and "COPY public.t" in script.out

    scratch = pg.createdb()
    r = run("verify", "-r", repo, "--read-data", "--restore-test", pg.dsn(scratch))
    assert r.code == 0, r.err
    stats = json.loads(run("stats", "-r", repo, "--json").out)
    assert stats["snapshots"] == 2 and stats["packs"] >= 2

    vault = Vault.open(repo)
    with Lock(vault.backend, exclusive=False, command="snap"):
        r = run("prune", "-r", repo)
        assert r.code == 4 and "shared lock held by snap" in r.err
    r = run("forget", "-r", repo, "--keep-last", "1", "--prune", "--json")
    assert r.code == 0, r.err
    assert run("verify", "-r", repo, "--read-data").code == 0
    assert run("unlock", "-r", repo).code == 0
    assert run("repair", "index", "-r", repo).code == 0
    assert run("verify", "-r", repo, "--read-data").code == 0
    again = pg.createdb()
    assert run("restore", "latest", "-r", repo, "--to", pg.dsn(again)).code == 0
    assert pg.query(again, "SELECT count(*) FROM t") == [(30001,)]


def test_s3_errors(s3_server):
    repo = s3_server()
    r = run("list", "-r", repo)
    assert r.code == 1 and "no fpvault repository" in r.err
    r = run("init", "-r", "s3://fpvault-no-such-bucket-here/x")
    assert r.code == 1 and "does not exist" in r.err
    r = run("list", "-r", "s3://Bad_Bucket")
    assert r.code == 2 and "s3://bucket" in r.err
    # A prefix that already holds other objects is not taken over.
    vault_url = s3_server("other")
    from fpvault.s3 import S3Backend
    S3Backend(vault_url).put("something-else", b"x")
    r = run("init", "-r", vault_url)
    assert r.code == 1 and "already holds objects" in r.err
