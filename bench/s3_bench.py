"""Snap and restore on S3 (a loopback moto server) next to a local directory,
encrypted and not; and the CPU cost of encryption.

Builds pgbench -i -s SCALE plus the factory_pulse sample, then for each of
local / S3 x plain / encrypted: a first snapshot into a fresh repository, a
second after the standard churn, and a restore of the latest into an empty
database (medians of --runs).  The S3 server is moto's server mode on
127.0.0.1: it measures fpvault's request pattern and client work, not a real
network or a real object store (moto is a Python server and slower than S3
at large objects).  Encryption cost is measured in-process on 64 KiB
blobs: ChaCha20-Poly1305 seal and open, keyed and plain BLAKE3.

    python bench/s3_bench.py --scale 5 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _pg import (Cluster, Conditions, build_bench_db, churn, fpvault_bin, human, machine,  # noqa: E402
                 moto_server, pin_fpvault, s3_client, timed, today, write_section)

from fpvault.crypto import Crypto, Plain, new_master  # noqa: E402

PASSWORD = "bench password"


def crypto_rates() -> list[tuple[str, float]]:
    data = os.urandom(64 * 1024)
    n = 3000
    c, p = Crypto(new_master()), Plain()
    out = []
    for label, fn in (("ChaCha20-Poly1305 seal", lambda: c.seal(data)),
                      ("ChaCha20-Poly1305 open", None),
                      ("BLAKE3 keyed (encrypted ids)", lambda: c.blob_id(data)),
                      ("BLAKE3 plain (unencrypted ids)", lambda: p.blob_id(data))):
        if fn is None:
            sealed = c.seal(data)
            fn = lambda: c.open(sealed, "bench")  # noqa: E731
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((label, n * len(data) / (time.perf_counter() - t) / 2**20))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    started = time.monotonic()
    conditions = Conditions()
    # Measure a frozen copy of the sources: the working tree may be edited meanwhile.
    _, version = pin_fpvault()
    server, port = moto_server()
    fv = fpvault_bin()
    results = {}
    try:
        with Cluster() as cluster, tempfile.TemporaryDirectory(prefix="fpvault-bench-") as tmp:
            build_bench_db(cluster, "bench", args.scale)
            cluster.execute("bench", "CREATE DATABASE scratch_template TEMPLATE template0")
            s3 = s3_client(port)
            base_env = cluster.env()
            base_env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                            AWS_DEFAULT_REGION="us-east-1",
                            FPVAULT_S3_ENDPOINT=f"http://127.0.0.1:{port}",
                            XDG_CACHE_HOME=str(Path(tmp) / "cache"), FPVAULT_PASSWORD=PASSWORD)
            counter = 0
            for where in ("local", "s3"):
                for enc in (False, True):
                    first, second, restore = [], [], []
                    for _ in range(args.runs):
                        counter += 1
                        if where == "s3":
                            bucket = f"bench-{counter}"
                            s3.create_bucket(Bucket=bucket)
                            repo = f"s3://{bucket}/repo"
                        else:
                            repo = str(Path(tmp) / f"repo-{counter}")
                        timed([fv, "-r", repo, "init", *(["--encrypt"] if enc else [])], env=base_env)
                        first.append(timed([fv, "-r", repo, "snap", "-d", "dbname=bench", "--json"],
                                           env=base_env))
                        churn(cluster, "bench")
                        second.append(timed([fv, "-r", repo, "snap", "-d", "dbname=bench", "--json"],
                                            env=base_env))
                        target = f"restore_{counter}"
                        cluster.createdb(target)
                        restore.append(timed([fv, "-r", repo, "restore", "latest", "--to",
                                              f"dbname={target}"], env=base_env))
                        cluster.dropdb(target)
                    med = lambda runs: statistics.median(r.seconds for r in runs)  # noqa: E731
                    added = statistics.median(json.loads(r.stdout)["bytes_added"] for r in second)
                    results[(where, enc)] = (med(first), med(second), med(restore), added,
                                             max((r.max_rss_kib or 0) for r in first) / 1024)
            rates = crypto_rates()
            lines = [
                f"Measured {today()} on {machine(cluster)}; {version}. {conditions.text()}",
                "",
                f"Database: `pgbench -i -s {args.scale}` plus factory_pulse. S3 is moto's server "
                "mode on 127.0.0.1 (a Python server: it shows fpvault's request pattern and client "
                "work, not a real network). The churn before snapshot 2 is the standard one. "
                f"Medians of {args.runs} runs, each into a fresh repository (bucket).",
                "",
                "| backend | encrypted | snapshot 1 | snapshot 2 (after churn) | snapshot 2 added | "
                "restore --to | snap peak RSS |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            for (where, enc), (f1, f2, rs, added, rss) in results.items():
                lines.append(f"| {where} | {'yes' if enc else 'no'} | {f1:.2f} s | {f2:.2f} s | "
                             f"{human(added)} | {rs:.2f} s | {rss:.0f} MiB |")
            lines += ["", "CPU cost of encryption, one core, 64 KiB blobs:", "",
                      "| operation | MB/s |", "|---|---:|"]
            lines += [f"| {label} | {rate:,.0f} |" for label, rate in rates]
            lines += ["", f"The whole script took {(time.monotonic() - started) / 60:.1f} min."]
            body = "\n".join(lines)
            print(body)
            write_section("s3_bench", body)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
