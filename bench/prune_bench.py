"""Prune on a repository of 100 snapshots: time, peak memory, and the repack threshold.

Builds pgbench -i -s SCALE plus the factory_pulse sample, takes SNAPS
snapshots with the standard churn (1% of pgbench_accounts and of
app.activity_log updated, 1000 rows appended) before each, then:

- `forget --keep-last KEEP` and `prune` as CLI processes: wall time, peak RSS;
- on copies of the repository as it was before the prune, `prune` with
  several repack thresholds: time, packs rewritten, bytes left; this is the
  measurement behind fpvault.gc.REPACK_THRESHOLD.

    python bench/prune_bench.py --scale 5 --snaps 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _pg import Cluster, Conditions, build_bench_db, churn, fpvault_bin, human, machine, timed, today, tree_bytes, write_section  # noqa: E402

from fpvault import gc  # noqa: E402
from fpvault.vault import Vault  # noqa: E402

THRESHOLDS = (0.05, 0.10, 0.25, 0.50, 1.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--snaps", type=int, default=100)
    ap.add_argument("--keep", type=int, default=10, help="snapshots kept by forget --keep-last")
    args = ap.parse_args()
    started = time.monotonic()
    conditions = Conditions()
    fv = fpvault_bin()
    with Cluster() as cluster, tempfile.TemporaryDirectory(prefix="fpvault-bench-") as tmp:
        env = cluster.env()
        build_bench_db(cluster, "bench", args.scale)
        repo = str(Path(tmp) / "repo")
        timed([fv, "-r", repo, "init"], env=env, rss=False)
        snap_times = []
        for i in range(args.snaps):
            if i:
                churn(cluster, "bench", i)
            run = timed([fv, "-r", repo, "snap", "-d", "dbname=bench", "--json"], env=env, rss=False)
            snap_times.append(run.seconds)
        stats_before = json.loads(timed([fv, "-r", repo, "stats", "--json"], env=env).stdout)
        forget = timed([fv, "-r", repo, "forget", "--keep-last", str(args.keep), "--json"], env=env)
        removed = sum(len(g["remove"]) for g in json.loads(forget.stdout)["groups"])

        copies = {}
        for t in THRESHOLDS:
            copies[t] = str(Path(tmp) / f"copy-{t}")
            shutil.copytree(repo, copies[t])
        prune = timed([fv, "-r", repo, "prune", "--json"], env=env)
        pruned = json.loads(prune.stdout)
        verify = timed([fv, "-r", repo, "verify", "--read-data"], env=env)
        stats_after = json.loads(timed([fv, "-r", repo, "stats", "--json"], env=env).stdout)

        rows = []
        for t in THRESHOLDS:
            vault = Vault.open(copies[t])
            t0 = time.perf_counter()
            st = gc.prune(vault, threshold=t)
            rows.append((t, time.perf_counter() - t0, st, tree_bytes(copies[t])))

        lines = [
            f"Measured {today()} on {machine(cluster)}. {conditions.text()}",
            "",
            f"Repository: {args.snaps} snapshots of `pgbench -i -s {args.scale}` plus factory_pulse, "
            f"with the standard churn before each; {human(stats_before['logical_bytes'])} of "
            f"snapshots stored in {human(stats_before['stored_bytes'])} "
            f"({stats_before['packs']} packs, {stats_before['blobs']:,} blobs, "
            f"{stats_before['index_files']} index files). Snap took "
            f"{sorted(snap_times)[len(snap_times) // 2]:.2f} s (median). Then `forget --keep-last "
            f"{args.keep}` removed {removed} snapshots.",
            "",
            "| measure | result |",
            "|---|---:|",
            f"| `fpvault prune` wall time | {prune.seconds:.2f} s |",
            f"| `fpvault prune` peak RSS | {(prune.max_rss_kib or 0) / 1024:.0f} MiB |",
            f"| packs deleted / repacked / written | {pruned['packs_deleted']} / "
            f"{pruned['packs_repacked']} / {pruned['packs_written']} |",
            f"| pack bytes before → after | {human(pruned['bytes_before'])} → "
            f"{human(pruned['bytes_after'])} |",
            f"| repository after prune | {human(stats_after['stored_bytes'])}, "
            f"{stats_after['snapshots']} snapshots |",
            f"| `verify --read-data` after prune | {verify.seconds:.2f} s, no problems |",
            "",
            "Repack threshold (share of a pack's bytes that are garbage before its live blobs "
            "are rewritten), each on a copy of the same repository:",
            "",
            "| threshold | prune time | packs repacked | packs written | repository after |",
            "|---:|---:|---:|---:|---:|",
        ]
        for t, secs, st, size in rows:
            label = "never" if t > 1 else f"{t:.0%}"
            lines.append(f"| {label} | {secs:.2f} s | {st.packs_repacked} | {st.packs_written} | "
                         f"{human(size)} |")
        lines += ["", f"The whole script took {(time.monotonic() - started) / 60:.1f} min."]
        body = "\n".join(lines)
        print(body)
        write_section("prune_bench", body)


if __name__ == "__main__":
    main()
