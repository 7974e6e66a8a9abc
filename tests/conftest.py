"""Test fixtures: a real PostgreSQL started by the session, and fpvault's CLI in-process.

The server comes from the system's PostgreSQL binaries (``pg_config --bindir``
or ``/usr/lib/postgresql/*/bin``), initdb'd in a temp dir and started with
pg_ctl on a free port.  initdb and postgres refuse to run as root, so when the
tests run as root the cluster belongs to the ``postgres`` OS user and is run
through ``runuser``.  ``FPVAULT_TEST_DSN`` may point at an existing server
instead (a superuser connection to a database there; tests create their own
databases).  If no server can be had, the database tests fail and say why:
they never skip silently.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from fpvault import pgsource, restore, snapshot
from fpvault.cli import main

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
FACTORY_PULSE = SHARED / "datasets" / "factory_pulse.sql"
_counter = itertools.count()


def pg_bindir() -> str | None:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        candidates.append(out)
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                         reverse=True)
    for d in candidates:
        if d and os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base: dict[str, str]     # conninfo params without dbname
    bindir: str | None

    def dsn(self, dbname: str = "postgres", **extra: str) -> str:
        return make_conninfo(**{**self.base, "dbname": dbname, **extra})

    def connect(self, dbname: str = "postgres", **extra) -> psycopg.Connection:
        return psycopg.connect(self.dsn(dbname, **extra), autocommit=True)

    def createdb(self, prefix: str = "t") -> str:
        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING UTF8 '
                         "LC_COLLATE 'C' LC_CTYPE 'C'")
        return name

    def execute(self, dbname: str, sql: str) -> None:
        with self.connect(dbname) as conn:
            conn.execute(sql)

    def query(self, dbname: str, sql: str, params=None) -> list[tuple]:
        with self.connect(dbname) as conn:
            return conn.execute(sql, params).fetchall()

    def tool(self, name: str) -> str:
        if self.bindir and os.path.exists(os.path.join(self.bindir, name)):
            return os.path.join(self.bindir, name)
        found = shutil.which(name)
        if not found:
            raise RuntimeError(f"{name} is not installed")
        return found

    def psql_file(self, dbname: str, path: str | os.PathLike) -> None:
        subprocess.run([self.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d",
                        self.dsn(dbname), "-f", str(path)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="session")
def pg():
    dsn = os.environ.get("FPVAULT_TEST_DSN")
    if dsn:
        params = conninfo_to_dict(dsn)
        params.pop("dbname", None)
        server = Server(params, pg_bindir())
        with server.connect():
            pass
        yield server
        return
    bindir = pg_bindir()
    if bindir is None:
        pytest.fail("No PostgreSQL server binaries found (pg_config --bindir, "
                    "/usr/lib/postgresql/*/bin). Install them (apt-get install postgresql) or set "
                    "FPVAULT_TEST_DSN to a superuser connection of an existing server.")
    tmp = tempfile.mkdtemp(prefix="fpvault-pg-")
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("Running as root, and there is no 'postgres' OS user to run the test "
                        "server as (initdb refuses root). Create one or run as a normal user.")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        os.chmod(tmp, 0o755)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(tmp, "data")
    port = free_port()
    user = "postgres" if as_root else pwd.getpwuid(os.geteuid()).pw_name
    init = subprocess.run([*prefix, os.path.join(bindir, "initdb"), "-D", data, "-A", "trust",
                           "-U", user, "-E", "UTF8", "--locale=C", "--no-sync"],
                          capture_output=True, text=True)
    if init.returncode:
        pytest.fail(f"initdb failed: {init.stderr}")
    opts = (f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off -c max_connections=60 "
            # No autovacuum: its commits would make tests of unchanged databases
            # (snap reads nothing when nothing was committed) depend on timing.
            "-c shared_buffers=128MB -c autovacuum=off")
    start = subprocess.run([*prefix, os.path.join(bindir, "pg_ctl"), "-D", data, "-o", opts,
                            "-l", os.path.join(tmp, "log"), "-w", "-t", "60", "start"],
                           capture_output=True, text=True)
    if start.returncode:
        log = Path(tmp, "log").read_text() if Path(tmp, "log").exists() else ""
        pytest.fail(f"pg_ctl start failed: {start.stderr}\n{log}")
    server = Server({"host": "127.0.0.1", "port": str(port), "user": user}, bindir)
    for _ in range(100):
        try:
            with server.connect():
                break
        except psycopg.OperationalError:
            time.sleep(0.1)
    try:
        yield server
    finally:
        subprocess.run([*prefix, os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _both_copy_readers(monkeypatch):
    """Snap reads large tables through psql and small ones through libpq (see
    fpvault.pgsource.PsqlReader).  Tables in the tests are small: move the line so
    that the suite goes through both readers (tables over 64 KiB on disk: psql)."""
    monkeypatch.setattr(pgsource, "PSQL_MIN_BYTES", 64 * 1024)


@pytest.fixture(autouse=True)
def _deltas_off_thread(monkeypatch):
    """snap encodes deltas on the compressor threads on machines with cores to spare
    (fpvault.snapshot.DELTAS_OFF_THREAD_CORES_PER_JOB): always in the tests, so that
    the suite goes through that path; write_stream called directly does not."""
    monkeypatch.setattr(snapshot, "DELTAS_OFF_THREAD_CORES_PER_JOB", 0)


@pytest.fixture(autouse=True)
def _catalog_fingerprints(monkeypatch):
    """snap takes the catalog's fingerprint, and takes the previous snapshot's schema
    when it is the same, in databases of 1,000 tables and more
    (fpvault.snapshot.CATALOG_FINGERPRINT_MIN_TABLES): in every database of the
    tests, so that the suite goes through that path."""
    monkeypatch.setattr(snapshot, "CATALOG_FINGERPRINT_MIN_TABLES", 0)


@pytest.fixture(autouse=True)
def _schema_in_parts(monkeypatch):
    """restore -j commits pre-data, and the post-data it runs on one connection, every
    500 entries (fpvault.restore.SCHEMA_ENTRIES): every 3 in the tests, so that every
    -j restore of the suite does it in parts."""
    monkeypatch.setattr(restore, "SCHEMA_ENTRIES", 3)


@pytest.fixture(autouse=True)
def _split_loads(monkeypatch):
    """restore -j loads a table larger than its share of the data in parts at once,
    from 64 MiB up (fpvault.restore.LOAD_SPLIT_MIN_BYTES): from 64 KiB in the tests,
    so that every -j restore of the suite goes through split loads where they apply."""
    monkeypatch.setattr(restore, "LOAD_SPLIT_MIN_BYTES", 64 * 1024)
    # (And loads even their small tables frozen, from 1 MiB up otherwise.)
    monkeypatch.setattr(restore, "FREEZE_MIN_BYTES", 0)


@pytest.fixture
def db(pg):
    """A fresh empty database; returns its name."""
    return pg.createdb()


@pytest.fixture(scope="session")
def factory_pulse(pg):
    """The sample database, loaded once per session (read-only for tests)."""
    if not FACTORY_PULSE.exists():
        pytest.fail(f"{FACTORY_PULSE} is missing: the tests expect shared/ beside the repository.")
    name = pg.createdb("factory_pulse")
    pg.psql_file(name, FACTORY_PULSE)
    return name


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the fpvault CLI in-process; return its exit code and output."""
    runner = CliRunner()
    with runner.isolation(env=env) as streams:
        try:
            main(list(args), in_process=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = streams[0].getvalue(), streams[1].getvalue()
    return Result(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "repo")
    r = run("init", "-r", path)
    assert r.code == 0, r.err
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto's server mode) on loopback, for the session.

    Returns a function that makes a fresh bucket and gives its s3:// URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "FPVAULT_S3_ENDPOINT")}
    cache = None
    if "XDG_CACHE_HOME" not in os.environ:
        cache = os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fpvault-cache-")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1",
                      FPVAULT_S3_ENDPOINT=f"http://127.0.0.1:{port}")
    import boto3
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")

    def bucket(prefix: str = "repo") -> str:
        name = f"fpvault-{next(_counter)}-{os.getpid()}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}/{prefix}"

    bucket.port = port
    try:
        yield bucket
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if cache is not None:
            os.environ.pop("XDG_CACHE_HOME", None)
            shutil.rmtree(cache, ignore_errors=True)
