"""fpvault snap/restore against pg_dump -Fc/pg_restore, on pgbench plus the sample app.

Builds one database with ``pgbench -i -s SCALE`` and the factory_pulse sample
(shared/datasets), in a throwaway cluster, then measures in the same run
(medians of ``--runs``; each run has its own fresh repository):

- snapshot 1 into a fresh repository: wall time, client and server CPU, peak
  RSS, and the repository's size afterwards, against ``pg_dump -Fc`` (time,
  size); and with ``-j 2`` into another fresh repository;
- snapshot 2 of the unchanged database, against a ``pg_dump -Fc`` timed in the
  same loop: with nothing committed since snapshot 1 (snap takes the tables
  unread), after a commit in another database of the cluster (snap looks at
  each table's rows with one scan and takes them unread; ``-j 1`` and
  ``-j 2``), and with ``--reread -j 2`` (every table read and hashed);
- the churn of ``_pg.CHURN`` (1% of rows updated, scattered, in the largest
  table of each part; 1000 rows appended), then snapshot 3: bytes added, also
  as a share of snapshot 1's; against a new full dump each time;
- ``fpvault restore --to`` of the latest snapshot into an empty database
  against ``pg_restore -d`` of the last dump, then both with ``-j 2``, then
  ``restore -o FILE`` against ``pg_restore -f FILE``; after each restore into
  a database, a ``VACUUM (FREEZE)`` of it (what autovacuum does to every page
  whose rows are not frozen, before xids wrap around);
- peak RSS of snapshot 1 at a second size (``--small-scale``), to show that
  memory does not grow with the database.

It prints a markdown table and writes it into docs/benchmarks.md between
``<!-- snap_bench:start -->`` and ``<!-- snap_bench:end -->``.

    /tmp/venv/bin/python bench/snap_bench.py --scale 50 --runs 3
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

from _pg import (CHURN_TEXT, Cluster, Run, build_bench_db, churn, copy_sizes, fpvault_bin,  # noqa: E402
                 human, Conditions, machine, run_in_cluster, timed, today, tree_bytes)

DB = "bench"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def secs(runs: list[Run]) -> str:
    xs = [r.seconds for r in runs]
    if len(xs) == 1:
        return f"{xs[0]:.2f} s"
    return f"{med(xs):.2f} s ({min(xs):.2f}–{max(xs):.2f})"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=50, help="pgbench scale (default 50: 5 M rows)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measure; medians (default 3)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="fpvault snap -j (default 1, as pg_dump -Fc)")
    ap.add_argument("--small-scale", type=int, default=10,
                    help="pgbench scale of the second database for peak RSS (default 10)")
    ap.add_argument("--keep", action="store_true", help="keep the cluster (and work dir) running")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    run_in_cluster("snap_bench", args, run)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(pg: Cluster, work: str, args, version: str) -> str:
    conditions = Conditions()
    env = pg.env()
    fp = fpvault_bin()
    # (from the work dir: ``python -c`` puts its cwd first on sys.path; the console script,
    # its own directory.)
    where = subprocess.run([sys.executable, "-c", "import fpvault; print(fpvault.__file__)"],
                           env=env, cwd=work, capture_output=True, text=True,
                           check=True).stdout.strip()
    if not where.startswith(env["PYTHONPATH"].split(os.pathsep)[0]):
        raise RuntimeError(f"the CLI would import fpvault from {where}, not the pinned copy")
    dsn = pg.dsn(DB)
    pg_dump, pg_restore = pg.tool("pg_dump"), pg.tool("pg_restore")
    jobs = ["-j", str(args.jobs)]

    log(f"building the database: pgbench -i -s {args.scale} + factory_pulse")
    setup = build_bench_db(pg, DB, args.scale)
    sizes = copy_sizes(pg, DB)
    log("  " + ", ".join(f"{k} {v:.1f} s" for k, v in setup.items()))

    # Each part on its own, once: how well each compresses.
    log("per-part sizes")
    parts = {}
    for group, sel in (("pgbench", ["-n", "public"]), ("factory_pulse", ["-N", "public"])):
        repo = os.path.join(work, f"part-{group}")
        timed([fp, "-q", "-r", repo, "init"], env, rss=False)
        timed([fp, "-q", "-r", repo, "snap", "-d", dsn, *sel], env, rss=False)
        dump = os.path.join(work, f"part-{group}.fc")
        timed([pg_dump, "-Fc", "-f", dump, *sel, "-d", dsn], env, rss=False)
        parts[group] = (tree_bytes(repo), os.path.getsize(dump))
        shutil.rmtree(repo)
        os.unlink(dump)

    repos = [os.path.join(work, f"repo{i}") for i in range(args.runs)]
    repos_j2 = [os.path.join(work, f"repo-j2-{i}") for i in range(args.runs)]
    dumps = [os.path.join(work, f"dump{i}.fc") for i in range(args.runs)]
    for repo in repos + repos_j2:   # (snap makes only the default repository itself)
        timed([fp, "-q", "-r", repo, "init"], env, rss=False)

    def measured(cmd: list[str]) -> Run:
        cpu = pg.server_cpu_settled()
        r = timed(cmd, env)
        r.server_cpu = pg.server_cpu_settled() - cpu
        return r

    def snap_cmd(repo: str, *extra: str) -> list[str]:
        return [fp, "-q", "-r", repo, "snap", "-d", dsn, *extra, "--json"]

    dump1, dump1_size, snap1, stored1, snap1_j2 = [], [], [], [], []
    for i in range(args.runs):
        log(f"run {i + 1}/{args.runs}: pg_dump -Fc, snapshot 1, snapshot 1 with -j 2")
        dump1.append(measured([pg_dump, "-Fc", "-f", dumps[i], "-d", dsn]))
        dump1_size.append(os.path.getsize(dumps[i]))
        snap1.append(measured(snap_cmd(repos[i], *jobs)))
        stored1.append(tree_bytes(repos[i]))
        snap1_j2.append(measured(snap_cmd(repos_j2[i], "-j", "2")))

    # Snapshot 2: nothing changed.  First with nothing committed since the snapshot
    # before (snap reads no table), then after a commit elsewhere in the cluster (it
    # looks at each table's rows, and reads none), and with --reread (it reads them
    # all).  Each run starts from a snapshot of its own, taken after the previous run's
    # commits.
    def commit_elsewhere() -> None:
        pg.execute("postgres", "CREATE TABLE IF NOT EXISTS bench_elsewhere (n int)",
                   "INSERT INTO bench_elsewhere VALUES (1)")

    dump2, snap2, added2, snap2m, added2m, snap2m_j2, reused2 = [], [], [], [], [], [], []
    reused2m, snap2r_j2 = [], []
    for i in range(args.runs):
        log(f"run {i + 1}/{args.runs}: pg_dump -Fc, snapshots 2 (unchanged)")
        if i:
            timed(snap_cmd(repos[i], *jobs), env)   # after run i-1's commits: reads all
        dump2.append(measured([pg_dump, "-Fc", "-f", dumps[i], "-d", dsn]))
        before = tree_bytes(repos[i])
        snap2.append(measured(snap_cmd(repos[i], *jobs)))
        added2.append(tree_bytes(repos[i]) - before)
        reused2.append(json.loads(snap2[-1].stdout)["tables_reused"])
        log(f"  reused {reused2[-1]}")
        commit_elsewhere()
        before = tree_bytes(repos[i])
        snap2m.append(measured(snap_cmd(repos[i], *jobs)))
        added2m.append(tree_bytes(repos[i]) - before)
        reused2m.append(json.loads(snap2m[-1].stdout)["tables_reused"])
        commit_elsewhere()
        snap2m_j2.append(measured(snap_cmd(repos_j2[i], "-j", "2")))
        commit_elsewhere()
        snap2r_j2.append(measured(snap_cmd(repos_j2[i], "-j", "2", "--reread")))
    for repo in repos_j2:
        shutil.rmtree(repo)

    log("churn")
    touched = churn(pg, DB)
    dump3, dump3_size, snap3, added3, repo3 = [], [], [], [], []
    for i in range(args.runs):
        log(f"run {i + 1}/{args.runs}: pg_dump -Fc, snapshot 3 (after churn)")
        dump3.append(measured([pg_dump, "-Fc", "-f", dumps[i], "-d", dsn]))
        dump3_size.append(os.path.getsize(dumps[i]))
        before = tree_bytes(repos[i])
        snap3.append(measured(snap_cmd(repos[i], *jobs)))
        repo3.append(tree_bytes(repos[i]))
        added3.append(repo3[-1] - before)
    deltas3 = [json.loads(r.stdout) for r in snap3]

    check_sql = ("SELECT (SELECT count(*) || '/' || sum(abalance) FROM pgbench_accounts), "
                 "(SELECT count(*) || '/' || max(id) FROM app.activity_log)")
    expect = pg.query(DB, check_sql)[0]
    # Each restore variant against its pg_restore counterpart: (label, fpvault args, pg_restore
    # args); None for a script, which is written to a file instead of a database.
    variants = [("restore into an empty database", ["--to", None], ["-d", None]),
                ("restore -j 2 into an empty database", ["--to", None, "-j", "2"],
                 ["-j", "2", "-d", None]),
                ("restore as a SQL script to a file", ["-o", "FILE"], ["-f", "FILE"])]
    rest = {label: ([], []) for label, _, _ in variants}
    # What the restored database costs afterwards: VACUUM (FREEZE), which autovacuum runs
    # before xids wrap around, rewriting every page whose rows are not frozen yet.
    vacuum = {label: ([], []) for label, _, tool_args in variants if None in tool_args}
    psql = pg.tool("psql")
    out_file = os.path.join(work, "restore.sql")

    def restore(name: str, cmd_of, tool_args: list, vacuumed: list[Run] | None = None) -> Run:
        """Run one restore, into a new database or to a file; check what it restored,
        then time a VACUUM (FREEZE) of it into ``vacuumed``."""
        target = pg.createdb(f"restore_{name}") if None in tool_args else None
        cmd = cmd_of([pg.dsn(target) if x is None else out_file if x == "FILE" else x
                      for x in tool_args])
        result = timed(cmd, env)
        if target is None:
            os.unlink(out_file)
            return result
        got = pg.query(target, check_sql)[0]
        if got != expect:
            raise RuntimeError(f"{name} restored {got}, expected {expect}: {' '.join(cmd)}")
        if vacuumed is not None:
            vacuumed.append(measured([psql, "-X", "-q", "-d", pg.dsn(target), "-c",
                                      "VACUUM (FREEZE)"]))
        pg.dropdb(target)
        return result

    for i in range(args.runs):
        for label, fp_args, pg_args in variants:
            log(f"run {i + 1}/{args.runs}: {label}")
            vac = vacuum.get(label, (None, None))
            rest[label][0].append(restore("fpvault", lambda a, i=i: [
                fp, "-q", "-r", repos[i], "restore", "latest", *a], fp_args, vac[0]))
            rest[label][1].append(restore("pg_restore", lambda a, i=i: [
                pg_restore, *a, dumps[i]], pg_args, vac[1]))

    # Peak RSS at a second size: the same snapshot of a smaller database.
    log(f"peak RSS at scale {args.small_scale}")
    build_bench_db(pg, "bench_small", args.small_scale)
    small = []
    for j, extra in enumerate((jobs, ["-j", "2"])):
        repo = os.path.join(work, f"small{j}")
        timed([fp, "-q", "-r", repo, "init"], env, rss=False)
        small.append(timed([fp, "-q", "-r", repo, "snap", "-d", pg.dsn("bench_small"), *extra,
                            "--json"], env))

    # -- the report
    s1, d1 = med(stored1), med(dump1_size)
    a3, d3 = med(added3), med(dump3_size)
    rss_fp = med([r.max_rss_kib for r in snap1]) * 1024
    rss_pg = med([r.max_rss_kib for r in dump1]) * 1024
    cpu_fp = med([r.cpu_seconds for r in snap1])
    cpu_pg = med([r.cpu_seconds for r in dump1])
    def wall(label: str, ours: list[Run], theirs: list[Run], mark: str = "") -> tuple:
        return (f"{label}: wall time", secs(ours), secs(theirs) + mark,
                ratio(med([r.seconds for r in ours]), med([r.seconds for r in theirs])))

    def cpu(label: str, ours: list[Run], theirs: list[Run], mark: str = "") -> tuple:
        a, b = med([r.cpu_seconds for r in ours]), med([r.cpu_seconds for r in theirs])
        sa, sb = med([r.server_cpu for r in ours]), med([r.server_cpu for r in theirs])
        return (f"{label}: CPU, client + server (user+sys)", f"{a:.2f} + {sa:.2f} s",
                f"{b:.2f} + {sb:.2f} s{mark}", ratio(a + sa, b + sb))

    def rss(label: str, ours: list[Run]) -> tuple:
        mine = med([r.max_rss_kib for r in ours]) * 1024
        return (f"{label}: client peak RSS", human(mine), human(rss_pg), ratio(mine, rss_pg))

    rows = [
        wall("snapshot 1 (fresh repository)", snap1, dump1),
        cpu("snapshot 1", snap1, dump1),
        rss("snapshot 1", snap1),
        wall("snapshot 1 with -j 2 (a table larger than its share is split where the "
             "machine has two cores per part)",
             snap1_j2, dump1),
        cpu("snapshot 1 with -j 2", snap1_j2, dump1),
        rss("snapshot 1 with -j 2", snap1_j2),
        ("snapshot 1: stored bytes", human(s1), human(d1), ratio(s1, d1)),
        wall(f"snapshot 2, unchanged, nothing committed since snapshot 1 (tables taken unread: "
             f"{med(reused2):.0f} of {json.loads(snap1[0].stdout)['tables']})",
             snap2, dump2, " ¹"),
        ("snapshot 2, nothing committed: bytes added", human(med(added2)), human(d1) + " ¹",
         ratio(med(added2), d1)),
        wall("snapshot 2, unchanged, after a commit in another database (each table's rows "
             f"looked at; taken unread: {med(reused2m):.0f})", snap2m, dump2, " ¹"),
        cpu("snapshot 2 after a commit elsewhere", snap2m, dump2, " ¹"),
        ("snapshot 2 after a commit elsewhere: bytes added", human(med(added2m)),
         human(d1) + " ¹", ratio(med(added2m), d1)),
        wall("snapshot 2 after a commit elsewhere, with -j 2", snap2m_j2, dump2, " ¹"),
        cpu("snapshot 2 after a commit elsewhere, with -j 2", snap2m_j2, dump2, " ¹"),
        wall("snapshot 2 with --reread -j 2 (every table read and hashed)", snap2r_j2, dump2,
             " ¹"),
        cpu("snapshot 2 with --reread -j 2", snap2r_j2, dump2, " ¹"),
        wall("snapshot 3 (after churn; taken unread: "
             f"{med([json.loads(r.stdout)['tables_reused'] for r in snap3]):.0f})", snap3, dump3),
        cpu("snapshot 3", snap3, dump3),
        rss("snapshot 3", snap3),
        ("snapshot 3: bytes added", human(a3), human(d3), ratio(a3, d3)),
        ("snapshot 3 added / snapshot 1 stored", f"{100 * a3 / s1:.1f}%", f"{100 * d3 / d1:.1f}%",
         "—"),
        ("stored after 3 snapshots", human(med(repo3)), human(2 * d1 + d3),
         ratio(med(repo3), 2 * d1 + d3)),
    ]
    for label, (r_fp, r_pg) in rest.items():
        rows += [(f"{label}: wall time", secs(r_fp), secs(r_pg),
                  ratio(med([r.seconds for r in r_fp]), med([r.seconds for r in r_pg]))),
                 (f"{label}: client CPU (user+sys)", f"{med([r.cpu_seconds for r in r_fp]):.2f} s",
                  f"{med([r.cpu_seconds for r in r_pg]):.2f} s",
                  ratio(med([r.cpu_seconds for r in r_fp]), med([r.cpu_seconds for r in r_pg]))),
                 (f"{label}: client peak RSS", human(med([r.max_rss_kib for r in r_fp]) * 1024),
                  human(med([r.max_rss_kib for r in r_pg]) * 1024),
                  ratio(med([r.max_rss_kib for r in r_fp]), med([r.max_rss_kib for r in r_pg])))]
        if label in vacuum:
            v_fp, v_pg = vacuum[label]
            rows += [(f"{label}, then VACUUM (FREEZE) of it: wall time", secs(v_fp), secs(v_pg),
                      ratio(med([r.seconds for r in v_fp]), med([r.seconds for r in v_pg]))),
                     (f"{label}, then VACUUM (FREEZE): server CPU",
                      f"{med([r.server_cpu for r in v_fp]):.2f} s",
                      f"{med([r.server_cpu for r in v_pg]):.2f} s",
                      ratio(med([r.server_cpu for r in v_fp]), med([r.server_cpu for r in v_pg])))]
    out = [f"Measured {today()} on {machine(pg)}; {version}. {conditions.text()}",
           "",
           f"Database: `pgbench -i -s {args.scale}` plus factory_pulse in one database "
           f"(built in {sum(setup.values()):.0f} s). Medians of {args.runs} runs (min–max in "
           f"brackets); fpvault runs as the CLI in a subprocess with `-j {args.jobs}`, each run "
           "into its own fresh repository. Stored bytes are the apparent size of the repository "
           "directory (packs, index, manifests, config). The page cache is warm for both tools.",
           "",
           "| part | tables | rows | COPY text | fpvault snapshot 1 stored | pg_dump -Fc | "
           "fpvault / COPY | pg_dump / COPY |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for group in ("pgbench", "factory_pulse"):
        n, r, b = sizes[group]
        st, dp = parts[group]
        out.append(f"| {group} | {n} | {r:,} | {human(b)} | {human(st)} | {human(dp)} | "
                   f"{100 * st / b:.1f}% | {100 * dp / b:.1f}% |")
    out += ["",
            "pgbench's `filler` column is blanks, so pgbench tables compress far better than "
            "real data would: read the factory_pulse line for realistic compression, and the "
            "totals below as dominated by pgbench.",
            "",
            "| measure | fpvault | baseline (pg_dump -Fc / pg_restore) | ratio |",
            "|---|---:|---:|---:|"]
    out += [f"| {m} | {a} | {b} | {c} |" for m, a, b, c in rows]
    out += ["",
            "¹ pg_dump has no incremental mode: the baseline for snapshot 2 is a full dump of "
            "the same (unchanged) database, timed in the same loop as the snapshots 2.",
            "",
            f"Peak RSS at a second size (`pgbench -i -s {args.small_scale}` plus factory_pulse): "
            f"snapshot 1 {human(small[0].max_rss_kib * 1024)} (`-j {args.jobs}`), "
            f"{human(small[1].max_rss_kib * 1024)} (`-j 2`); at scale {args.scale}: "
            f"{human(rss_fp)} and {human(med([r.max_rss_kib for r in snap1_j2]) * 1024)}.",
            "",
            f"Churn before snapshot 3: {CHURN_TEXT}; rows touched: "
            f"{', '.join(f'{c:,}' for c in touched)}. fpvault stored "
            f"{med([d['bytes_added'] for d in deltas3]) / 1024:.0f} KiB for it by its own count "
            "(packs + index).",
            "",
            "Restore: `fpvault restore latest --to` (one transaction) against `pg_restore -d` "
            "(not single-transaction) of the latest `-Fc` dump, each into a new empty database, "
            "without and with `-j 2` on both sides; row counts and sums are checked after each. "
            "`restore -o FILE` against `pg_restore -f FILE` writes the SQL script. After each "
            "restore into a database, `VACUUM (FREEZE)` of it (psql): fpvault loads the tables "
            "it creates frozen (COPY FREEZE; with -j 2, not a table loaded in parts). Peak RSS and "
            "CPU are of the client process tree (`/usr/bin/time -v`: fpvault with its psql "
            "and pg_dump children); server CPU is the PostgreSQL server's over the same "
            "time (its backends' user+sys, from /proc)."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
