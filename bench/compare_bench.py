"""fpvault against pg_dump -Fc, restic and borg over a series of snapshots.

Builds pgbench -i -s SCALE plus the factory_pulse sample, then takes SNAPS
snapshots with the standard churn before each (1% of pgbench_accounts and of
app.activity_log updated, scattered, different rows each round; 1000 rows
appended), four ways:

- fpvault snap into its repository;
- pg_dump -Fc into a new file each time (what the backup script keeps);
- pg_dump -Fp piped into `restic backup --stdin` (restic 0.14 from Debian:
  encrypted, compression as that version does);
- pg_dump -Fp piped into `borg create --compression zstd,3` (unencrypted).

It prints the first snapshot's stored bytes and time, the bytes the second
(after churn) added, and the totals after all SNAPS, with fpvault's ratios to
each.  borgbackup and restic are installed from Debian's packages when absent.

    python bench/compare_bench.py --scale 50 --snaps 30
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _pg import (CHURN_TEXT, Cluster, Conditions, build_bench_db, churn, fpvault_bin, human, machine,  # noqa: E402
                 pin_fpvault, today, tree_bytes, write_section)


def ensure_tools() -> None:
    missing = [p for p, tool in (("borgbackup", "borg"), ("restic", "restic")) if not shutil.which(tool)]
    if missing:
        print(f"installing {' '.join(missing)} from Debian's packages")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def sh(cmd: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--snaps", type=int, default=30)
    args = ap.parse_args()
    ensure_tools()
    started = time.monotonic()
    conditions = Conditions()
    # Measure a frozen copy of the sources: the working tree may be edited meanwhile.
    _, version = pin_fpvault()
    fv = fpvault_bin()
    with Cluster() as cluster, tempfile.TemporaryDirectory(prefix="fpvault-bench-") as tmp:
        env = cluster.env()
        env.update(RESTIC_PASSWORD="bench", BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                   BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_BASE_DIR=f"{tmp}/borgbase",
                   RESTIC_CACHE_DIR=f"{tmp}/resticcache")
        build_bench_db(cluster, "bench", args.scale)
        dump = f"{cluster.tool('pg_dump')} -d dbname=bench"
        repos = {"fpvault": f"{tmp}/fpvault", "pg_dump -Fc": f"{tmp}/dumps",
                 "restic": f"{tmp}/restic", "borg": f"{tmp}/borg"}
        os.makedirs(repos["pg_dump -Fc"])
        sh(f"restic init -q -r {repos['restic']}", env)
        sh(f"borg init -e none {repos['borg']}", env)
        sh(f"{fv} -q -r {repos['fpvault']} init", env)
        sizes = {k: [] for k in repos}
        times = {k: [] for k in repos}
        for i in range(args.snaps):
            if i:
                churn(cluster, "bench", i)
            times["fpvault"].append(sh(f"{fv} -q -r {repos['fpvault']} snap -d dbname=bench", env))
            times["pg_dump -Fc"].append(sh(f"{dump} -Fc -f {repos['pg_dump -Fc']}/{i}.dump", env))
            times["restic"].append(sh(f"{dump} -Fp | restic -q -r {repos['restic']} backup --stdin "
                                      f"--stdin-filename bench.sql", env))
            times["borg"].append(sh(f"{dump} -Fp | borg create --compression zstd,3 "
                                    f"{repos['borg']}::s{i} -", env))
            for k, path in repos.items():
                sizes[k].append(tree_bytes(path))
            print(f"snapshot {i + 1}/{args.snaps}: " + ", ".join(
                f"{k} {human(sizes[k][-1])}" for k in repos), flush=True)

        def added(k: str, n: int) -> int:
            return sizes[k][n] - sizes[k][n - 1]

        lines = [
            f"Measured {today()} on {machine(cluster)}; {version}; restic "
            f"{subprocess.run(['restic', 'version'], capture_output=True, text=True).stdout.split()[1]}, "
            f"borg {subprocess.run(['borg', '--version'], capture_output=True, text=True).stdout.split()[1]}. "
            f"{conditions.text()}",
            "",
            f"Database: `pgbench -i -s {args.scale}` plus factory_pulse; {args.snaps} snapshots with "
            f"the standard churn before each ({CHURN_TEXT}). One run; sizes are the repository directories' "
            "apparent sizes, restic's encrypted, borg's unencrypted, fpvault's unencrypted.",
            "",
            "| measure | fpvault | pg_dump -Fc | restic | borg | fpvault / borg |",
            "|---|---:|---:|---:|---:|---:|",
            "| snapshot 1: time | " + " | ".join(f"{times[k][0]:.2f} s" for k in repos)
            + f" | {times['fpvault'][0] / times['borg'][0]:.2f}× |",
            "| snapshot 1: stored | " + " | ".join(human(sizes[k][0]) for k in repos)
            + f" | {sizes['fpvault'][0] / sizes['borg'][0]:.2f}× |",
        ]
        if args.snaps > 1:
            lines += [
                "| snapshot 2 (after churn): time | " + " | ".join(f"{times[k][1]:.2f} s" for k in repos)
                + f" | {times['fpvault'][1] / times['borg'][1]:.2f}× |",
                "| snapshot 2: bytes added | " + " | ".join(human(added(k, 1)) for k in repos)
                + f" | {added('fpvault', 1) / max(added('borg', 1), 1):.2f}× |",
                "| snapshot 2 added / snapshot 1 stored | " + " | ".join(
                    f"{added(k, 1) / sizes[k][0]:.1%}" for k in repos) + " | — |",
                f"| all {args.snaps} snapshots: stored | " + " | ".join(human(sizes[k][-1]) for k in repos)
                + f" | {sizes['fpvault'][-1] / sizes['borg'][-1]:.2f}× |",
                f"| all {args.snaps}: total snap time | " + " | ".join(
                    f"{sum(times[k]):.1f} s" for k in repos)
                + f" | {sum(times['fpvault']) / sum(times['borg']):.2f}× |",
            ]
        lines += ["", f"The whole script took {(time.monotonic() - started) / 60:.1f} min."]
        body = "\n".join(lines)
        print(body)
        write_section("compare_bench", body)


if __name__ == "__main__":
    main()
