"""snap reads large tables through psql processes that join the exported snapshot."""

import json
import os
import threading
import time

import psycopg
import pytest

from conftest import run
from fpvault import pgsource, pgtools, snapshot
from fpvault.vault import Vault

TRICKY = """
CREATE TABLE tricky (id int PRIMARY KEY, t text, b bytea, j jsonb, f float8, ts timestamptz,
                     iv interval, n numeric);
INSERT INTO tricky
SELECT g, CASE g % 5 WHEN 0 THEN NULL WHEN 1 THEN E'tab\\there\\nnew line \\\\ back' WHEN 2 THEN '\\.'
              WHEN 3 THEN 'ünïcødé ✓ ' || g ELSE repeat('x', g % 300) END,
       decode(md5(g::text), 'hex'), jsonb_build_object('k', g, 's', E'q"\\\\'),
       g / 7.0, '2026-01-01 00:00+00'::timestamptz + g * interval '1 minute',
       g * interval '1 second', g::numeric / 3
FROM generate_series(1, 20000) g;
CREATE TABLE small (id int PRIMARY KEY, v text);
INSERT INTO small VALUES (1, 'a'), (2, NULL);
"""


def snap(repo, dsn, *args, env=None):
    r = run("snap", "-r", repo, "-d", dsn, "--json", *args, env=env)
    assert r.code == 0, r.err
    return json.loads(r.out)


def streams(repo, sid):
    _, s = Vault.open(repo).resolve(sid)
    return {t.name: (t.data.list, t.data.hash, t.rows) for t in s.tables}


def readers_used(monkeypatch):
    """Which tables went through psql."""
    used = []
    real = pgsource.PsqlReader.copy_out

    def spy(self, table, key_range=None, rows=None):
        used.append(table.name)
        return real(self, table, key_range, rows)

    monkeypatch.setattr(pgsource.PsqlReader, "copy_out", spy)
    return used


def test_psql_and_libpq_read_the_same_stream(pg, db, repo, monkeypatch):
    pg.execute(db, TRICKY)
    used = readers_used(monkeypatch)
    monkeypatch.setattr(pgsource, "PSQL_MIN_BYTES", 10**12)
    through_libpq = snap(repo, pg.dsn(db))
    assert used == []
    monkeypatch.setattr(pgsource, "PSQL_MIN_BYTES", 0)
    # A client encoding in the environment must not change what is stored.
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    through_psql = snap(repo, pg.dsn(db), "--reread")
    assert sorted(used) == ["small", "tricky"]
    assert streams(repo, through_libpq["id"]) == streams(repo, through_psql["id"])
    assert through_psql["bytes_added"] < 16 * 1024   # same chunks: only a manifest
    assert streams(repo, through_psql["id"])["tricky"][2] == 20000
    monkeypatch.delenv("PGCLIENTENCODING")
    target = pg.createdb()
    assert run("restore", through_psql["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    q = "SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM tricky t"
    assert pg.query(target, q) == pg.query(db, q)


def test_a_role_refused_by_psql_fails_the_snapshot(pg, db, repo, monkeypatch):
    monkeypatch.setattr(pgsource, "PSQL_MIN_BYTES", 0)
    pg.execute(db, "CREATE TABLE secret_t (id int); "
                   "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fpv_reader') "
                   "THEN CREATE ROLE fpv_reader LOGIN; END IF; END $$; ALTER ROLE fpv_reader LOGIN")
    r = run("snap", "-r", repo, "-d", pg.dsn(db, user="fpv_reader"))
    assert r.code == 5, r.err
    assert "permission denied for table secret_t" in r.err and "No snapshot was written" in r.err


def fake_psql(tmp_path, body):
    path = tmp_path / "psql"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return pgtools.Tool(str(path), "15.0", 15, True)


@pytest.mark.parametrize("body", [
    'cat >/dev/null; echo \'psql: error: connection to server at "db" failed: FATAL:  sorry, '
    'too many clients already\' >&2; exit 2\n',
    None,   # no psql at that path at all
])
def test_without_a_working_psql_tables_are_read_through_libpq(pg, db, repo, monkeypatch,
                                                              tmp_path, body):
    pg.execute(db, TRICKY)
    monkeypatch.setattr(pgsource, "PSQL_MIN_BYTES", 0)
    tool = (fake_psql(tmp_path, body) if body else
            pgtools.Tool(str(tmp_path / "missing" / "psql"), "15.0", 15, True))
    monkeypatch.setattr(pgtools, "find_psql", lambda pg_dump: tool)
    doc = snap(repo, pg.dsn(db))
    assert doc["rows"] == 20002
    monkeypatch.undo()
    monkeypatch.setattr(pgsource, "PSQL_MIN_BYTES", 0)
    assert streams(repo, doc["id"]) == streams(repo, snap(repo, pg.dsn(db), "--reread")["id"])


def test_psql_failing_after_it_started_fails_the_snapshot(pg, db, repo, monkeypatch, tmp_path):
    """Part of a stream, then an error: never a short table."""
    pg.execute(db, TRICKY)
    first = snap(repo, pg.dsn(db))
    monkeypatch.setattr(pgsource, "PSQL_MIN_BYTES", 0)
    tool = fake_psql(tmp_path, "cat >/dev/null; printf '1\\tpartial\\n'; "
                               "echo 'psql:<stdin>:9: ERROR:  XX001: invalid page in block 7 "
                               "of relation base/5/16384' >&2; exit 3\n")
    monkeypatch.setattr(pgtools, "find_psql", lambda pg_dump: tool)
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--reread")
    assert r.code == 1, r.err
    assert "invalid page in block 7" in r.err and "No snapshot was written" in r.err
    assert [s["id"] for s in json.loads(run("list", "-r", repo, "--json").out)] == [first["id"]]


def test_a_queued_exclusive_lock_fails_the_psql_reader_instead_of_hanging(pg, db, repo,
                                                                          monkeypatch):
    """The leader holds ACCESS SHARE; an ALTER TABLE queues behind it; a reader that
    waited for its own lock would wait for the ALTER, which waits for the leader."""
    pg.execute(db, TRICKY)
    monkeypatch.setattr(pgsource, "PSQL_MIN_BYTES", 0)
    real_lock = pgsource.lock_tables
    blocker: list[psycopg.Connection] = []

    def lock_then_queue_ddl(conn, tables, nowait=False):
        real_lock(conn, tables, nowait)
        if nowait or blocker:
            return
        ddl = pg.connect(db)
        blocker.append(ddl)
        threading.Thread(target=lambda: _ignore(ddl.execute, "ALTER TABLE tricky ADD COLUMN z int"),
                         daemon=True).start()
        for _ in range(200):   # until the ALTER is waiting for its lock
            if pg.query(db, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0]:
                return
            time.sleep(0.01)
        raise AssertionError("the ALTER TABLE never queued")

    monkeypatch.setattr(pgsource, "lock_tables", lock_then_queue_ddl)
    r = run("snap", "-r", repo, "-d", pg.dsn(db))
    assert r.code == 1, r.err
    assert "waiting for an exclusive lock on public.tricky" in r.err
    for conn in blocker:
        conn.close()


def _ignore(f, *args):
    try:
        f(*args)
    except psycopg.Error:
        pass

