"""Every command's bad-input path: a clear message, the right exit code, nothing changed."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import psycopg
import pytest
import msgspec
import zstandard

from conftest import run
from fpvault import pgsource
from fpvault.chunkstore import ChunkStore
from fpvault import cli as fpvault_cli
from fpvault.cli import cli
from fpvault.vault import SNAPSHOTS, Vault


def snap(pg, repo, db, *extra):
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", *extra)
    assert r.code == 0, r.err
    return json.loads(r.out)


def listed(repo):
    r = run("list", "-r", repo, "--json")
    assert r.code == 0, r.err
    return [s["id"] for s in json.loads(r.out)]


def test_every_command_has_help_with_an_example():
    for name, command in cli.commands.items():
        r = run(name, "--help")
        assert r.code == 0, name
        assert "Example" in r.out, f"'fpvault {name} --help' has no example"
    assert "Example" in run("--help").out


def test_wrong_repository_path(tmp_path):
    for args in (["list"], ["show", "latest"], ["restore", "latest", "-o", "-"]):
        r = run(*args, "-r", str(tmp_path / "nope"))
        assert r.code == 1
        assert "no fpvault repository" in r.err and "fpvault init" in r.err
        assert "Traceback" not in r.err
    assert not (tmp_path / "nope").exists()


def test_snap_makes_no_repository_where_one_is_named(pg, db, tmp_path):
    """A -r or FPVAULT_REPO that names no repository (a typo, a backup disk not
    mounted) is an error, not a new history; only the default one is made."""
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
    for how in ({"args": ["-r", str(tmp_path / "typo")]},
                {"env": {"FPVAULT_REPO": str(tmp_path / "typo")}}):
        r = run("snap", "-d", pg.dsn(db), *how.get("args", []), env=how.get("env"))
        assert r.code == 1 and "no fpvault repository" in r.err and "fpvault init" in r.err, r.err
        assert not (tmp_path / "typo").exists()
    home = tmp_path / "home"
    r = run("snap", "-q", "-d", pg.dsn(db), env={"XDG_DATA_HOME": str(home), "FPVAULT_REPO": ""})
    assert r.code == 0, r.err
    assert (home / "fpvault" / "config").exists()


def test_a_repository_that_lost_its_config_is_damaged_not_absent(pg, db, repo):
    """Not 'no repository here, run init': its snapshots are there (exit 3)."""
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
    snap(pg, repo, db)
    (Path(repo) / "config").unlink()
    for args in (["list"], ["snap", "-d", pg.dsn(db)], ["verify"]):
        r = run(*args, "-r", repo)
        assert r.code == 3 and "lost its config" in r.err, (args, r.code, r.err)
    r = run("verify", "-r", repo, "--json")     # still a report, for monitoring
    assert r.code == 3 and json.loads(r.out)["ok"] is False, r.out
    assert "lost its config" in json.loads(r.out)["problems"][0]


def test_debug_keeps_the_exit_code(tmp_path, repo):
    r = run("--debug", "show", "latest", "-r", str(tmp_path / "nope"))
    assert r.code == 1 and "Traceback" in r.err
    r = run("--debug", "show", "abcdef", "-r", repo)
    assert r.code == 2 and "Traceback" in r.err, (r.code, r.err)
    (Path(repo) / "config").write_bytes(b"garbage")
    r = run("--debug", "list", "-r", repo)
    assert r.code == 3 and "Traceback" in r.err, (r.code, r.err)


def test_bad_tags_are_usage_errors(pg, db, repo):
    for tag in ("", " ", "a,b", "two\nlines"):
        r = run("snap", "-r", repo, "-d", pg.dsn(db), "--tag", tag)
        assert r.code == 2 and "Tag" in r.err, (tag, r.err)
    assert listed(repo) == []


def test_verify_read_data_and_a_subset_are_one_or_the_other(repo):
    r = run("verify", "-r", repo, "--read-data", "--read-data-subset", "10%")
    assert r.code == 2 and "one of the two" in r.err, r.err


def test_repo_from_environment_and_after_command(tmp_path, monkeypatch):
    path = str(tmp_path / "envrepo")
    assert run("-r", path, "init").code == 0
    r = run("list", env={"FPVAULT_REPO": path})
    assert r.code == 0 and "0 snapshots" in r.out
    # Also between a command group and its subcommand.
    r = run("repair", "-r", path, "index")
    assert r.code == 0, r.err
    r = run("key", "-r", path, "passwd")
    assert r.code != 2 and "not encrypted" in r.err, r.err


def test_init_twice_and_into_a_non_empty_directory(tmp_path, repo):
    r = run("init", "-r", repo)
    assert r.code == 1 and "already exists" in r.err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious.txt").write_text("x")
    r = run("init", "-r", str(tmp_path / "full"))
    assert r.code == 1 and "not an empty directory" in r.err
    assert os.listdir(tmp_path / "full") == ["precious.txt"]


def test_unreachable_database(repo, pg):
    r = run("snap", "-r", repo, "-d", "host=127.0.0.1 port=1 dbname=x connect_timeout=3")
    assert r.code == 5
    assert "Cannot connect" in r.err and "Traceback" not in r.err
    for bad in ("host=127.0.0.1 port=1 ==garbage", "bogus=1"):   # malformed: a usage error
        r = run("snap", "-r", repo, "-d", bad)
        assert r.code == 2 and "connection string" in r.err, (r.code, r.err)
        assert r.err.count("\n") == 1, r.err       # one line: libpq's newline dropped
    assert listed(repo) == []
    r = run("restore", "latest", "-r", repo, "--to", "host=127.0.0.1 port=1 dbname=x")
    assert r.code == 2 and "no snapshots yet" in r.err


def test_unknown_and_malformed_snapshot_references(pg, db, repo):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
    s1 = snap(pg, repo, db)["id"]
    s2 = snap(pg, repo, db)["id"]
    for ref, why in (("deadbeef", "No snapshot matches"), ("abc", "too short"),
                     ("latest~2", "only 2 snapshots"), ("yesterday", "not a snapshot reference")):
        r = run("show", ref, "-r", repo)
        assert r.code == 2, ref
        assert why in r.err, (ref, r.err)
    assert json.loads(run("show", "latest~1", "-r", repo, "--json").out)["id"] == s1
    assert json.loads(run("show", s2[:6], "-r", repo, "--json").out)["id"] == s2
    assert json.loads(run("show", s2.upper(), "-r", repo, "--json").out)["id"] == s2


def test_ambiguous_prefix(pg, db, repo):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
    snap(pg, repo, db)
    vault = Vault.open(repo)
    (head,) = vault.snapshots()
    base = vault.load_snapshot(head.id)
    # Forge variants of the manifest until two ids share a 4-digit prefix.
    seen = {}
    for i in range(100_000):
        variant = msgspec.structs.replace(base, tags=[f"v{i}"])
        raw = msgspec.json.encode(variant)
        sid = blake3.blake3(raw).hexdigest()
        if sid[:4] in seen:
            for r in (seen[sid[:4]], raw):
                vault.backend.put(SNAPSHOTS + blake3.blake3(r).hexdigest(),
                                  zstandard.ZstdCompressor().compress(r))
            prefix = sid[:4]
            break
        seen[sid[:4]] = raw
    r = run("show", prefix, "-r", repo)
    assert r.code == 2 and "ambiguous" in r.err
    # One of the two damaged: forget of the prefix is still ambiguous, not the damaged one.
    ids = sorted(blake3.blake3(r).hexdigest() for r in (seen[prefix], raw))
    path = Path(repo) / SNAPSHOTS / ids[0]
    path.write_bytes(path.read_bytes()[:-8] + b"damaged!")
    r = run("forget", prefix, "-r", repo, "--dry-run", "--json")
    assert r.code == 2 and "ambiguous" in r.err, (r.code, r.out, r.err)
    r = run("forget", ids[0][:12], "-r", repo, "--dry-run", "--json")
    assert r.code == 0 and json.loads(r.out)["groups"][0]["remove"][0]["id"] == ids[0], r.err


def test_a_manifest_whose_lists_do_not_decode_is_damaged(pg, db, repo):
    """A manifest whose hash matches but whose table list does not decode (a bug
    wrote it, not the disk) passes for a snapshot in the list, which decodes only
    heads; every command that needs its tables says it is damaged, snap goes on
    from the one before, and forget drops it."""
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    good = snap(pg, repo, db)["id"]
    vault = Vault.open(repo)
    doc = json.loads(zstandard.ZstdDecompressor().decompress(
        (Path(repo) / SNAPSHOTS / good).read_bytes()))
    del doc["tables"][0]["name"]
    doc["time"] = "2099-01-01T00:00:00Z"      # the latest: the one snap would build on
    raw = json.dumps(doc).encode()
    bad = blake3.blake3(raw).hexdigest()
    vault.backend.put(SNAPSHOTS + bad, zstandard.ZstdCompressor().compress(raw))
    assert listed(repo) == [good, bad]
    for args in (["show", bad[:8]], ["restore", bad[:8], "-o", "-"], ["diff", good, bad]):
        r = run(*args, "-r", repo)
        assert r.code == 3 and f"Snapshot {bad[:8]}: its manifest cannot be read" in r.err, (
            args, r.code, r.err)
    r = run("verify", "-r", repo)
    assert r.code == 3 and f"snapshot {bad[:8]}: manifest damaged" in r.out + r.err, r.out
    r = run("prune", "--dry-run", "-r", repo)
    assert r.code == 3 and "Prune stopped without deleting anything" in r.err, r.err
    pg.execute(db, "INSERT INTO t VALUES (2)")
    assert snap(pg, repo, db)["tables_reused"] == 0
    assert run("forget", bad[:8], "-r", repo).code == 0
    assert bad not in listed(repo) and run("verify", "-r", repo).code == 0


def test_missing_and_old_pg_dump(pg, db, repo, tmp_path):
    pg.execute(db, "CREATE TABLE t (id int)")
    empty = tmp_path / "bin"
    empty.mkdir()
    r = run("snap", "-r", repo, "-d", pg.dsn(db), env={"FPVAULT_PG_BINDIR": str(empty)})
    assert r.code == 1 and "pg_dump was not found" in r.err and "FPVAULT_PG_BINDIR" in r.err
    fake = empty / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n")
    fake.chmod(0o755)
    r = run("snap", "-r", repo, "-d", pg.dsn(db), env={"FPVAULT_PG_BINDIR": str(empty)})
    assert r.code == 1 and "only older ones" in r.err and "9.6" in r.err
    # pg_dump alone: pg_restore is looked for while pg_dump runs, and still missed.
    fake.unlink()
    fake.symlink_to(pg.tool("pg_dump"))
    r = run("snap", "-r", repo, "-d", pg.dsn(db), env={"FPVAULT_PG_BINDIR": str(empty)})
    assert r.code == 1 and "pg_restore was not found" in r.err, r.err
    assert listed(repo) == []


def test_restore_usage_errors(pg, db, repo, tmp_path):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    snap(pg, repo, db)
    assert run("restore", "latest", "-r", repo).code == 2
    assert run("restore", "-r", repo, "-o", "-").code == 2
    r = run("restore", "latest", "-r", repo, "-o", "-", "--schema-only", "--data-only")
    assert r.code == 2 and "exclude each other" in r.err
    r = run("restore", "latest", "-r", repo, "-o", "-", "-t", "nosuch")
    assert r.code == 2 and "no table 'nosuch'" in r.err
    r = run("restore", "-r", repo, "--at", "1999-01-01T00:00Z", "-o", "-")
    assert r.code == 2 and "No snapshot was taken at or before" in r.err
    r = run("restore", "-r", repo, "--at", "not a time", "-o", "-")
    assert r.code == 2 and "ISO 8601" in r.err
    out = tmp_path / "x.sql"
    r = run("restore", "latest", "-r", repo, "-o", str(out), "-t", "nosuch")
    assert not out.exists()


def test_restore_script_to_a_pipe_and_to_bad_paths(pg, db, repo, tmp_path):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    snap(pg, repo, db)
    # A pipe (or /dev/null) is written as it is: a file renamed over it would replace it.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    r = run("restore", "latest", "-r", repo, "-o", str(fifo))
    reader.join(30)
    assert r.code == 0, r.err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and not (tmp_path / "pipe.partial").exists()
    assert got and b"COPY public.t" in got[0]
    r = run("restore", "latest", "-r", repo, "-o", str(tmp_path))
    assert r.code == 2 and "is a directory" in r.err
    r = run("restore", "latest", "-r", repo, "-o", str(tmp_path / "nosuch" / "x.sql"))
    assert r.code == 2 and "there is no directory" in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "repo"]   # nothing left
    # A symlink is written through: the file it names gets the script, the link stays.
    (tmp_path / "scripts").mkdir()
    (tmp_path / "latest.sql").symlink_to(tmp_path / "scripts" / "today.sql")
    r = run("restore", "latest", "-r", repo, "-o", str(tmp_path / "latest.sql"))
    assert r.code == 0, r.err
    assert (tmp_path / "latest.sql").is_symlink()
    assert b"COPY public.t" in (tmp_path / "scripts" / "today.sql").read_bytes()


def test_restore_script_that_cannot_be_written_whole(pg, db, repo, tmp_path, monkeypatch):
    """A full disk, or a reader that goes away: a clear error and exit 1, not an
    internal error, and no partial file left behind."""
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    snap(pg, repo, db)
    r = run("restore", "latest", "-r", repo, "-o", "/dev/full")
    assert r.code == 1 and "No space left" in r.err and "internal error" not in r.err, r.err
    # A reader that stops early (| head): the pipe breaks under the writer.
    p = subprocess.run(f"{sys.executable} -m fpvault.cli restore latest -r {repo} -o - "
                       "| head -c 100 > /dev/null; exit ${PIPESTATUS[0]}",
                       shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert p.returncode == 1 and "stopped reading" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    # A file on a full disk: written as FILE.partial, which goes.
    from fpvault import restore as restore_mod

    def full(vault, plan, out):
        out.write(b"-- part of a script\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(restore_mod, "to_script", full)
    r = run("restore", "latest", "-r", repo, "-o", str(tmp_path / "x.sql"))
    assert r.code == 1 and "No space left" in r.err and "x.sql.partial was removed" in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_restore_into_non_empty_database_changes_nothing(pg, db, repo):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    snap(pg, repo, db)
    target = pg.createdb()
    pg.execute(target, "CREATE TABLE keep (x int); INSERT INTO keep VALUES (42)")
    r = run("restore", "latest", "-r", repo, "--to", pg.dsn(target))
    assert r.code == 1 and "not empty" in r.err
    assert pg.query(target, "SELECT x FROM keep") == [(42,)]
    assert pg.query(target, "SELECT count(*) FROM pg_tables WHERE tablename = 't'") == [(0,)]


def test_failed_restore_is_rolled_back_and_names_the_cause(pg, db, repo):
    pg.execute(db, "CREATE ROLE fpv_gone_role; CREATE TABLE t (id int PRIMARY KEY); "
                   "ALTER TABLE t OWNER TO fpv_gone_role; INSERT INTO t VALUES (1); "
                   "CREATE TABLE t2 (id int); INSERT INTO t2 VALUES (2)")
    snap(pg, repo, db)
    pg.execute(db, "DROP TABLE t; DROP ROLE fpv_gone_role")
    target = pg.createdb()
    r = run("restore", "latest", "-r", repo, "--to", pg.dsn(target))
    assert r.code == 1
    assert "fpv_gone_role" in r.err and "--no-owner" in r.err and "rolled back" in r.err
    assert pg.query(target, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    r = run("restore", "latest", "-r", repo, "--to", pg.dsn(target), "-j", "2")
    assert r.code == 1 and "fpv_gone_role" in r.err and "rolled back" in r.err  # in pre-data
    assert pg.query(target, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    assert run("restore", "latest", "-r", repo, "-o", "-", "-j", "2").code == 2
    r = run("restore", "latest", "-r", repo, "--to", pg.dsn(target), "--no-owner")
    assert r.code == 0, r.err
    assert pg.query(target, "SELECT id FROM t") == [(1,)]


def test_permission_denied_fails_the_snapshot(pg, db, repo):
    pg.execute(db, "CREATE TABLE open_t (id int); CREATE TABLE secret_t (id int); "
                   "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fpv_reader') "
                   "THEN CREATE ROLE fpv_reader LOGIN; END IF; END $$; "
                   "ALTER ROLE fpv_reader LOGIN; "   # tests/sql/awkward.sql makes it NOLOGIN
                   "GRANT SELECT ON open_t TO fpv_reader")
    r = run("snap", "-r", repo, "-d", pg.dsn(db, user="fpv_reader"))
    assert r.code == 5, r.err
    assert "secret_t" in r.err and "No snapshot was written" in r.err
    assert listed(repo) == []
    # Narrowed to what the role may read, the same role succeeds.
    r = run("snap", "-r", repo, "-d", pg.dsn(db, user="fpv_reader"), "-t", "open_t")
    assert r.code == 0, r.err
    assert len(listed(repo)) == 1


def test_row_security_does_not_hide_rows_or_is_refused(pg, db, repo):
    pg.execute(db, "CREATE TABLE r (id int PRIMARY KEY, owner text); "
                   "INSERT INTO r SELECT g, 'u' || g FROM generate_series(1, 50) g; "
                   "ALTER TABLE r ENABLE ROW LEVEL SECURITY; ALTER TABLE r FORCE ROW LEVEL SECURITY; "
                   "CREATE POLICY p ON r USING (owner = current_user); "
                   "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fpv_rls') "
                   "THEN CREATE ROLE fpv_rls LOGIN; END IF; END $$; GRANT SELECT ON r TO fpv_rls")
    # A superuser gets every row, FORCE or not.
    doc = snap(pg, repo, db)
    assert doc["rows"] == 50
    # A role subject to the policy is refused rather than given a partial table.
    r = run("snap", "-r", repo, "-d", pg.dsn(db, user="fpv_rls"))
    assert r.code != 0 and "row-level security" in r.err
    assert len(listed(repo)) == 1


def test_connection_lost_mid_snapshot_writes_nothing(pg, db, repo):
    pg.execute(db, "CREATE TABLE big (id int PRIMARY KEY, v text); "
                   "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 600000) g")
    stop = threading.Event()

    def killer():
        with pg.connect() as conn:
            while not stop.is_set():
                hit = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = %s AND query LIKE 'COPY%%'", (db,)).fetchall()
                if hit:
                    return
                time.sleep(0.005)

    t = threading.Thread(target=killer)
    t.start()
    try:
        r = run("snap", "-r", repo, "-d", pg.dsn(db))
    finally:
        stop.set()
        t.join()
    assert r.code == 5, r.err
    assert "No snapshot was written" in r.err
    assert listed(repo) == []
    # The repository is still usable.
    assert snap(pg, repo, db)["rows"] == 600000


def test_connection_lost_once_the_manifest_is_written_is_a_snapshot(pg, db, repo, monkeypatch):
    """The leader's transaction must last until every row is read (snap asks it before
    writing the manifest); once the manifest is written, losing it costs nothing, and
    snap must not say that no snapshot was written."""
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
    real = Vault.save_snapshot

    def save_then_lose(self, snapshot):
        sid = real(self, snapshot)
        with pg.connect() as conn:
            assert conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s AND backend_type = 'client backend' "
                                "AND pid <> pg_backend_pid()", (db,)).fetchall()
        return sid

    monkeypatch.setattr(Vault, "save_snapshot", save_then_lose)
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 0, r.err
    assert listed(repo) == [json.loads(r.out)["id"]]
    monkeypatch.setattr(Vault, "save_snapshot", real)
    assert run("verify", "-r", repo).code == 0


def test_sigterm_once_the_manifest_is_written_is_a_snapshot(pg, db, repo, monkeypatch):
    """SIGTERM (a cron job's timeout) in the last instant: snap still prints the id of
    the snapshot it wrote, and exits 0 saying it was asked to stop; before the
    manifest, it stops (exit 143) with nothing written."""
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
    real_save, real_flush = Vault.save_snapshot, ChunkStore.flush

    def save_then_term(self, snapshot):
        sid = real_save(self, snapshot)
        os.kill(os.getpid(), signal.SIGTERM)   # handled in this thread, at once
        time.sleep(0.01)
        return sid

    monkeypatch.setattr(Vault, "save_snapshot", save_then_term)
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 0, r.err
    assert r.err.strip() == "Terminated once the snapshot was written: it is complete."
    assert listed(repo) == [json.loads(r.out)["id"]]
    monkeypatch.setattr(Vault, "save_snapshot", real_save)

    def flush_then_term(self, *args, **kwargs):
        real_flush(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)

    monkeypatch.setattr(ChunkStore, "flush", flush_then_term)
    pg.execute(db, "INSERT INTO t VALUES (3)")
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 143 and r.err.strip() == "Terminated.", (r.code, r.err)
    assert len(listed(repo)) == 1
    monkeypatch.setattr(ChunkStore, "flush", real_flush)
    assert snap(pg, repo, db)["rows"] == 3


def test_a_second_sigterm_stops_snap_even_as_it_writes_the_manifest(pg, db, repo, monkeypatch):
    """The first signal waits for the manifest; a second one, as to a write that hangs,
    stops snap, saying what is not known; after the manifest, saying it is complete."""
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    real_save = Vault.save_snapshot

    def term():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)

    def hung_save(self, snapshot):
        term()
        term()   # the write would hang here
        return real_save(self, snapshot)

    monkeypatch.setattr(Vault, "save_snapshot", hung_save)
    r = run("snap", "-r", repo, "-d", pg.dsn(db))
    assert r.code == 143, r.err
    assert r.err.strip() == ("Terminated. It came as the snapshot's manifest was being "
                             "written: 'fpvault list' shows whether it was."), r.err
    assert listed(repo) == []

    def save_then_term(self, snapshot):
        sid = real_save(self, snapshot)
        term()   # remembered
        return sid

    real_emit = fpvault_cli.emit_json

    def emit_after_term(doc):
        term()   # the second: raised, after the manifest
        real_emit(doc)

    monkeypatch.setattr(Vault, "save_snapshot", save_then_term)
    monkeypatch.setattr(fpvault_cli, "emit_json", emit_after_term)
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 143, r.err
    assert r.err.strip() == "Terminated. The snapshot was written before that: it is complete."
    monkeypatch.setattr(fpvault_cli, "emit_json", real_emit)
    assert len(listed(repo)) == 1


def test_main_called_from_a_program_puts_its_signal_handlers_back(repo, capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        fpvault_cli.main(["list", "-r", repo, "--json"])
    assert exit_.value.code == 0 and json.loads(capsys.readouterr().out) == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigint_that_the_parent_ignores_stays_ignored(repo):
    """A shell's background job ignores Ctrl-C: so does fpvault run as one."""
    script = ("import os, signal, sys, time; from fpvault import vault; "
              "real = vault.Vault.snapshots\n"
              "def snapshots(self, *a, **k):\n"
              "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)\n"
              "    return real(self, *a, **k)\n"
              "vault.Vault.snapshots = snapshots\n"
              "from fpvault.cli import entry; entry()")
    args = [sys.executable, "-c", script, "list", "-r", repo, "--json"]
    p = subprocess.run(args, capture_output=True, timeout=60,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert p.returncode == 0 and json.loads(p.stdout) == [], p.stderr
    p = subprocess.run(args, capture_output=True, timeout=60)
    assert p.returncode == 130 and p.stderr.strip() == b"Interrupted.", p.stderr


def test_a_connection_lost_as_a_restore_commits_is_not_called_a_rollback(pg, db, repo,
                                                                        monkeypatch):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    sid = snap(pg, repo, db)["id"]
    target = pg.createdb()
    real = psycopg.Cursor.execute

    def execute(self, query, *args, **kwargs):
        if query == "COMMIT":
            with pg.connect() as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s", (target,))
        return real(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", execute)
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target))
    assert r.code == 5, r.err
    assert "as the restore committed" in r.err and "Whether it did is not known" in r.err
    assert "rolled back" not in r.err, r.err


def test_sigterm_as_a_restore_commits_does_not_say_it_was_rolled_back(pg, db, repo, monkeypatch):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
    sid = snap(pg, repo, db)["id"]
    real = psycopg.Cursor.execute

    def execute(self, query, *args, **kwargs):
        out = real(self, query, *args, **kwargs)
        if query == "COMMIT":   # the restore's, in one transaction
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        return out

    monkeypatch.setattr(psycopg.Cursor, "execute", execute)
    target = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target))
    monkeypatch.setattr(psycopg.Cursor, "execute", real)
    assert r.code == 0, r.err
    assert "Terminated once the restore was committed: it is complete." in r.err, r.err
    assert pg.query(target, "SELECT count(*) FROM t") == [(2,)]


def test_a_signal_once_the_exit_code_is_known_ends_with_that_code(repo):
    """As the interpreter exits (joining worker threads), SIGTERM ends the process
    with the command's own exit code, not -15."""
    late = ("import atexit, os, signal, sys, time; "
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(5))); "
            "from fpvault.cli import entry; entry()")
    for args, code in ((["list", "-r", repo, "--json"], 0), (["show", "abcdef", "-r", repo], 2)):
        p = subprocess.run([sys.executable, "-c", late, *args], capture_output=True, timeout=60)
        assert p.returncode == code, (p.returncode, p.stderr)
    assert json.loads(subprocess.run([sys.executable, "-c", late, "list", "-r", repo, "--json"],
                                     capture_output=True, timeout=60).stdout) == []


def test_damaged_chunk_stops_restore_naming_table(pg, db, repo):
    pg.execute(db, "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY); "
                   "INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 20000) g; "
                   "INSERT INTO b SELECT generate_series(1, 10)")
    sid = snap(pg, repo, db)["id"]
    pg.execute(db, "UPDATE a SET v = 'changed' WHERE id = 1")
    later = snap(pg, repo, db)["id"]
    vault = Vault.open(repo)
    (entry,) = [t for t in vault.resolve(sid)[1].tables if t.name == "a"]
    first = vault.store.get_list(bytes.fromhex(entry.data.list))[0][0]
    pack_id, e = vault.index.blobs[first]
    path = Path(repo) / f"data/{pack_id.hex()[:2]}/{pack_id.hex()}"
    raw = bytearray(path.read_bytes())
    raw[e.offset + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    target = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target))
    assert r.code == 3
    assert "public.a" in r.err and sid[:8] in r.err
    assert pg.query(target, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    r = run("restore", sid, "-r", repo, "-o", "-")
    assert r.code == 3 and "public.a" in r.err
    r = run("diff", sid, later, "-r", repo, "--rows")     # the damaged chunk differs
    assert r.code == 3 and "public.a" in r.err and later[:8] in r.err, r.err
    parallel = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(parallel), "-j", "2")
    assert r.code == 3 and "public.a" in r.err and "partial restore" in r.err
    # The undamaged table still restores on its own.
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target), "-t", "b")
    assert r.code == 0, r.err
    assert pg.query(target, "SELECT count(*) FROM b") == [(10,)]


def test_password_never_reaches_the_repository(pg, db, repo):
    pg.execute(db, "CREATE TABLE t (id int)")
    # Trust auth ignores the password; it must still not be kept anywhere.
    r = run("snap", "-r", repo, "-d", pg.dsn(db, password="s3cr3t-pw"))
    assert r.code == 0, r.err
    for path in Path(repo).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            try:
                data = zstandard.ZstdDecompressor().decompress(data)
            except zstandard.ZstdError:
                pass
            assert b"s3cr3t-pw" not in data, path


def test_repository_files_are_not_world_readable(pg, db, repo):
    pg.execute(db, "CREATE TABLE t (id int)")
    snap(pg, repo, db)
    for path in Path(repo).rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_interrupted_parallel_restore_says_it_is_partial(pg, db, repo, monkeypatch):
    """restore -j loads tables in transactions of their own: interrupted after some
    committed, it says the target holds a partial restore (exit 130)."""
    from fpvault import restore as restore_mod

    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1); "
                   "CREATE TABLE u (id int PRIMARY KEY); INSERT INTO u VALUES (1); "
                   "SELECT lo_from_bytea(7321, 'x')")
    sid = snap(pg, repo, db)["id"]

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(restore_mod, "_restore_lo", interrupted)
    target = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target), "-j", "2")
    assert r.code == 130 and "partial restore" in r.err, (r.code, r.err)
    target = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target))     # one transaction
    assert r.code == 130 and "partial" not in r.err, (r.code, r.err)
    assert pg.query(target, "SELECT count(*) FROM pg_class WHERE relname = 't'") == [(0,)]


def test_a_read_only_repository_is_read_with_no_lock(pg, db, repo, monkeypatch):
    """restore, diff and verify write a lock, which media that cannot be written
    refuse: --no-lock reads without one (restic's --no-lock)."""
    from fpvault import backend as backend_mod

    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    sid = snap(pg, repo, db)["id"]

    def read_only(self, name, data):
        raise backend_mod._storage_error(OSError(errno.EROFS, "Read-only file system"),
                                         f"writing {name}", self.root)

    monkeypatch.setattr(backend_mod.LocalBackend, "put", read_only)
    r = run("restore", sid, "-r", repo, "-o", "-")
    assert r.code == 1 and "Read-only file system" in r.err and "lock" in r.err, r.err
    for args in (["restore", sid, "-o", "-"], ["diff", sid, sid], ["verify", "--read-data"]):
        r = run(*args, "-r", repo, "--no-lock")
        assert r.code == 0, (args, r.err)
    assert "COPY public.t" in run("restore", sid, "-r", repo, "-o", "-", "--no-lock").out


class _Diag:
    message_primary = "out of shared memory"
    message_hint = "You might need to increase max_locks_per_transaction."


class _OutOfLocks(psycopg.errors.OutOfMemory):
    """What the server says when its lock table is full (SQLSTATE 53200)."""

    @property
    def diag(self):
        return _Diag()


def test_a_full_lock_table_is_a_failure_with_advice_not_a_lost_connection(pg, db, repo,
                                                                          monkeypatch):
    """psycopg raises OperationalError for "out of shared memory" as for a dropped
    connection; snap says which, and what to do about the first."""
    assert pgsource.out_of_locks(_OutOfLocks("out of shared memory"))
    assert not pgsource.connection_lost(_OutOfLocks("out of shared memory"))
    assert pgsource.connection_lost(psycopg.OperationalError("server closed the connection"))
    assert pgsource.connection_lost(psycopg.errors.AdminShutdown("terminating connection"))
    assert not pgsource.connection_lost(psycopg.errors.QueryCanceled("statement timeout"))

    def full(conn, oids):
        raise _OutOfLocks("out of shared memory")

    monkeypatch.setattr(pgsource, "relations", full)
    r = run("snap", "-r", repo, "-d", pg.dsn(db))
    assert r.code == 1, r.err
    assert "Lost the connection" not in r.err
    assert "out of shared memory" in r.err and "max_locks_per_transaction" in r.err
    assert "No snapshot was written" in r.err
