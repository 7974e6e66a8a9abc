"""New chunks of a stream are compressed together in frames: transparent everywhere."""

import json
import random
from collections import Counter

import pytest

from conftest import run
from fpvault import chunkstore, gc, packs
from fpvault.chunkstore import BlobDamaged, ChunkStore
from fpvault.manifest import ChunkerParams
from fpvault.vault import Vault

SMALL = ChunkerParams(avg_size=1024, min_size=256, max_size=4096)
FRAME = 16 * 1024


@pytest.fixture
def small_frames(monkeypatch):
    monkeypatch.setattr(chunkstore, "FRAME_TARGET", FRAME)


def app_rows(n: int, seed: int = 1) -> bytes:
    """Rows whose values recur across the table but rarely within a few rows."""
    rnd = random.Random(seed)
    users = [f"{rnd.randbytes(6).hex()}@example.org" for _ in range(6000)]
    paths = [f"/api/v1/{w}/{rnd.randbytes(5).hex()}" for w in ("orders", "items", "carts")
             for _ in range(2000)]
    return "".join(f'{i}\t{rnd.choice(users)}\t{{"path": "{rnd.choice(paths)}", '
                   f'"status": {rnd.choice([200, 201, 404])}}}\n' for i in range(n)).encode()


def frames_of(vault: Vault) -> dict[tuple[bytes, int], list[packs.BlobEntry]]:
    out: dict[tuple[bytes, int], list[packs.BlobEntry]] = {}
    for pack_id, e in vault.index.blobs.values():
        if e.encoding == packs.FRAME:
            out.setdefault((pack_id, e.offset), []).append(e)
    return out


def test_a_stream_is_stored_in_frames_and_each_is_decoded_once(tmp_path, small_frames,
                                                              monkeypatch):
    vault = Vault.create(str(tmp_path / "r"), chunker=SMALL)
    data = app_rows(5000)
    stream, _ = vault.write_stream([data[i:i + 7777] for i in range(0, len(data), 7777)])
    vault.store.flush()

    fresh = Vault.open(str(tmp_path / "r"))
    frames = frames_of(fresh)
    assert len(frames) >= len(data) // FRAME - 1
    for members in frames.values():
        members.sort(key=lambda e: e.start)
        assert members[0].start == 0 and len({e.length for e in members}) == 1
        assert all(a.start + a.raw_length == b.start for a, b in zip(members, members[1:]))
    # Frames fill up to the target; only the one with the stream's end is short.
    assert sum(sum(e.raw_length for e in m) < FRAME for m in frames.values()) <= 1
    opened = Counter()
    real_open = ChunkStore._open

    def counting_open(self, e, stored):
        opened[e.encoding] += 1
        return real_open(self, e, stored)

    monkeypatch.setattr(ChunkStore, "_open", counting_open)
    assert fresh.read_bytes(stream) == data
    assert opened[packs.FRAME] == len(frames)


def test_frames_keep_what_recurs_across_a_table(tmp_path):
    """The point of frames: chunks compressed one by one pay again in every chunk for
    what recurs across the table."""
    data = app_rows(40000)
    sizes = {}
    for target in (1, chunkstore.FRAME_TARGET):   # 1: every chunk alone
        chunkstore.FRAME_TARGET, saved = target, chunkstore.FRAME_TARGET
        try:
            vault = Vault.create(str(tmp_path / f"r{target}"))
            stream, _ = vault.write_stream([data])
            vault.store.flush()
        finally:
            chunkstore.FRAME_TARGET = saved
        sizes[target] = vault.store.stats.bytes_added
        assert Vault.open(str(tmp_path / f"r{target}")).read_bytes(stream) == data
    assert sizes[chunkstore.FRAME_TARGET] < 0.85 * sizes[1], sizes


def test_runs_read_a_frame_once(tmp_path, small_frames):
    vault = Vault.create(str(tmp_path / "r"), chunker=SMALL)
    data = app_rows(3000)
    stream, _ = vault.write_stream([data])
    vault.store.flush()
    store = Vault.open(str(tmp_path / "r")).store
    refs = store.get_list(bytes.fromhex(stream.list))
    blobs = [r.id for r in refs]
    runs = store.runs(blobs, max_gap=0, max_span=FRAME * 2)
    assert [b for r in runs for b in r] == blobs
    assert len(runs) <= len(frames_of(Vault.open(str(tmp_path / "r")))) + 1
    assert b"".join(c for r in runs for c in store.get_run(r)) == data


@pytest.mark.parametrize("where", ["header", "middle"])
def test_damage_in_a_frame_is_caught_chunk_by_chunk(tmp_path, small_frames, where):
    """A frame's chunks are each checked against their own hash: damage in its header
    loses the whole frame, damage in its middle the chunks whose bytes it hit, and
    nothing else is affected."""
    path = str(tmp_path / "r")
    vault = Vault.create(path, chunker=SMALL)
    data = app_rows(3000)
    stream, _ = vault.write_stream([data])
    vault.store.flush()
    (pack_id, offset), members = sorted(frames_of(vault).items())[1]
    pack = tmp_path / "r" / packs.pack_name(pack_id)
    raw = bytearray(pack.read_bytes())
    raw[offset + (1 if where == "header" else members[0].length // 2)] ^= 0x40
    pack.write_bytes(bytes(raw))

    fresh = Vault.open(path)
    stored = bytes(raw[offset:offset + members[0].length])
    judged = {e.id: exc for e, exc in fresh.store.decode_stored(members, stored)}
    damaged = {blob for blob, exc in judged.items() if exc is not None}
    assert damaged == set(judged) if where == "header" else damaged
    for e in members:
        if e.id in damaged:
            with pytest.raises(BlobDamaged):
                fresh.store.get(e.id)
    by_id = dict(zip((r.id for r in fresh.store.get_list(bytes.fromhex(stream.list))),
                     vault.chunker().feed(data) + vault.chunker().finish()))
    for blob, chunk in by_id.items():
        if blob not in damaged:
            assert fresh.store.get(blob) == chunk
    r = run("verify", "-r", path, "--read-data", "--json")
    assert r.code == 3 and json.loads(r.out)["blobs_checked"] == len(fresh.index)


def snap(repo, dsn):
    r = run("snap", "-r", repo, "-d", dsn, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def to_repack(vault: Vault, pack_id: bytes) -> bool:
    """Whether prune will repack the pack: some of it live, garbage over the threshold."""
    live = gc.live_blobs(vault, vault.snapshots())
    stored: dict[tuple[int, int], list[bytes]] = {}
    for p, e in vault.index.blobs.values():
        if p == pack_id:
            stored.setdefault((e.offset, e.length), []).append(e.id)
    total = sum(length for _, length in stored)
    kept = sum(length for (_, length), ids in stored.items() if any(b in live for b in ids))
    return 0 < kept and (total - kept) / total >= gc.REPACK_THRESHOLD


def test_prune_keeps_a_frame_while_any_of_its_chunks_is_live(pg, db, tmp_path, small_frames):
    repo = str(tmp_path / "r")
    Vault.create(repo, chunker=SMALL)
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    first = snap(repo, pg.dsn(db))
    # The second half is replaced by unrelated rows: its chunks (and the frames that
    # hold only them) are needed by the first snapshot alone.
    pg.execute(db, "DELETE FROM t WHERE id > 10000; "
                   "INSERT INTO t SELECT g, md5((g * 7)::text) || 'x' FROM "
                   "generate_series(30001, 40000) g")
    second = snap(repo, pg.dsn(db))
    before = frames_of(Vault.open(repo))
    assert run("forget", first["id"], "-r", repo).code == 0
    # A pack to repack that does not match its hash: prune copies nothing, deletes nothing.
    # (Which pack holds what depends on which frame thread finished first: choose one
    # that prune will repack, partly live and garbage over the threshold.)
    (pack_id, offset), members = next((where, members) for where, members in before.items()
                                      if to_repack(Vault.open(repo), where[0]))
    pack = tmp_path / "r" / packs.pack_name(pack_id)
    original = pack.read_bytes()
    damaged = bytearray(original)
    damaged[offset + members[0].length // 2] ^= 0x01
    pack.write_bytes(bytes(damaged))
    files = sorted(p.name for p in (tmp_path / "r" / "data").rglob("*"))
    r = run("prune", "-r", repo)
    assert r.code == 3 and "does not match its hash" in r.err, r.err
    assert sorted(p.name for p in (tmp_path / "r" / "data").rglob("*")) == files
    pack.write_bytes(original)
    r = run("prune", "-r", repo, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["packs_deleted"] + json.loads(r.out)["packs_repacked"] >= 1
    after = Vault.open(repo)
    live = gc.live_blobs(after, after.snapshots())   # tables, schema streams, delta bases
    # Every frame that survived holds a live chunk, with all its chunks.
    for members in frames_of(after).values():
        assert any(e.id in live for e in members)
    assert sum(map(len, frames_of(after).values())) < sum(map(len, before.values()))
    assert run("verify", "-r", repo, "--read-data").code == 0
    target = pg.createdb()
    assert run("restore", second["id"], "-r", repo, "--to", pg.dsn(target)).code == 0
    q = "SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t"
    assert pg.query(target, q) == pg.query(db, q)
