"""Extensions' configuration tables and sequences (pg_extension_config_dump).

CREATE EXTENSION makes them, so the schema dump has no entry for them, and may
fill them with rows of its own; what the user added is data that pg_dump
dumps, filtered by the extension's condition (PostGIS's spatial_ref_sys is the
best-known case).  Two small test extensions are installed into the server's
share directory for this (the session runs as root in CI, where it always
can; elsewhere a test that cannot write there says so and skips).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run
from fpvault import pgsource
from fpvault.vault import Vault
from pgcompare import assert_same_database
from test_roundtrip import restore_into, restore_script, snap

# Relocatable: its script runs with search_path set to the schema CREATE EXTENSION names.
CFG_CONTROL = """\
comment = 'fpvault tests: configuration tables with and without a condition, a sequence'
default_version = '1.0'
relocatable = true
"""
CFG_SCRIPT = """\
CREATE TABLE settings (id int PRIMARY KEY, v text, shipped bool NOT NULL DEFAULT false);
INSERT INTO settings VALUES (1, 'shipped one', true), (2, 'shipped two', true);
SELECT pg_catalog.pg_extension_config_dump('settings', 'WHERE NOT shipped');
CREATE TABLE rules (r text);
SELECT pg_catalog.pg_extension_config_dump('rules', '');
CREATE SEQUENCE counter;
SELECT pg_catalog.pg_extension_config_dump('counter', '');
CREATE TABLE internal (x int);
INSERT INTO internal VALUES (42);
"""
# Its script makes a schema, which is then a member of the extension (a schema that
# the control file names and CREATE EXTENSION makes is not).
OWNED_CONTROL = """\
comment = 'fpvault tests: a configuration table in a schema the extension makes'
default_version = '1.0'
relocatable = false
"""
OWNED_SCRIPT = """\
CREATE SCHEMA fpv_owned;
CREATE TABLE fpv_owned.prefs (k text PRIMARY KEY, v text);
SELECT pg_catalog.pg_extension_config_dump('fpv_owned.prefs', '');
"""
# A condition that chooses other rows as time goes by.
RECENT_CONTROL = """\
comment = 'fpvault tests: a configuration table whose condition calls now()'
default_version = '1.0'
relocatable = true
"""
RECENT_SCRIPT = """\
CREATE TABLE recent (id int PRIMARY KEY, ts timestamptz NOT NULL DEFAULT now());
INSERT INTO recent VALUES (0, '2000-01-01');
SELECT pg_catalog.pg_extension_config_dump('recent', 'WHERE ts > now() - interval ''2 seconds''');
"""
EXTENSIONS = {"fpvault_cfg": (CFG_CONTROL, CFG_SCRIPT),
              "fpvault_owned": (OWNED_CONTROL, OWNED_SCRIPT),
              "fpvault_recent": (RECENT_CONTROL, RECENT_SCRIPT)}


@pytest.fixture(scope="session")
def test_extensions(pg):
    """The two extensions' files in the server's share directory."""
    with pg.connect() as conn:
        (share,) = conn.execute(
            "SELECT setting FROM pg_catalog.pg_config WHERE name = 'SHAREDIR'").fetchone()
    folder = Path(share) / "extension"
    written = []
    try:
        for name, (control, script) in EXTENSIONS.items():
            for path, text in ((folder / f"{name}.control", control),
                               (folder / f"{name}--1.0.sql", script)):
                if not path.exists() or path.read_text() != text:
                    path.write_text(text)
                    written.append(path)
    except OSError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Cannot install the test extensions into {folder}: {exc}")
        pytest.skip(f"cannot install the test extensions into {folder} ({exc.strerror}); "
                    "run the tests as a user who may write there, or in CI")
    yield
    for path in written:
        path.unlink(missing_ok=True)


@pytest.fixture
def ext_db(pg, db, test_extensions):
    """A database with both extensions, rows of the user's own in their configuration
    tables beside the shipped ones, and an ordinary table."""
    pg.execute(db, """
        CREATE SCHEMA cfg;
        CREATE EXTENSION fpvault_cfg SCHEMA cfg;
        CREATE EXTENSION fpvault_owned;
        INSERT INTO cfg.settings VALUES (3, 'mine', false), (4, 'also mine', false);
        UPDATE cfg.settings SET v = 'shipped, edited' WHERE id = 2;
        INSERT INTO cfg.rules VALUES ('r1'), ('r2');
        INSERT INTO cfg.internal VALUES (7);
        SELECT setval('cfg.counter', 77);
        INSERT INTO fpv_owned.prefs VALUES ('theme', 'dark');
        CREATE TABLE public.t (id int PRIMARY KEY, v text);
        INSERT INTO public.t SELECT g, 'row ' || g FROM generate_series(1, 500) g;""")
    return db


def pg_dump_data(pg, db: str, tmp_path: Path, *filters: str) -> set[tuple[str, str]] | None:
    """What pg_dump's data section holds, with these filters: (schema, name) of every
    table's data and every sequence's value; None if pg_dump refuses them."""
    archive = tmp_path / f"data-{time.monotonic_ns()}.dump"
    dump = subprocess.run([pg.tool("pg_dump"), "-Fc", "--section=data", "-f", str(archive),
                           *filters, "-d", pg.dsn(db)], capture_output=True)
    if dump.returncode:
        return None
    listing = subprocess.run([pg.tool("pg_restore"), "-l", str(archive)], check=True,
                             capture_output=True, text=True).stdout
    out = set()
    for line in listing.splitlines():
        for kind in (" TABLE DATA ", " SEQUENCE SET "):
            if kind in line:
                schema, name = line.split(kind, 1)[1].split()[:2]
                out.add((schema, name))
    return out


def snapped(pg, repo: str, sid: str) -> set[tuple[str, str]]:
    """(schema, name) of every table and sequence a snapshot holds."""
    shown = json.loads(run("show", sid, "-r", repo, "--json").out)
    names = [t["name"] for t in shown["tables"]] + [s["name"] for s in shown["sequences"]]
    return {tuple(n.replace('"', "").split(".", 1)) for n in names}


def test_configuration_tables_restore_every_way(pg, ext_db, repo, tmp_path):
    sid = snap(repo, pg.dsn(ext_db))
    shown = json.loads(run("show", sid, "-r", repo, "--json").out)
    tables = {t["name"]: t for t in shown["tables"]}
    # The user's rows only (the condition), all of rules, none of the extension's
    # internal table (CREATE EXTENSION makes it whole).
    assert tables["cfg.settings"]["rows"] == 2 and tables["cfg.settings"]["extension"] == \
        "fpvault_cfg"
    assert tables["cfg.rules"]["rows"] == 2 and tables["fpv_owned.prefs"]["rows"] == 1
    assert "cfg.internal" not in tables and tables["public.t"]["extension"] is None
    assert {s["name"]: s["last_value"] for s in shown["sequences"]} == {"cfg.counter": 77}
    assert "configuration of extension fpvault_cfg" in run("show", sid, "-r", repo).out

    # Each way, the database pg_dump | psql makes: the shipped rows come from CREATE
    # EXTENSION (as it ships them: edits to them, and to the extension's other tables,
    # are not the user's data), the user's from the snapshot; with -j the table is
    # never emptied first to load it frozen.
    dumped = pg.createdb("dumped")
    script = subprocess.run([pg.tool("pg_dump"), "-d", pg.dsn(ext_db)], check=True,
                            capture_output=True).stdout
    subprocess.run([pg.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d",
                    pg.dsn(dumped)], input=script, check=True, capture_output=True)
    assert pg.query(dumped, "SELECT id, v FROM cfg.settings ORDER BY id") == [
        (1, "shipped one"), (2, "shipped two"), (3, "mine"), (4, "also mine")]
    assert_same_database(pg, dumped, restore_into(pg, repo, sid))
    assert_same_database(pg, dumped, restore_into(pg, repo, sid, "-j", "2"))
    assert_same_database(pg, dumped, restore_script(pg, repo, sid, tmp_path / "all.sql"))
    scratch = pg.createdb("scratch")
    r = run("verify", "-r", repo, "--read-data", "--restore-test", pg.dsn(scratch))
    assert r.code == 0, r.err + r.out


@pytest.mark.parametrize("filters", [
    (),
    ("-n", "cfg"),
    ("-n", "public"),
    ("-n", "fpv_owned"),          # the extension's own schema: pg_dump leaves its data out
    ("-n", "CFG"),                # folds to cfg
    ("-n", '"CFG"'),              # quoted: no such schema, which pg_dump refuses
    ("-t", "cfg.settings"),
    ("-t", "cfg.*", "-T", "cfg.rules"),
    ("-t", "settings", "-t", "public.t"),   # not on search_path: only public.t
    ("-t", "c?g.rul*", "-t", "public.t"),
    ("-T", "cfg.rules"),
    ("-T", "rules"),              # unqualified and not visible: excludes nothing
    ("-N", "cfg"),
    ("-N", "fpv_*"),
], ids=lambda f: " ".join(f) or "none")
def test_the_data_pg_dump_would_dump(pg, ext_db, repo, tmp_path, filters):
    """The tables and sequences read are those whose data pg_dump dumps, for every
    kind of pattern, compared with pg_dump's own list."""
    expected = pg_dump_data(pg, ext_db, tmp_path, *filters)
    if expected is None:
        r = run("snap", "-r", repo, "-d", pg.dsn(ext_db), *filters)
        assert r.code != 0 and "pg_dump failed" in r.err, r.err
        return
    assert snapped(pg, repo, snap(repo, pg.dsn(ext_db), *filters)) == expected


def test_a_configuration_table_on_the_search_path(pg, ext_db, repo, tmp_path):
    """An unqualified -t/-T pattern matches as pg_dump matches it: among the tables on
    the role's search_path, which fpvault's own reading sessions leave empty."""
    pg.execute(ext_db, f'ALTER DATABASE "{ext_db}" SET search_path = public, cfg')
    for filters in (("-t", "settings"), ("-T", "rules")):
        expected = pg_dump_data(pg, ext_db, tmp_path, *filters)
        assert ("cfg", "settings") in expected
        assert snapped(pg, repo, snap(repo, pg.dsn(ext_db), *filters)) == expected


def test_a_configuration_table_with_a_condition_is_always_read(pg, ext_db, repo):
    """After a commit, a table is taken unread when its rows are as old and as many as
    the previous snapshot saw; the rows a condition chooses are not told that way."""
    dsn = pg.dsn(ext_db)
    first = snap(repo, dsn)
    # One of the user's rows goes, and a shipped row with it: the table then has as
    # many rows as the snapshot holds, all of them old.
    pg.execute(ext_db, "DELETE FROM cfg.settings WHERE id IN (2, 3)")
    second = snap(repo, dsn)
    assert first != second
    target = restore_into(pg, repo, second)
    assert pg.query(target, "SELECT id FROM cfg.settings WHERE NOT shipped ORDER BY id") == \
        [(4,)]
    # The others are looked at as any table is.
    pg.execute(ext_db, "INSERT INTO public.t VALUES (1000, 'new')")
    r = run("snap", "-r", repo, "-d", dsn, "--json")
    result = json.loads(r.out)
    # cfg.rules and fpv_owned.prefs taken unread; cfg.settings (condition) and
    # public.t (changed) read.
    assert result["tables_reused"] == 2, result
    # Even with no transaction ended since (a condition may call now()): read.
    vault = Vault.open(repo)
    for _ in range(10):
        quiet = json.loads(run("snap", "-r", repo, "-d", dsn, "--json").out)
        marks = [vault.resolve(sid)[1].xact for sid in (result["id"], quiet["id"])]
        if marks[0] == marks[1]:
            break
        result = quiet
    else:
        raise AssertionError("transactions kept ending between two snapshots")
    assert quiet["tables_reused"] == 3 and quiet["bytes_read"] > 0, quiet


@pytest.mark.parametrize("pattern, qualified, expected", [
    ("Foo", True, (None, "^(foo)$")),
    ('"Foo"', True, (None, "^(Foo)$")),
    ("s.t", True, ("^(s)$", "^(t)$")),
    ("db.s.t", True, ("^(s)$", "^(t)$")),
    ("db.s.t.u", True, ("^(s)$", "^(t.u)$")),      # dots past the third are the name's
    ("s.t", False, (None, "^(s.t)$")),              # a schema pattern has one part
    ('"a.b"', True, (None, r"^(a\.b)$")),
    ('"x""y"', True, (None, '^(x"y)$')),
    ('"a*"', True, (None, r"^(a\*)$")),
    ("a*", True, (None, "^(a.*)$")),
    ("a?", True, (None, "^(a.)$")),
    ("a$b", True, (None, r"^(a\$b)$")),
    ("t[]", True, (None, r"^(t\[])$")),
    ("a|b", True, (None, "^(a|b)$")),               # outside quotes, a regular expression
    ("*.T", True, ("^(.*)$", "^(t)$")),
])
def test_patterns_read_as_pg_dump_reads_them(pattern, qualified, expected):
    assert pgsource.name_pattern(pattern, qualified) == expected


def test_restore_test_of_a_condition_that_chooses_other_rows_now(pg, db, repo, test_extensions,
                                                                 monkeypatch):
    """A configuration table whose condition calls now(): the rows it chose when snap
    ran are restored (beside the one CREATE EXTENSION ships), and verify's restore
    test checks they are there rather than read the table back with the condition,
    which chooses none of them two seconds later."""
    from fpvault import restore as restore_mod

    pg.execute(db, "CREATE EXTENSION fpvault_recent; INSERT INTO recent (id) VALUES (1), (2)")
    sid = snap(repo, pg.dsn(db))
    assert {t["name"]: t["rows"] for t in json.loads(
        run("show", sid, "-r", repo, "--json").out)["tables"]} == {"public.recent": 2}
    time.sleep(2.5)
    r = run("verify", "-r", repo, "--restore-test", pg.dsn(pg.createdb("scratch")), "--json")
    assert r.code == 0 and json.loads(r.out)["tables_restored"] == 1, r.out + r.err
    # And a stored row missing from the restore is found.
    real = restore_mod.to_database

    def losing(vault, plan, conninfo, before_commit=None, **kw):
        def lose(cur):
            cur.execute("DELETE FROM public.recent WHERE id = 2")
            before_commit(cur)
        return real(vault, plan, conninfo, before_commit=lose, **kw)

    monkeypatch.setattr(restore_mod, "to_database", losing)
    r = run("verify", sid, "-r", repo, "--restore-test", pg.dsn(pg.createdb("scratch")))
    assert r.code == 3 and "1 of the 2 rows stored" in r.err, r.err
