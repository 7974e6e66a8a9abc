"""kill -9 at random moments, and snap racing prune: the repository stays valid.

After every kill: verify --read-data passes, every snapshot listed before
still restores to exactly the same script, and the next command runs without
a manual unlock (the dead process's lock is recognised as stale).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import run

KILLS = 20


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fpvault.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def scripts_of(repo) -> dict[str, str]:
    out = {}
    for s in json.loads(run("list", "-r", repo, "--json").out):
        r = run("restore", s["id"], "-r", repo, "-o", "-")
        assert r.code == 0, r.err
        out[s["id"]] = r.out
    return out


def check(repo, known: dict[str, str]) -> None:
    r = run("verify", "-r", repo, "--read-data")
    assert r.code == 0, r.err
    now = scripts_of(repo)
    for sid, text in known.items():
        if sid in now:
            assert now[sid] == text, f"snapshot {sid[:8]} changed"
    known.update(now)


def kill_at_random(args, repo, work: float, rnd: random.Random) -> int:
    """Start a command, wait until it holds its lock (its real work starts then),
    kill -9 it at a random moment within ``work`` seconds; return its exit status."""
    p = cli(*args)
    locks = os.path.join(repo, "locks")
    deadline = time.monotonic() + 30
    while p.poll() is None and time.monotonic() < deadline:
        if os.path.isdir(locks) and os.listdir(locks):
            break
        time.sleep(0.002)
    time.sleep(rnd.uniform(0, work))
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    p.stderr.close()
    return p.returncode


def work_of(args, repo) -> float:
    """Seconds from the moment the command holds its lock to its exit."""
    p = cli(*args)
    locks = os.path.join(repo, "locks")
    while p.poll() is None:
        if os.path.isdir(locks) and os.listdir(locks):
            break
        time.sleep(0.002)
    start = time.monotonic()
    _, err = p.communicate()
    assert p.returncode == 0, err.decode()
    return time.monotonic() - start


def populate(pg, db):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 150000) g; "
                   "CREATE TABLE u (id int PRIMARY KEY, w text); "
                   "INSERT INTO u SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 50000) g")


def test_kill_snap_at_random_moments(pg, db, repo):
    populate(pg, db)
    rnd = random.Random(1234)
    dsn = pg.dsn(db)
    r = run("snap", "-r", repo, "-d", dsn, "--json")
    assert r.code == 0, r.err
    duration = json.loads(r.out)["seconds"]
    known = scripts_of(repo)
    killed = 0
    for i in range(KILLS):
        pg.execute(db, f"UPDATE t SET v = v || '{i}' WHERE id % 97 = {i}; "
                       f"INSERT INTO u VALUES ({100000 + i}, 'new')")
        killed += kill_at_random(["snap", "-r", repo, "-d", dsn], repo, duration, rnd) != 0
        check(repo, known)
    assert killed >= KILLS // 2, killed
    # No manual unlock: the next snap just works.
    r = run("snap", "-r", repo, "-d", dsn)
    assert r.code == 0, r.err
    check(repo, known)
    assert run("prune", "-r", repo).code == 0
    check(repo, known)


def test_kill_prune_at_random_moments(pg, db, repo):
    populate(pg, db)
    rnd = random.Random(99)
    dsn = pg.dsn(db)
    run("snap", "-r", repo, "-d", dsn)
    known = scripts_of(repo)
    killed = 0
    for i in range(KILLS):
        pg.execute(db, f"UPDATE t SET v = v || '{i}' WHERE id % 5 = {i % 5}; "
                       f"DELETE FROM u WHERE id % 20 = {i}")
        r = run("snap", "-r", repo, "-d", dsn)
        assert r.code == 0, r.err
        known.update(scripts_of(repo))
        r = run("forget", "-r", repo, "--keep-last", "2")
        assert r.code == 0, r.err
        for sid in list(known):
            if sid not in {s["id"] for s in json.loads(run("list", "-r", repo, "--json").out)}:
                del known[sid]
        # How long this prune's own work takes, timed on a copy from the moment it
        # holds its lock, to aim the kill inside it (a dry run does not repack, and
        # prune got faster than any fixed guess).
        copy = os.path.join(os.path.dirname(repo), "copy")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(repo, copy)
        work = work_of(["prune", "-r", copy], copy)
        killed += kill_at_random(["prune", "-r", repo], repo, 0.9 * work, rnd) != 0
        check(repo, known)
    # Most kills must land while prune runs, or this tests nothing.
    assert killed >= KILLS // 2, killed
    r = run("prune", "-r", repo, "--json")
    assert r.code == 0, r.err
    check(repo, known)


def test_snap_and_prune_concurrently(pg, db, repo):
    populate(pg, db)
    dsn = pg.dsn(db)
    run("snap", "-r", repo, "-d", dsn)
    errors: list[str] = []

    def snaps():
        for i in range(6):
            pg.execute(db, f"UPDATE t SET v = v || 'c{i}' WHERE id % 11 = {i}")
            p = cli("snap", "-r", repo, "-d", dsn, "--lock-wait", "60")
            _, err = p.communicate()
            if p.returncode:
                errors.append(err.decode())

    def prunes():
        for _ in range(6):
            for args in (["forget", "-r", repo, "--keep-last", "3", "--lock-wait", "60"],
                         ["prune", "-r", repo, "--lock-wait", "60"]):
                p = cli(*args)
                _, err = p.communicate()
                if p.returncode:
                    errors.append(err.decode())

    threads = [threading.Thread(target=snaps), threading.Thread(target=prunes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    r = run("verify", "-r", repo, "--read-data")
    assert r.code == 0, r.err
    listed = json.loads(run("list", "-r", repo, "--json").out)
    assert len(listed) >= 3
    target = pg.createdb()
    r = run("restore", "latest", "-r", repo, "--to", pg.dsn(target))
    assert r.code == 0, r.err
    assert pg.query(target, "SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t") == \
        pg.query(db, "SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t")
    assert os.listdir(os.path.join(repo, "locks")) == []


CRASHPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crashpoint.py")


@pytest.mark.parametrize("command", ["prune", "snap"])
def test_killed_after_each_write_or_delete(pg, db, repo, tmp_path, command):
    """Not at random: the command is killed right after each of its writes and deletes
    of a pack, an index file or a manifest in turn; the next prune (or snap, then prune) then
    finishes the job, and every snapshot still restores as before.  A repacked pack
    has the name of its bytes, so the next prune writes the same pack again; it once
    deleted it afterwards as the killed run's orphan."""
    populate(pg, db)
    dsn = pg.dsn(db)
    for i in range(3):
        pg.execute(db, f"UPDATE t SET v = v || '{i}' WHERE id % 3 = {i}; "
                       f"DELETE FROM u WHERE id % 4 = {i}")
        assert run("snap", "-r", repo, "-d", dsn).code == 0
    if command == "prune":
        assert run("forget", "-r", repo, "--keep-last", "1").code == 0
        args = ["prune"]
    else:
        pg.execute(db, "UPDATE t SET v = v || 'x' WHERE id % 5 = 0")
        args = ["snap", "-d", dsn]
    known = scripts_of(repo)

    def killed_at(path: str, at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, CRASHPOINT, str(at), *args, "-r", path],
                              capture_output=True, text=True)

    counting = str(tmp_path / "counting")
    shutil.copytree(repo, counting)
    done = killed_at(counting, -1)
    assert done.returncode == 0, done.stderr
    steps = int(re.search(r"crashpoint: (\d+) operations", done.stderr).group(1))
    assert steps >= 3   # prune: a pack, an index, old ones deleted; snap: a manifest too
    for at in range(1, steps + 1):
        work = str(tmp_path / f"at{at}")
        shutil.copytree(repo, work)
        killed = killed_at(work, at)
        assert killed.returncode == 137, killed.stderr
        for then in ([args] if command == "prune" else [args, ["prune"]]):
            r = run(*then, "-r", work)
            assert r.code == 0, f"{' '.join(then)} after a kill at step {at}: {r.err}"
            check(work, dict(known))
        shutil.rmtree(work)


def test_sigterm_during_snap_cleans_up(pg, db, repo, tmp_path, monkeypatch):
    """SIGTERM (a cron job's timeout) unwinds as Ctrl-C does: exit 143, no snapshot,
    no lock left behind, no temporary files, no pg_dump or psql left running."""
    pg.execute(db, "CREATE TABLE big (id int PRIMARY KEY, v text); "
                   "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000000) g")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    p = cli("snap", "-r", repo, "-d", pg.dsn(db))
    locks = os.path.join(repo, "locks")
    deadline = time.monotonic() + 30
    while p.poll() is None and time.monotonic() < deadline and not (
            os.path.isdir(locks) and os.listdir(locks)):
        time.sleep(0.002)
    time.sleep(0.3)
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                              text=True).stdout.split()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.strip() == b"Terminated.", (p.returncode, err)
    assert os.listdir(locks) == [] and os.listdir(tmp) == []
    assert json.loads(run("list", "-r", repo, "--json").out) == []
    for pid in children:   # pg_dump or psql, if one ran then: gone
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
    assert run("snap", "-r", repo, "-d", pg.dsn(db)).code == 0
