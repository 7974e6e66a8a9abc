"""Trained zstd dictionaries: one per large stream, carried forward, transparent everywhere."""

import json
import random
from pathlib import Path

import pytest

from conftest import run
from test_delta import script, snap

from fpvault import packs, vault as vault_mod
from fpvault.vault import Vault

ACTIONS = ["login", "logout", "comment", "approve", "reject", "upload", "share", "archive"]
NAMES = ["ada", "grace", "linus", "barbara", "ken", "dennis", "margaret", "edsger"]
AGENTS = ["Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
          "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 Version/17.1",
          "curl/8.4.0", "python-requests/2.31.0"]


def app_rows(rnd: random.Random, start: int, n: int) -> list[str]:
    """Rows like an audit log's: values drawn from a vocabulary much larger than a chunk
    holds but recurring across the table (users, paths), so that a chunk compressed
    on its own misses what a dictionary can carry."""
    vocab = random.Random(0)
    users = [f"{vocab.choice(NAMES)}.{vocab.randbytes(3).hex()}@example.com" for _ in range(3000)]
    paths = [f"/api/v2/{vocab.choice(ACTIONS)}/{vocab.randbytes(4).hex()}" for _ in range(3000)]

    def pick(pool):
        return pool[min(int(rnd.expovariate(1 / 300)), len(pool) - 1)]
    return [f'{i}\t{rnd.randrange(1, 50)}\t{rnd.choice(ACTIONS)}\t{{"user": "{pick(users)}", '
            f'"path": "{pick(paths)}", "agent": "{rnd.choice(AGENTS)}", '
            f'"status": {rnd.choice([200, 200, 200, 201, 404])}}}\t'
            f'2026-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d} 12:{rnd.randrange(60):02d}'
            f':00+00\n' for i in range(start, start + n)]


def encodings(vault: Vault) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for _, e in vault.index.blobs.values():
        out[e.type, e.encoding] = out.get((e.type, e.encoding), 0) + 1
    return out


def test_a_large_stream_gets_a_dictionary_that_pays(tmp_path, monkeypatch):
    rows = app_rows(random.Random(1), 0, 60000)
    data = "".join(rows).encode()
    vault = Vault.create(str(tmp_path / "with"))
    stream, _ = vault.write_stream([data[i:i + 100000] for i in range(0, len(data), 100000)])
    vault.store.flush()
    assert stream.dictionary
    kinds = encodings(vault)
    assert kinds[packs.DICT, packs.ZSTD] == 1
    assert kinds[packs.DATA, packs.ZDICT] == stream.chunks
    fresh = Vault.open(str(tmp_path / "with"))
    assert fresh.read_bytes(stream) == data

    monkeypatch.setattr(vault_mod, "DICT_MIN_CHUNKS", 10**9)   # never train
    plain = Vault.create(str(tmp_path / "without"))
    plain_stream, _ = plain.write_stream([data])
    plain.store.flush()
    assert not plain_stream.dictionary and packs.ZDICT not in {k[1] for k in encodings(plain)}
    # The dictionary and everything compressed with it take at least 5% less.
    assert vault.store.stats.bytes_added < plain.store.stats.bytes_added * 0.95, (
        vault.store.stats.bytes_added, plain.store.stats.bytes_added)


@pytest.mark.parametrize("password", [None, "correct horse"])
def test_the_dictionary_is_carried_to_the_next_version(tmp_path, password):
    """Also encrypted: the dictionary is a sealed blob with a keyed id like any other."""
    rnd = random.Random(2)
    rows = app_rows(rnd, 0, 60000)
    v1 = "".join(rows).encode()
    vault = Vault.create(str(tmp_path / "r"), password=password)
    s1, _ = vault.write_stream([v1])
    vault.store.flush()
    for i in rnd.sample(range(len(rows)), 600):        # 1% updated, scattered
        rows[i] = app_rows(rnd, i, 1)[0]
    rows += app_rows(rnd, 60000, 3000)                 # and appended
    v2 = "".join(rows).encode()
    before = dict(encodings(vault))
    s2, _ = vault.write_stream([v2], s1)
    vault.store.flush()
    after = encodings(vault)
    assert s2.dictionary == s1.dictionary
    assert after[packs.DICT, packs.ZSTD] == before[packs.DICT, packs.ZSTD] == 1
    # Changed chunks became deltas; the appended ones, new, use the dictionary.
    assert after[packs.DATA, packs.DELTA] > 10
    assert after[packs.DATA, packs.ZDICT] > before[packs.DATA, packs.ZDICT]
    fresh = Vault.open(str(tmp_path / "r"), password=lambda: password)
    assert fresh.read_bytes(s1) == v1 and fresh.read_bytes(s2) == v2
    if password:   # nothing of the dictionary's content is readable in the packs
        dictionary = fresh.store.get(bytes.fromhex(s1.dictionary))
        sample = dictionary[-64:]
        assert all(sample not in p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file())


def test_no_dictionary_where_it_cannot_pay(tmp_path):
    vault = Vault.create(str(tmp_path / "r"))
    small = "".join(app_rows(random.Random(3), 0, 2000)).encode()        # ~0.3 MiB
    noise = random.Random(4).randbytes(6 << 20)                          # incompressible
    streams = [vault.write_stream([small])[0], vault.write_stream([noise])[0]]
    vault.store.flush()
    assert [s.dictionary for s in streams] == ["", ""]
    assert (packs.DICT, packs.ZSTD) not in encodings(vault)
    fresh = Vault.open(str(tmp_path / "r"))
    assert fresh.read_bytes(streams[0]) == small and fresh.read_bytes(streams[1]) == noise
    # A full sample that did not pay is not tried again; a short one is, once it grows.
    assert [s.no_dictionary for s in streams] == [False, True]
    tried = []
    real_train = fresh.store.train_dictionary
    fresh.store.train_dictionary = lambda samples: tried.append(len(samples)) or real_train(samples)
    noise2 = random.Random(5).randbytes(6 << 20)
    again, _ = fresh.write_stream([noise2], streams[1])
    assert tried == [] and again.no_dictionary
    grown = small + "".join(app_rows(random.Random(6), 2000, 60000)).encode()
    bigger, _ = fresh.write_stream([grown], streams[0])
    assert len(tried) == 1 and bigger.dictionary


# Users and paths recur across the table, skewed, as in test_dictionary's app_rows.
AUDIT_SQL = """
SELECT setseed(0.42);
CREATE TABLE audit (id int PRIMARY KEY, org int, action text, payload jsonb, at timestamptz);
INSERT INTO audit SELECT g, g % 50, (ARRAY['login','logout','comment','approve','share'])[g % 5 + 1],
  jsonb_build_object(
    'user', md5(least(floor(-300 * ln(1 - random())), 2999)::text) || '@example.com',
    'path', '/api/v2/' || md5('p' || least(floor(-300 * ln(1 - random())), 2999)::text),
    'agent', (ARRAY['Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36',
                    'curl/8.4.0', 'python-requests/2.31.0'])[g % 3 + 1],
    'status', (ARRAY[200, 200, 201, 404])[g % 4 + 1]),
  timestamptz '2026-01-01' + g * interval '37 seconds'
FROM generate_series(1, 60000) g;
"""


def test_dictionaries_in_snapshots_prune_and_verify(pg, db, repo):
    pg.execute(db, AUDIT_SQL)
    first = snap(pg, repo, db)
    pg.execute(db, "UPDATE audit SET payload = payload || '{\"seen\": true}' WHERE id % 100 = 7; "
                   "INSERT INTO audit SELECT g, 1, 'login', '{\"ip\": \"10.0.0.1\"}', now() "
                   "FROM generate_series(60001, 62000) g")
    second = snap(pg, repo, db)
    vault = Vault.open(repo)
    table = vault.resolve(second["id"])[1].tables[0]
    assert table.data.dictionary
    assert vault.resolve(first["id"])[1].tables[0].data.dictionary == table.data.dictionary
    expected = script(repo, second["id"])

    # Forget the snapshot that trained the dictionary: prune keeps it for the second.
    assert run("forget", first["id"], "-r", repo, "--prune").code == 0
    assert run("verify", "-r", repo, "--read-data").code == 0
    assert script(repo, second["id"]) == expected
    target = pg.createdb()
    assert run("restore", "latest", "-r", repo, "--to", pg.dsn(target)).code == 0
    assert pg.query(target, "SELECT count(*), sum(length(payload::text)) FROM audit") == \
        pg.query(db, "SELECT count(*), sum(length(payload::text)) FROM audit")

    # A damaged dictionary: verify names it and the snapshot; restore refuses.
    vault = Vault.open(repo)
    pack_id, e = vault.index.blobs[bytes.fromhex(table.data.dictionary)]
    path = Path(repo) / packs.pack_name(pack_id)
    raw = bytearray(path.read_bytes())
    raw[e.offset + e.length // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    r = run("verify", "-r", repo, "--read-data", "--json")
    assert r.code == 3
    assert json.loads(r.out)["affected"] == {second["id"]: ["table public.audit"]}
    r = run("restore", second["id"], "-r", repo, "-o", "-")
    assert r.code == 3 and "public.audit" in r.err and "dictionary" in r.err
