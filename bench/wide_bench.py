"""A schema of thousands of small tables: fpvault against pg_dump/pg_restore.

Per-table costs hide on the bench database (15 tables); a schema of thousands
of tables (one per customer, per month, partitions) shows them.  This script
builds one database of ``--tables`` small tables (a key, a foreign key to one
shared parent, an index, a comment; every tenth with a view and a row level
security policy; ``--rows`` rows each) in a throwaway cluster with the default
``max_locks_per_transaction``, and measures in the same run, medians of
``--runs``:

- snapshot 1 into a fresh repository (`-j 1`), against ``pg_dump -Fc``;
- a snapshot after a commit in another database (each table looked at, none
  read), against the same dump;
- ``snap --reread -j 4`` (every table read by four connections, each taking
  the locks of what it reads), against ``pg_dump -Fd -j 4``;
- ``restore --to`` with ``-j 2``, against ``pg_restore -j 2``, each going first
  in turn; and whether a restore in one transaction fits the server's lock table;
- with ``--history`` snapshots in the repository, the time and peak RSS of
  ``list``, a snapshot with nothing committed, ``verify`` and ``prune --dry-run``.

It prints a markdown table and writes it into docs/benchmarks.md between
``<!-- wide_bench:start -->`` and ``<!-- wide_bench:end -->``.

    /tmp/venv/bin/python bench/wide_bench.py --tables 3000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _pg import (Cluster, Conditions, Run, fpvault_bin, machine, run_in_cluster,  # noqa: E402
                 timed, today)

DB = "wide"
BATCH = 500   # tables created per transaction (each takes locks until it commits)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(pg: Cluster, tables: int, rows: int) -> None:
    pg.createdb(DB)
    pg.execute(DB, "CREATE TABLE parent (id int PRIMARY KEY, name text)",
               "INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 100) g")
    for first in range(1, tables + 1, BATCH):
        last = min(tables, first + BATCH - 1)
        pg.execute(DB, f"""DO $$ BEGIN FOR i IN {first}..{last} LOOP
            EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY, parent_id int REFERENCES
                parent (id), v text, n numeric, created timestamptz DEFAULT now())', i);
            EXECUTE format('CREATE INDEX t%s_v ON t%s (v)', i, i);
            EXECUTE format('COMMENT ON TABLE t%s IS %L', i, 'table ' || i || ': a ''quote''; a');
            EXECUTE format('INSERT INTO t%s SELECT g, 1 + g %% 100, md5(g::text), g / 3.0
                FROM generate_series(1, {rows}) g', i);
            IF i % 10 = 0 THEN
                EXECUTE format('CREATE VIEW v%s AS SELECT id, v FROM t%s WHERE n > 1', i, i);
                EXECUTE format('ALTER TABLE t%s ENABLE ROW LEVEL SECURITY', i);
                EXECUTE format('CREATE POLICY p%s ON t%s USING (v <> %L)', i, i, 'x');
            END IF;
        END LOOP; END $$""")
    pg.execute(DB, "VACUUM ANALYZE")


def med(runs: list[Run]) -> float:
    return statistics.median(r.seconds for r in runs)


def secs(runs: list[Run]) -> str:
    xs = [r.seconds for r in runs]
    return f"{med(runs):.2f} s ({min(xs):.2f}–{max(xs):.2f})" if len(xs) > 1 else f"{xs[0]:.2f} s"


def run(pg: Cluster, work: str, args, version: str) -> str:
    conditions = Conditions()
    env = pg.env()
    fp = fpvault_bin()
    dsn = pg.dsn(DB)
    pg_dump, pg_restore = pg.tool("pg_dump"), pg.tool("pg_restore")
    log(f"building {args.tables} tables of {args.rows} rows")
    t = time.perf_counter()
    build(pg, args.tables, args.rows)
    built = time.perf_counter() - t

    def measured(cmd: list[str]) -> Run:
        pg.server_cpu_settled()
        return timed(cmd, env)

    dump, first, after_commit, dump_dir, reread = [], [], [], [], []
    for i in range(args.runs):
        log(f"run {i + 1}/{args.runs}: pg_dump -Fc, snapshot 1, snapshot after a commit")
        archive = os.path.join(work, "wide.fc")
        dump.append(measured([pg_dump, "-Fc", "-f", archive, "-d", dsn]))
        repo = os.path.join(work, f"repo{i}")
        timed([fp, "-q", "-r", repo, "init"], env, rss=False)
        first.append(measured([fp, "-q", "-r", repo, "snap", "-d", dsn]))
        pg.execute("postgres", "CREATE TABLE IF NOT EXISTS bench_elsewhere (n int)",
                   "INSERT INTO bench_elsewhere VALUES (1)")
        after_commit.append(measured([fp, "-q", "-r", repo, "snap", "-d", dsn]))
        log(f"run {i + 1}/{args.runs}: pg_dump -Fd -j 4, snap --reread -j 4")
        out_dir = os.path.join(work, "wide.dir")
        shutil.rmtree(out_dir, ignore_errors=True)
        dump_dir.append(measured([pg_dump, "-Fd", "-j", "4", "-f", out_dir, "-d", dsn]))
        reread.append(measured([fp, "-q", "-r", repo, "snap", "-d", dsn, "--reread",
                                "-j", "4"]))
    repo = os.path.join(work, "repo0")

    restores, pg_restores = [], []
    for i in range(args.runs):
        log(f"run {i + 1}/{args.runs}: restore -j 2, pg_restore -j 2")
        ours, theirs = pg.createdb(f"ours{i}"), pg.createdb(f"theirs{i}")
        pg.execute("postgres", "CHECKPOINT")
        runs = [(restores, [fp, "-q", "-r", repo, "restore", "latest", "--to", pg.dsn(ours),
                            "-j", "2"]),
                (pg_restores, [pg_restore, "-j", "2", "-d", pg.dsn(theirs),
                               os.path.join(work, "wide.fc")])]
        # Each goes first in turn: the first after dropping the last run's databases
        # was up to twice as slow (fpvault, always first, measured 7.2-14.3 s).
        for results, cmd in (runs if i % 2 == 0 else runs[::-1]):
            results.append(measured(cmd))
        for name in (ours, theirs):
            pg.dropdb(name)
        pg.execute("postgres", "CHECKPOINT")
    # Many snapshots of the schema: each command that lists them holds every one's
    # head, and verify and prune read every manifest.
    log(f"taking snapshots up to {args.history} in all")
    taken = len(json.loads(timed([fp, "-r", repo, "list", "--json"], env, rss=False).stdout))
    for _ in range(taken, args.history):
        timed([fp, "-q", "-r", repo, "snap", "-d", dsn], env, rss=False)
    history = {label: [measured([fp, "-q", "-r", repo, *cmd]) for _ in range(args.runs)]
               for label, cmd in (("`list`", ["list"]),
                                  ("`snap` (nothing committed)", ["snap", "-d", dsn]),
                                  ("`verify`", ["verify"]),
                                  ("`prune --dry-run`", ["prune", "--dry-run"]))}
    single = pg.createdb("single")
    one = subprocess.run([fp, "-q", "-r", repo, "restore", "latest", "--to", pg.dsn(single)],
                         env=env, capture_output=True, text=True)
    single_said = ("restored" if one.returncode == 0 else
                   f"exit {one.returncode}: {one.stderr.strip().removeprefix('fpvault: ')}")

    def row(label: str, ours: list[Run], theirs: list[Run]) -> str:
        return f"| {label} | {secs(ours)} | {secs(theirs)} | {med(ours) / med(theirs):.2f}× |"

    lines = [
        f"Measured {today()} on {machine(pg)}; {version}. {conditions.text()}",
        "",
        f"Database: {args.tables} tables of {args.rows} rows (a key, a foreign key to one "
        "shared parent, an index, a comment; every tenth with a view and a row level "
        f"security policy), built in {built:.0f} s; `max_locks_per_transaction` 64 "
        f"(the default). Medians of {args.runs} runs (min–max in brackets).",
        "",
        "| measure | fpvault | baseline | ratio |",
        "|---|---:|---:|---:|",
        row("snapshot 1 (`-j 1`), against `pg_dump -Fc`", first, dump),
        row("snapshot after a commit elsewhere (every table looked at, none read), against "
            "`pg_dump -Fc`", after_commit, dump),
        row("`snap --reread -j 4`, against `pg_dump -Fd -j 4`", reread, dump_dir),
        row("`restore --to -j 2`, against `pg_restore -j 2`", restores, pg_restores),
        "",
        f"`restore --to` in one transaction: {single_said}",
        "",
        f"With {args.history} snapshots of it in the repository (peak RSS: the largest "
        "of the runs):",
        "",
        "| command | wall | peak RSS |",
        "|---|---:|---:|",
        *(f"| {label} | {secs(runs)} | {max(r.max_rss_kib for r in runs) / 1024:.0f} MiB |"
          for label, runs in history.items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", type=int, default=3000, help="tables (default 3000)")
    ap.add_argument("--rows", type=int, default=20, help="rows per table (default 20)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measure; medians (default 3)")
    ap.add_argument("--history", type=int, default=40,
                    help="snapshots in the repository for the last table (default 40)")
    ap.add_argument("--keep", action="store_true", help="keep the cluster (and work dir)")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    run_in_cluster("wide_bench", args, run, prefix="fpvault-wide-")


if __name__ == "__main__":
    main()
