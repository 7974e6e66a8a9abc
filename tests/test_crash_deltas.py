"""SIGTERM and SIGKILL at random moments of a churned snap that encodes deltas off
the reading thread.  test_crash.py runs the CLI in a subprocess, where conftest's
monkeypatch does not reach: on a machine with fewer than four cores per -j it never
takes that path.  Here the subprocess forces it on, and counts that it was taken."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import run
from test_crash import check, populate, scripts_of

FORCED = ("import sys, os, atexit; from fpvault import snapshot, chunkstore; "
          "snapshot.DELTAS_OFF_THREAD_CORES_PER_JOB = 0; "
          "n = [0]; real = chunkstore.ChunkStore.put_delta_async; "
          "chunkstore.ChunkStore.put_delta_async = "
          "lambda *a: (n.__setitem__(0, n[0] + 1), real(*a))[1]; "
          "atexit.register(lambda: os.environ.get('FPVAULT_TEST_DELTA_JOBS') and "
          "open(os.environ['FPVAULT_TEST_DELTA_JOBS'], 'a').write(f'{n[0]}\\n')); "
          "from fpvault.cli import entry; entry()")


def count(repo) -> int:
    r = run("list", "-r", repo, "--json")
    assert r.code == 0, r.err
    return len(json.loads(r.out))


def cli(*args):
    return subprocess.Popen([sys.executable, "-c", FORCED, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("sig,jobs", [(signal.SIGTERM, "1"), (signal.SIGTERM, "2"),
                                      (signal.SIGKILL, "2")])
def test_a_churned_snap_killed_off_thread_leaves_a_good_repository(pg, db, repo, sig, jobs, tmp_path, monkeypatch):
    monkeypatch.setenv("FPVAULT_TEST_DELTA_JOBS", str(tmp_path / "count"))   # the path is taken
    populate(pg, db)
    rnd = random.Random(99 + sig + int(jobs))
    dsn = pg.dsn(db)
    assert run("snap", "-r", repo, "-d", dsn).code == 0
    known = scripts_of(repo)
    for i in range(5):
        pg.execute(db, f"UPDATE t SET v = v || '{i}' WHERE id % 13 = {i}; "
                       f"UPDATE u SET w = w || '{i}' WHERE id % 11 = {i}")
        t0 = time.monotonic()
        p = cli("snap", "-r", repo, "-d", dsn, "-j", jobs)
        _, err = p.communicate()   # a full run first, to time it
        assert p.returncode == 0, err.decode()
        if i == 0:
            assert int(open(os.environ["FPVAULT_TEST_DELTA_JOBS"]).read().split()[-1]) > 100
        duration = time.monotonic() - t0
        pg.execute(db, f"UPDATE t SET v = v || 'x{i}' WHERE id % 17 = {i}")
        before = count(repo)
        p = cli("snap", "-r", repo, "-d", dsn, "-j", jobs)
        locks, t0 = os.path.join(repo, "locks"), time.monotonic()
        while p.poll() is None and time.monotonic() < t0 + 30 and not (
                os.path.isdir(locks) and os.listdir(locks)):
            time.sleep(0.002)
        time.sleep(rnd.uniform(0, duration))
        p.send_signal(sig)
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"snap hung after {sig!r}")
        check(repo, known)
        if sig == signal.SIGTERM:
            # 0 once the manifest is written (even as the interpreter exits), else 143
            # and no snapshot.
            assert p.returncode in (0, 143), (p.returncode, err.decode())
            assert (count(repo) > before) == (p.returncode == 0), err.decode()
    assert run("snap", "-r", repo, "-d", dsn).code == 0
    check(repo, known)
