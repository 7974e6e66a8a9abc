"""Key order against physical order: what reading each table in its key order costs
the server, and what each order costs the repository after churn.

snap reads a table with a key as ``COPY (SELECT ... ORDER BY key) TO STDOUT``, so
that an unchanged table gives the same stream and ``diff --rows`` can merge-join two
versions.  pg_dump reads in physical order, which is cheaper for the server (a
sequential scan, no index).  This script measures both sides of that choice on
the bench database (pgbench ``-s SCALE`` plus factory_pulse, in a throwaway
cluster):

- reading every table to /dev/null through psql in each order: wall time and the
  server's CPU (its backends' user+sys, from /proc), medians of ``--runs``;
- storing: every table's stream in each order is written through fpvault's API
  (``Vault.write_stream`` with the table's previous stream as delta base, as snap
  does) into a repository of its own; then ``--rounds`` rounds of the churn of
  ``_pg.CHURN``, each followed by VACUUM of the churned tables (as autovacuum
  would: in physical order, updated rows move into the space it frees) and a
  snapshot of the same kind.  Bytes added per round, and in total.

It prints a markdown table and writes it into docs/benchmarks.md between
``<!-- order_bench:start -->`` and ``<!-- order_bench:end -->``.

    /tmp/venv/bin/python bench/order_bench.py --scale 20 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _pg import (CHURN_TEXT, Cluster, build_bench_db, churn, human, Conditions,  # noqa: E402
                 machine, pin_fpvault, today, tree_bytes, write_section)

SRC, VERSION = pin_fpvault()
sys.path.insert(0, SRC)

from fpvault import pgsource  # noqa: E402
from fpvault.vault import Vault  # noqa: E402

DB = "bench"
CHURNED = ("public.pgbench_accounts", "app.activity_log")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tables(pg: Cluster) -> list[pgsource.TableInfo]:
    with pg.connect(DB) as conn:
        oids = [r[0] for r in conn.execute(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "ORDER BY 1").fetchall()]
        return pgsource.table_infos(conn, oids)


def statement(table: pgsource.TableInfo, order: str) -> str:
    if order == "physical":
        cols = ", ".join(f'"{c}"' for c in table.columns)
        return f"COPY {table.qname} ({cols}) TO STDOUT"
    return table.copy_statement().as_string(None)


def psql_copy(pg: Cluster, sql: str, out) -> subprocess.Popen:
    return subprocess.Popen([pg.tool("psql"), "-X", "-q", "-d", pg.dsn(DB), "-c", sql],
                            stdout=out, env=pg.env())


def read_all(pg: Cluster, infos: list[pgsource.TableInfo], order: str) -> tuple[float, float]:
    """Wall time and server CPU of reading every table in ``order`` to /dev/null."""
    cpu0, t0 = pg.server_cpu(), time.perf_counter()
    with open(os.devnull, "wb") as null:
        for t in infos:
            if psql_copy(pg, statement(t, order), null).wait():
                raise RuntimeError(f"reading {t.qname} failed")
    return time.perf_counter() - t0, pg.server_cpu() - cpu0


def snapshot(pg: Cluster, vault: Vault, infos, order: str, previous: dict) -> dict:
    """Every table's stream in ``order`` into the vault, against its previous stream."""
    out = {}
    for t in infos:
        proc = psql_copy(pg, statement(t, order), subprocess.PIPE)
        stream, _ = vault.write_stream(iter(lambda: proc.stdout.read(1 << 20), b""),
                                       previous.get(t.qname))
        if proc.wait():
            raise RuntimeError(f"reading {t.qname} failed")
        out[t.qname] = stream
    vault.store.flush()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=20, help="pgbench scale (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="churn rounds (default 5)")
    ap.add_argument("--runs", type=int, default=3, help="timed reads per order; medians")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    started = time.perf_counter()
    work = tempfile.mkdtemp(prefix="fpvault-bench-order-")
    with Cluster() as pg:
        conditions = Conditions()
        log(f"building the database: pgbench -i -s {args.scale} + factory_pulse")
        build_bench_db(pg, DB, args.scale)
        infos = tables(pg)
        orders = ("key", "physical")
        reads = {o: [] for o in orders}
        for i in range(args.runs):
            for o in orders:
                log(f"read {i + 1}/{args.runs}, {o} order")
                reads[o].append(read_all(pg, infos, o))
        vaults = {o: Vault.create(os.path.join(work, o)) for o in orders}
        prev = {o: {} for o in orders}
        added = {o: [] for o in orders}
        touched = []
        for rnd in range(args.rounds + 1):
            if rnd:
                log(f"churn round {rnd}")
                touched = churn(pg, DB, rnd - 1)
                pg.execute(DB, *(f"VACUUM {t}" for t in CHURNED))
            for o in orders:
                path = os.path.join(work, o)
                before = tree_bytes(path)
                prev[o] = snapshot(pg, vaults[o], infos, o, prev[o])
                added[o].append(tree_bytes(path) - before)
        version = pg.version()
        mach = machine(pg)
    shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    lines = [f"Measured {today()} on {mach}; {VERSION}. {conditions.text()}",
             "",
             f"Database: `pgbench -i -s {args.scale}` plus factory_pulse (PostgreSQL {version}). "
             f"Reads: every table through `psql -c 'COPY ... TO STDOUT'` to /dev/null, medians "
             f"of {args.runs}; server CPU is its backends' user+sys. Storage: through the API, "
             "each order in a repository of its own, as snap stores streams (deltas against "
             f"the previous stream, frames); {args.rounds} rounds of churn ({CHURN_TEXT}; rows "
             f"touched per round: {', '.join(f'{c:,}' for c in touched)}), each followed by "
             "VACUUM of the two churned tables.",
             "",
             "| order | read all tables: wall | server CPU | snapshot 1 stored | "
             "added per churn round (median) | rounds | total after all rounds |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for o in orders:
        walls, cpus = [r[0] for r in reads[o]], [r[1] for r in reads[o]]
        per_round = added[o][1:]
        lines.append(f"| {o} | {med(walls):.2f} s | {med(cpus):.2f} s | {human(added[o][0])} | "
                     f"{human(med(per_round)) if per_round else '—'} | "
                     f"{', '.join(human(a) for a in per_round)} | {human(sum(added[o]))} |")
    k, p = reads["key"], reads["physical"]
    lines += ["",
              f"Key order costs the server {med(r[1] for r in k) / med(r[1] for r in p):.2f}× "
              "the CPU of physical order here (an index scan against a sequential scan).",
              "",
              f"The whole script took {(time.perf_counter() - started) / 60:.1f} min."]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_doc:
        write_section("order_bench", table)
        print("written to docs/benchmarks.md", file=sys.stderr)


if __name__ == "__main__":
    main()
