"""Every command on an s3:// repository, against a real S3-compatible server on loopback."""

import json
import random

import pytest

from conftest import run
from test_delta import rows_text
from fpvault import verify as verify_mod
from fpvault.locks import Lock
from fpvault.s3 import S3Backend
from fpvault.vault import Vault, backend_for


@pytest.mark.parametrize("where,encrypted", [("s3", False), ("s3", True), ("local", True)])
def test_every_command(pg, db, s3_server, tmp_path, monkeypatch, where, encrypted):
    """The whole command suite on a bucket and on a directory, encrypted and not (the
    plain local repository is what every other test uses)."""
    repo = s3_server() if where == "s3" else str(tmp_path / "repo")
    if encrypted:
        monkeypatch.setenv("FPVAULT_PASSWORD", "correct horse battery staple")
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 30000) g; "
                   "CREATE SEQUENCE s; SELECT setval('s', 7); SELECT lo_from_bytea(4242, 'lob')")
    r = run("init", "-r", repo, *(["--encrypt"] if encrypted else []))
    assert r.code == 0, r.err
    assert ("not encrypted" in r.err) == (where == "s3" and not encrypted)
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

    with Lock(backend_for(repo), exclusive=False, command="snap"):
        r = run("prune", "-r", repo, "--lock-wait", "0")
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


def test_endpoint_as_an_option(s3_server, monkeypatch):
    repo = s3_server()
    endpoint = f"http://127.0.0.1:{s3_server.port}"
    monkeypatch.setenv("FPVAULT_S3_ENDPOINT", "http://127.0.0.1:1")   # wrong: the option wins
    r = run("init", "-r", repo, "--s3-endpoint", endpoint, "--s3-region", "us-east-1")
    assert r.code == 0, r.err
    monkeypatch.setenv("FPVAULT_S3_ENDPOINT", "http://127.0.0.1:1")
    r = run("list", "-r", repo, env={"FPVAULT_S3_ATTEMPTS": "1", "FPVAULT_S3_TIMEOUT": "2"})
    assert r.code == 1 and "Cannot reach S3" in r.err


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


def _through(proxy, **extra):
    return {"FPVAULT_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}", "FPVAULT_S3_TIMEOUT": "1",
            **extra}


def test_transient_faults_are_retried(pg, db, s3_server):
    from s3faults import FaultProxy

    repo = s3_server()
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    proxy = FaultProxy(s3_server.port)
    # Every 7th request fails: 503 SlowDown, 500, a dropped connection, and (1 in 56)
    # a request that is never answered.
    kinds = ["503", "500", "drop", "503", "500", "drop", "503", "stall"]
    proxy.plan = lambda method, n: kinds[(n // 7) % 8] if n % 7 == 0 else None
    try:
        env = _through(proxy)
        assert run("init", "-r", repo, env=env).code == 0
        r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", env=env)
        assert r.code == 0, r.err
        pg.execute(db, "UPDATE t SET v = 'changed' WHERE id % 50 = 0")
        assert run("snap", "-r", repo, "-d", pg.dsn(db), env=env).code == 0
        target = pg.createdb()
        r = run("restore", "latest", "-r", repo, "--to", pg.dsn(target), env=env)
        assert r.code == 0, r.err
        r = run("verify", "-r", repo, "--read-data", env=env)
        direct = run("verify", "-r", repo, "--read-data")
        assert r.code == 0, (r.err, direct.err)
        assert run("forget", "-r", repo, "--keep-last", "1", "--prune", env=env).code == 0
    finally:
        proxy.close()
    assert proxy.faults >= 8, proxy.faults
    # Straight to the server: nothing corrupt was left behind.
    assert run("verify", "-r", repo, "--read-data").code == 0
    assert pg.query(target, "SELECT count(*), count(*) FILTER (WHERE v = 'changed') FROM t") == [
        (20000, 400)]


def test_a_store_that_keeps_failing_fails_the_snapshot_cleanly(pg, db, s3_server):
    from s3faults import FaultProxy

    repo = s3_server()
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    assert run("init", "-r", repo).code == 0
    assert run("snap", "-r", repo, "-d", pg.dsn(db)).code == 0
    pg.execute(db, "UPDATE t SET v = 'again' WHERE id % 10 = 0")
    proxy = FaultProxy(s3_server.port)
    # Every upload of a pack or an index fails, however often it is retried.
    proxy.plan = lambda method, n: "500" if method == "PUT" and n > 3 else None
    try:
        r = run("snap", "-r", repo, "-d", pg.dsn(db), env=_through(proxy, FPVAULT_S3_ATTEMPTS="2"))
    finally:
        proxy.close()
    assert r.code == 1
    assert "InternalError" in r.err and "Nothing was committed" in r.err and "Traceback" not in r.err
    assert len(json.loads(run("list", "-r", repo, "--json").out)) == 1
    assert run("verify", "-r", repo, "--read-data").code == 0
    assert run("snap", "-r", repo, "-d", pg.dsn(db)).code == 0   # no manual unlock needed
    assert len(json.loads(run("list", "-r", repo, "--json").out)) == 2


def test_a_lock_that_cannot_be_removed_does_not_undo_a_snapshot(pg, db, s3_server):
    """The store gone just after the manifest is written: the snapshot is committed,
    so snap says so (exit 0, its id) and warns that its lock stays behind; and when a
    pack upload fails too, the error named is the upload's, not the lock's."""
    from s3faults import FaultProxy

    repo = s3_server()
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
    assert run("init", "-r", repo).code == 0
    proxy = FaultProxy(s3_server.port)
    proxy.path_plan = lambda method, path: "500" if method == "DELETE" else None
    try:
        env = _through(proxy, FPVAULT_S3_ATTEMPTS="2")
        r = run("snap", "-r", repo, "-d", pg.dsn(db), env=env)
        assert r.code == 0 and "could not remove the lock" in r.err, (r.code, r.err)
        sid = r.out.strip().splitlines()[-1]
        assert [s["id"] for s in json.loads(run("list", "-r", repo, "--json").out)] == [sid]
        pg.execute(db, "UPDATE t SET v = 'x' WHERE id = 1")
        proxy.path_plan = lambda method, path: ("500" if method == "DELETE" or (
            method == "PUT" and "/data/" in path) else None)
        r = run("snap", "-r", repo, "-d", pg.dsn(db), env=env)
        assert r.code == 1 and "writing data/" in r.err and "Nothing was committed" in r.err, r.err
    finally:
        proxy.close()
    assert run("snap", "-r", repo, "-d", pg.dsn(db)).code == 0   # the locks left are stale
    assert run("verify", "-r", repo, "--read-data").code == 0


def test_metadata_cache_follows_the_remote(pg, db, s3_server):
    from pathlib import Path

    from fpvault.vault import Vault, cache_dir

    repo = s3_server()
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)")
    assert run("init", "-r", repo).code == 0
    ids = [json.loads(run("snap", "-r", repo, "-d", pg.dsn(db), "--json").out)["id"] for _ in range(2)]
    assert len(json.loads(run("list", "-r", repo, "--json").out)) == 2
    cache = Path(cache_dir(Vault.open(repo).config.id))
    cached = sorted(p.name for p in (cache / "snapshots").iterdir())
    assert cached == sorted(ids)
    # A damaged cached copy is not trusted: it is fetched again.
    victim = cache / "snapshots" / ids[0]
    victim.write_bytes(b"\0" * 40)
    assert run("verify", "-r", repo).code == 0
    # A snapshot forgotten (here, by another machine) leaves the cache too.
    from fpvault.s3 import S3Backend
    S3Backend(repo).delete(f"snapshots/{ids[0]}")
    assert [s["id"] for s in json.loads(run("list", "-r", repo, "--json").out)] == [ids[1]]
    assert sorted(p.name for p in (cache / "snapshots").iterdir()) == [ids[1]]


def first_version(url: str) -> tuple[dict[int, str], object]:
    """A new repository at ``url`` holding one stream of 150,000 random rows."""
    vault = Vault.create(url)
    rnd = random.Random(5)
    rows = {i: rnd.randbytes(20).hex() for i in range(150000)}
    stream, _ = vault.write_stream([rows_text(rows)])
    vault.store.flush()
    return rows, stream


def pack_reads(vault: Vault) -> list[str]:
    """The names of the packs ``vault`` reads from now on, once per GET."""
    gets: list[str] = []
    real_get = vault.store.backend.get

    def counting_get(name, *args):
        if name.startswith("data/"):
            gets.append(name)
        return real_get(name, *args)

    vault.store.backend.get = counting_get
    return gets


def cli_pack_reads(monkeypatch) -> list[str]:
    """The names of the packs any S3 repository is read from now on, once per GET: for
    the commands run through the CLI, which open their own."""
    gets: list[str] = []
    real_get = S3Backend.get

    def counting_get(self, name, *args):
        if name.startswith("data/"):
            gets.append(name)
        return real_get(self, name, *args)

    monkeypatch.setattr(S3Backend, "get", counting_get)
    return gets


def test_delta_bases_are_read_ahead_in_few_requests(s3_server):
    """A snapshot after scattered changes fetches the delta bases of a window of chunks in
    a few ranged GETs, not one round trip per changed chunk; and stores the same bytes."""
    url = s3_server()
    rows, first = first_version(url)
    for k in range(7, 150000, 100):               # 1% of rows, scattered: every chunk changes
        rows[k] = "changed" + rows[k][7:]
    second_text = rows_text(rows)

    fresh = Vault.open(url)                        # nothing decoded or cached yet
    gets = pack_reads(fresh)
    second, _ = fresh.write_stream([second_text], first)
    fresh.store.flush()
    assert fresh.store.stats.deltas_added >= 60, fresh.store.stats
    assert len(gets) <= fresh.store.stats.deltas_added / 10, (len(gets), fresh.store.stats)
    assert Vault.open(url).read_bytes(second) == second_text


def test_verify_reads_delta_bases_ahead(s3_server):
    """verify --read-data reads each pack whole, and the bases its deltas decode against
    from other packs ahead, in coalesced ranged GETs: not one per delta."""
    url = s3_server()
    rows, stream = first_version(url)
    deltas = 0
    for version in range(6):                       # 1% of rows each time, scattered
        for k in range(7 + version, 150000, 100):
            rows[k] = f"changed{version}" + rows[k][8:]
        vault = Vault.open(url)
        stream, _ = vault.write_stream([rows_text(rows)], stream)
        vault.store.flush()
        deltas += vault.store.stats.deltas_added
    checker = Vault.open(url)
    gets = pack_reads(checker)
    report = verify_mod.verify(checker, read_data=True)
    assert report.ok, report.problems
    assert report.blobs_checked == len(checker.index.blobs)
    assert deltas >= 400 and len(gets) <= deltas / 4, (len(gets), deltas)

    # The first version's pack (the largest), which every chain starts from, lost:
    # reported as damage, not raised by the read-ahead.
    checker.backend.delete(max(checker.backend.list("data/"), key=checker.backend.size))
    report = verify_mod.verify(Vault.open(url), read_data=True)
    assert not report.ok and any("missing" in p for p in report.problems), report.problems


def test_verify_reports_a_truncated_pack(s3_server):
    """A pack cut short: S3 refuses ranged reads past its end (HTTP 416), which verify
    reports as damage to what needs them, as it does a missing pack."""
    url = s3_server()
    rows, first = first_version(url)
    for k in range(7, 150000, 100):
        rows[k] = "changed" + rows[k][7:]
    vault = Vault.open(url)
    vault.write_stream([rows_text(rows)], first)
    vault.store.flush()
    name = max(vault.backend.list("data/"), key=vault.backend.size)   # the first version's
    vault.backend.put(name, vault.backend.get(name)[:vault.backend.size(name) // 2])
    report = verify_mod.verify(Vault.open(url), read_data=True)
    assert not report.ok
    assert any(name.rsplit("/", 1)[-1][:16] in p for p in report.problems), report.problems


def test_a_quiet_snapshot_of_many_tables_reads_their_lists_together(pg, db, s3_server,
                                                                    monkeypatch):
    """A snapshot with nothing committed since the last one checks that every table's
    chunks are still stored: the chunk lists, one per table, are read a run of
    neighbours at a time, not one request each (150 tables: 165 requests before)."""
    pg.execute(db, "DO $$ BEGIN FOR i IN 1..80 LOOP EXECUTE format("
                   "'CREATE TABLE t%s (id int PRIMARY KEY, v text); "
                   "INSERT INTO t%s SELECT g, md5(g::text) FROM generate_series(1, 50) g', i, i);"
                   " END LOOP; END $$; CHECKPOINT")
    repo = s3_server()
    assert run("init", "-r", repo).code == 0
    assert run("snap", "-r", repo, "-d", pg.dsn(db)).code == 0
    gets = cli_pack_reads(monkeypatch)
    for _ in range(10):
        before = json.loads(run("show", "latest", "-r", repo, "--json").out)
        gets.clear()
        r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
        assert r.code == 0, r.err
        doc = json.loads(r.out)
        if doc["tables_reused"] == 80:    # nothing committed in between
            break
    assert doc["bytes_read"] == 0 and before["id"] != doc["id"]
    assert len(gets) <= 8, len(gets)


def test_verify_reads_each_chunk_list_once(pg, db, s3_server, monkeypatch):
    """An unchanged table's chunk list is shared by every snapshot since it changed:
    verify reads it once, with its neighbours, not once per snapshot and request
    each (41 tables in 4 snapshots: 188 requests before, 16 after)."""
    pg.execute(db, "DO $$ BEGIN FOR i IN 1..40 LOOP EXECUTE format("
                   "'CREATE TABLE t%s (id int PRIMARY KEY, v text); "
                   "INSERT INTO t%s SELECT g, md5(g::text) FROM generate_series(1, 50) g', i, i);"
                   " END LOOP; END $$; CREATE TABLE hot (v int)")
    repo = s3_server()
    assert run("init", "-r", repo).code == 0
    for i in range(4):
        pg.execute(db, f"INSERT INTO hot VALUES ({i})")
        assert run("snap", "-r", repo, "-d", pg.dsn(db)).code == 0
    gets = cli_pack_reads(monkeypatch)
    r = run("verify", "-r", repo, "--json")
    assert r.code == 0 and json.loads(r.out)["ok"], r.out
    assert len(gets) <= 30, len(gets)
