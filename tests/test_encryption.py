"""Encrypted repositories: passwords, confidentiality, tampering."""

import json
from pathlib import Path

import blake3
import pytest

from conftest import run
from fpvault import packs
from fpvault.vault import Vault

SECRET = "a-value-the-storage-host-must-never-see"


@pytest.fixture
def encrypted(pg, db, tmp_path, monkeypatch):
    monkeypatch.setenv("FPVAULT_PASSWORD", "old password")
    repo = str(tmp_path / "enc")
    assert run("init", "-r", repo, "--encrypt").code == 0
    pg.execute(db, f"CREATE TABLE t (id int PRIMARY KEY, v text); "
                   f"INSERT INTO t SELECT g, '{SECRET}' || g FROM generate_series(1, 20000) g")
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    assert r.code == 0, r.err
    return repo, json.loads(r.out)["id"]


def test_nothing_readable_without_the_key(encrypted, pg, db):
    repo, sid = encrypted
    chunk = f"1\t{SECRET}1\n".encode()
    for path in Path(repo).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data, path
            assert b'"tables"' not in data and b"public.t" not in data, path
    # Ids are keyed hashes: the plain BLAKE3 of a known chunk is not an id here.
    vault = Vault.open(repo, password=lambda: "old password")
    assert blake3.blake3(chunk).digest() not in vault.index.blobs
    assert sid != blake3.blake3(b"").hexdigest()


def test_passwords(encrypted, pg, monkeypatch, tmp_path):
    repo, sid = encrypted
    monkeypatch.setenv("FPVAULT_PASSWORD", "wrong")
    r = run("list", "-r", repo)
    assert r.code == 1 and "Wrong password" in r.err
    monkeypatch.delenv("FPVAULT_PASSWORD")
    r = run("list", "-r", repo)
    assert r.code == 1 and "password is needed" in r.err
    pw = tmp_path / "pw"
    pw.write_text("old password\n")
    assert run("list", "-r", repo, "--password-file", str(pw)).code == 0
    r = run("key", "passwd", "-r", repo, "--password-file", str(pw),
            env={"FPVAULT_NEW_PASSWORD": "new password"})
    assert r.code == 0, r.err
    assert len(list((Path(repo) / "keys").iterdir())) == 1
    assert run("list", "-r", repo, "--password-file", str(pw)).code == 1
    monkeypatch.setenv("FPVAULT_PASSWORD", "new password")
    r = run("restore", sid, "-r", repo, "-o", "-")
    assert r.code == 0 and f"{SECRET}20000" in r.out
    r = run("key", "passwd", "-r", str(tmp_path / "plain"))
    assert r.code == 1


@pytest.mark.parametrize("target", ["pack", "manifest", "index"])
def test_tampering_is_detected(encrypted, target):
    repo, sid = encrypted
    if target == "pack":
        path = next((Path(repo) / "data").rglob("*"))
        while path.is_dir():
            path = next(path.iterdir())
    elif target == "manifest":
        path = Path(repo) / "snapshots" / sid
    else:
        path = next((Path(repo) / "index").iterdir())
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    r = run("verify", "-r", repo, "--read-data", "--json")
    assert r.code == 3
    doc = json.loads(r.out)
    assert doc["problems"]
    if target != "index":
        assert sid in doc["affected"]
    r = run("restore", sid, "-r", repo, "-o", "-")
    assert r.code in (2, 3)   # a manifest that fails authentication is no longer listed


def test_encrypted_deltas_and_prune(encrypted, pg, db):
    repo, first = encrypted
    pg.execute(db, "UPDATE t SET v = v || '!' WHERE id % 100 = 5")
    r = run("snap", "-r", repo, "-d", pg.dsn(db), "--json")
    second = json.loads(r.out)
    assert second["bytes_added"] < 200_000
    vault = Vault.open(repo, password=lambda: "old password")
    assert any(e.encoding == packs.DELTA for _, e in vault.index.blobs.values())
    assert run("forget", first, "-r", repo, "--prune").code == 0
    assert run("verify", "-r", repo, "--read-data").code == 0
    target = pg.createdb()
    assert run("restore", "latest", "-r", repo, "--to", pg.dsn(target)).code == 0
    assert pg.query(target, "SELECT count(*) FILTER (WHERE v LIKE '%!') FROM t") == [(200,)]


def test_a_damaged_key_object_is_skipped(tmp_path, monkeypatch):
    """Two key objects (as a 'key passwd' killed between writing the new one and
    deleting the old leaves): damage to one must not lock out the password of the
    other, nor crash; with every key damaged, exit 3 and say so."""
    from fpvault import crypto
    from fpvault.backend import LocalBackend

    repo = str(tmp_path / "enc")
    monkeypatch.setenv("FPVAULT_PASSWORD", "old password")
    assert run("init", "-r", repo, "--encrypt").code == 0
    backend = LocalBackend(repo)
    (intact,) = list(backend.list("keys/"))
    _, _, master = crypto.unlock(backend, "old password")
    backend.put("keys/0" + "0" * 31, crypto.wrap(master, "new password"))   # sorts first
    keys = Path(repo) / "keys"
    for damage in (b'{"n": 3', b'{"kdf":"scrypt","n":1000,"r":8,"p":1,"salt":"AA==","data":"AA=="}',
                   b'{"kdf":"scrypt","n":16384,"r":8,"p":1,"salt":"AA==","data":"!!"}',
                   # (scrypt accepts it; too short for a nonce: 'ValueError: Nonce must
                   # be 12 bytes' from deep inside, before)
                   b'{"kdf":"scrypt","n":16384,"r":8,"p":1,"salt":"AA==","data":"AAAA"}'):
        (keys / ("0" + "0" * 31)).write_bytes(damage)
        r = run("list", "-r", repo)
        assert r.code == 0, r.err
        monkeypatch.setenv("FPVAULT_PASSWORD", "wrong")
        r = run("list", "-r", repo)
        assert r.code == 1 and "Wrong password" in r.err and "cannot be read" in r.err, r.err
        monkeypatch.setenv("FPVAULT_PASSWORD", "old password")
    (keys / intact.split("/")[1]).write_bytes(b"garbage")
    r = run("list", "-r", repo)
    assert r.code == 3 and "key objects" in r.err and "internal error" not in r.err, r.err
