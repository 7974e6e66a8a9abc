"""forget, prune, verify, repair, locks, stats: on a real repository with real damage."""

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path

import msgspec
import pytest

from conftest import run
from fpvault import backend as backend_mod
from fpvault.locks import LOCKS, Lock, LockInfo, list_locks
from fpvault.vault import Vault


def snap(pg, repo, db, *extra):
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json", *extra)
    assert r.code == 0, r.err
    return json.loads(r.out)["id"]


def script(repo, sid):
    r = run("restore", sid, "-r", repo, "-o", "-")
    assert r.code == 0, r.err
    return r.out


def listed(repo):
    return [s["id"] for s in json.loads(run("list", "-r", repo, "--json").out)]


@pytest.fixture
def history(pg, db, repo):
    """A repository with four snapshots of a changing database, and each one's script."""
    pg.execute(db, "CREATE TABLE big (id int PRIMARY KEY, v text); "
                   "INSERT INTO big SELECT g, md5(g::text) || repeat('z', g % 50) "
                   "FROM generate_series(1, 40000) g; "
                   "CREATE TABLE small (id int PRIMARY KEY, n int); "
                   "INSERT INTO small SELECT g, g FROM generate_series(1, 100) g")
    ids = []
    for i in range(4):
        ids.append(snap(pg, repo, db, "--tag", f"n{i}"))
        pg.execute(db, f"UPDATE big SET v = v || '{i}' WHERE id % 7 = {i}; "
                       f"DELETE FROM small WHERE id = {i + 1}")
    return ids, {sid: script(repo, sid) for sid in ids}


def test_dry_runs_say_what_forget_and_prune_would_free(history, repo):
    """prune --dry-run counts what repacking drops, and forget --prune --dry-run
    what the prune would do once those snapshots are gone; neither changes a file."""
    ids, _ = history
    files = {p: p.read_bytes() for p in Path(repo).rglob("*") if p.is_file()}
    r = run("forget", "-r", repo, "--keep-last", "1", "--prune", "--dry-run", "--json")
    assert r.code == 0, r.err
    guess = json.loads(r.out)["prune"]
    assert guess["dry_run"] and guess["bytes_after"] < guess["bytes_before"], guess
    assert {p: p.read_bytes() for p in Path(repo).rglob("*") if p.is_file()} == files
    r = run("forget", "-r", repo, "--keep-last", "1", "--prune", "--json")
    done = json.loads(r.out)["prune"]
    assert done["packs_deleted"] == guess["packs_deleted"]
    assert done["packs_repacked"] == guess["packs_repacked"]
    # Trailers and pack boundaries aside, the estimate is what was freed.
    assert abs(done["bytes_after"] - guess["bytes_after"]) < 0.1 * done["bytes_before"], (
        guess, done)


def test_forget_by_policy_and_id_then_prune(history, repo):
    ids, scripts = history
    r = run("forget", "-r", repo, "--keep-last", "2", "--dry-run", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    (group,) = doc["groups"]
    assert [k["id"] for k in group["keep"]] == [ids[3], ids[2]]
    assert group["keep"][0]["reasons"] == ["last snapshot"]
    times = {s["id"]: s["time"] for s in json.loads(run("list", "-r", repo, "--json").out)}
    assert all(x["time"] == times[x["id"]] for x in group["keep"] + group["remove"])
    assert sorted(x["id"] for x in group["remove"]) == sorted(ids[:2])
    assert listed(repo) == ids  # dry run
    before = json.loads(run("stats", "-r", repo, "--json").out)
    r = run("forget", "-r", repo, "--keep-last", "2", "--keep-tag", "n0", "--prune")
    assert r.code == 0, r.err
    assert "tagged n0" in r.out and "remove " in r.out
    assert listed(repo) == [ids[0], ids[2], ids[3]]
    r = run("forget", ids[0][:8], "-r", repo, "--prune", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["prune"]["packs_before"] >= 1
    assert listed(repo) == ids[2:]
    after = json.loads(run("stats", "-r", repo, "--json").out)
    assert after["snapshots"] == 2 and after["stored_bytes"] < before["stored_bytes"]
    for sid in ids[2:]:
        assert script(repo, sid) == scripts[sid]
    r = run("verify", "-r", repo, "--read-data")
    assert r.code == 0, r.err
    assert "no problems" in r.out


def test_forget_usage(history, repo):
    assert run("forget", "-r", repo).code == 2
    r = run("forget", "-r", repo, "--keep-within", "soon")
    assert r.code == 2 and "duration" in r.err
    assert run("forget", "-r", repo, "deadbeef").code == 2
    assert len(listed(repo)) == 4


def test_prune_repacks_and_removes_orphans(history, repo):
    ids, scripts = history
    vault = Vault.open(repo)
    # A pack no index names, as a killed snap leaves, and a temp file.
    (Path(repo) / "data" / "ff").mkdir(exist_ok=True)
    (Path(repo) / "data" / "ff" / ("ff" * 32)).write_bytes(b"orphan")
    (Path(repo) / "data" / "ff" / "x.tmp-1234").write_bytes(b"partial")
    # In locks/, a temp file is a lock being taken by a process that does not know of
    # prune's lock yet (it backs off when it sees it): only an old one is debris.
    locks = Path(repo) / "locks"
    locks.mkdir(exist_ok=True)
    (locks / "a.tmp-1234").write_bytes(b"{}")
    (locks / "b.tmp-1234").write_bytes(b"{}")
    old = time.time() - 2 * 3600
    os.utime(locks / "b.tmp-1234", (old, old))
    for sid in ids[:3]:
        vault.forget_snapshot(sid)
    r = run("prune", "-r", repo, "--dry-run", "--json")
    dry = json.loads(r.out)
    assert dry["dry_run"] and dry["orphan_packs"] == 1
    assert (Path(repo) / "data" / "ff" / ("ff" * 32)).exists()
    r = run("prune", "-r", repo, "--json")
    assert r.code == 0, r.err
    stats = json.loads(r.out)
    assert stats["orphan_packs"] == 1 and stats["bytes_after"] < stats["bytes_before"]
    assert not (Path(repo) / "data" / "ff" / ("ff" * 32)).exists()
    assert not (Path(repo) / "data" / "ff" / "x.tmp-1234").exists()
    assert (locks / "a.tmp-1234").exists() and not (locks / "b.tmp-1234").exists()
    assert len(list((Path(repo) / "index").iterdir())) == 1
    assert script(repo, ids[3]) == scripts[ids[3]]
    assert run("verify", "-r", repo, "--read-data").code == 0
    # Nothing left to do: a second prune changes nothing.
    again = json.loads(run("prune", "-r", repo, "--json").out)
    assert again["packs_deleted"] == 0 and again["packs_repacked"] == 0


def _pack_of(repo, sid, table):
    vault = Vault.open(repo)
    snap = vault.resolve(sid)[1]
    (entry,) = [t for t in snap.tables if t.name == table]
    first = vault.store.get_list(bytes.fromhex(entry.data.list))[0].id
    pack_id, e = vault.index.blobs[first]
    return Path(repo) / f"data/{pack_id.hex()[:2]}/{pack_id.hex()}", e


def test_damage_is_found_named_and_contained(pg, history, repo):
    ids, scripts = history
    # Snapshot 4 shares the pack of snapshot 1's 'big' chunks; give the last snapshot a
    # table of its own in a pack of its own, and damage that.
    pg_db = Vault.open(repo).resolve(ids[3])[1].source.database
    pg.execute(pg_db, "CREATE TABLE lonely (id int PRIMARY KEY, v text); "
                      "INSERT INTO lonely SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    last = snap(pg, repo, pg_db)
    path, e = _pack_of(repo, last, "lonely")
    raw = bytearray(path.read_bytes())
    raw[e.offset + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    assert run("verify", "-r", repo).code == 0          # structure alone cannot see a flipped byte
    r = run("verify", "-r", repo, "--read-data", "--json")
    assert r.code == 3
    doc = json.loads(r.out)
    assert not doc["ok"] and list(doc["affected"]) == [last]
    assert any("table public.lonely" in w for w in doc["affected"][last])
    r = run("verify", "-r", repo, "--read-data")
    assert r.code == 3 and last[:8] in r.err and "public.lonely" in r.err
    target = pg.createdb()
    r = run("restore", last, "-r", repo, "--to", pg.dsn(target))
    assert r.code == 3 and "public.lonely" in r.err
    for sid in ids:   # the snapshots that do not use the damaged pack still restore exactly
        assert script(repo, sid) == scripts[sid]


def test_a_damaged_list_is_named_in_every_snapshot_that_shares_it(history, repo):
    """verify reads a chunk list once however many snapshots hold it, and still names
    each of them: the schema did not change, so all four share its lists."""
    ids, _ = history
    vault = Vault.open(repo)
    lists = {sid: vault.resolve(sid)[1].schema.pre_data.list for sid in ids}
    assert len(set(lists.values())) == 1
    pack_id, e = vault.index.blobs[bytes.fromhex(lists[ids[0]])]
    path = Path(repo) / f"data/{pack_id.hex()[:2]}/{pack_id.hex()}"
    raw = bytearray(path.read_bytes())
    raw[e.offset + e.length // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    for extra in ([], ["--read-data"]):
        r = run("verify", "-r", repo, "--json", *extra)
        assert r.code == 3, r.err
        doc = json.loads(r.out)
        assert sorted(doc["affected"]) == sorted(ids), doc
        assert all("schema (pre-data)" in doc["affected"][sid] for sid in ids), doc
        for sid in ids:
            assert any(p.startswith(f"snapshot {sid[:8]}, schema (pre-data)")
                       for p in doc["problems"]), doc["problems"]


def test_truncated_and_deleted_packs(history, repo):
    ids, scripts = history
    path, _ = _pack_of(repo, ids[0], "big")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    r = run("verify", "-r", repo, "--json")
    assert r.code == 3
    doc = json.loads(r.out)
    assert ids[0] in doc["affected"] and any("truncated" in p or "damaged" in p
                                              for p in doc["problems"])
    r = run("restore", ids[0], "-r", repo, "-o", "-")
    assert r.code == 3 and ids[0][:8] in r.err   # the pack also holds the schema
    path.unlink()
    r = run("verify", "-r", repo, "--json")
    assert r.code == 3 and any("missing" in p for p in json.loads(r.out)["problems"])
    r = run("restore", ids[0], "-r", repo, "-o", "-")
    assert r.code == 3 and ids[0][:8] in r.err and "missing" in r.err
    # Prune refuses to run on a repository that lost data a snapshot needs.
    r = run("prune", "-r", repo)
    assert r.code == 3


def test_pack_problems_are_reported_in_pack_order(history, repo):
    """verify reads trailers and packs in threads; what it reports comes in pack
    order all the same, missing packs among the rest."""
    packs = sorted(Path(repo, "data").glob("*/*"), key=lambda p: p.name)
    assert len(packs) >= 3
    packs[0].write_bytes(packs[0].read_bytes()[:-20])     # no trailer
    packs[-1].unlink()
    for extra in ([], ["--read-data"]):
        r = run("verify", "-r", repo, "--json", *extra)
        assert r.code == 3
        named = [p.split()[1] for p in json.loads(r.out)["problems"]
                 if p.startswith("pack ") and (" is damaged" in p or " is missing" in p)]
        assert named == [packs[0].name[:16], packs[-1].name[:16]], r.out


def test_deleted_index_is_repaired_from_packs(history, repo):
    ids, scripts = history
    for f in (Path(repo) / "index").iterdir():
        f.unlink()
    # A file in data/ that is no pack (a copy tool's leftover): not read, not deleted.
    stray = Path(repo) / "data" / "00" / "notes.txt"
    stray.parent.mkdir(exist_ok=True)
    stray.write_text("not a pack")
    r = run("verify", "-r", repo)
    assert r.code == 3 and "not in the index" in r.err
    assert run("restore", ids[1], "-r", repo, "-o", "-").code == 3
    assert run("prune", "-r", repo).code == 3   # would otherwise delete every pack
    r = run("repair", "index", "-r", repo)
    assert r.code == 0, r.err
    assert run("verify", "-r", repo, "--read-data").code == 0
    for sid in ids:
        assert script(repo, sid) == scripts[sid]
    assert run("prune", "-r", repo).code == 0 and stray.read_text() == "not a pack"


def test_repair_keeps_what_it_cannot_read_again(history, repo):
    """A pack whose trailer is damaged can still hold intact blobs: repair keeps the
    entries the old index had for it, instead of dropping them and the index files
    that held them (restore worked before the repair, and must after), and says so."""
    ids, scripts = history
    pack = max((p for p in (Path(repo) / "data").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[-30] ^= 0x40    # in the trailer; no blob touched
    pack.write_bytes(bytes(data))
    assert run("verify", "-r", repo).code == 3
    for sid in ids:
        assert script(repo, sid) == scripts[sid]
    r = run("repair", "index", "-r", repo)
    assert r.code == 3 and "unreadable pack" in r.err and "were kept" in r.err, r.err
    for sid in ids:
        assert script(repo, sid) == scripts[sid]
    r = run("verify", "-r", repo, "--read-data", "--json")
    assert r.code == 3 and any("trailer" in p or "pack" in p
                               for p in json.loads(r.out)["problems"])


def test_verify_does_not_tell_you_to_run_verify(history, repo):
    """Damage met on the way ("...; run 'fpvault verify'") is reported by verify
    without that advice, and still names what is damaged."""
    pack = max((p for p in (Path(repo) / "data").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    os.truncate(pack, pack.stat().st_size // 2)
    for extra in ((), ("--read-data",)):
        r = run("verify", "-r", repo, "--json", *extra)
        problems = json.loads(r.out)["problems"]
        assert r.code == 3 and problems
        assert any(pack.name[:16] in p for p in problems), problems
        assert not any("fpvault verify" in p for p in problems), [p for p in problems if "fpvault verify" in p]


def _same_tables(pg, a, b):
    query = ("SELECT (SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM big), "
             "(SELECT md5(string_agg(id || ':' || n, ',' ORDER BY id)) FROM small)")
    assert pg.query(a, query) == pg.query(b, query)


def _check_new_snapshot(pg, repo, db):
    """A snapshot taken now restores the database as it is, and verify finds it whole."""
    sid = snap(pg, repo, db)
    target = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target))
    assert r.code == 0, r.err
    _same_tables(pg, db, target)
    doc = json.loads(run("verify", "-r", repo, "--read-data", "--json").out)
    assert sid not in doc["affected"], [p for p in doc["problems"] if sid[:8] in p]
    return sid


@pytest.mark.parametrize("lost", ["first", "largest"])
def test_snap_refuses_while_packs_the_index_names_are_gone(pg, history, repo, lost):
    """Packs gone from the repository (deleted by hand, a partial copy): the index
    still names their blobs, so a snapshot would take them as stored, exit 0 and be
    as unrestorable as the old ones.  It refuses, saying what to do, and once the
    index is repaired it stores them again: also those that the packs still there
    hold as deltas on a base that was in the lost one (the largest pack holds the
    first version of 'big', which the later versions are deltas against)."""
    ids, scripts = history
    packs = sorted(p for p in (Path(repo) / "data").rglob("*") if p.is_file())
    if lost == "largest":
        packs.sort(key=lambda p: -p.stat().st_size)
    packs[0].unlink()
    db = json.loads(run("show", ids[-1], "-r", repo, "--json").out)["database"]
    for extra in ((), ("--reread",)):
        r = run("snap", "-r", repo, "-d", pg.dsn(db), *extra)
        assert r.code == 3 and "missing from the repository" in r.err, r.err
        assert "repair index" in r.err and "Nothing was written" in r.err
    assert listed(repo) == ids
    assert run("repair", "index", "-r", repo).code == 0
    _check_new_snapshot(pg, repo, db)
    assert run("verify", "-r", repo, "--json").code == 3   # the older ones are damaged


def test_snap_refuses_while_a_pack_is_cut_short(pg, history, repo):
    """A pack shorter than the index says (an interrupted copy): a snapshot would take
    what lay past its end as stored.  snap refuses; repair index keeps what is still
    there (the trailer is lost with the end), and the next snap stores the rest again
    and restores.  verify names the pack as damaged while it is there; deleted and
    the index repaired again, the next snapshot is whole."""
    ids, _ = history
    pack = max((p for p in (Path(repo) / "data").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    pack.write_bytes(pack.read_bytes()[:pack.stat().st_size // 2])
    db = json.loads(run("show", ids[-1], "-r", repo, "--json").out)["database"]
    r = run("snap", "-r", repo, "-d", pg.dsn(db))
    assert r.code == 3 and "shorter than the index says" in r.err, r.err
    assert "repair index" in r.err and listed(repo) == ids
    r = run("repair", "index", "-r", repo)
    assert r.code == 3 and "unreadable pack" in r.err, r.err
    sid = snap(pg, repo, db)
    target = pg.createdb()
    r = run("restore", sid, "-r", repo, "--to", pg.dsn(target))
    assert r.code == 0, r.err
    _same_tables(pg, db, target)
    doc = json.loads(run("verify", "-r", repo, "--json").out)
    assert any(pack.name[:16] in p for p in doc["problems"]), doc["problems"]
    pack.unlink()
    assert run("repair", "index", "-r", repo).code == 0
    _check_new_snapshot(pg, repo, db)


def test_snap_and_index_files_lost_or_damaged(pg, history, repo, tmp_path):
    """An index file that cannot be read: snap refuses until the index is repaired.
    One deleted leaves no trace, but its blobs are then simply not stored, and what
    the other files index as deltas on them is not taken as stored either."""
    ids, scripts = history
    db = json.loads(run("show", ids[-1], "-r", repo, "--json").out)["database"]
    files = sorted(p.name for p in (Path(repo) / "index").iterdir())
    assert len(files) >= 4   # one per snapshot: the first one's indexes the bases
    for name in files:
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(repo, copy)
        (copy / "index" / name).unlink()
        _check_new_snapshot(pg, str(copy), db)
    index_file = Path(repo) / "index" / files[0]
    index_file.write_bytes(b"garbage")
    r = run("snap", "-r", repo, "-d", pg.dsn(db))
    assert r.code == 3 and "cannot be read" in r.err and "repair index" in r.err, r.err
    assert listed(repo) == ids
    assert run("repair", "index", "-r", repo).code == 0
    for sid in ids:
        assert script(repo, sid) == scripts[sid]


def test_latest_is_not_guessed_past_a_damaged_manifest(history, repo):
    """With the newest manifest unreadable, "latest", "latest~N" and --at would quietly
    mean an older snapshot: they refuse, and an id still works."""
    ids, scripts = history
    manifest = Path(repo) / "snapshots" / ids[-1]
    manifest.write_bytes(manifest.read_bytes()[:-10] + b"0123456789")
    for args in (["restore", "latest", "-o", "-"], ["restore", "latest~1", "-o", "-"],
                 ["restore", "--at", "2999-01-01", "-o", "-"], ["show", "latest"],
                 ["diff", "latest~1", "latest"]):
        r = run(*args, "-r", repo)
        assert r.code == 3 and "cannot be told" in r.err and ids[-1][:8] in r.err, (args, r.err)
        assert r.out == ""
    assert script(repo, ids[-2]) == scripts[ids[-2]]
    r = run("forget", ids[-1][:8], "-r", repo)
    assert r.code == 0, r.err
    assert script(repo, "latest") == scripts[ids[-2]]


def test_corrupted_manifest_and_index_file(history, repo):
    ids, scripts = history
    manifest = Path(repo) / "snapshots" / ids[1]
    manifest.write_bytes(manifest.read_bytes()[:-10] + b"0123456789")
    r = run("verify", "-r", repo, "--json")
    assert r.code == 3
    doc = json.loads(r.out)
    assert ids[1] in doc["affected"] and any("manifest" in p for p in doc["problems"])
    r = run("list", "-r", repo, "--json")
    assert r.code == 0 and ids[1] not in r.out   # the others are still listed
    assert f"snapshot {ids[1][:8]} is not listed" in r.err
    r = run("show", ids[1][:8], "-r", repo)
    assert r.code == 3 and "manifest cannot be read" in r.err
    for sid in (ids[0], ids[2], ids[3]):
        assert script(repo, sid) == scripts[sid]
    assert run("prune", "-r", repo).code == 3   # a snapshot it cannot read might need data
    # Unless that is the one being forgotten: the dry run says what the prune would do.
    r = run("forget", ids[1][:8], "-r", repo, "--prune", "--dry-run", "--json")
    assert r.code == 0 and json.loads(r.out)["prune"]["dry_run"], r.err
    r = run("forget", ids[1][:8], "-r", repo)
    assert r.code == 0, r.err
    assert run("verify", "-r", repo, "--read-data").code == 0
    (index_file,) = list((Path(repo) / "index").iterdir())[:1]
    index_file.write_bytes(b"garbage")
    r = run("verify", "-r", repo)
    assert r.code == 3 and "repair index" in r.err
    assert run("repair", "index", "-r", repo).code == 0
    assert run("verify", "-r", repo, "--read-data").code == 0


def test_verify_subset_and_restore_test(pg, history, repo):
    ids, _ = history
    r = run("verify", "-r", repo, "--read-data-subset", "50%", "--json")
    assert r.code == 0 and json.loads(r.out)["packs_read"] >= 1
    assert run("verify", "-r", repo, "--read-data-subset", "150%").code == 2
    scratch = pg.createdb()
    r = run("verify", ids[0][:8], "latest", "-r", repo, "--restore-test", pg.dsn(scratch), "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["tables_restored"] == 4
    # The scratch database is left as it was.
    assert pg.query(scratch, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    # SNAPSHOTS are what --restore-test restores: a typo fails at once (exit 2), and
    # without --restore-test they would mean nothing.
    r = run("verify", "deadbeef", "-r", repo, "--restore-test", pg.dsn(scratch))
    assert r.code == 2 and "No snapshot matches" in r.err
    r = run("verify", ids[0][:8], "-r", repo)
    assert r.code == 2 and "--restore-test" in r.err
    # A scratch database that is not empty: said in verify's terms, not restore's.
    pg.execute(scratch, "CREATE TABLE mine (id int)")
    r = run("verify", "-r", repo, "--restore-test", pg.dsn(scratch))
    assert r.code == 1 and "empty scratch database" in r.err and "--data-only" not in r.err, r.err


def test_stats(history, repo):
    doc = json.loads(run("stats", "-r", repo, "--json").out)
    assert doc["snapshots"] == 4 and doc["packs"] >= 1 and doc["blobs"] > 4
    assert doc["logical_bytes"] > doc["stored_bytes"] and doc["dedup_ratio"] > 2
    assert "ratio" in run("stats", "-r", repo).out


# -- locks


def test_exclusive_and_shared_locks(repo):
    vault = Vault.open(repo)
    with Lock(vault.backend, exclusive=False, command="snap"):
        with Lock(vault.backend, exclusive=False, command="snap"):
            pass  # shared locks coexist
        r = run("prune", "-r", repo, "--lock-wait", "0")
        assert r.code == 4
        assert "shared lock held by snap" in r.err and f"pid {os.getpid()}" in r.err
        # Dry runs change nothing: they run beside a snap.
        for args in (["prune", "--dry-run"], ["forget", "--keep-last", "1", "--dry-run"],
                     ["forget", "--keep-last", "1", "--prune", "--dry-run"]):
            r = run(*args, "-r", repo)
            assert r.code == 0, (args, r.err)
    with Lock(vault.backend, exclusive=True, command="prune"):
        r = run("list", "-r", repo)
        assert r.code == 0   # reading the list needs no lock
        r = run("forget", "--keep-last", "1", "-r", repo, "--lock-wait", "0")
        assert r.code == 4 and "exclusive lock held by prune" in r.err
    assert list_locks(vault.backend) == []


def test_prune_waits_for_a_running_snap(repo):
    """prune is safe while a snap runs by waiting for it (--lock-wait, default 30
    minutes for the commands that delete), not by failing a cron job that overlaps."""
    vault = Vault.open(repo)
    lock = Lock(vault.backend, exclusive=False, command="snap")
    lock.acquire()
    import threading
    threading.Timer(1.0, lock.release).start()
    started = time.monotonic()
    r = run("prune", "-r", repo)
    assert r.code == 0, r.err
    assert time.monotonic() - started >= 0.9


def test_lock_wait(repo):
    vault = Vault.open(repo)
    lock = Lock(vault.backend, exclusive=True, command="prune")
    lock.acquire()
    import threading
    threading.Timer(1.0, lock.release).start()
    started = time.monotonic()
    r = run("prune", "-r", repo, "--lock-wait", "20")
    assert r.code == 0, r.err
    assert time.monotonic() - started >= 0.9


def _plant(vault, **kw):
    info = LockInfo(host=kw.get("host", socket.gethostname()), pid=kw.get("pid", 999999),
                    command="snap", exclusive=kw.get("exclusive", True),
                    time=kw.get("time", time.time()), refreshed=kw.get("time", time.time()))
    name = LOCKS + kw.get("name", "planted")
    vault.backend.put(name, msgspec.json.encode(info))
    return name


def test_stale_locks_are_ignored_and_unlock_removes_them(repo):
    vault = Vault.open(repo)
    dead = _plant(vault, name="dead")                      # same host, no such pid
    old = _plant(vault, name="old", host="elsewhere", time=time.time() - 3600)
    assert run("prune", "-r", repo).code == 0              # both stale: ignored without unlock
    live = _plant(vault, name="live", host="elsewhere")    # another host, fresh: respected
    r = run("prune", "-r", repo, "--lock-wait", "0")
    # Another host's lock is not stale until 30 minutes without a refresh: plain
    # unlock would not remove it, and the message does not say it would.
    assert r.code == 4 and "elsewhere" in r.err and "unlock --remove-all" in r.err, r.err
    r = run("prune", "-r", repo, "--lock-wait", "0.2")
    assert r.code == 4 and "Waited 0.2 s" in r.err and "pass --lock-wait" not in r.err, r.err
    r = run("unlock", "-r", repo)
    assert r.code == 0 and "removed 2 locks" in r.out
    names = {h.name for h in list_locks(vault.backend)}
    assert names == {live} and dead not in names and old not in names
    vault.backend.put("locks/garbage", b"not a lock")       # ignored by all, removed by this
    assert run("unlock", "-r", repo, "--remove-all").code == 0
    assert list_locks(vault.backend) == [] and list(vault.backend.list("locks/")) == []


def test_refresh_replaces_the_lock_object(repo):
    vault = Vault.open(repo)
    with Lock(vault.backend, exclusive=False, command="snap") as lock:
        first = lock.name
        lock.refresh()
        assert lock.name != first
        assert [h.name for h in list_locks(vault.backend)] == [lock.name]


# -- running out of disk


def test_out_of_space_during_snap_leaves_repository_valid(pg, history, repo, monkeypatch):
    ids, scripts = history
    real_write = os.write
    budget = {"bytes": 200_000}

    def failing_write(fd, data):
        budget["bytes"] -= len(data)
        if budget["bytes"] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    db = Vault.open(repo).resolve(ids[0])[1].source.database
    pg.execute(db, "INSERT INTO big SELECT g, md5(g::text) || 'new' FROM generate_series(100001, 160000) g")
    monkeypatch.setattr(backend_mod.os, "write", failing_write)
    r = run("snap", "-r", repo, "-d", pg.dsn(db))
    monkeypatch.setattr(backend_mod.os, "write", real_write)
    assert r.code == 1
    assert "No space left" in r.err and "Traceback" not in r.err
    assert listed(repo) == ids
    assert run("verify", "-r", repo, "--read-data").code == 0
    assert list_locks(Vault.open(repo).backend) == []
    for sid in ids:
        assert script(repo, sid) == scripts[sid]
    assert run("snap", "-r", repo, "-d", pg.dsn(db)).code == 0


def test_prune_stops_at_a_chunk_list_it_cannot_read(history, repo):
    """Prune reads every snapshot's chunk lists (a run of neighbours at a time) to
    know what is live: one it cannot read stops it, naming the snapshot and the
    table, before anything is deleted."""
    ids, _ = history
    vault = Vault.open(repo)
    snap = vault.resolve(ids[-1])[1]
    table = next(t for t in snap.tables if t.name == "big")
    pack_id, e = vault.index.blobs[bytes.fromhex(table.data.list)]
    pack = Path(repo) / "data" / pack_id.hex()[:2] / pack_id.hex()
    data = bytearray(pack.read_bytes())
    data[e.offset + e.length // 2] ^= 0x55
    pack.write_bytes(bytes(data))
    before = sorted(p.name for p in (Path(repo) / "data").rglob("*") if p.is_file())
    r = run("forget", ids[0], "-r", repo, "--prune")
    assert r.code == 3 and "chunk list cannot be read" in r.err, r.err
    assert f"Snapshot {ids[-1][:8]}" in r.err and "big" in r.err, r.err
    assert sorted(p.name for p in (Path(repo) / "data").rglob("*") if p.is_file()) == before
