"""The backend contract and the chunk store, against models."""

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fpvault import packs
from fpvault.backend import LocalBackend, ObjectMissing
from fpvault.chunkstore import (BlobDamaged, BlobMap, ChunkRef, ChunkStore, Index, decode_list,
                               encode_list)
from fpvault.errors import RepositoryDamaged
from fpvault.packs import BlobEntry

# -- the Backend contract: every implementation must pass these


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    if request.param == "s3":
        from fpvault.s3 import S3Backend
        return S3Backend(request.getfixturevalue("s3_server")())
    return LocalBackend(tmp_path / "objects")


def test_put_get_list_delete(backend):
    backend.put("data/ab/abcd", b"hello")
    backend.put("index/1", b"")
    assert backend.get("data/ab/abcd") == b"hello"
    assert backend.get("data/ab/abcd", 1, 3) == b"ell"
    assert backend.get("index/1") == b""
    assert sorted(backend.list("data/")) == ["data/ab/abcd"]
    assert sorted(backend.list("")) == ["data/ab/abcd", "index/1"]
    assert backend.exists("index/1") and backend.size("data/ab/abcd") == 5
    backend.put("data/ab/abcd", b"world")
    assert backend.get("data/ab/abcd") == b"world"
    backend.delete("data/ab/abcd")
    backend.delete("data/ab/abcd")  # deleting what is gone is not an error
    assert not backend.exists("data/ab/abcd")
    assert list(backend.list("data/")) == []
    assert list(backend.list("nothing/")) == []


def test_listing_with_sizes(backend):
    backend.put("data/ab/abcd", b"hello")
    backend.put("data/cd/cdef", b"")
    backend.put("index/1", b"xy")
    assert sorted(backend.list_sizes("data/")) == [("data/ab/abcd", 5), ("data/cd/cdef", 0)]
    assert list(backend.list_sizes("nothing/")) == []


def test_missing_object_and_short_range_are_damage(backend):
    with pytest.raises(ObjectMissing):
        backend.get("snapshots/nope")
    backend.put("x", b"abc")
    with pytest.raises(RepositoryDamaged):
        backend.get("x", 2, 10)


def test_bad_names_are_refused(backend):
    for name in ("/etc/passwd", "../x", "a/../../b"):
        with pytest.raises(ValueError):
            backend.put(name, b"")


def test_local_files_are_private_and_temp_files_invisible(tmp_path):
    b = LocalBackend(tmp_path / "r")
    b.put("snapshots/x", b"1")
    mode = os.stat(tmp_path / "r" / "snapshots" / "x").st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "r" / "snapshots").st_mode) == 0o700
    (tmp_path / "r" / "snapshots" / "y.tmp-1234").write_bytes(b"partial")
    assert list(b.list("snapshots/")) == ["snapshots/x"]


# -- the chunk store


def test_put_get_dedup_and_persistence(tmp_path):
    backend = LocalBackend(tmp_path)
    store = ChunkStore(backend, Index())
    a = store.put(b"a" * 1000)
    assert store.put(b"a" * 1000) == a
    b = store.put(os.urandom(5000))   # incompressible: stored raw
    store.flush()
    assert store.stats.blobs_added == 2
    fresh = ChunkStore(backend, Index.load(backend))
    assert fresh.get(a) == b"a" * 1000
    assert len(fresh.get(b)) == 5000
    assert fresh.put(b"a" * 1000) == a
    fresh.flush()
    assert fresh.stats.blobs_added == 0 and fresh.stats.bytes_added == 0


def test_flipped_byte_is_detected(tmp_path):
    backend = LocalBackend(tmp_path)
    store = ChunkStore(backend, Index())
    blob = store.put(b"row\n" * 5000)
    store.flush()
    (pack,) = [n for n in backend.list("data/")]
    path = tmp_path / pack
    raw = bytearray(path.read_bytes())
    pack_id, entry = store.index.blobs[blob]
    raw[entry.offset + entry.length // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobDamaged):
        ChunkStore(backend, Index.load(backend)).get(blob)


def test_unknown_blob_is_damage(tmp_path):
    store = ChunkStore(LocalBackend(tmp_path), Index())
    with pytest.raises(BlobDamaged):
        store.get(b"\0" * 32)


def test_pack_trailer_rebuilds_the_index(tmp_path):
    backend = LocalBackend(tmp_path)
    store = ChunkStore(backend, Index())
    ids = [store.put(os.urandom(100) * 10) for _ in range(20)]
    store.flush()
    (pack,) = list(backend.list("data/"))
    entries = packs.read_trailer(backend.get(pack))
    assert {e.id for e in entries} == set(ids)
    with pytest.raises(packs.PackFormatError):
        packs.read_trailer(backend.get(pack)[:-3])


def test_chunk_list_round_trip():
    items = [ChunkRef(bytes([i]) * 32, i * 1000, i % 3 == 0) for i in range(50)]
    assert decode_list(b"x", encode_list(items)) == items
    with pytest.raises(BlobDamaged):
        decode_list(b"x", encode_list(items)[:-1])


class StoreMachine(RuleBasedStateMachine):
    """The store against a dict model: whatever is put and flushed can be read back,
    across reopenings, and nothing else can."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="fpvault-store-")
        self.backend = LocalBackend(self.dir)
        self.store = ChunkStore(self.backend, Index())
        self.model: dict[bytes, bytes] = {}
        self.flushed: dict[bytes, bytes] = {}

    @rule(data=st.binary(max_size=3000), repeat=st.integers(1, 50))
    def put(self, data, repeat):
        data = data * repeat
        blob = self.store.put(data)
        self.model[blob] = data

    @rule()
    def flush(self):
        self.store.flush()
        self.flushed = dict(self.model)

    @rule()
    def reopen(self):
        # Unflushed blobs are lost, as after a crash; flushed ones must survive.
        self.store = ChunkStore(self.backend, Index.load(self.backend))
        self.model = dict(self.flushed)

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(min_value=0))
    def get(self, pick):
        self.store.flush()
        self.flushed = dict(self.model)
        blob = sorted(self.model)[pick % len(self.model)]
        assert self.store.get(blob) == self.model[blob]

    @invariant()
    def index_knows_exactly_what_was_flushed(self):
        assert set(self.store.index.blobs) == set(self.flushed)

    def teardown(self):
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


StoreMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_store_state_machine = StoreMachine.TestCase


def test_runs_group_adjacent_blobs_within_bounds(tmp_path):
    backend = LocalBackend(tmp_path)
    store = ChunkStore(backend, Index())
    blobs = [store.put(os.urandom(50_000)) for _ in range(20)]
    store.flush()
    runs = store.runs(blobs, max_gap=0, max_span=200_000)
    assert [b for run in runs for b in run] == blobs
    assert all(1 <= len(run) <= 4 for run in runs) and len(runs) >= 5
    assert all(store.get_run(run) == [store.get(b) for b in run] for run in runs)
    # Out of order, or not adjacent: runs of one.
    shuffled = blobs[::-1]
    assert all(len(run) == 1 for run in store.runs(shuffled, max_gap=0, max_span=10**9))
    skipping = blobs[::2]
    assert all(len(run) == 1 for run in store.runs(skipping, max_gap=0, max_span=10**9))
    assert max(len(run) for run in store.runs(skipping, max_gap=60_000, max_span=10**9)) > 1


@given(entries=st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 3),
                                  st.integers(0, 2**40), st.integers(0, 2**32 - 1),
                                  st.integers(0, 2**32 - 1), st.integers(0, 3),
                                  st.lists(st.binary(min_size=32, max_size=32), max_size=3),
                                  st.integers(0, 1023), st.sampled_from([b"p" * 32, b"q" * 32])),
                        max_size=30, unique_by=lambda t: t[0]))
def test_the_compact_index_gives_back_what_it_was_given(entries):
    blobs = BlobMap()
    want = {}
    for blob, type_, offset, length, raw, enc, bases, gen, pack in entries:
        e = BlobEntry(blob, type_, offset, length, raw, enc, bases, gen)
        blobs[blob] = (pack, e)
        want[blob] = (pack, e)
    assert len(blobs) == len(want) and set(blobs) == set(want)
    assert {b: blobs[b] for b in want} == want
    assert dict(blobs.items()) == want
    assert sorted(e.id for _, e in blobs.values()) == sorted(want)
    assert blobs.get(b"x" * 32) is None and b"x" * 32 not in blobs


def test_a_blob_stored_whole_is_kept_over_a_delta_copy_in_any_order():
    """A blob stored again whole (its delta's base was lost) and its old delta entry,
    loaded in either order: the whole copy, which needs no other blob, is indexed."""
    blob, base = b"b" * 32, b"a" * 32
    delta = BlobEntry(blob, packs.DATA, 0, 10, 100, packs.DELTA, [base], 1)
    whole = BlobEntry(blob, packs.DATA, 50, 40, 100, packs.ZSTD)
    for order in ([(b"p" * 32, delta), (b"q" * 32, whole)],
                  [(b"q" * 32, whole), (b"p" * 32, delta)]):
        blobs = BlobMap()
        for value in order:
            blobs[blob] = value
        assert blobs[blob] == (b"q" * 32, whole)
        # A pack is named missing, or shorter than the end of a blob indexed in it,
        # only if it holds one: not the pack of the delta copy.
        assert blobs.beyond({b"q" * 32: 90}) == ([], [], 0)
        assert blobs.beyond({b"q" * 32: 89}) == ([], [b"q" * 32], 1)
        assert blobs.beyond({}) == ([b"q" * 32], [], 1)


def test_a_delta_on_a_lost_base_is_not_taken_as_stored(tmp_path):
    store = ChunkStore(LocalBackend(tmp_path), Index())
    base = store.put(os.urandom(5000) * 4)
    store.flush()
    data = store.get(base)[:-100] + b"changed" * 20
    blob = store.put(data, similar=[base])
    store.flush()
    assert store.index.blobs[blob][1].encoding == packs.DELTA and store.stored(blob)
    store.index = Index()             # the base's index entry lost; the delta's kept
    store.index.add_pack(*next((p, [e]) for p, e in [Index.load(store.backend).blobs[blob]]))
    assert blob in store.index and not store.stored(blob)
    assert store.put(data, similar=[base]) == blob    # stored again, whole
    store.flush()
    assert store.index.blobs[blob][1].encoding != packs.DELTA and store.stored(blob)
    assert store.get(blob) == data


def test_threads_opening_a_vault_at_once_share_one_store(tmp_path, monkeypatch):
    """The index and store are made once, whichever thread asks first: two stores
    would each keep blobs pending that the other never writes.  (Loading the index
    is slowed down, as a large or remote one is, so that the threads overlap.)"""
    import threading
    import time
    from fpvault import vault as vault_mod
    from fpvault.vault import Vault

    path = str(tmp_path / "r")
    Vault.create(path)
    real_load = vault_mod.Index.load

    def slow_load(*args, **kwargs):
        time.sleep(0.05)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(vault_mod.Index, "load", slow_load)
    for _ in range(3):
        vault = Vault.open(path)
        start = threading.Barrier(8)
        stores = []

        def get():
            start.wait()
            stores.append(vault.store)

        threads = [threading.Thread(target=get) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({id(s) for s in stores}) == 1
