"""Properties of the content-defined, row-aligned chunker."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fpvault.chunker import Chunker, chunk_all

# Small parameters so that hypothesis-sized inputs span many chunks.
P = dict(avg_size=256, min_size=64, max_size=1024)


row_text = st.lists(st.binary(min_size=0, max_size=300).map(lambda b: b.replace(b"\n", b"x") + b"\n"),
                    max_size=80).map(b"".join)
blobs = st.one_of(st.binary(max_size=20_000), row_text)


@given(data=blobs, cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=10))
@settings(max_examples=200, deadline=None)
def test_chunks_concatenate_to_input_however_it_is_fed(data, cuts):
    whole = chunk_all(data, **P)
    assert b"".join(whole) == data
    chunker = Chunker(**P)
    pieces, prev = [], 0
    for c in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
        pieces += chunker.feed(data[prev:c])
        prev = c
    pieces += chunker.finish()
    assert pieces == whole


@given(data=blobs)
@settings(max_examples=200, deadline=None)
def test_chunk_sizes_within_bounds(data):
    chunks = chunk_all(data, **P)
    assert all(0 < len(c) <= P["max_size"] * 2 for c in chunks)
    assert all(len(c) >= P["min_size"] for c in chunks[:-1])


@given(data=row_text)
@settings(max_examples=200, deadline=None)
def test_chunks_end_at_row_ends_when_rows_are_short(data):
    # Rows here are at most 301 bytes, less than the slack: every chunk is whole rows.
    for c in chunk_all(data, **P):
        assert c.endswith(b"\n")


@given(seed=st.integers(0, 2**32 - 1), where=st.floats(0.6, 0.95))
@settings(max_examples=50, deadline=None)
def test_boundaries_survive_an_edit_far_away(seed, where):
    rnd = random.Random(seed)
    lines = [b"%d\t%s\n" % (i, rnd.randbytes(rnd.randint(5, 60)).hex().encode())
             for i in range(6000)]
    before = b"".join(lines)
    i = int(len(lines) * where)
    lines[i] = b"%d\tchanged\n" % i
    after = b"".join(lines)
    a, b = chunk_all(before, **P), chunk_all(after, **P)
    # Everything well before the edit is cut identically.
    edit_at = sum(len(x) for x in lines[:i])
    prefix = []
    for c in a:
        if sum(map(len, prefix)) + len(c) >= edit_at - 4 * P["max_size"]:
            break
        prefix.append(c)
    assert b[:len(prefix)] == prefix
    # And the cuts resynchronise after the edit: a bounded number of chunks differ,
    # however long the rest.  (How many is geometric: in 1500 random cases 1 for
    # 58%, at most 14; a share of the tail, as this test once asked, fails when the
    # edit is near the end.)  The tail is longer than that, so a chunker that never
    # resynchronised would fail this.
    assert len(a) - len(prefix) > 40
    assert len(set(a) - set(b)) <= 32


def test_a_row_longer_than_the_slack_is_cut_inside():
    big = b"x" * 10_000 + b"\n"
    chunks = chunk_all(big * 2, **P)
    assert b"".join(chunks) == big * 2
    assert max(map(len, chunks)) <= 2 * P["max_size"]


def test_default_parameters_cut_a_large_stream_into_row_aligned_chunks():
    data = b"".join(b"%d\tsome row text here\n" % i for i in range(200_000))
    chunks = chunk_all(data)
    assert b"".join(chunks) == data
    assert all(c.endswith(b"\n") for c in chunks)
    avg = len(data) / len(chunks)
    assert 16 * 1024 <= avg <= 256 * 1024
