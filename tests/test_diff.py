"""fpvault diff: table, schema and row level."""

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run
from fpvault.diff import copy_field, copy_rows, row_diff, schema_objects
from fpvault.manifest import ChunkerParams, TableEntry
from fpvault.vault import Vault

# -- the row merge, against the true difference of two row sets

SMALL = ChunkerParams(avg_size=256, min_size=64, max_size=1024)


def entry(vault, rows: list[str], columns, key, kinds=(), physical=False) -> TableEntry:
    stream, n = vault.write_stream([("".join(r + "\n" for r in rows)).encode()])
    vault.store.flush()
    return TableEntry(schema="s", name="t", qname="s.t", oid=1, columns=columns, key=key,
                      key_kinds=list(kinds), rows=n, data=stream, physical=physical)


values = st.one_of(st.text(alphabet="abcxyz", min_size=0, max_size=12),
                   st.text(alphabet="q", min_size=2500, max_size=2600))  # longer than the slack


@given(base=st.dictionaries(st.integers(0, 5000), values, max_size=300),
       edits=st.lists(st.tuples(st.sampled_from(["ins", "del", "upd"]), st.integers(0, 5000),
                                values), max_size=40),
       kinds=st.sampled_from([(), ("int",)]),
       physical=st.sampled_from([None, 0, 1]), rnd=st.randoms(use_true_random=False))
@settings(max_examples=120, deadline=None)
def test_keyed_row_diff_equals_the_true_difference(tmp_path_factory, base, edits, kinds,
                                                   physical, rnd):
    """With key kinds, the merge join; without, matching by key in hunks.  A side
    stored in physical order (``physical``: which) has its rows in any order."""
    vault = Vault.create(str(tmp_path_factory.mktemp("v") / "r"), chunker=SMALL)
    after = dict(base)
    for op, k, v in edits:
        if op == "del":
            after.pop(k, None)
        else:
            after[k] = v
    fmt = lambda d: [f"{k}\t{d[k]}" for k in sorted(d)]  # noqa: E731 (key order, as snap reads)
    sides = [fmt(base), fmt(after)]
    if physical is not None:
        rnd.shuffle(sides[physical])
    d = row_diff(vault, *(entry(vault, rows, ["id", "v"], ["id"], kinds, side == physical)
                          for side, rows in enumerate(sides)))
    got = {(r.op, int(r.key["id"])): (r.before, r.after) for r in d.rows}
    want = {}
    for k in set(base) | set(after):
        if k not in after:
            want[("delete", k)] = ({"id": str(k), "v": base[k]}, None)
        elif k not in base:
            want[("insert", k)] = (None, {"id": str(k), "v": after[k]})
        elif base[k] != after[k]:
            want[("update", k)] = ({"id": str(k), "v": base[k]}, {"id": str(k), "v": after[k]})
    assert got == want
    assert (d.inserted, d.deleted, d.updated) == (
        sum(op == "insert" for op, _ in want), sum(op == "delete" for op, _ in want),
        sum(op == "update" for op, _ in want))


@given(base=st.lists(st.sampled_from(["a", "b", "c", "d\\tx", "\\N"]), max_size=400),
       after=st.lists(st.sampled_from(["a", "b", "c", "e"]), max_size=400))
@settings(max_examples=60, deadline=None)
def test_keyless_row_diff_is_a_multiset_difference(tmp_path_factory, base, after):
    vault = Vault.create(str(tmp_path_factory.mktemp("v") / "r"), chunker=SMALL)
    rows_b = base[: len(base) // 2] + after  # share a prefix, as a table that grew would
    d = row_diff(vault, entry(vault, base, ["v"], []), entry(vault, rows_b, ["v"], []))
    want = Counter(base)
    want.subtract(Counter(rows_b))
    got = Counter()
    for r in d.rows:
        value = r.before["v"] if r.op == "delete" else r.after["v"]
        raw = "\\N" if value is None else value.replace("\t", "\\t")
        got[raw] += r.count if r.op == "delete" else -r.count
    assert +got == +want and -got == -want


def test_only_differing_chunks_are_decoded(tmp_path):
    vault = Vault.create(str(tmp_path / "r"), chunker=SMALL)
    rows = [f"{i}\tvalue number {i}" for i in range(20000)]
    a = entry(vault, rows, ["id", "v"], ["id"])
    rows[12345] = "12345\tchanged"
    d = row_diff(vault, a, entry(vault, rows, ["id", "v"], ["id"]))
    assert [(r.op, r.key, r.changed) for r in d.rows] == [("update", {"id": "12345"}, ["v"])]
    assert d.chunks_decoded <= 6 < d.chunks_total // 50


def test_merge_join_orders_keys_as_postgres_does(tmp_path):
    vault = Vault.create(str(tmp_path / "r"), chunker=SMALL)
    # numeric with NaN last, and a C-collated text key with escapes, as ORDER BY sorts them.
    keys = ["-1.5", "2", "10", "NaN"]
    a = entry(vault, [f"{k}\tx" for k in keys], ["k", "v"], ["k"], ["numeric"])
    b = entry(vault, [f"{k}\t{'y' if k == '10' else 'x'}" for k in keys] + [], ["k", "v"], ["k"],
              ["numeric"])
    d = row_diff(vault, a, b)
    assert [(r.op, r.key) for r in d.rows] == [("update", {"k": "10"})]
    texts = sorted(["a\\tb", "a", "B", "\\\\N", "é"], key=lambda t: copy_field(t).encode())
    a = entry(vault, [f"{t}\t1" for t in texts], ["k", "v"], ["k"], ["bytes"])
    b = entry(vault, [f"{t}\t{2 if t == 'é' else 1}" for t in texts if t != "a"], ["k", "v"], ["k"],
              ["bytes"])
    d = row_diff(vault, a, b)
    assert sorted((r.op, r.key["k"]) for r in d.rows) == [("delete", "a"), ("update", "é")]


@pytest.mark.parametrize("physical", [False, True])
def test_equal_keys_of_another_text_match_in_either_order(tmp_path, physical):
    """numeric 5.0 and 5.00 are one key to PostgreSQL: an update, whether diff merges
    or (a stream in physical order) matches by key; char(n) likewise without its
    trailing blanks."""
    vault = Vault.create(str(tmp_path / "r"), chunker=SMALL)
    for kind, old, new in (("numeric", "5.0", "5.00"), ("bpchar", "ab ", "ab")):
        a = entry(vault, ["1\tx", f"{old}\tx", "7\tx"], ["k", "v"], ["k"], [kind], physical)
        b = entry(vault, ["1\tx", f"{new}\ty", "7\tx"], ["k", "v"], ["k"], [kind])
        d = row_diff(vault, a, b)
        assert [(r.op, r.key) for r in d.rows] == [("update", {"k": old})], kind


@given(text=st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"\n")),
       cuts=st.lists(st.integers(0, 300), max_size=12))
def test_copy_rows_are_the_lines_however_the_stream_is_cut(text, cuts):
    edges = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[i:j] for i, j in zip(edges, edges[1:])] + [b""]
    expected = text.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    assert list(copy_rows(iter(chunks))) == expected


def test_copy_field_unescapes():
    assert copy_field("\\N") is None
    assert copy_field("") == ""
    assert copy_field("a\\tb\\nc\\\\d\\x41\\101") == "a\tb\nc\\dAA"


def test_schema_objects_split_pg_restore_text():
    text = ("--\n-- Name: t; Type: TABLE; Schema: public; Owner: me\n--\n\nCREATE TABLE public.t ();\n\n"
            "--\n-- Name: t t_pkey; Type: CONSTRAINT; Schema: public; Owner: me\n--\n\nALTER ...;\n\n"
            "--\n-- PostgreSQL database dump complete\n--\n")
    objs = schema_objects(text)
    assert [(o.type, o.name, o.text) for o in objs] == [
        ("TABLE", "t", "CREATE TABLE public.t ();"), ("CONSTRAINT", "t t_pkey", "ALTER ...;")]


# -- end to end on a real database


def snap(pg, repo, db):
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)["id"]


def test_diff_reports_exactly_the_changes(pg, db, repo):
    pg.execute(db, """
        CREATE TABLE a (id int PRIMARY KEY, v text);
        INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 5000) g;
        CREATE TABLE b (id int PRIMARY KEY, n int);
        INSERT INTO b SELECT g, g FROM generate_series(1, 3000) g;
        CREATE TABLE bag (v text);
        INSERT INTO bag VALUES ('x'), ('x'), ('y'), ('z');
        CREATE TABLE shuffled (v text);
        INSERT INTO shuffled VALUES ('p'), ('q'), ('r');
        CREATE TABLE same (id int PRIMARY KEY);
        INSERT INTO same SELECT generate_series(1, 100);
        CREATE TABLE gone (id int);
        CREATE TABLE pol (id int PRIMARY KEY, owner text);
        CREATE SEQUENCE s;
        -- char(n) orders without its trailing blanks: 'a' before E'a\\x01'
        CREATE TABLE bp (k char(3) COLLATE "C" PRIMARY KEY, v int);
        INSERT INTO bp VALUES ('a', 1), (E'a\\x01', 2), ('b', 3);
    """)
    old = snap(pg, repo, db)
    pg.execute(db, """
        UPDATE a SET v = 'changed' WHERE id IN (10, 4000);
        DELETE FROM a WHERE id = 20;
        INSERT INTO a VALUES (6000, 'new');
        UPDATE b SET n = -1 WHERE id = 7;
        DELETE FROM bag WHERE ctid = (SELECT min(ctid) FROM bag WHERE v = 'x');
        INSERT INTO bag VALUES ('w'), ('w');
        DELETE FROM shuffled WHERE v = 'p'; INSERT INTO shuffled VALUES ('p');
        DROP TABLE gone;
        CREATE TABLE fresh (id int PRIMARY KEY); INSERT INTO fresh VALUES (1);
        ALTER TABLE same ADD COLUMN extra int;
        CREATE INDEX b_n_idx ON b (n);
        ALTER TABLE pol ENABLE ROW LEVEL SECURITY;
        CREATE POLICY mine ON pol USING (owner = current_user);
        SELECT setval('s', 42);
        DELETE FROM bp WHERE k = 'a';
    """)
    new = snap(pg, repo, db)
    r = run("diff", old, new, "-r", repo, "--rows", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["from"] == old and d["to"] == new and d["schema_changed"]
    tables = {t["name"]: t for t in d["tables"]}
    assert {n: t["status"] for n, t in tables.items()} == {
        "public.a": "changed", "public.b": "changed", "public.bag": "changed",
        "public.same": "changed", "public.gone": "removed", "public.fresh": "added",
        "public.pol": "unchanged", "public.bp": "changed",
        "public.shuffled": "unchanged"}     # the same rows in another order: no key
    bp = tables["public.bp"]
    assert (bp["inserted"], bp["deleted"], bp["updated"]) == (0, 1, 0), bp
    a = tables["public.a"]
    assert (a["inserted"], a["deleted"], a["updated"]) == (1, 1, 2)
    assert {(r["op"], r["key"]["id"]) for r in a["rows"]} == {
        ("insert", "6000"), ("delete", "20"), ("update", "10"), ("update", "4000")}
    upd = [r for r in a["rows"] if r["key"] == {"id": "10"}][0]
    assert upd["before"]["v"] == "a10" and upd["after"]["v"] == "changed"
    # Every row has both, as the original contract has them: null where there is none.
    ins, dele = ([r for r in a["rows"] if r["op"] == op][0] for op in ("insert", "delete"))
    assert ins["before"] is None and ins["after"]["id"] == "6000"
    assert dele["after"] is None and dele["before"]["id"] == "20"
    assert upd["changed"] == ["v"]
    assert not a["schema_changed"]
    b = tables["public.b"]
    assert (b["inserted"], b["deleted"], b["updated"]) == (0, 0, 1) and b["schema_changed"]
    assert any("b_n_idx" in o for o in b["objects"])
    bag = tables["public.bag"]
    assert sorted((r["op"], r["before"]["v"] if r["op"] == "delete" else r["after"]["v"],
                   r.get("count", 1)) for r in bag["rows"]) == [("delete", "x", 1), ("insert", "w", 2)]
    same = tables["public.same"]
    assert same["columns_added"] == ["extra"] and same["schema_changed"]
    assert (same["inserted"], same["deleted"], same["updated"]) == (0, 0, 0)
    pol = tables["public.pol"]
    assert pol["schema_changed"] and any("mine" in o for o in pol["objects"])
    assert d["sequences"] == [{"name": "public.s", "status": "changed", "before": 1, "after": 42}]
    assert "CREATE POLICY mine" in d["schema_diff"]
    assert "CREATE INDEX b_n_idx" in d["schema_diff"]
    assert any("index public.b_n_idx" in o for o in d["objects"]["added"])

    text = run("diff", old, new, "-r", repo, "--rows")
    assert text.code == 0
    assert "public.gone" in text.out and "removed" in text.out
    assert '~ {"id": "10"} v: "a10" -> "changed"' in text.out
    stat = run("diff", old, new, "-r", repo, "--stat")
    assert "CREATE POLICY" not in stat.out and "5 tables changed, 1 added, 1 removed" in stat.out
    brief = json.loads(run("diff", old, new, "-r", repo, "--stat", "--json").out)
    assert brief["schema_changed"] and brief["schema_diff"] == "" and brief["schema_diff_omitted"]
    full = json.loads(run("diff", old, new, "-r", repo, "--json").out)
    assert full["schema_diff"] and not full["schema_diff_omitted"]
    only = json.loads(run("diff", old, new, "-r", repo, "-t", "b", "--json").out)
    assert [t["name"] for t in only["tables"]] == ["public.b"]
    assert run("diff", old, new, "-r", repo, "--exit-code", "--stat").code == 1
    assert run("diff", new, new, "-r", repo, "--exit-code", "--stat").code == 0


def test_diff_between_distant_snapshots(pg, db, repo):
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v int); "
                   "INSERT INTO t SELECT g, 0 FROM generate_series(1, 1000) g")
    for i in range(6):
        snap(pg, repo, db)
        pg.execute(db, f"UPDATE t SET v = v + 1 WHERE id = {i + 1}")
    r = run("diff", "latest~5", "latest", "-r", repo, "--rows", "--json")
    assert r.code == 0, r.err
    (t,) = json.loads(r.out)["tables"]
    assert t["updated"] == 5 and t["inserted"] == t["deleted"] == 0
    assert run("diff", "latest~6", "latest", "-r", repo).code == 2


def test_diff_rows_in_a_database_that_is_not_utf8(pg, repo):
    """Values print as PostgreSQL prints them, in any server encoding (WIN1251 was
    shown as latin-1 mojibake), and a -t naming no table names both snapshots."""
    from test_roundtrip import database_in

    db = database_in(pg, "WIN1251", "cyr")
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t VALUES (1, 'привет'), (2, 'мир')")
    old = snap(pg, repo, db)
    pg.execute(db, "UPDATE t SET v = 'пока' WHERE id = 1")
    new = snap(pg, repo, db)
    r = run("diff", old, new, "-r", repo, "--rows", "--json")
    assert r.code == 0, r.err
    (row,) = json.loads(r.out)["tables"][0]["rows"]
    assert row["before"]["v"] == "привет" and row["after"]["v"] == "пока"
    r = run("diff", old, new, "-r", repo, "-t", "nosuch")
    assert r.code == 2 and f"in snapshot {old[:8]} or {new[:8]}" in r.err, r.err
