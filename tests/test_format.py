"""The frozen repository in tests/data must stay readable by every later version.

tests/data/repo-v1 was written by fpvault 0.1.0 (format 1) from a small
database; never regenerate it.  If a change breaks these tests, the change
broke every repository users already have.
"""

import json
import shutil
from pathlib import Path

import pytest

from conftest import run
from fpvault.manifest import FORMAT_VERSION

FROZEN = Path(__file__).parent / "data" / "repo-v1"
OLD, NEW = "44d7f1c8b7e1f6e103af23ec0780fb8ab9de1e43982130f8dfdc57e74a3f9c88", \
    "f03acea887902f4ad2f5563aa19c16bf8118032730c86c5eb7611b76456e2e78"


@pytest.fixture
def frozen(tmp_path):
    dst = tmp_path / "repo-v1"
    shutil.copytree(FROZEN, dst)
    return str(dst)


def test_frozen_repository_lists_and_shows(frozen):
    snaps = json.loads(run("list", "-r", frozen, "--json").out)
    assert [(s["id"], s["tags"], s["tables"], s["rows"]) for s in snaps] == [
        (OLD, ["frozen"], 2, 6), (NEW, ["frozen2"], 2, 7)]
    shown = json.loads(run("show", OLD[:8], "-r", frozen, "--json").out)
    assert shown["database"] == "frozen" and shown["server_version"] == "15.18"
    assert [(t["name"], t["rows"]) for t in shown["tables"]] == [
        ('public."Mixed Case"', 3), ("public.people", 3)]


def test_frozen_repository_writes_the_same_script(frozen):
    r = run("restore", OLD, "-r", frozen, "-o", "-")
    assert r.code == 0, r.err
    assert ('COPY public.people ("id", "name", "mood", "note") FROM STDIN;\n'
            "1\tAda\thappy\ttab\\there\n2\tBrian\t\\N\t\\\\N\n3\tChloé 🐘\tok\t\n\\.\n") in r.out
    assert "SELECT pg_catalog.setval('public.people_id_seq', 10, true);" in r.out
    assert "CREATE TYPE public.mood AS ENUM" in r.out


def test_frozen_repository_restores(pg, frozen):
    for sid, expect in ((OLD, [(1, "happy"), (2, None), (3, "ok")]),
                        (NEW, [(1, "sad"), (2, None), (3, "ok"), (11, None)])):
        target = pg.createdb()
        r = run("restore", sid, "-r", frozen, "--to", pg.dsn(target))
        assert r.code == 0, r.err
        assert pg.query(target, "SELECT id, mood::text FROM people ORDER BY id") == expect
        assert pg.query(target, 'SELECT count(*) FROM "Mixed Case"') == [(3,)]
        assert pg.query(target, "SELECT convert_from(lo_get(424242), 'UTF8')") == [
            ("frozen large object",)]


def test_a_snapshot_into_a_format_1_repository_upgrades_it(pg, db, frozen):
    """New snapshots may store frames, which fpvault 0.1.0 cannot read: the config
    says the current format from then on (0.1.0 refuses it instead of misreading it), and
    everything already there reads as before."""
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text); "
                   "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    r = run("snap", "-r", frozen, "-d", pg.dsn(db), "--json")
    assert r.code == 0, r.err
    new = json.loads(r.out)["id"]
    assert json.loads(Path(frozen, "config").read_text())["version"] == FORMAT_VERSION
    assert run("verify", "-r", frozen, "--read-data").code == 0
    for sid in (OLD, NEW, new):
        target = pg.createdb()
        assert run("restore", sid, "-r", frozen, "--to", pg.dsn(target)).code == 0, sid
    assert pg.query(target, "SELECT count(*) FROM t") == [(5000,)]


def test_manifests_load_without_the_garbage_collector_scanning_them(frozen):
    """A manifest's tables and streams are not tracked by the garbage collector (no
    cycles; 160,000 of them, from 48 snapshots of 3,400 tables, cost 2.1 s of
    collections while they were decoded), and the collector is paused while a
    manifest loads and left as it was after."""
    import gc
    from fpvault.manifest import Stream, TableEntry
    from fpvault.vault import Vault

    t = TableEntry(schema="s", name="t", qname="s.t", oid=1, columns=["a"],
                   data=Stream(list="00", bytes=0, hash="00"))
    assert not gc.is_tracked(t) and not gc.is_tracked(t.data)
    assert gc.isenabled()
    assert Vault.open(frozen).load_snapshot(OLD).tables
    assert gc.isenabled()
    gc.disable()
    try:
        Vault.open(frozen).load_snapshot(OLD)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_snapshot_head_is_its_manifest_without_the_lists():
    """The head that listing decodes has every field of a manifest but the lists
    of tables, sequences and large objects, with the same defaults, so that an old
    manifest decodes the same as either."""
    import msgspec
    from fpvault.manifest import Snapshot, SnapshotHead

    lists = {"tables", "sequences", "large_objects"}
    whole = {f.name: (f.type, f.default) for f in msgspec.structs.fields(Snapshot)}
    head = {f.name: (f.type, f.default) for f in msgspec.structs.fields(SnapshotHead)}
    assert head == {k: v for k, v in whole.items() if k not in lists}


def test_listing_holds_heads_with_the_totals_of_the_whole_manifests(frozen):
    """vault.snapshots() gives heads: no table list to be mistaken for an empty one
    (prune would count none of its blobs live), but the totals of the whole."""
    from fpvault.vault import Vault

    vault = Vault.open(frozen)
    heads = vault.snapshots()
    assert [h.id for h in heads] == [OLD, NEW]
    for head in heads:
        whole = vault.load_snapshot(head.id)
        assert not hasattr(head, "tables") and whole.tables
        assert (head.table_count, head.rows, head.bytes, head.time, head.schema) == (
            len(whole.tables), whole.rows, whole.bytes, whole.time, whole.schema)
