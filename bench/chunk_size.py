"""The choice of average chunk size: storage, metadata and churn cost per size.

For each average size (default 16 KiB, 64 KiB, 256 KiB, 1 MiB; min = avg/4,
max = avg*4, as the default 64 KiB is set up) a repository is created through
the API with those chunker parameters, and the same bench database (pgbench
``-s SCALE`` plus the factory_pulse sample, in a throwaway cluster) is
snapshotted into it.  Then the churn of ``_pg.CHURN`` is applied and every
repository takes a second snapshot.  Measured per size:

- snapshot 1: stored bytes, data chunks, wall time (median of ``--runs``, each
  into a fresh repository);
- metadata: what is not compressed chunk data, read from the index: index
  files, chunk-list blobs, pack headers and trailers, snapshot manifests;
- snapshot 2, after the churn: bytes added (per part: pgbench, factory_pulse),
  chunks written and how many of them were stored as deltas, wall time;
- reading the latest snapshot's table data back through the store (decode,
  delta bases, re-hash): what a restore costs on fpvault's side.

It prints a markdown table and writes it into docs/benchmarks.md between
``<!-- chunk_size:start -->`` and ``<!-- chunk_size:end -->``.

    /tmp/venv/bin/python bench/chunk_size.py --scale 10
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import shutil
import statistics
import sys
import time

import zstandard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _pg import (CHURN_TEXT, Cluster, build_bench_db, churn, copy_sizes, group_tables, human,  # noqa: E402
                 Conditions, machine, pin_fpvault, run_in_cluster, today, tree_bytes)

# Measure a frozen copy of the sources: the package may be edited meanwhile.
SRC, VERSION = pin_fpvault()
sys.path.insert(0, SRC)

from fpvault import packs, snapshot  # noqa: E402
from fpvault.chunker import DEFAULT_AVG_SIZE  # noqa: E402
from fpvault.chunkstore import Index  # noqa: E402
from fpvault.manifest import ChunkerParams  # noqa: E402
from fpvault.vault import Vault  # noqa: E402

DB = "bench"
KIB = 1024


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KIB, "M": KIB * KIB}.get(text[-1:], 1)
    return int(text.rstrip("KM")) * mult


def size_name(n: int) -> str:
    return f"{n // (KIB * KIB)} MiB" if n >= KIB * KIB else f"{n // KIB} KiB"


def metadata(path: str) -> dict[str, int]:
    """Stored bytes of a repository by kind, from its files and its index."""
    vault = Vault.open(path)
    index = Index.load(vault.backend, strict=True)
    # The schema (pg_dump archive, DDL text) is stored as streams of DATA chunks too.
    schema_ids = set()
    for snap in vault.snapshots():
        for stream in (snap.schema.archive, snap.schema.pre_data, snap.schema.post_data):
            schema_ids.update(ref.id for ref in vault.store.get_list(bytes.fromhex(stream.list)))
    data = lists = schema = chunks = 0
    in_packs: dict[bytes, int] = {}
    # A frame's chunks share their stored bytes; an empty blob (0 bytes) shares its
    # offset with the blob after it, so both count.
    counted: set[tuple[bytes, int, int]] = set()
    for pack_id, e in index.blobs.values():
        if e.type == packs.DATA and e.id not in schema_ids:
            chunks += 1
        if (pack_id, e.offset, e.length) in counted:
            continue
        counted.add((pack_id, e.offset, e.length))
        in_packs[pack_id] = in_packs.get(pack_id, 0) + e.length
        if e.type == packs.LIST:
            lists += e.length
        elif e.id in schema_ids or e.type != packs.DATA:
            schema += e.length
        else:
            data += e.length
    pack_files = sum(os.path.getsize(os.path.join(path, packs.pack_name(p))) for p in in_packs)
    return {
        "data": data,                                   # table data chunks (and deltas)
        "schema": schema,                               # pg_dump archive and DDL text
        "lists": lists,                                 # chunk lists
        "pack_overhead": pack_files - sum(in_packs.values()),   # magic + trailers
        "index": tree_bytes(os.path.join(path, "index")),
        "manifests": tree_bytes(os.path.join(path, "snapshots")),
        "data_chunks": chunks,
        "total": tree_bytes(path),
    }


def added_by_part(path: str, before: set[bytes]) -> dict[str, int]:
    """Stored bytes of the data chunks the latest snapshot added, per part of the database."""
    vault = Vault.open(path)
    _, snap = vault.resolve("latest")
    out = {"pgbench": 0, "factory_pulse": 0}
    seen = set()
    stored = set()   # (pack, offset): a frame's chunks share their stored bytes
    for t in snap.tables:
        part = "pgbench" if t.schema == "public" else "factory_pulse"
        for ref in vault.store.get_list(bytes.fromhex(t.data.list)):
            if ref.id not in before and ref.id not in seen:
                seen.add(ref.id)
                pack_id, e = vault.index.blobs[ref.id]
                if (pack_id, e.offset) not in stored:
                    stored.add((pack_id, e.offset))
                    out[part] += e.length
    return out


def read_back(path: str) -> float:
    """Seconds to read every table stream of the latest snapshot through the store."""
    vault = Vault.open(path)
    _, snap = vault.resolve("latest")
    t = time.perf_counter()
    for table in snap.tables:
        for _ in vault.read_stream(table.data):
            pass
    return time.perf_counter() - t


# Encodings tried for each chunk snapshot 2 added (see delta_variants).
VARIANTS = ("whole chunk, no delta", "delta, primary base first (as fpvault)",
            "delta, primary base last", "delta, window ≥ dictionary + data", "delta, level 9")


def delta_variants(path: str, level: int) -> tuple[int, dict[str, int], dict[str, float]]:
    """Re-encode every table data chunk the latest snapshot added, several ways.

    The bases are the chunks of the same table in the previous snapshot at the
    same offset and its two neighbours (fpvault's choice, without its drift
    correction), concatenated into a raw-content zstd dictionary with the
    primary base first (as fpvault does) or last (nearest the data, where
    zstd's match finder looks first), or compressed with a window that covers
    dictionary and data, or at level 9.  Each chunk counts the smaller of its
    delta and its whole compressed size, as a store would keep.  Returns the
    number of chunks, bytes per encoding (with "fpvault stored": what the
    repository holds for them), and seconds spent compressing per encoding."""
    vault = Vault.open(path)
    first, second = (vault.load_snapshot(s.id) for s in vault.snapshots()[-2:])
    lists = {}
    for t in first.tables:
        lists[(t.schema, t.name)] = vault.store.get_list(bytes.fromhex(t.data.list))
    old_ids = {r.id for refs in lists.values() for r in refs}
    total = {"fpvault stored": 0, **{v: 0 for v in VARIANTS}}
    secs = {v: 0.0 for v in VARIANTS}
    seen: set[bytes] = set()
    frames_counted: set[tuple[bytes, int]] = set()

    def encode(name: str, data: bytes, dictionary: bytes | None = None, **kw) -> int:
        if dictionary is not None:
            kw["dict_data"] = zstandard.ZstdCompressionDict(
                dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        t = time.perf_counter()
        n = len(zstandard.ZstdCompressor(**kw).compress(data))
        secs[name] += time.perf_counter() - t
        return n

    for t in second.tables:
        old = lists.get((t.schema, t.name), [])
        starts = list(itertools.accumulate((r.size for r in old), initial=0))[:-1]
        offset = 0
        for ref in vault.store.get_list(bytes.fromhex(t.data.list)):
            at, offset = offset, offset + ref.size
            if ref.id in old_ids or ref.id in seen:
                continue
            seen.add(ref.id)
            data = vault.store.get(ref.id)
            pack_id, e = vault.index.blobs[ref.id]
            if (pack_id, e.offset) not in frames_counted:   # a frame's chunks share it
                frames_counted.add((pack_id, e.offset))
                total["fpvault stored"] += e.length
            whole = encode(VARIANTS[0], data, level=level)
            total[VARIANTS[0]] += whole
            if not old:
                for v in VARIANTS[1:]:
                    total[v] += whole
                continue
            i = min(max(bisect.bisect_right(starts, at) - 1, 0), len(old) - 1)
            bases = [vault.store.get(old[j].id) for j in (i, i - 1, i + 1) if 0 <= j < len(old)]
            first_d, last_d = b"".join(bases), b"".join(bases[1:] + bases[:1])
            wlog = max(20, (len(first_d) + len(data)).bit_length() + 1)
            wide = zstandard.ZstdCompressionParameters.from_level(
                level, window_log=wlog, hash_log=wlog - 3, chain_log=wlog - 2)
            for v, n in ((VARIANTS[1], encode(VARIANTS[1], data, first_d, level=level)),
                         (VARIANTS[2], encode(VARIANTS[2], data, last_d, level=level)),
                         (VARIANTS[3], encode(VARIANTS[3], data, first_d, compression_params=wide)),
                         (VARIANTS[4], encode(VARIANTS[4], data, first_d, level=9))):
                total[v] += min(n, whole)
    return len(seen), total, secs


def whole_stream_zstd(pg: Cluster, dbname: str, level: int) -> dict[str, int]:
    """Per part: zstd at ``level`` over each table's whole COPY stream, one frame per table
    (what compression would give without chunking)."""
    out = {}
    with pg.connect(dbname) as conn:
        for group, tables in group_tables(conn).items():
            total = 0
            for qname in tables:
                cobj = zstandard.ZstdCompressor(level=level).compressobj()
                with conn.cursor().copy(f"COPY {qname} TO STDOUT") as copy:
                    for buf in copy:
                        total += len(cobj.compress(bytes(buf)))
                total += len(cobj.flush())
            out[group] = total
    return out


def take(path: str, dsn: str, jobs: int, params: ChunkerParams | None = None):
    vault = Vault.create(path, chunker=params) if params else Vault.open(path)
    t = time.perf_counter()
    result = snapshot.take(vault, dsn, jobs=jobs)
    return time.perf_counter() - t, result, vault.store.stats


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale (default 10)")
    ap.add_argument("--sizes", default="16K,64K,256K,1M", help="average chunk sizes")
    ap.add_argument("--runs", type=int, default=3, help="snapshot-1 timings per size; medians")
    ap.add_argument("--jobs", type=int, default=1, help="snap connections (default 1)")
    ap.add_argument("--no-delta-variants", dest="delta_variants", action="store_false",
                    help="skip re-encoding the changed chunks as other kinds of delta")
    ap.add_argument("--keep", action="store_true", help="keep the cluster and work dir")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    def measured(pg: Cluster, work: str, args, _version: str) -> str:
        os.environ["FPVAULT_PG_BINDIR"] = pg.bindir
        return run(pg, work, sizes, args)

    run_in_cluster("chunk_size", args, measured, prefix="fpvault-bench-chunk-", version=VERSION)


def run(pg: Cluster, work: str, sizes: list[int], args) -> str:
    conditions = Conditions()
    log(f"building the database: pgbench -i -s {args.scale} + factory_pulse")
    setup = build_bench_db(pg, DB, args.scale)
    copy = copy_sizes(pg, DB)
    dsn = pg.dsn(DB)

    first: dict[int, dict] = {}
    for avg in sizes:
        params = ChunkerParams(avg_size=avg, min_size=avg // 4, max_size=avg * 4)
        times = []
        for i in range(args.runs):
            log(f"{size_name(avg)}: snapshot 1, run {i + 1}/{args.runs}")
            path = os.path.join(work, f"{avg}-{i}")
            seconds, _, _ = take(path, dsn, args.jobs, params)
            times.append(seconds)
            if i:
                shutil.rmtree(path)   # the first run's repository goes on to snapshot 2
        first[avg] = {"seconds": statistics.median(times), "runs": times,
                      **metadata(os.path.join(work, f"{avg}-0"))}

    level = Vault.open(os.path.join(work, f"{sizes[0]}-0")).config.compression_level
    whole = whole_stream_zstd(pg, DB, level)

    log("churn")
    touched = churn(pg, DB)
    second: dict[int, dict] = {}
    for avg in sizes:
        log(f"{size_name(avg)}: snapshot 2 (after churn)")
        path = os.path.join(work, f"{avg}-0")
        before_ids = set(Index.load(Vault.open(path).backend).blobs)
        before = tree_bytes(path)
        seconds, _, stats = take(path, dsn, args.jobs)
        parts = added_by_part(path, before_ids)
        second[avg] = {"seconds": seconds, "added": tree_bytes(path) - before,
                       "blobs": stats.blobs_added,
                       "deltas": stats.deltas_added, "raw": stats.raw_bytes_added, **parts,
                       "read": read_back(path), "meta": metadata(path)}
        if args.delta_variants:
            log(f"{size_name(avg)}: delta encodings of the changed chunks")
            second[avg]["variants"] = delta_variants(path, level)

    total_copy = sum(b for _, _, b in copy.values())
    out = [f"Measured {today()} on {machine(pg)}; {VERSION}. {conditions.text()}",
           "",
           f"Database: `pgbench -i -s {args.scale}` ({human(copy['pgbench'][2])} of COPY text, "
           f"{copy['pgbench'][1]:,} rows) plus factory_pulse ({human(copy['factory_pulse'][2])}, "
           f"{copy['factory_pulse'][1]:,} rows), built in {sum(setup.values()):.0f} s. "
           f"fpvault through its API (`Vault.create(path, chunker=ChunkerParams(...))`, "
           f"`snapshot.take(vault, conninfo, jobs={args.jobs})`), min = avg/4, max = avg×4; "
           f"the default is {size_name(DEFAULT_AVG_SIZE)}. Snapshot 1 times are medians of "
           f"{args.runs} runs into fresh repositories; the rest is one run.",
           "",
           f"Churn between the snapshots: {CHURN_TEXT}; rows touched: "
           f"{', '.join(f'{c:,}' for c in touched)}.",
           "",
           "| avg chunk | snap 1 stored | data chunks | avg stored chunk | metadata | "
           "metadata / stored | snap 1 time | snap 2 added | of which pgbench / factory_pulse / "
           "metadata | chunks rewritten (deltas) | snap 2 added / snap 1 | snap 2 time | "
           "read back |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for avg in sizes:
        f, s = first[avg], second[avg]
        meta = f["lists"] + f["pack_overhead"] + f["index"] + f["manifests"]
        m2 = s["meta"]
        meta_added = m2["lists"] + m2["pack_overhead"] + m2["index"] + m2["manifests"] - meta
        out.append(
            f"| {size_name(avg)} | {human(f['total'])} | {f['data_chunks']:,} | "
            f"{human(f['data'] / max(f['data_chunks'], 1))} | {human(meta)} | "
            f"{100 * meta / f['total']:.2f}% | {f['seconds']:.2f} s | {human(s['added'])} | "
            f"{human(s['pgbench'])} / {human(s['factory_pulse'])} / {human(meta_added)} | "
            f"{s['blobs']:,} ({s['deltas']:,}) | {100 * s['added'] / f['total']:.1f}% | "
            f"{s['seconds']:.2f} s | {s['read']:.2f} s |")
    out += ["",
            "Metadata is everything in the repository after snapshot 1 that is not a stored "
            "chunk or schema blob, measured exactly: chunk-list blobs (36 "
            "bytes per chunk per "
            "table, stored compressed), pack headers and trailers (which repeat the index "
            "entries), the `index/` files and the snapshot manifest. \"Chunks rewritten\" counts "
            "every blob snapshot 2 wrote (data chunks, chunk lists, schema blobs), and in "
            "brackets how many were stored as zstd deltas against the chunk at the same place in "
            "snapshot 1; \"of which\" splits the bytes added into new table data chunks of each "
            "part and new metadata (as defined above). \"Read back\" decodes and re-hashes every "
            "table "
            "stream of snapshot 2 through the store, in-process (restore's share of the work "
            "without PostgreSQL).",
            "",
            "| avg chunk | table data stored | schema | chunk lists "
            "| pack headers+trailers | index files | manifest |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for avg in sizes:
        f = first[avg]
        out.append(f"| {size_name(avg)} | {human(f['data'])} | {human(f['schema'])} | "
                   f"{human(f['lists'])} | {human(f['pack_overhead'])} | {human(f['index'])} | "
                   f"{human(f['manifests'])} |")
    out.append(f"\nCOPY text in total: {human(total_copy)}. For reference, zstd level {level} "
               "over each table's whole COPY stream (one frame per table, no chunking) gives "
               f"{human(sum(whole.values()))}: {human(whole['pgbench'])} for pgbench, "
               f"{human(whole['factory_pulse'])} for factory_pulse.")
    if args.delta_variants:
        out += ["",
                "How the chunks snapshot 2 added could be stored: each re-encoded against the "
                "chunks at the same offset (±1) of the same table in snapshot 1, the smaller of "
                "delta and whole chunk counted, compression time in brackets "
                "(`delta_variants` in bench/chunk_size.py). \"fpvault stored\" is what the "
                f"repository holds for those chunks; all at zstd level {level} unless named.",
                "",
                "| avg chunk | changed chunks | fpvault stored | "
                + " | ".join(VARIANTS) + " |",
                "|---|---:|---:|" + "---:|" * len(VARIANTS)]
        for avg in sizes:
            n, total, secs = second[avg]["variants"]
            out.append(f"| {size_name(avg)} | {n:,} | {human(total['fpvault stored'])} | "
                       + " | ".join(f"{human(total[v])} ({secs[v]:.2f} s)" for v in VARIANTS)
                       + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
