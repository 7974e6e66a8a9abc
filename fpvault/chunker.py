"""Content-defined chunking of COPY streams.

A *chunk* is a piece of a stream whose boundaries depend only on nearby
content, so an edit in one place moves at most the chunks around it and the
rest of the stream still deduplicates.  Candidate cut points come from
FastCDC (the compiled ``pyfastcdc``, about 2 GB/s).  Each cut is then moved
forward to the end of the row it falls in, when that row ends within
``ROW_SLACK`` bytes: COPY text never holds a raw newline inside a value, so
the chunks of a table are whole rows, which is what lets a diff or a delta
work on a chunk without its neighbours.  A row longer than that (a 16 MiB
value) is cut where FastCDC says.

The chunker is pure: buffers in, chunks out.  Feeding the same bytes in any
split gives the same chunks, which the property tests check.
"""

from __future__ import annotations


from pyfastcdc import FastCDC

# Chosen by measurement (docs/benchmarks.md, "chunk_size"; pgbench -s 10 plus the
# sample, 1% scattered churn): at 64 KiB the metadata is 0.9% of a first snapshot
# (16 KiB: 3.5%) and a churned snapshot adds 2.0% of the first (16 KiB: 3.9%,
# 256 KiB: 31%, 1 MiB: 57%, because the delta encoder cannot reach far enough
# back into large dictionaries).  The price is compression: chunks compressed
# one by one store the table data 43% larger than one zstd stream over all of
# it (26.1 against 18.2 MiB) and about even with pg_dump -Fc's zlib.
DEFAULT_AVG_SIZE = 64 * 1024
DEFAULT_MIN_SIZE = 16 * 1024
DEFAULT_MAX_SIZE = 256 * 1024

NEWLINE = 0x0A


class Chunker:
    """Cuts a stream into content-defined, row-aligned chunks.

    ``feed()`` returns the chunks that are complete; ``finish()`` returns the
    rest.  Parameters are part of the repository config: changing them would
    stop new snapshots from deduplicating against old ones.
    """

    def __init__(self, avg_size: int = DEFAULT_AVG_SIZE, min_size: int = DEFAULT_MIN_SIZE,
                 max_size: int = DEFAULT_MAX_SIZE, row_aligned: bool = True):
        self._cdc = FastCDC(avg_size, min_size=min_size, max_size=max_size)
        self.max_size = max_size
        # A cut may move forward this far to reach the end of its row.
        self.row_slack = max_size if row_aligned else 0
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self.push(data)
        out = []
        # Only cut where the result cannot depend on bytes not yet seen.
        while self.ready():
            out.append(self.cut(final=False))
        self.compact()
        return out

    def finish(self) -> list[bytes]:
        out = []
        while self.pending():
            out.append(self.cut(final=True))
        self._buf = bytearray()
        self._pos = 0
        return out

    # -- the steps of feed(), for a caller that can sometimes tell where the next
    # chunk ends without cutting (StreamWriter, from the stream's previous version)

    def push(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def pending(self) -> int:
        """Bytes pushed and not yet cut or skipped."""
        return len(self._buf) - self._pos

    def ready(self) -> bool:
        """Whether the next cut can be made without the bytes still to come."""
        return self.pending() >= self.max_size + self.row_slack

    def view(self, n: int) -> memoryview:
        """The next ``n`` pending bytes, without copying; release it before compact()."""
        return memoryview(self._buf)[self._pos:self._pos + n]

    def count(self, byte: bytes, n: int) -> int:
        return self._buf.count(byte, self._pos, self._pos + n)

    def skip(self, n: int) -> None:
        """Consume the next ``n`` bytes as one chunk the caller already knows: right
        only if cutting here would have given exactly those bytes."""
        self._pos += n

    def compact(self) -> None:
        if self._pos > 4 * self.max_size:
            del self._buf[:self._pos]
            self._pos = 0

    def cut(self, final: bool) -> bytes:
        buf, pos = self._buf, self._pos
        window = memoryview(buf)[pos:pos + self.max_size]
        try:
            first = next(iter(self._cdc.cut_buf(window)))
            end = pos + first.length
        finally:
            window.release()
        if self.row_slack and buf[end - 1] != NEWLINE:
            limit = min(len(buf), end + self.row_slack)
            nl = buf.find(b"\n", end, limit)
            if nl >= 0:
                end = nl + 1
        with memoryview(buf) as view:
            chunk = bytes(view[pos:end])   # one copy (a bytearray slice would be two)
        self._pos = end
        return chunk


def chunk_all(data: bytes, **params) -> list[bytes]:
    """Chunks of a whole buffer: for tests and small streams."""
    chunker = Chunker(**params)
    return chunker.feed(data) + chunker.finish()
