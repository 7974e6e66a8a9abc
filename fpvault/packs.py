"""Pack files: many compressed blobs in one object.

A *blob* is a stored piece of content addressed by the BLAKE3 hash of its
plaintext: a data chunk of a COPY stream, a chunk list, or a piece of schema.
Blobs are stored in *packs* (target ``PACK_TARGET_SIZE``) so a repository is
not millions of small files and maps well onto object storage.

Layout of a pack (docs/format.md has the authoritative description)::

    MAGIC (8 bytes)
    blob 0 bytes, blob 1 bytes, ...          encoded as each entry says
    trailer: zstd(msgpack([entry, ...]))
    trailer length (4 bytes, little endian)
    TRAILER_MAGIC (8 bytes)

The trailer repeats what the index says of each blob, so the index can be
rebuilt from the packs alone.  A pack's name is the BLAKE3 hash of its bytes.
"""

from __future__ import annotations

import struct

import blake3
import msgspec
import zstandard

MAGIC = b"FPVPACK1"
TRAILER_MAGIC = b"FPVPEND1"
# Large enough that a 10 GB database is a few hundred objects; small enough
# that a pack is buffered in memory while it fills, and uploads in one PUT.
PACK_TARGET_SIZE = 32 * 1024 * 1024

# Blob types.
DATA = 0   # a chunk of a table's COPY stream or of a large object
LIST = 1   # a chunk list: the ids and sizes of a stream's chunks
META = 2   # schema text, the pg_dump archive (unused: schema streams are DATA)

# Encodings of a blob's bytes in a pack.
RAW = 0    # stored as is (zstd did not make it smaller)
ZSTD = 1   # a zstd frame
DELTA = 2  # a zstd frame compressed with the plaintext of ``bases`` (concatenated) as dictionary
# 3 was a trained-dictionary encoding in development builds; never written by a release.
FRAME = 4  # ``raw_length`` bytes at ``start`` in the plaintext of a zstd frame that holds
           # several blobs back to back; every blob of the frame has the same offset/length


class BlobEntry(msgspec.Struct, array_like=True, frozen=True):
    """Where one blob lives in its pack and how it is encoded."""

    id: bytes
    type: int
    offset: int
    length: int       # stored bytes
    raw_length: int   # plaintext bytes
    encoding: int
    bases: list[bytes] = []   # DELTA: the blobs whose plaintext is the dictionary, primary
                              # first
    generation: int = 0       # DELTA: position in its chain of versions (0: stored whole)
    start: int = 0            # FRAME: where the blob starts in the frame's plaintext


_trailer_encoder = msgspec.msgpack.Encoder()
_trailer_decoder = msgspec.msgpack.Decoder(list[BlobEntry])


def blob_id(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data, max_threads=1).digest()


def pack_name(pack_id: bytes) -> str:
    hexid = pack_id.hex()
    return f"data/{hexid[:2]}/{hexid}"


def pack_id_of(name: str) -> bytes | None:
    """The pack id a name under ``data/`` spells, or None if it is no pack's name (a
    stray file someone put there)."""
    try:
        pack_id = bytes.fromhex(name.rsplit("/", 1)[-1])
    except ValueError:
        return None
    return pack_id if len(pack_id) == 32 and name == pack_name(pack_id) else None


class PackBuilder:
    """Accumulates encoded blobs in memory until the pack is full."""

    def __init__(self) -> None:
        self.buf = bytearray(MAGIC)
        self.entries: list[BlobEntry] = []

    def add(self, id: bytes, type: int, stored: bytes, raw_length: int, encoding: int,
            bases: list[bytes] | None = None, generation: int = 0) -> None:
        self.entries.append(BlobEntry(id, type, len(self.buf), len(stored), raw_length, encoding,
                                      bases or [], generation))
        self.buf += stored

    def add_stored(self, stored: bytes, entries: list[BlobEntry]) -> None:
        """Stored bytes shared by ``entries`` (the blobs of one frame, or one blob),
        placed at the end of the pack; the entries' offset and length are set here."""
        offset = len(self.buf)
        self.entries += [msgspec.structs.replace(e, offset=offset, length=len(stored))
                         for e in entries]
        self.buf += stored

    def __len__(self) -> int:
        return len(self.buf)

    def finish(self, codec=None) -> tuple[bytes, bytearray]:
        """Return (pack id, pack bytes); ``codec`` seals the trailer in an encrypted repository.

        The bytes are the builder's own buffer, not a copy (a pack is up to 32 MiB):
        the builder must not be added to afterwards."""
        trailer = zstandard.ZstdCompressor(level=3).compress(_trailer_encoder.encode(self.entries))
        if codec is not None:
            trailer = codec.seal(trailer)
        self.buf += trailer
        self.buf += struct.pack("<I", len(trailer))
        self.buf += TRAILER_MAGIC
        data, self.buf = self.buf, bytearray()
        return blob_id(data), data


class PackFormatError(ValueError):
    pass


def read_trailer(data: bytes, codec=None) -> list[BlobEntry]:
    """Entries of a whole pack; raises PackFormatError if it is malformed."""
    if len(data) < len(MAGIC) + 12 or not data.startswith(MAGIC) or not data.endswith(TRAILER_MAGIC):
        raise PackFormatError("not a pack file, or truncated")
    (tlen,) = struct.unpack("<I", data[-12:-8])
    start = len(data) - 12 - tlen
    if start < len(MAGIC):
        raise PackFormatError("trailer length out of range")
    return decode_trailer(data[start:len(data) - 12], start, codec)


def decode_trailer(trailer: bytes, body_end: int, codec=None) -> list[BlobEntry]:
    """Entries from a trailer's bytes; ``body_end`` is where the trailer starts."""
    if codec is not None:
        try:
            trailer = codec.open(trailer, "pack trailer")
        except Exception as exc:
            raise PackFormatError(str(exc)) from exc
    try:
        raw = zstandard.ZstdDecompressor().decompress(trailer)
        entries = _trailer_decoder.decode(raw)
    except (zstandard.ZstdError, msgspec.DecodeError) as exc:
        raise PackFormatError(f"trailer does not decode: {exc}") from exc
    for e in entries:
        if e.offset < len(MAGIC) or e.offset + e.length > body_end:
            raise PackFormatError("blob outside the pack body")
    return entries


def stored_ranges(entries: list[BlobEntry]) -> dict[tuple[int, int], list[BlobEntry]]:
    """Entries grouped by the stored bytes they share: (offset, length) -> entries.
    A frame's blobs share one range; every other blob has its own."""
    ranges: dict[tuple[int, int], list[BlobEntry]] = {}
    for e in entries:
        ranges.setdefault((e.offset, e.length), []).append(e)
    return ranges
