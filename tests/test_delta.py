"""Chunks stored as deltas against their previous versions: transparent everywhere."""

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blake3 import blake3

from conftest import run
from fpvault.chunker import Chunker, chunk_all
from fpvault import packs
from fpvault.chunkstore import Index
from fpvault.manifest import ChunkerParams
from fpvault.vault import Vault

SMALL = ChunkerParams(avg_size=1024, min_size=256, max_size=4096)


def rows_text(rows: dict[int, str]) -> bytes:
    return "".join(f"{k}\t{v}\n" for k, v in sorted(rows.items())).encode()


def pieces(data: bytes, n: int = 5000):
    return [data[i:i + n] for i in range(0, len(data), n)]


def all_stored(v: Vault, stream) -> bool:
    fresh = Vault.open(v.backend.describe())
    return bool(fresh.store.complete_lists([bytes.fromhex(stream.list)]))


def chain_depth(index: Index, blob: bytes) -> int:
    depth = 0
    while True:
        e = index.blobs[blob][1]
        if e.encoding != packs.DELTA:
            return depth
        depth += 1
        blob = e.bases[0]


@given(seed=st.integers(0, 2**32 - 1),
       steps=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 5), st.integers(0, 5)),
                      min_size=1, max_size=8),
       off_thread=st.booleans())
@settings(max_examples=30, deadline=None)
def test_random_edit_sequences_restore_every_version(tmp_path_factory, seed, steps, off_thread):
    rnd = random.Random(seed)
    vault = Vault.create(str(tmp_path_factory.mktemp("d") / "r"), chunker=SMALL)
    rows = {i: rnd.randbytes(rnd.randint(10, 60)).hex() for i in range(0, 3000, 2)}
    versions, streams, prev = [], [], None
    for updates, inserts, deletes in [(0, 0, 0)] + steps:
        for k in rnd.sample(sorted(rows), min(updates, len(rows))):
            rows[k] = rows[k][:-3] + rnd.randbytes(2).hex()
        for _ in range(inserts):
            rows[rnd.randrange(0, 3000) | 1] = rnd.randbytes(20).hex()
        for k in rnd.sample(sorted(rows), min(deletes, len(rows))):
            del rows[k]
        data = rows_text(rows)
        stream, _ = vault.write_stream([data], prev, deltas_off_thread=off_thread)
        vault.store.flush()
        versions.append(data)
        streams.append(stream)
        prev = stream
    fresh = Vault.open(vault.backend.describe())
    for data, stream in zip(versions, streams):
        assert fresh.read_bytes(stream) == data
    if len(versions) > 1 and any(u for u, _, _ in steps):
        assert any(e.encoding == packs.DELTA for _, e in fresh.index.blobs.values())


def test_deltas_encoded_off_the_reading_thread_are_the_same(tmp_path_factory):
    """Deltas encoded on the compressor threads while the stream is read on: the same
    blobs, deltas and frames as encoded in line, whatever the threads' timing."""
    rnd = random.Random(7)
    rows = {i: rnd.randbytes(rnd.randint(10, 60)).hex() for i in range(0, 20000, 2)}
    changed = dict(rows)
    for k in rnd.sample(sorted(rows), 200):              # 2% updated, scattered
        changed[k] = changed[k][:-4] + rnd.randbytes(2).hex()
    for k in range(20000, 20400):                        # and rows appended: a frame
        changed[k] = rnd.randbytes(30).hex()
    results = []
    for off_thread in (False, True):
        vault = Vault.create(str(tmp_path_factory.mktemp("d") / "r"), chunker=SMALL)
        first, _ = vault.write_stream([rows_text(rows)])
        vault.store.flush()
        second, _ = vault.write_stream([rows_text(changed)[i:i + 5000]
                                        for i in range(0, len(rows_text(changed)), 5000)],
                                       first, deltas_off_thread=off_thread)
        vault.store.flush()
        assert Vault.open(vault.backend.describe()).read_bytes(second) == rows_text(changed)
        blobs = sorted((blob, e.encoding, tuple(e.bases), e.start, e.raw_length)
                       for blob, (_, e) in vault.index.blobs.items())
        results.append((second, vault.store.stats.deltas_added, blobs))
    assert results[0][1] > 100
    assert results[0] == results[1]


@pytest.mark.parametrize("off_thread", [False, True])
def test_a_failed_stream_gives_up_its_claims(tmp_path, off_thread):
    """A stream that fails leaves no blob pending that it will not store: another
    stream in the same process must not list it as stored (chunks whose delta was
    not worth it, and its open frame's)."""
    rnd = random.Random(4)
    rows = {i: rnd.randbytes(30).hex() for i in range(0, 6000, 2)}
    v = Vault.create(str(tmp_path / "r"), chunker=SMALL)
    first, _ = v.write_stream([rows_text(rows)])
    v.store.flush()
    changed = dict(rows)
    for k in sorted(rows)[:1500]:
        changed[k] = rnd.randbytes(30).hex()            # not worth a delta: to the frame
    text = rows_text(changed)

    def failing():
        p = pieces(text)
        yield from p[: len(p) // 3]
        raise RuntimeError("the COPY failed")

    with pytest.raises(RuntimeError):
        v.write_stream(failing(), first, deltas_off_thread=off_thread)
    again, _ = v.write_stream(pieces(text), first, deltas_off_thread=off_thread)
    v.store.flush()
    assert all_stored(v, again)


def test_a_lost_chunk_stored_again_keeps_its_place_in_the_frames(tmp_path_factory):
    """A chunk matched ahead that the index lost is stored again after the chunks
    before it whose deltas were not worth it: the same frames either way."""
    rnd = random.Random(11)
    rows = {i: rnd.randbytes(rnd.randint(10, 60)).hex() for i in range(0, 20000, 2)}
    # Changes that make deltas not worth it (a whole chunk rewritten), then unchanged
    # chunks after them that the index has lost.
    changed = dict(rows)
    keys = sorted(rows)
    for k in keys[3000:3100]:
        changed[k] = rnd.randbytes(len(rows[k]) // 2).hex()
    results = []
    for off_thread in (False, True):
        v = Vault.create(str(tmp_path_factory.mktemp("d") / "r"), chunker=SMALL)
        first, _ = v.write_stream([rows_text(rows)])
        v.store.flush()
        v = Vault.open(v.backend.describe())
        refs = v.store.get_list(bytes.fromhex(first.list))
        # forget (as a lost index file would) the records of old chunks after the churn
        lost = [r.id for r in refs[len(refs) // 2 + 40: len(refs) // 2 + 60]]
        for blob in lost:
            v.index.blobs._records.pop(blob, None)
        v.index.blobs._undecodable = None
        second, _ = v.write_stream(pieces(rows_text(changed)), first,
                                   deltas_off_thread=off_thread)
        v.store.flush()
        assert Vault.open(v.backend.describe()).read_bytes(second) == rows_text(changed)
        blobs = sorted((blob, e.encoding, tuple(e.bases), e.start, e.raw_length)
                       for blob, (_, e) in v.index.blobs.items())
        results.append(blobs)
    assert results[0] == results[1]


def test_long_chains_stay_shallow_and_small(tmp_path):
    vault = Vault.create(str(tmp_path / "r"), chunker=SMALL)
    rnd = random.Random(7)
    rows = {i: rnd.randbytes(30).hex() for i in range(4000)}
    prev, streams, versions, added = None, [], [], []
    for v in range(40):
        for k in rnd.sample(sorted(rows), 40):   # 1% of rows, scattered
            rows[k] = rnd.randbytes(30).hex()
        data = rows_text(rows)
        before = vault.store.stats.bytes_added
        stream, _ = vault.write_stream([data], prev)
        vault.store.flush()
        added.append(vault.store.stats.bytes_added - before)
        streams.append(stream)
        versions.append(data)
        prev = stream
    fresh = Vault.open(vault.backend.describe())
    depths = []
    for data, stream in zip(versions, streams):
        assert fresh.read_bytes(stream) == data
        refs = fresh.store.get_list(bytes.fromhex(stream.list))
        depths.append(max(chain_depth(fresh.index, r.id) for r in refs))
    assert max(depths) <= 6            # skip-deltas: log2(40) + 1
    # Each later version costs a fraction of the first.
    assert sum(added[1:]) / 39 < added[0] * 0.35, added


def snap(pg, repo, db):
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def script(repo, sid):
    r = run("restore", sid, "-r", repo, "-o", "-")
    assert r.code == 0, r.err
    return r.out


def flip_a_byte(repo: str, pack_id: bytes, e: packs.BlobEntry) -> tuple[Path, bytes]:
    """Damage a blob's stored bytes in its pack; return the pack's path and bytes."""
    path = Path(repo) / packs.pack_name(pack_id)
    original = path.read_bytes()
    raw = bytearray(original)
    raw[e.offset + e.length // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    return path, original


def test_deltas_in_snapshots_prune_and_verify(pg, db, repo):
    pg.execute(db, "CREATE TABLE acc (id int PRIMARY KEY, bal int, note text); "
                   "INSERT INTO acc SELECT g, 0, md5(g::text) FROM generate_series(1, 100000) g")
    first = snap(pg, repo, db)
    pg.execute(db, "UPDATE acc SET bal = bal + 1 WHERE id % 100 = 7")
    second = snap(pg, repo, db)
    # 1% of rows scattered over every chunk: deltas keep the increment small.
    assert second["bytes_added"] < first["bytes_added"] * 0.25, (first, second)
    vault = Vault.open(repo)
    assert sum(e.encoding == packs.DELTA for _, e in vault.index.blobs.values()) > 10
    scripts = {s: script(repo, s) for s in (first["id"], second["id"])}

    # Damage a base that only the first snapshot lists: verify names both snapshots.
    snap1 = vault.resolve(first["id"])[1]
    refs1 = vault.store.get_list(bytes.fromhex(snap1.tables[0].data.list))
    first_chunks = {r.id for r in refs1}
    base = next(e.bases[0] for _, e in vault.index.blobs.values()
                if e.encoding == packs.DELTA and e.bases[0] in first_chunks)
    path, original = flip_a_byte(repo, *vault.index.blobs[base])
    r = run("verify", "-r", repo, "--read-data", "--json")
    assert r.code == 3
    assert set(json.loads(r.out)["affected"]) == {first["id"], second["id"]}
    r = run("restore", second["id"], "-r", repo, "-o", "-")
    assert r.code == 3 and "public.acc" in r.err and "delta" in r.err
    path.write_bytes(original)

    # Damage a delta itself (verify checks deltas after the packs, chain by chain):
    # only the second snapshot needs it.
    delta_pack, d = next((p, e) for p, e in vault.index.blobs.values()
                         if e.encoding == packs.DELTA)
    path, original = flip_a_byte(repo, delta_pack, d)
    r = run("verify", "-r", repo, "--read-data", "--json")
    doc = json.loads(r.out)
    assert r.code == 3 and set(doc["affected"]) == {second["id"]}
    assert any(f"chunk {d.id.hex()[:16]} is damaged" in p for p in doc["problems"])
    path.write_bytes(original)

    # The pack of the bases missing, or cut short: verify --read-data still reports
    # (a report, and JSON), naming both snapshots; it used to stop at the first delta.
    base_path = Path(repo) / packs.pack_name(vault.index.blobs[base][0])
    original = base_path.read_bytes()
    for damage in ("missing", "truncated"):
        if damage == "missing":
            base_path.unlink()
        else:
            base_path.write_bytes(original[:len(original) // 3])
        r = run("verify", "-r", repo, "--read-data", "--json")
        doc = json.loads(r.out)
        assert r.code == 3 and not doc["ok"], (damage, r.err)
        assert set(doc["affected"]) == {first["id"], second["id"]}, (damage, doc)
        base_path.write_bytes(original)

    # Forget the snapshot that introduced the bases: prune must keep them.
    assert run("forget", first["id"], "-r", repo, "--prune").code == 0
    assert run("verify", "-r", repo, "--read-data").code == 0
    assert script(repo, second["id"]) == scripts[second["id"]]
    target = pg.createdb()
    assert run("restore", "latest", "-r", repo, "--to", pg.dsn(target)).code == 0
    assert pg.query(target, "SELECT sum(bal), count(*) FROM acc") == [(1000, 100000)]


@given(seed=st.integers(0, 2**32 - 1),
       edits=st.lists(st.tuples(st.sampled_from(["update", "grow", "insert", "delete", "long",
                                                 "append", "truncate"]),
                                st.floats(0, 1)), max_size=6),
       pieces=st.integers(1, 9000))
@settings(max_examples=60, deadline=None)
def test_matching_ahead_cuts_exactly_as_the_chunker(tmp_path_factory, seed, edits, pieces):
    """A stream written against its previous version (chunks taken whole where the
    old ones match) is cut exactly as the chunker alone cuts it."""
    rnd = random.Random(seed)
    rows = [f"{i}\t{rnd.randbytes(rnd.randint(5, 40)).hex()}\n".encode() for i in range(1500)]
    old = b"".join(rows)
    for kind, where in edits:
        rows = rows or [b"0\tonly\n"]
        i = int(where * (len(rows) - 1))
        if kind == "update":      # same length
            rows[i] = rows[i][:-2] + b"z\n"
        elif kind == "grow":
            rows[i] = rows[i][:-1] + b"grown\n"
        elif kind == "insert":
            rows.insert(i, b"new\trow\n" * rnd.randint(1, 30))
        elif kind == "delete":
            del rows[i:i + rnd.randint(1, 50)]
        elif kind == "append":
            rows += [f"{j}\tappended\n".encode() for j in range(rnd.randint(1, 3000))]
        elif kind == "truncate":
            del rows[i + 1:]
        else:                     # a row longer than the slack: cut inside it
            rows[i] = rnd.randbytes(3000).replace(b"\n", b"-") + b"\n"
    new = b"".join(rows)
    vault = Vault.create(str(tmp_path_factory.mktemp("d") / "r"), chunker=SMALL)
    first, _ = vault.write_stream([old])
    vault.store.flush()
    second, rows_seen = vault.write_stream(
        [new[i:i + pieces] for i in range(0, len(new), pieces)], first)
    vault.store.flush()
    expect = chunk_all(new, avg_size=SMALL.avg_size, min_size=SMALL.min_size,
                       max_size=SMALL.max_size)
    refs = vault.store.get_list(bytes.fromhex(second.list))
    assert [r.size for r in refs] == [len(c) for c in expect]
    assert [r.id for r in refs] == [vault.codec.blob_id(c) for c in expect]
    assert rows_seen == new.count(b"\n")
    assert vault.read_bytes(second) == new
    assert second.hash == blake3(new).hexdigest()


def test_an_unchanged_stream_is_matched_not_cut(tmp_path, monkeypatch):
    rnd = random.Random(5)
    rows = [f"{i}\t{rnd.randbytes(20).hex()}\n".encode() for i in range(20000)]
    vault = Vault.create(str(tmp_path / "r"), chunker=SMALL)
    first, _ = vault.write_stream([b"".join(rows)])
    vault.store.flush()
    cuts = []
    real_cut = Chunker.cut
    monkeypatch.setattr(Chunker, "cut", lambda self, final: cuts.append(1) or real_cut(self, final))
    same, _ = vault.write_stream([b"".join(rows)], first)
    assert same.list == first.list and cuts == []
    rows[10000] = b"10000\tchanged\n"          # one row, in the middle
    changed, _ = vault.write_stream([b"".join(rows)], first)
    assert 1 <= len(cuts) <= 4 < changed.chunks
    vault.store.flush()
    assert vault.read_bytes(changed) == b"".join(rows)


def test_read_ahead_of_delta_bases_stays_within_its_budget(tmp_path, monkeypatch):
    """Bases read ahead beyond what waits for decoding would be dropped unread and read
    again: one read-ahead takes at most half the budget, and the rest is read when
    needed, the same bytes either way."""
    from concurrent.futures import ThreadPoolExecutor
    from fpvault import chunkstore

    monkeypatch.setattr(chunkstore, "PREFETCH_BYTES", 12 * 1024 * 1024)
    vault = Vault.create(str(tmp_path / "repo"))
    rnd = random.Random(7)
    rows = {i: rnd.randbytes(20).hex() for i in range(300000)}   # 7 MiB stored
    first, _ = vault.write_stream([rows_text(rows)])
    vault.store.flush()
    for k in range(3, 300000, 100):
        rows[k] = "changed" + rows[k][7:]
    second, _ = vault.write_stream([rows_text(rows)], first)
    vault.store.flush()
    fresh = Vault.open(str(tmp_path / "repo"))
    refs = fresh.store.get_list(bytes.fromhex(second.list))
    bases = [b for ref in refs for b in (fresh.index.blobs.bases(ref.id) or [])]
    assert len(bases) >= 20
    with ThreadPoolExecutor(2) as pool:
        fresh.store.prefetch(bases, pool)
    assert 0 < fresh.store._prefetched_bytes <= chunkstore.PREFETCH_BYTES // 2
    assert fresh.read_bytes(second) == rows_text(rows)
