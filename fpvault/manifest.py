"""Snapshot manifests and the repository config: msgspec structs.

A *snapshot manifest* describes one complete backup: when, of what (the
source, never a password), the schema (as blobs), and the ordered *table
entries*, sequences and large objects.  Streams are referred to by the id of
their chunk list, so a table that did not change adds only that reference.

A manifest is stored as ``snapshots/<id>``, zstd-compressed JSON, where the
id is the BLAKE3 hash of the JSON.  It is written last, after every blob and
index it refers to, so a snapshot either exists whole or not at all.

Format rules: ``FORMAT_VERSION`` changes only when an older fpvault could
misread new data; new fields always get defaults, so older manifests keep
decoding (tests/data holds a frozen repository that checks this).
"""

from __future__ import annotations

import msgspec

# 2: blobs may be stored in frames (encoding 4, entries with a ninth field).
# 3: a table with a key may be stored in physical order (TableEntry.physical), which
#    an older diff would merge-join as if in key order; an extension's configuration
#    tables (TableEntry.extension), which an older restore -j would empty first.
# Older repositories are read as they are, and upgraded when a snapshot first writes
# to one.
FORMAT_VERSION = 3


# Structs of a manifest are not tracked by the garbage collector (gc=False): they hold
# no reference cycles, and a repository of 48 snapshots of 3,400 tables decoded into
# 160,000 of them, which Python's collector scanned again and again while they were
# made: 2.1 s of the 2.3 s that listing them took.
class Stream(msgspec.Struct, kw_only=True, gc=False):
    """A byte stream stored as chunks."""

    list: str             # hex id of the chunk list blob
    bytes: int            # plaintext length
    hash: str             # hex BLAKE3 of the whole stream
    chunks: int = 0       # number of chunks


class TableEntry(msgspec.Struct, kw_only=True, gc=False):
    """One table in one snapshot."""

    schema: str
    name: str
    qname: str                        # as PostgreSQL quotes it: "Weird Schema"."T"
    oid: int                          # in the source database, for the schema archive
    columns: list[str]                # COPY column list (no generated or dropped columns)
    key: list[str] = []               # ORDER BY key; empty: physical order, a bag of rows
    # Per key column, how its COPY text orders as ORDER BY orders it ("int", "numeric",
    # "bytes", "bpchar": bytes without trailing blanks; "" if Python cannot tell): lets
    # diff merge-join two streams.
    key_kinds: list[str] = []
    rows: int = 0
    data: Stream
    relkind: str = "r"
    persistence: str = "p"            # p permanent, u unlogged
    parent: str | None = None         # partitioned parent (qname) for a leaf partition
    related_oids: list[int] = []      # indexes, constraints, triggers, policies... of the table
    owned_sequences: list[str] = []   # qnames
    # A configuration table of this extension (pg_extension_config_dump): CREATE
    # EXTENSION in the pre-data makes it, maybe with rows of its own; the stream holds
    # the rows ``condition`` (a WHERE clause; "": all) chose, as pg_dump's data does.
    extension: str = ""
    condition: str = ""
    # The stream is in physical order, not in key order: a table the previous snapshot
    # did not hold (its first, usually), read as its heap lies because the statistics
    # said that is key order (pgsource.in_key_order).  Mostly it is; diff and verify
    # do not assume it.
    physical: bool = False


class SequenceState(msgspec.Struct, kw_only=True):
    qname: str
    oid: int
    last_value: int
    is_called: bool


class LargeObject(msgspec.Struct, kw_only=True):
    oid: int
    data: Stream
    # Its rows (pages) in pg_largeobject, where the role may read that catalog: a
    # later snapshot takes it unread if it sees as many, all older (snapshot.py).
    pages: int | None = None


class Source(msgspec.Struct, kw_only=True):
    """What was backed up; never a password."""

    host: str = ""
    port: str = ""
    database: str = ""
    user: str = ""
    server_version: str = ""
    server_version_num: int = 0
    encoding: str = "UTF8"
    pg_dump_version: str = ""


class XactMark(msgspec.Struct, kw_only=True):
    """Which transactions a snapshot saw as running, on which server (not recorded
    on a standby).

    Every row change is made by a transaction that holds an xid, and is seen by a
    snapshot once that transaction has ended.  A transaction that ends moves
    the snapshot's ``xmax`` (one past the newest ended xid) or leaves its list of
    running xids.  So a later snapshot of the same running server (same system,
    timeline and start, and no crash recovery since: either may empty unlogged
    tables without any transaction) with the same ``xids`` sees the same rows:
    no transaction ended in between (snapshot.py, "Unchanged")."""

    system: str          # pg_control_system().system_identifier
    timeline: int
    started: str         # pg_postmaster_start_time()
    # pg_stat_get_bgwriter_stat_reset_time(): a crash restart, which keeps the
    # postmaster's start time, resets it ("" in marks written before it was recorded)
    recovered: str = ""
    database_oid: int
    xids: str            # txid_current_snapshot() of the snapshot: xmin:xmax:running

    @property
    def xmin(self) -> int:
        return int(self.xids.split(":")[0])

    @property
    def xmax(self) -> int:
        return int(self.xids.split(":")[1])


class SchemaBlobs(msgspec.Struct, kw_only=True):
    """The schema: pg_dump's custom archive (pre-data + post-data), and its text."""

    archive: Stream
    pre_data: Stream
    post_data: Stream


class Snapshot(msgspec.Struct, kw_only=True, dict=True):
    """A snapshot manifest.  Its id is the hash of its encoding, so it is not a
    field: ``Vault`` sets the undeclared attribute ``id`` when it reads or writes one."""

    version: int = FORMAT_VERSION
    time: str                          # ISO 8601, UTC
    tags: list[str] = []
    hostname: str = ""                 # the machine fpvault ran on
    source: Source
    filters: dict[str, list[str]] = {}
    schema: SchemaBlobs
    tables: list[TableEntry] = []
    sequences: list[SequenceState] = []
    large_objects: list[LargeObject] = []
    seconds: float = 0.0
    bytes_added: int = 0
    xact: XactMark | None = None
    tables_reused: int = 0   # tables taken from the previous snapshot, unread (snapshot.py)
    # The settings the data was read with (pgsource.SESSION_SETTINGS); empty in
    # snapshots written before it was recorded, which left search_path and TimeZone
    # to the environment.
    session: dict[str, str] = {}
    # What wrote it, e.g. "fpvault 0.2.0" ("" before it was recorded): a snapshot is
    # taken whole from the previous one only if the same release wrote that.
    program: str = ""
    # pgsource.catalog_fingerprint of the snapshot ("" where it could not be told, and
    # before it was recorded): a later snapshot with the same one takes this one's
    # schema without running pg_dump (snapshot.py, "_same_catalog").
    catalog: str = ""

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def bytes(self) -> int:
        return sum(t.data.bytes for t in self.tables) + sum(lo.data.bytes for lo in self.large_objects)


class SnapshotHead(msgspec.Struct, kw_only=True, dict=True):
    """A manifest without its lists of tables, sequences and large objects: what
    listing, retention and choosing a snapshot need.  ``Vault.snapshots()`` holds one
    per snapshot; ``Vault.load_snapshot`` gives the whole manifest, for one snapshot
    at a time.  (Decoded whole, a manifest of 3,400 tables takes 5.9 MiB: a repository
    of 48 of them took 340 MiB to list.)

    ``decode_head`` sets, besides ``id``, the totals of the lists: ``table_count``,
    ``rows`` and ``bytes``, as ``Snapshot`` computes them."""

    version: int = FORMAT_VERSION
    time: str
    tags: list[str] = []
    hostname: str = ""
    source: Source
    filters: dict[str, list[str]] = {}
    schema: SchemaBlobs
    seconds: float = 0.0
    bytes_added: int = 0
    xact: XactMark | None = None
    tables_reused: int = 0
    session: dict[str, str] = {}
    program: str = ""
    catalog: str = ""


# The sizes in a manifest's lists, decoded for a head's totals and dropped.
class _Size(msgspec.Struct, gc=False):
    bytes: int


class _TableSize(msgspec.Struct, gc=False):
    data: _Size
    rows: int = 0


class _LargeObjectSize(msgspec.Struct, gc=False):
    data: _Size


class _Sizes(msgspec.Struct):
    tables: list[_TableSize] = []
    large_objects: list[_LargeObjectSize] = []


class ChunkerParams(msgspec.Struct, kw_only=True):
    avg_size: int
    min_size: int
    max_size: int


class Config(msgspec.Struct, kw_only=True):
    """The ``config`` object: fixed at init, but for ``version`` (see Vault.upgrade)."""

    version: int = FORMAT_VERSION
    id: str
    created: str
    chunker: ChunkerParams
    compression_level: int = 3
    # Encrypted: blobs, pack trailers, index files and manifests are sealed with the
    # master key in keys/ (fpvault/crypto.py); ids are keyed BLAKE3.
    encrypted: bool = False


json_encoder = msgspec.json.Encoder()


def decode_snapshot(data: bytes) -> Snapshot:
    return msgspec.json.decode(data, type=Snapshot)


def decode_head(data: bytes) -> SnapshotHead:
    """The head of the manifest ``data`` (its lists skipped, but for their totals)."""
    head = msgspec.json.decode(data, type=SnapshotHead)
    sizes = msgspec.json.decode(data, type=_Sizes)
    head.table_count = len(sizes.tables)
    head.rows = sum(t.rows for t in sizes.tables)
    head.bytes = (sum(t.data.bytes for t in sizes.tables)
                  + sum(lo.data.bytes for lo in sizes.large_objects))
    return head


def decode_config(data: bytes) -> Config:
    return msgspec.json.decode(data, type=Config)
