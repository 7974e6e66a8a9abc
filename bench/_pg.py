"""A throwaway PostgreSQL cluster and small measuring helpers for the bench scripts.

``Cluster`` initdb's a data directory in a temp dir, starts it with pg_ctl on a
free port (listening on 127.0.0.1 only, trust auth, fsync off: a benchmark
cluster holds nothing worth keeping) and removes it again on ``stop()``.
initdb and postgres refuse to run as root, so when the scripts run as root the
cluster belongs to the ``postgres`` OS user and is started through ``runuser``.

``BENCH_PG_BINDIR`` picks the PostgreSQL binaries; otherwise the newest
``/usr/lib/postgresql/*/bin``, then ``pg_config --bindir``.

The rest is what both scripts need: the bench database (pgbench plus the
factory_pulse sample), the churn applied between snapshots, a timed
subprocess with its peak RSS, and the apparent size of a directory tree.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import os
import platform
import pwd
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
FACTORY_PULSE = ROOT.parent / "shared" / "datasets" / "factory_pulse.sql"
if not FACTORY_PULSE.exists():  # a worktree elsewhere: the shared copy
    FACTORY_PULSE = Path("/work/shared/datasets/factory_pulse.sql")
DOC = ROOT / "docs" / "benchmarks.md"
TIME_BIN = "/usr/bin/time"

# Server settings for a benchmark, not for durability: no fsync, and WAL large
# enough that pgbench -i and the restores do not spend their time checkpointing.
SERVER_OPTS = ("-c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off "
               "-c synchronous_commit=off -c max_connections=40 -c shared_buffers=256MB "
               "-c max_wal_size=8GB -c checkpoint_timeout=30min -c autovacuum=off")


def pg_bindir() -> str:
    env = os.environ.get("BENCH_PG_BINDIR")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                         reverse=True)
    if shutil.which("pg_config"):
        candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True,
                                         text=True).stdout.strip())
    for d in candidates:
        if d and all(os.path.exists(os.path.join(d, tool)) for tool in ("initdb", "pg_ctl")):
            return d
    sys.exit("No PostgreSQL server binaries found (set BENCH_PG_BINDIR, or apt-get install "
             "postgresql).")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A PostgreSQL server of its own, in a temp dir, for one benchmark run."""

    def __init__(self, keep: bool = False):
        self.bindir = pg_bindir()
        self.keep = keep
        self.tmp = tempfile.mkdtemp(prefix="fpvault-bench-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                sys.exit("Running as root, and there is no 'postgres' OS user to run the "
                         "benchmark server as (initdb refuses root).")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
            os.chmod(self.tmp, 0o755)
            self.prefix = ["runuser", "-u", "postgres", "--"]
            self.user = "postgres"
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.started = False

    # -- lifecycle

    def start(self) -> "Cluster":
        init = subprocess.run([*self.prefix, self.tool("initdb"), "-D", self.data, "-A", "trust",
                               "-U", self.user, "-E", "UTF8", "--locale=C", "--no-sync"],
                              capture_output=True, text=True)
        if init.returncode:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        opts = f"-p {self.port} -k {self.tmp} {SERVER_OPTS}"
        log = os.path.join(self.tmp, "log")
        start = subprocess.run([*self.prefix, self.tool("pg_ctl"), "-D", self.data, "-o", opts,
                                "-l", log, "-w", "-t", "60", "start"],
                               capture_output=True, text=True)
        if start.returncode:
            text = Path(log).read_text() if Path(log).exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {start.stderr}\n{text}")
        self.started = True
        for _ in range(100):
            try:
                with self.connect():
                    break
            except psycopg.OperationalError:
                time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.keep:
            print(f"cluster kept: {self.data} on port {self.port} "
                  f"(stop: {' '.join(self.prefix)} {self.tool('pg_ctl')} -D {self.data} stop)",
                  file=sys.stderr)
            return
        if self.started:
            subprocess.run([*self.prefix, self.tool("pg_ctl"), "-D", self.data, "-m", "immediate",
                            "stop"], capture_output=True)
            self.started = False
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- using it

    def tool(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo(host="127.0.0.1", port=str(self.port), user=self.user, dbname=dbname)

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.dsn(dbname), autocommit=True)

    def execute(self, dbname: str, *statements: str) -> None:
        with self.connect(dbname) as conn:
            for s in statements:
                conn.execute(s)

    def query(self, dbname: str, sql: str, params=None) -> list[tuple]:
        with self.connect(dbname) as conn:
            return conn.execute(sql, params).fetchall()

    def createdb(self, name: str) -> str:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING UTF8 '
                         "LC_COLLATE 'C' LC_CTYPE 'C'")
        return name

    def dropdb(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')

    def version(self) -> str:
        return self.query("postgres", "SHOW server_version")[0][0]

    def server_cpu(self) -> float:
        """CPU seconds (user+sys) the server has used so far: the postmaster, its live
        backends and those that have exited (Linux /proc; 0.0 elsewhere)."""
        try:
            pm = int(Path(self.data, "postmaster.pid").read_text().split()[0])
            tick = os.sysconf("SC_CLK_TCK")
            fields = Path(f"/proc/{pm}/stat").read_text().rsplit(")", 1)[1].split()
            total = sum(int(x) for x in fields[11:15])   # utime stime cutime cstime
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    rest = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(rest[1]) == pm:   # a backend: its own time (not yet in cutime)
                    total += int(rest[11]) + int(rest[12])
            return total / tick
        except (OSError, ValueError, IndexError):
            return 0.0

    def server_cpu_settled(self) -> float:
        """``server_cpu`` once the backends of a client that just exited have been reaped
        (a backend outlives its client by a moment, and its time is counted only then)."""
        last, same = self.server_cpu(), 0
        for _ in range(60):
            time.sleep(0.05)
            now = self.server_cpu()
            same = same + 1 if now == last else 0
            if same >= 4:
                break
            last = now
        return last

    def env(self) -> dict[str, str]:
        """For client tools run as subprocesses: these binaries, this server."""
        env = dict(os.environ)
        env.update(PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER=self.user,
                   FPVAULT_PG_BINDIR=self.bindir)
        return env


# -- the bench database

def build_bench_db(cluster: Cluster, dbname: str, scale: int) -> dict[str, float]:
    """pgbench -i -s SCALE plus factory_pulse, in one database; returns seconds per step."""
    if not FACTORY_PULSE.exists():
        sys.exit(f"{FACTORY_PULSE} is missing.")
    cluster.createdb(dbname)
    took = {}
    t = time.perf_counter()
    subprocess.run([cluster.tool("pgbench"), "-i", "-q", "-s", str(scale),
                    "-d", cluster.dsn(dbname)],
                   check=True, env=cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took["pgbench -i"] = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([cluster.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d",
                    cluster.dsn(dbname), "-f", str(FACTORY_PULSE)],
                   check=True, env=cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took["factory_pulse"] = time.perf_counter() - t
    t = time.perf_counter()
    cluster.execute(dbname, "VACUUM ANALYZE")
    took["vacuum analyze"] = time.perf_counter() - t
    return took


# The churn between snapshots: 1% of pgbench_accounts updated, scattered over
# the whole table; 1% of app.activity_log (the sample's largest table)
# updated, scattered likewise; and 1000 new activity_log rows appended (an
# audit trail grows at its end; the identity column numbers them after the
# last id).  Round r updates the rows whose key is 7 + 13r modulo 100, so
# successive rounds touch different rows, as pgbench's random transactions
# would (13 is prime to 100: a hundred rounds cover every row once), and every
# repository sees the same change.  Re-updating the same rows each round would
# flatter tools that read in physical order: after the first round the
# updated rows sit together at the table's end, so only that region changes.
CHURN = (
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 100 = {residue}",
    ("UPDATE app.activity_log SET payload = jsonb_set(payload, '{{reviewed}}', 'true') "
     "WHERE id % 100 = {residue}"),
    ("INSERT INTO app.activity_log (org_id, actor_id, action, entity_type, entity_id, payload, "
     "ip, created_at) "
     "SELECT org_id, actor_id, 'comment', entity_type, entity_id, "
     "payload || '{{\"source\": \"bench\"}}', ip, created_at + interval '1 year' "
     "FROM app.activity_log WHERE id <= 1000 ORDER BY id"),
)
CHURN_TEXT = ("`UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 100 = 7` (1% of "
              "rows, scattered); `UPDATE app.activity_log SET payload = jsonb_set(payload, "
              "'{reviewed}', 'true') WHERE id % 100 = 7` (1%, scattered); 1000 rows appended to "
              "`app.activity_log`; where it is repeated, round r updates the rows whose key is "
              "7 + 13r modulo 100 instead of 7, so each round touches different rows")


def churn(cluster: Cluster, dbname: str, round: int = 0) -> list[int]:
    """Apply CHURN for ``round``; return the rows each statement touched."""
    counts = []
    with cluster.connect(dbname) as conn:
        for s in CHURN:
            counts.append(conn.execute(s.format(residue=(7 + 13 * round) % 100)).rowcount)
    return counts


# Which tables belong to which part of the bench database.
GROUPS = {"pgbench": "n.nspname = 'public'", "factory_pulse": "n.nspname <> 'public'"}


def group_tables(conn: psycopg.Connection) -> dict[str, list[str]]:
    """Per group: the qualified names of its ordinary tables."""
    out = {}
    for group, where in GROUPS.items():
        out[group] = [r[0] for r in conn.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            f"AND {where} ORDER BY 1").fetchall()]
    return out


def copy_sizes(cluster: Cluster, dbname: str) -> dict[str, tuple[int, int, int]]:
    """Per group: (tables, rows, bytes of COPY text), by reading every COPY stream."""
    out = {}
    with cluster.connect(dbname) as conn:
        for group, tables in group_tables(conn).items():
            rows = size = 0
            for qname in tables:
                with conn.cursor().copy(f"COPY {qname} TO STDOUT") as copy:
                    for buf in copy:
                        size += len(buf)
                        rows += bytes(buf).count(b"\n")
            out[group] = (len(tables), rows, size)
    return out


# -- measuring

@dataclass
class Run:
    seconds: float
    max_rss_kib: int | None = None
    cpu_seconds: float | None = None   # user + system of the process (and its children)
    stdout: str = ""
    server_cpu: float | None = None    # the PostgreSQL server's, over the same time


def timed(cmd: list[str], env: dict[str, str] | None = None, rss: bool = True) -> Run:
    """Run ``cmd`` to completion (failing loudly); wall time, peak RSS and CPU time.

    Peak RSS and CPU come from ``/usr/bin/time -v`` when it exists (the command's
    own process tree), else from ``getrusage(RUSAGE_CHILDREN)`` (peak RSS is then
    the largest child this script has waited for, so only an upper bound)."""
    use_time = rss and os.path.exists(TIME_BIN)
    with tempfile.NamedTemporaryFile("r", prefix="bench-time-", suffix=".txt") as tf:
        full = [TIME_BIN, "-v", "-o", tf.name, *cmd] if use_time else cmd
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(full, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
        if use_time:
            text = tf.read()
            rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
            user = float(re.search(r"User time \(seconds\): ([\d.]+)", text).group(1))
            system = float(re.search(r"System time \(seconds\): ([\d.]+)", text).group(1))
            return Run(seconds, rss_kib, user + system, proc.stdout)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return Run(seconds, after.ru_maxrss, cpu, proc.stdout)


def tree_bytes(path: str | os.PathLike) -> int:
    """Apparent size of every file under ``path`` (``du -sb``)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def moto_server():
    """(moto's S3 server on a free local port, started; the port).  stop() it when done."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, port


def s3_client(port: int):
    import boto3

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                        aws_access_key_id="bench", aws_secret_access_key="bench")


def pin_fpvault() -> tuple[str, str]:
    """Freeze the fpvault sources under measurement; return (their dir, version).

    The package may be edited while a benchmark runs (an editable install
    imports the working tree afresh in every subprocess), so the scripts copy
    ``fpvault/`` once, at the start, and run everything against that copy: the
    copy goes first on ``PYTHONPATH`` here, for the CLI in subprocesses; a script
    that uses the API in-process puts the returned dir first on ``sys.path``."""
    src = tempfile.mkdtemp(prefix="fpvault-bench-src-")
    shutil.copytree(ROOT / "fpvault", os.path.join(src, "fpvault"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    atexit.register(shutil.rmtree, src, True)
    digest = hashlib.blake2b(digest_size=4)
    for f in sorted(Path(src, "fpvault").glob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "no git"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "fpvault"], capture_output=True,
                           text=True).stdout.strip()
    version = f"fpvault at {head}" + (" with uncommitted changes to fpvault/" if dirty else "")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    return src, f"{version} (sources {digest.hexdigest()})"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_counters() -> tuple[int, int]:
    """(stolen, total) CPU time of the machine so far, in clock ticks (/proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def stolen_since(start: tuple[int, int]) -> str:
    """The share of CPU time a hypervisor took from this machine since ``start``:
    on a virtual machine it is what makes wall times move between runs while CPU
    times hold."""
    stolen, total = cpu_counters()
    if total <= start[1]:
        return "?"
    return f"{100 * (stolen - start[0]) / (total - start[1]):.0f}%"


class Conditions:
    """How loaded the machine was over a run, for a section's first line: the load
    average at both ends, and the share of CPU time a hypervisor stole."""

    def __init__(self) -> None:
        self.load = load_average()
        self.cpu = cpu_counters()

    def text(self) -> str:
        return (f"Load average (1/5/15 min) {self.load} at the start, {load_average()} at "
                f"the end; CPU time stolen by the hypervisor: {stolen_since(self.cpu)}.")


def fpvault_bin() -> str:
    """The fpvault console script of this interpreter's environment."""
    here = Path(sys.executable).parent / "fpvault"
    if here.exists():
        return str(here)
    found = shutil.which("fpvault")
    if not found:
        sys.exit("fpvault is not installed in this environment (pip install -e .).")
    return found


# -- reporting

def machine(cluster: Cluster) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}), {ram} RAM, Linux {platform.release()}, "
            f"PostgreSQL {cluster.version()}, Python {platform.python_version()}")


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


INTRO = """# fpvault benchmarks

Measured by the scripts in `bench/`, each against a throwaway PostgreSQL
cluster it starts itself (initdb in a temp dir, `fsync=off`, localhost). The
sections between the markers are rewritten by the scripts; rerun them to
refresh the numbers:

```sh
python bench/snap_bench.py --scale 50 --runs 3
python bench/chunk_size.py --scale 10
```

Tests never assert timings; these numbers are for decisions (chunk size,
where the time goes), on the machine named in each section.
"""


def run_in_cluster(name: str, args, run, prefix: str = "fpvault-bench-",
                   version: str | None = None) -> None:
    """What a script's main() does after parsing: pin the sources (unless the script
    did, and gives their ``version``), start a throwaway cluster, ``run(cluster,
    work_dir, args, version)`` for the markdown table, stop the cluster, print the
    table with the script's time, and write it into docs/benchmarks.md as section
    ``name`` unless ``args.no_doc``.  ``args.keep`` keeps the cluster and the work dir."""
    t_all = time.perf_counter()
    if version is None:
        _, version = pin_fpvault()
    work = tempfile.mkdtemp(prefix=prefix)
    pg = Cluster(keep=args.keep)
    try:
        pg.start()
        table = run(pg, work, args, version)
    finally:
        pg.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}", file=sys.stderr)
    table += f"\nThe whole script took {(time.perf_counter() - t_all) / 60:.1f} min.\n"
    print(table)
    if not args.no_doc:
        write_section(name, table)
        print("written to docs/benchmarks.md", file=sys.stderr)


def write_section(name: str, body: str, path: Path = DOC) -> None:
    """Replace the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else INTRO
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
