"""verify and repair on S3 with a network's latency: how much of the round trips they overlap.

Builds a small database (one table of --rows rows), takes --snaps snapshots
into an S3 repository (moto's server on 127.0.0.1, behind tests/s3faults.py's
proxy), changing 1/40 of the rows before each, so the repository holds many
packs and chunk lists.  Then times ``fpvault verify``, ``fpvault verify
--read-data`` and ``fpvault repair index`` (medians of --runs) without and with the proxy adding
--latency-ms to every request, and counts their requests: the ratio is what
the latency costs, against requests x latency, what it would cost a command
that waits for each answer before asking the next.  It prints a
table and writes it into docs/benchmarks.md (``verify_bench``).

    python bench/verify_bench.py --snaps 40 --latency-ms 20 --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))   # the S3 proxy of the tests

from _pg import (Cluster, Conditions, fpvault_bin, machine, moto_server, pin_fpvault,  # noqa: E402
                 s3_client, timed, today, write_section)
from s3faults import FaultProxy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snaps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    started = time.monotonic()
    conditions = Conditions()
    _, version = pin_fpvault()
    server, port = moto_server()
    proxy = FaultProxy(port)
    fv = fpvault_bin()
    try:
        with Cluster() as cluster, tempfile.TemporaryDirectory(prefix="fpvault-bench-") as tmp:
            cluster.createdb("small")
            cluster.execute("small", "CREATE TABLE t (id int PRIMARY KEY, v text); "
                                     f"INSERT INTO t SELECT g, md5(g::text) "
                                     f"FROM generate_series(1, {args.rows}) g")
            s3_client(port).create_bucket(Bucket="verify-bench")
            env = cluster.env()
            env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                       AWS_DEFAULT_REGION="us-east-1",
                       FPVAULT_S3_ENDPOINT=f"http://127.0.0.1:{proxy.port}",
                       XDG_CACHE_HOME=str(Path(tmp) / "cache"))
            repo = "s3://verify-bench/repo"
            timed([fv, "-r", repo, "init"], env=env, rss=False)
            for i in range(args.snaps):
                cluster.execute("small", f"UPDATE t SET v = md5(v) WHERE id % 40 = {i % 40}")
                timed([fv, "-r", repo, "snap", "-q", "-d", "dbname=small"], env=env, rss=False)
            rows = []
            # repair last: it rewrites the index as one file (the same every time).
            for label, command in (("verify", ["verify", "-q"]),
                                   ("verify --read-data", ["verify", "-q", "--read-data"]),
                                   ("repair index", ["repair", "index"])):
                measured = {}
                for delay in (0.0, args.latency_ms / 1000):
                    proxy.delay = delay
                    seconds, requests, rss = [], [], []
                    for _ in range(args.runs):
                        before = proxy.requests
                        r = timed([fv, "-r", repo, *command], env=env)
                        seconds.append(r.seconds)
                        requests.append(proxy.requests - before)
                        rss.append((r.max_rss_kib or 0) / 1024)
                    measured[delay] = (statistics.median(seconds), statistics.median(requests),
                                       max(rss))
                (base, _, _), (wall, n, peak) = measured[0.0], measured[proxy.delay]
                rows.append(f"| `{label}` | {n:.0f} | {n * proxy.delay:.2f} s | {base:.2f} s | "
                            f"{wall:.2f} s | {wall / base:.2f}× | {peak:.0f} MiB |")
            body = "\n".join([
                f"Measured {today()} on {machine(cluster)}; {version}. {conditions.text()}",
                "",
                f"An S3 repository (moto's server on 127.0.0.1, behind a proxy that adds "
                f"{args.latency_ms:g} ms to every request) holding {args.snaps} snapshots of a "
                f"table of {args.rows:,} rows, 1/40 of them changed before each. Medians of "
                f"{args.runs} runs, with a warm local cache of manifests and index files. The "
                "baseline is the same command without the added latency, in the same run; "
                "requests × latency is what the latency alone would cost one request after "
                "another.",
                "",
                f"| command | requests | requests × latency | without latency | with "
                f"{args.latency_ms:g} ms | ratio | peak RSS |",
                "|---|---:|---:|---:|---:|---:|---:|",
                *rows,
                "",
                f"The whole script took {(time.monotonic() - started) / 60:.1f} min.",
            ])
            print(body)
            if not args.no_doc:
                write_section("verify_bench", body)
    finally:
        proxy.close()
        server.stop()


if __name__ == "__main__":
    main()
