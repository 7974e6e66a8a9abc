"""What changed between two snapshots: tables, schema objects, sequences, rows.

Table level: two snapshots' entries for a table are *unchanged* when their
chunk list ids are equal (the same stream, byte for byte), which is decided
from the manifests alone, without reading data.  Where one side is stored in
physical order (TableEntry.physical) and both have as many rows, the same rows
may lie in another order: the differing chunks are then read (as for
``--rows``) to tell.

Schema level: the schema text (pg_restore's SQL, which heads every object
with ``-- Name: …; Type: …; Schema: …``) is split into *objects*; objects
present on one side only are added or removed, objects whose text differs
are altered.  Each object is attributed to the table it belongs to (its
indexes, constraints, policies, triggers, defaults, comments, grants), so a
table's ``schema_changed`` covers its whole definition.

Row level (``--rows``): a chunk present in both streams holds the same rows
in both, so only chunks that occur on one side are decoded.  Walking both
chunk lists in order, the runs of one-sided chunks between shared chunks are
*hunks*; rows of a hunk are matched by key against the unmatched rows of the
other side.  What stays unmatched at the end is inserted or deleted.  Memory
is bounded by the largest hunk plus the rows inserted and deleted, not by the
table; time by the changed chunks.  Where both streams are in key order and
Python can order the keys as PostgreSQL does, the rows of the hunks are
merge-joined instead, in constant memory.  A table's first snapshot may be in
physical order (TableEntry.physical): its rows are matched by key in any
order.  Tables without a key are multisets: rows are counted, and the
differences reported as inserts and deletes.

When columns differ between the snapshots, rows are compared on the columns
both have (the change of columns is reported in the schema part); if the key
columns are not the same on both sides, the table is compared as a multiset
of those shared columns.
"""

from __future__ import annotations

import difflib
from decimal import Decimal
import re
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Iterator

from .chunkstore import ChunkRef
from .errors import RepositoryDamaged
from .manifest import Snapshot, TableEntry
from .restore import python_codec, select_tables
from .vault import Vault

_HEADER = re.compile(r"^-- Name: (.*); Type: (.*); Schema: (.*); Owner: (.*)$")
# Objects whose pg_dump name starts with their table's name: "users users_pkey".
_TABLE_PREFIXED = {"CONSTRAINT", "FK CONSTRAINT", "POLICY", "TRIGGER", "RULE", "DEFAULT",
                   "ROW SECURITY", "CHECK CONSTRAINT"}
_INDEX_ON = re.compile(r"\bON (?:ONLY )?(.+?) USING ")


@dataclass(frozen=True)
class SchemaObject:
    type: str
    schema: str
    name: str
    text: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.type, self.schema, self.name)

    def label(self) -> str:
        where = f"{self.schema}." if self.schema not in ("-", "") else ""
        return f"{self.type.lower()} {where}{self.name}"


def schema_objects(sql: str) -> list[SchemaObject]:
    """Split pg_restore output into its objects (the preamble is left out)."""
    objects: list[SchemaObject] = []
    lines = sql.splitlines()
    current: tuple[str, str, str] | None = None
    body: list[str] = []

    def close() -> None:
        if current:
            text = "\n".join(body).strip()
            objects.append(SchemaObject(current[1], current[2], current[0], text))

    i = 0
    while i < len(lines):
        m = _HEADER.match(lines[i])
        if m and i > 0 and lines[i - 1] == "--":
            if body and body[-1] == "--":
                body.pop()
            close()
            current = (m.group(1), m.group(2), m.group(3))
            body = []
            i += 2 if i + 1 < len(lines) and lines[i + 1] == "--" else 1
            continue
        if lines[i].startswith("-- PostgreSQL database dump complete"):
            if body and body[-1] == "--":
                body.pop()
            close()
            current, body = None, []
        elif current:
            body.append(lines[i])
        i += 1
    close()
    return objects


def owning_table(obj: SchemaObject, tables: dict[tuple[str, str], TableEntry]) -> TableEntry | None:
    """The table an object is part of, if any."""
    if obj.type in ("TABLE", "TABLE ATTACH"):
        return tables.get((obj.schema, obj.name))
    if obj.type in _TABLE_PREFIXED:
        for (schema, name), t in tables.items():
            if schema == obj.schema and (obj.name == name or obj.name.startswith(name + " ")):
                return t
        return None
    if obj.type == "INDEX":
        m = _INDEX_ON.search(obj.text)
        if m:
            for t in tables.values():
                if t.qname == m.group(1):
                    return t
        return None
    if obj.type in ("COMMENT", "ACL", "SECURITY LABEL"):
        for (schema, name), t in tables.items():
            if schema == obj.schema and (obj.name == f"TABLE {name}"
                                         or obj.name.startswith(f"COLUMN {name}.")):
                return t
    return None


# -- COPY text

_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)", re.S)


def _unescape_sub(m: re.Match) -> str:
    s = m.group(1)
    if s[0] == "x" and len(s) > 1:
        return chr(int(s[1:], 16))
    if s[0] in "01234567":
        return chr(int(s, 8))
    return _ESCAPES.get(s, s)


def copy_field(text: str) -> str | None:
    """One COPY text field as its value's text (None for NULL)."""
    if text == "\\N":
        return None
    return _ESCAPE_RE.sub(_unescape_sub, text) if "\\" in text else text


def copy_rows(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines of a stream, from chunks that may split rows.  A row longer than a chunk
    is gathered piece by piece and joined once: joining it again at every chunk took
    41 s for a 51 MB value."""
    rest: list[bytes] = []
    for chunk in chunks:
        if b"\n" not in chunk:
            if chunk:
                rest.append(chunk)
            continue
        lines = chunk.split(b"\n")
        if rest:
            rest.append(lines[0])
            lines[0] = b"".join(rest)
        tail = lines.pop()
        rest = [tail] if tail else []
        yield from lines
    if rest:
        yield b"".join(rest)


# -- results

@dataclass
class RowChange:
    op: str
    key: dict[str, Any]
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    changed: list[str] | None = None
    count: int = 1

    def as_json(self) -> dict[str, Any]:
        # "before" and "after" on every row, as the original contract has them: null
        # where there is none (an insert's before, a delete's after).
        d: dict[str, Any] = {"op": self.op, "key": self.key, "before": self.before,
                             "after": self.after}
        if self.changed is not None:
            d["changed"] = self.changed
        if self.count != 1:
            d["count"] = self.count
        return d


@dataclass
class RowDiff:
    inserted: int = 0
    deleted: int = 0
    updated: int = 0
    rows: list[RowChange] = field(default_factory=list)
    chunks_decoded: int = 0
    chunks_total: int = 0


@dataclass
class TableDiff:
    name: str
    status: str
    schema_changed: bool
    rows_before: int | None
    rows_after: int | None
    bytes_before: int | None
    bytes_after: int | None
    columns_added: list[str] = field(default_factory=list)
    columns_removed: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    rows: RowDiff | None = None

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "status": self.status, "schema_changed": self.schema_changed,
            "rows_before": self.rows_before, "rows_after": self.rows_after,
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}
        if self.columns_added or self.columns_removed:
            d["columns_added"] = self.columns_added
            d["columns_removed"] = self.columns_removed
        if self.objects:
            d["objects"] = self.objects
        if self.rows is not None:
            d.update(inserted=self.rows.inserted, deleted=self.rows.deleted,
                     updated=self.rows.updated, rows=[r.as_json() for r in self.rows.rows],
                     chunks_decoded=self.rows.chunks_decoded,
                     chunks_total=self.rows.chunks_total)
        return d


@dataclass
class Diff:
    from_id: str
    to_id: str
    schema_changed: bool
    schema_diff: str            # "" also when not computed (--stat)
    objects_added: list[str]
    objects_removed: list[str]
    objects_altered: list[str]
    tables: list[TableDiff]
    sequences: list[dict[str, Any]]
    large_objects: list[dict[str, Any]]
    schema_diff_omitted: bool = False   # --stat: the text was not computed

    @property
    def differs(self) -> bool:
        return (self.schema_changed or bool(self.sequences) or bool(self.large_objects)
                or any(t.status != "unchanged" or t.schema_changed for t in self.tables))

    def as_json(self) -> dict[str, Any]:
        return {"from": self.from_id, "to": self.to_id, "schema_changed": self.schema_changed,
                "schema_diff": self.schema_diff, "schema_diff_omitted": self.schema_diff_omitted,
                "objects": {"added": self.objects_added, "removed": self.objects_removed,
                            "altered": self.objects_altered},
                "tables": [t.as_json() for t in self.tables],
                "sequences": self.sequences, "large_objects": self.large_objects}


# -- the diff

def diff(vault: Vault, a_id: str, a: Snapshot, b_id: str, b: Snapshot, *,
         tables: list[str] | None = None, rows: bool = False, schema_text: bool = True) -> Diff:
    ta = {(t.schema, t.name): t for t in a.tables}
    tb = {(t.schema, t.name): t for t in b.tables}

    sql_a = _schema_text(vault, a)
    sql_b = _schema_text(vault, b)
    schema_changed = sql_a != sql_b
    schema_diff = ""
    added: list[str] = []
    removed: list[str] = []
    altered: list[str] = []
    table_objects: dict[tuple[str, str], list[str]] = {}
    if schema_changed:
        if schema_text:
            schema_diff = "".join(difflib.unified_diff(
                sql_a.splitlines(keepends=True), sql_b.splitlines(keepends=True),
                fromfile=f"a/{a_id[:8]}", tofile=f"b/{b_id[:8]}"))
        oa = {o.key: o for o in schema_objects(sql_a)}
        ob = {o.key: o for o in schema_objects(sql_b)}
        for k in sorted(set(oa) | set(ob)):
            if k in oa and k in ob and oa[k].text == ob[k].text:
                continue
            obj = ob.get(k) or oa[k]
            what = "added" if k not in oa else "removed" if k not in ob else "altered"
            {"added": added, "removed": removed, "altered": altered}[what].append(obj.label())
            owner = owning_table(obj, tb if k in ob else ta)
            if owner is not None:
                table_objects.setdefault((owner.schema, owner.name), []).append(
                    f"{what} {obj.label()}")

    wanted = None
    if tables:
        # Names are matched as restore -t matches them.
        both = Snapshot(time="", source=a.source, schema=a.schema,
                        tables=list({(t.schema, t.name): t for t in [*a.tables, *b.tables]}.values()))
        wanted = {(t.schema, t.name) for t in select_tables(
            both, tuple(tables), where=f"snapshot {a_id[:8]} or {b_id[:8]}")}

    out: list[TableDiff] = []
    for key in sorted(set(ta) | set(tb)):
        if wanted is not None and key not in wanted:
            continue
        x, y = ta.get(key), tb.get(key)
        found = None
        if x is None:
            status = "added"
        elif y is None:
            status = "removed"
        elif x.data.list == y.data.list:
            status = "unchanged"
        elif ((x.physical or y.physical or not x.key or not y.key)
              and (x.columns, x.rows) == (y.columns, y.rows)):
            # As many rows, one side stored in physical order (read so, or without a
            # key): perhaps the same rows in another order (a first snapshot not quite
            # in key order, then one in key order; a row of a keyless table deleted
            # and inserted again).  Only the rows can tell; the differing chunks are read.
            found = _row_diff(vault, x, y, a.source.encoding, f"{a_id[:8]} and {b_id[:8]}")
            status = "changed" if found.inserted or found.deleted or found.updated else "unchanged"
        else:
            status = "changed"
        t = y or x
        td = TableDiff(
            name=t.qname, status=status, schema_changed=False,
            rows_before=x.rows if x else None, rows_after=y.rows if y else None,
            bytes_before=x.data.bytes if x else None, bytes_after=y.data.bytes if y else None,
            objects=table_objects.get(key, []))
        if x and y:
            td.columns_added = [c for c in y.columns if c not in x.columns]
            td.columns_removed = [c for c in x.columns if c not in y.columns]
            td.schema_changed = bool(td.objects or td.columns_added or td.columns_removed)
        else:
            td.schema_changed = True
        if rows and status == "changed":
            td.rows = found or _row_diff(vault, x, y, a.source.encoding,
                                         f"{a_id[:8]} and {b_id[:8]}")
        out.append(td)

    seqs = []
    sa = {s.qname: s for s in a.sequences}
    sb = {s.qname: s for s in b.sequences}
    for name in sorted(set(sa) | set(sb)):
        p, q = sa.get(name), sb.get(name)
        if p and q and (p.last_value, p.is_called) == (q.last_value, q.is_called):
            continue
        seqs.append({"name": name, "status": "added" if not p else "removed" if not q else "changed",
                     "before": p.last_value if p else None, "after": q.last_value if q else None})
    los = []
    la = {lo.oid: lo for lo in a.large_objects}
    lb = {lo.oid: lo for lo in b.large_objects}
    for oid in sorted(set(la) | set(lb)):
        p, q = la.get(oid), lb.get(oid)
        if p and q and p.data.hash == q.data.hash:
            continue
        los.append({"oid": oid, "status": "added" if not p else "removed" if not q else "changed",
                    "bytes_before": p.data.bytes if p else None,
                    "bytes_after": q.data.bytes if q else None})
    return Diff(a_id, b_id, schema_changed, schema_diff, added, removed, altered, out, seqs, los,
                schema_diff_omitted=schema_changed and not schema_text)


def _schema_text(vault: Vault, snap: Snapshot) -> str:
    raw = vault.read_bytes(snap.schema.pre_data) + vault.read_bytes(snap.schema.post_data)
    text = raw.decode("utf-8", "replace")
    # The version lines change with a server upgrade, not with the schema.
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith(("-- Dumped from database version",
                                             "-- Dumped by pg_dump version")))


def _row_diff(vault: Vault, x: TableEntry, y: TableEntry, encoding: str, ids: str) -> RowDiff:
    """row_diff, naming the table and the snapshots in what damage stops it."""
    try:
        return row_diff(vault, x, y, encoding)
    except RepositoryDamaged as exc:
        raise RepositoryDamaged(f"Table {y.qname} of snapshots {ids} cannot be compared: {exc} "
                                "Run 'fpvault verify' to see what else the damage affects.") from exc


def row_diff(vault: Vault, a: TableEntry, b: TableEntry, encoding: str = "UTF8") -> RowDiff:
    """Rows inserted, deleted and updated from table entry ``a`` to ``b``."""
    enc = python_codec(encoding)
    la = vault.store.get_list(bytes.fromhex(a.data.list))
    lb = vault.store.get_list(bytes.fromhex(b.data.list))
    shared_cols = [c for c in b.columns if c in a.columns]
    keyed = bool(a.key) and a.key == b.key and all(k in shared_cols for k in a.key)
    result = RowDiff(chunks_total=len(la) + len(lb))
    ia = [a.columns.index(c) for c in shared_cols]
    ib = [b.columns.index(c) for c in shared_cols]
    kpos = [shared_cols.index(k) for k in a.key] if keyed else []
    hunks = list(_hunks(la, lb))

    def rows_of(chunks: list[bytes], idx: list[int]) -> Iterator[tuple[bytes, ...]]:
        """Rows of these chunks as COPY fields (bytes), projected on the shared columns."""
        result.chunks_decoded += len(chunks)
        for line in copy_rows(vault.store.get_many(chunks)):
            fields = line.split(b"\t")
            yield tuple(fields[i] for i in idx)

    def as_dict(values: tuple, cols: list[str]) -> dict[str, Any]:
        return {c: copy_field(v.decode(enc, "backslashreplace")) for c, v in zip(cols, values)}

    def deleted(row: tuple) -> None:
        result.deleted += 1
        result.rows.append(RowChange("delete", as_dict(tuple(row[i] for i in kpos), a.key),
                                     before=as_dict(row, shared_cols)))

    def inserted(row: tuple) -> None:
        result.inserted += 1
        result.rows.append(RowChange("insert", as_dict(tuple(row[i] for i in kpos), a.key),
                                     after=as_dict(row, shared_cols)))

    def matched(before: tuple, after: tuple) -> None:
        _update(result, before, after, tuple(before[i] for i in kpos), shared_cols, a.key, as_dict)

    kinds = a.key_kinds if a.key_kinds == b.key_kinds else []
    if keyed and len(kinds) == len(a.key) and all(kinds) and not (a.physical or b.physical):
        # Both streams are in key order and Python can order keys as PostgreSQL does:
        # a merge join, in constant memory.  Most one-sided rows are byte-identical
        # on both sides (their chunk differs elsewhere): with the same columns on
        # both sides such a pair is skipped without parsing it.
        order = _key_order(kinds, enc)
        same_shape = a.columns == b.columns

        def lines(side: int) -> Iterator[bytes]:
            for hunk in hunks:
                result.chunks_decoded += len(hunk[side])
                yield from copy_rows(vault.store.get_many(hunk[side]))

        def parse(line: bytes, idx: list[int]) -> tuple[tuple, tuple]:
            fields = line.split(b"\t")
            row = tuple(fields[i] for i in idx)
            return order(tuple(row[i] for i in kpos)), row

        ita, itb = lines(0), lines(1)
        la, lb = next(ita, None), next(itb, None)
        x = y = None   # (key, row) of la and lb, once parsed
        while la is not None or lb is not None:
            if same_shape and la is not None and la == lb:
                la, lb, x, y = next(ita, None), next(itb, None), None, None
                continue
            if x is None and la is not None:
                x = parse(la, ia)
            if y is None and lb is not None:
                y = parse(lb, ib)
            if y is None or (x is not None and x[0] < y[0]):
                deleted(x[1])
                la, x = next(ita, None), None
            elif x is None or y[0] < x[0]:
                inserted(y[1])
                lb, y = next(itb, None), None
            else:
                matched(x[1], y[1])
                la, lb, x, y = next(ita, None), next(itb, None), None, None
        return result

    if keyed:
        # Keys Python cannot order, or a stream in physical order: match them hunk by
        # hunk; rows left unmatched are carried along, so memory is bounded by the
        # largest hunk plus the changes (and the rows that lie out of key order).
        # Keys are compared as values where Python knows how (numeric 5.0 = 5.00, as
        # in the merge join), else as their text.
        same = (_key_order(kinds, enc) if len(kinds) == len(a.key) and all(kinds)
                else lambda fields: fields)
        pending: tuple[dict, dict] = ({}, {})
        for hunk in hunks:
            for side, idx in ((0, ia), (1, ib)):
                mine, theirs = pending[side], pending[1 - side]
                for row in rows_of(hunk[side], idx):
                    k = same(tuple(row[i] for i in kpos))
                    other = theirs.pop(k, None)
                    if other is None:
                        mine[k] = row
                    else:
                        matched(*((row, other) if side == 0 else (other, row)))
        for row in pending[0].values():
            deleted(row)
        for row in pending[1].values():
            inserted(row)
        return result

    counts: Counter[tuple] = Counter()
    for ha, hb in hunks:
        for row in rows_of(ha, ia):
            counts[row] += 1
        for row in rows_of(hb, ib):
            counts[row] -= 1
    for row, n in sorted(counts.items(), key=lambda kv: kv[0]):
        if n > 0:
            result.deleted += n
            result.rows.append(RowChange("delete", {}, before=as_dict(row, shared_cols), count=n))
        elif n < 0:
            result.inserted += -n
            result.rows.append(RowChange("insert", {}, after=as_dict(row, shared_cols), count=-n))
    return result


def _key_order(kinds: list[str], enc: str):
    """A function from COPY key fields to a tuple that sorts as ORDER BY does."""
    def one(kind: str, field: bytes):
        if kind == "int":
            return int(field)
        if kind == "numeric":
            text = field.decode("ascii")
            return (1, Decimal(0)) if text == "NaN" else (0, Decimal(text))  # NaN sorts last
        # bytes: C-like collation (or uuid): the value's bytes in the database encoding;
        # bpchar: the same without the trailing blanks, which char(n) does not compare
        value = copy_field(field.decode(enc, "surrogateescape")).encode(enc, "surrogateescape")
        return value.rstrip(b" ") if kind == "bpchar" else value

    def order(fields: tuple[bytes, ...]) -> tuple:
        return tuple(one(k, f) for k, f in zip(kinds, fields))
    return order


def _update(result: RowDiff, before: tuple, after: tuple, k: tuple, cols: list[str],
            key: list[str], as_dict) -> None:
    if before == after:
        return  # the same row, in a chunk that differs for other reasons
    result.updated += 1
    changed = [c for c, p, q in zip(cols, before, after) if p != q]
    result.rows.append(RowChange("update", as_dict(k, key), before=as_dict(before, cols),
                                 after=as_dict(after, cols), changed=changed))


def _hunks(la: list[ChunkRef], lb: list[ChunkRef]) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """Maximal runs of one-sided chunks, paired in stream order.

    The k-th occurrence of a chunk id in one list is shared with its k-th
    occurrence in the other; shared chunks hold the same rows on both sides and
    are never decoded.  A run must hold whole rows, so a shared chunk next to a
    one-sided one is made one-sided (on both sides) when a row crosses the
    boundary between them (``cut_in_row``: rows longer than the chunker's slack).
    """
    where_b: dict[bytes, deque[int]] = defaultdict(deque)
    for j, ref in enumerate(lb):
        where_b[ref.id].append(j)
    pair_a = [-1] * len(la)
    pair_b = [-1] * len(lb)
    for i, ref in enumerate(la):
        q = where_b.get(ref.id)
        if q:
            j = q.popleft()
            pair_a[i], pair_b[j] = j, i

    changed = True
    while changed:
        changed = False
        for refs, pair, other in ((la, pair_a, pair_b), (lb, pair_b, pair_a)):
            for i in range(len(refs)):
                if pair[i] >= 0:
                    continue
                for k in (i - 1, i + 1):
                    crosses = refs[i - 1].cut_in_row if k == i - 1 else refs[i].cut_in_row
                    if 0 <= k < len(refs) and crosses and pair[k] >= 0:
                        other[pair[k]] = -1
                        pair[k] = -1
                        changed = True

    i = j = 0
    while i < len(la) or j < len(lb):
        ha: list[bytes] = []
        hb: list[bytes] = []
        while i < len(la) and pair_a[i] < 0:
            ha.append(la[i].id)
            i += 1
        while j < len(lb) and pair_b[j] < 0:
            hb.append(lb[j].id)
            j += 1
        if ha or hb:
            yield ha, hb
        i += 1 if i < len(la) else 0   # step over one shared chunk on each side
        j += 1 if j < len(lb) else 0
