"""pg_dump and pg_restore: finding them, checking their version, running them.

fpvault reads table data itself but leaves DDL to pg_dump, which knows every
object type of every server version.  pg_dump must be at least the server's
major version (an older one refuses, or misses objects), and pg_restore at
least the pg_dump that wrote an archive.

Search order for a tool: the directory in ``FPVAULT_PG_BINDIR`` (only there,
when set); Debian/Ubuntu's ``/usr/lib/postgresql/<major>/bin`` from the
needed major upwards; ``pg_config --bindir``; ``PATH``.

Since 15.14/16.10/17.6, plain-text output starts with ``\\restrict KEY`` and
ends with ``\\unrestrict KEY`` with a random key.  We pass a fixed key, so the
text is the same on every run, and strip those two lines: the SQL is executed
through psycopg or written into fpvault's own script.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from .errors import ToolError

RESTRICT_KEY = "fpvault"


@dataclass(frozen=True)
class Tool:
    path: str
    version: str      # e.g. "15.18"
    major: int
    supports_restrict_key: bool


def _candidates(name: str, min_major: int) -> list[str]:
    bindir = os.environ.get("FPVAULT_PG_BINDIR")
    if bindir:
        return [os.path.join(bindir, name)]
    found: list[str] = []
    majors = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        m = re.search(r"/postgresql/(\d+)/bin$", d)
        if m:
            majors.append((int(m.group(1)), d))
    # The server's own major first, then newer ones.
    for major, d in sorted(majors, key=lambda md: (md[0] < min_major, md[0])):
        found.append(os.path.join(d, name))
    bindir = _pg_config_bindir(shutil.which("pg_config"))
    if bindir:
        found.append(os.path.join(bindir, name))
    on_path = shutil.which(name)
    if on_path:
        found.append(on_path)
    return found


@functools.lru_cache(maxsize=None)
def _pg_config_bindir(pg_config: str | None) -> str | None:
    if not pg_config:
        return None
    try:
        return subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _probe(path: str) -> Tool | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.access(path, os.X_OK):
        return None
    return _probe_file(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _probe_file(path: str, _mtime: int, _size: int) -> Tool | None:
    """Version of the tool at ``path`` (cached while the file is unchanged)."""
    procs = []
    try:
        # Both at once: each costs a few milliseconds, before every snapshot.
        for arg in ("--version", "--help"):
            procs.append(subprocess.Popen([path, arg], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True))
        out, helptext = (p.communicate(timeout=30)[0] for p in procs)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    m = re.search(r"\)\s+(\d+)(?:\.(\d+))?", out)
    if not m:
        return None
    version = m.group(1) + (f".{m.group(2)}" if m.group(2) else "")
    return Tool(path, version, int(m.group(1)), "--restrict-key" in helptext)


def find_tool(name: str, min_major: int, why: str) -> Tool:
    """The first ``name`` of at least ``min_major``, or a ToolError saying what to do."""
    seen = []
    for path in _candidates(name, min_major):
        tool = _probe(path)
        if tool is None:
            continue
        if tool.major >= min_major:
            return tool
        seen.append(f"{path} is version {tool.version}")
    where = (f"in FPVAULT_PG_BINDIR={os.environ['FPVAULT_PG_BINDIR']}"
             if os.environ.get("FPVAULT_PG_BINDIR") else "on this machine")
    if seen:
        raise ToolError(f"{name} {min_major} or newer is needed {why}, but only older ones are "
                        f"{where} ({'; '.join(seen)}). Install the PostgreSQL {min_major} client "
                        f"tools (e.g. apt-get install postgresql-client-{min_major}) or point "
                        "FPVAULT_PG_BINDIR at their bin directory.")
    raise ToolError(f"{name} was not found {where}; it is needed {why}. Install the PostgreSQL "
                    "client tools (e.g. apt-get install postgresql-client) or point "
                    "FPVAULT_PG_BINDIR at their bin directory.")


def find_psql(pg_dump: Tool) -> Tool | None:
    """The psql beside ``pg_dump`` (any psql reads COPY; this one is known to fit), else
    the first one found; None without one (snap then reads every table through libpq)."""
    beside = _probe(os.path.join(os.path.dirname(pg_dump.path), "psql"))
    if beside is not None:
        return beside
    try:
        return find_tool("psql", 0, "")
    except ToolError:
        return None


def run_tool(tool: Tool, args: list[str], env: dict[str, str] | None = None,
             what: str = "") -> bytes:
    """Run a tool; return its stdout or raise ToolError with its stderr."""
    try:
        proc = subprocess.run([tool.path, *args], capture_output=True, env=env)
    except OSError as exc:
        raise ToolError(f"Could not run {tool.path}: {exc.strerror}.") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = " ".join(err[-3:]) if err else f"exit status {proc.returncode}"
        raise ToolError(f"{os.path.basename(tool.path)} failed{' ' + what if what else ''}: {detail}")
    return proc.stdout


def restrict_args(tool: Tool) -> list[str]:
    return [f"--restrict-key={RESTRICT_KEY}"] if tool.supports_restrict_key else []


def strip_restrict(sql: bytes) -> bytes:
    """Remove the ``\\restrict``/``\\unrestrict`` lines of our fixed key."""
    for line in (b"\\restrict " + RESTRICT_KEY.encode() + b"\n",
                 b"\\unrestrict " + RESTRICT_KEY.encode() + b"\n"):
        sql = sql.replace(line, b"")
    return sql


def archive_sql(pg_restore: Tool, archive_path: str, section: str, *, no_owner: bool = False,
                no_privileges: bool = False, use_list: str | None = None) -> bytes:
    """The SQL text of one section of a custom-format archive."""
    args = [*restrict_args(pg_restore), f"--section={section}", "-f", "-"]
    if no_owner:
        args.append("--no-owner")
    if no_privileges:
        args.append("--no-privileges")
    if use_list:
        args.append(f"--use-list={use_list}")
    args.append(archive_path)
    return strip_restrict(run_tool(pg_restore, args, what=f"writing the {section} SQL"))


@dataclass(frozen=True)
class TocEntry:
    line: str
    dump_id: int
    catalog: int
    oid: int
    rest: str   # "DESC SCHEMA NAME OWNER"


# The header pg_restore writes before each entry of its SQL: name and type.
ENTRY_HEADER = re.compile(rb"^--\n-- Name: (.*); Type: (.*); Schema: .*; Owner: .*\n--\n", re.M)
_LARGE_OBJECT_TYPES = {b"BLOB", b"BLOBS", b"BLOB METADATA"}
_ABOUT_AN_OBJECT = {b"ACL", b"COMMENT", b"SECURITY LABEL"}

# What can hide a line that looks like a header: a string, a quoted name, a
# dollar-quoted body, a comment.  (A $ inside a name makes pg_dump quote it, so an
# unquoted $ not after a name's character starts a dollar quote or is a $1.)
_SQL_TOKEN = re.compile(rb"\n|--|/\*|(?<![A-Za-z0-9_\x80-\xff$])[Ee]'|'|\"|"
                        rb"(?<![A-Za-z0-9_\x80-\xff$])"
                        rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_BLOCK_COMMENT = re.compile(rb"/\*|\*/")


def entry_headers(sql: bytes) -> list[re.Match] | None:
    """The entry headers of pg_restore's SQL: the lines that look like one (ENTRY_HEADER)
    and begin outside any string, quoted name, dollar-quoted body or comment.  A
    policy's expression or an enum label can hold text that looks like a header;
    splitting there would cut a statement in two, and let what follows the fake
    header run as SQL of its own (restore -j) or hide what follows it (the
    comparison of schemas).  None if a header cannot be read for sure: its name,
    schema or owner holds one of the separators ("; Type: ", ...), so that its
    type could be another's (a schema named "s; Type: BLOB; Schema: x")."""
    starts = {0}
    pos = 0
    while (m := _SQL_TOKEN.search(sql, pos)) is not None:
        if m.group() == b"\n":
            starts.add(m.end())
            pos = m.end()
        else:
            pos = _past(sql, m.group(), m.end())
    heads = [m for m in ENTRY_HEADER.finditer(sql) if m.start() in starts]
    for m in heads:
        line = m.group(0)
        if any(line.count(sep) != 1 for sep in (b"; Type: ", b"; Schema: ", b"; Owner: ")):
            return None
    return heads


def _past(sql: bytes, token: bytes, end: int) -> int:
    """Where the comment, string, quoted name or dollar-quoted body that ``token``
    opens (it ends at ``end``) ends: the end of ``sql`` if it is not closed."""
    n = len(sql)
    if token == b"--":                       # to the end of the line (PostgreSQL: \r too)
        ends = [i for i in (sql.find(b"\n", end), sql.find(b"\r", end)) if i >= 0]
        return min(ends) if ends else n      # the newline is a token of its own
    if token == b"/*":                       # they nest
        depth = 1
        while depth and (c := _BLOCK_COMMENT.search(sql, end)) is not None:
            depth += 1 if c.group() == b"/*" else -1
            end = c.end()
        return n if depth else end
    if token.endswith((b"'", b'"')):         # '' (and "") is the quote itself
        quote, backslashes = token[-1:], len(token) == 2   # E'...': \' and \\ too
        while (q := sql.find(quote, end)) >= 0:
            k = q
            while backslashes and k > end and sql[k - 1] == 0x5C:
                k -= 1
            if (q - k) % 2:
                end = q + 1                  # an escaped quote
            elif sql[q + 1:q + 2] == quote:
                end = q + 2
            else:
                return q + 1
        return n
    q = sql.find(token, end)                 # $tag$ ... $tag$
    return n if q < 0 else q + len(token)


def without_large_objects(sql: bytes) -> bytes | None:
    """pg_restore's SQL without the entries that only describe large objects (their
    creation and owner, comments, grants, security labels): what is left is all
    that can change how a table's rows print.  None if the entries cannot be told
    for sure (entry_headers)."""
    heads = entry_headers(sql)
    if heads is None:
        return None
    out = [sql[:heads[0].start()] if heads else sql]
    for m, nxt in zip(heads, [*heads[1:], None]):
        name, kind = m.group(1), m.group(2)
        if kind in _LARGE_OBJECT_TYPES or (kind in _ABOUT_AN_OBJECT
                                           and name.startswith(b"LARGE OBJECT ")):
            continue
        out.append(sql[m.start():nxt.start() if nxt else len(sql)])
    return b"".join(out)


def archive_toc(pg_restore: Tool, archive_path: str, codec: str = "utf-8") -> list[TocEntry]:
    """The archive's list of entries; ``codec``: Python's for the database's encoding,
    which pg_restore prints the names in."""
    out = run_tool(pg_restore, ["-l", archive_path], what="listing the schema archive")
    entries = []
    for line in out.decode(codec, "replace").splitlines():
        m = re.match(r"^(\d+); (\d+) (\d+) (.*)$", line)
        if m:
            entries.append(TocEntry(line, int(m.group(1)), int(m.group(2)), int(m.group(3)),
                                    m.group(4)))
    return entries


# PostgreSQL's names of its server encodings (pg_encoding_to_char) that are not also
# Python's: LATINn are ISO 8859 parts, WINnnnn Windows code pages.
_PG_CODECS = {"SQL_ASCII": "latin-1", "UTF8": "utf-8", "EUC_CN": "gb2312", "UHC": "cp949",
              "SJIS": "shift_jis", "KOI8R": "koi8-r", "KOI8U": "koi8-u",
              "LATIN1": "iso8859-1", "LATIN2": "iso8859-2", "LATIN3": "iso8859-3",
              "LATIN4": "iso8859-4", "LATIN5": "iso8859-9", "LATIN6": "iso8859-10",
              "LATIN7": "iso8859-13", "LATIN8": "iso8859-14", "LATIN9": "iso8859-15",
              "LATIN10": "iso8859-16"}


def python_codec(encoding: str) -> str:
    """Python's codec for a PostgreSQL encoding name (SQL_ASCII: its bytes as latin-1,
    which keeps every byte; one Python lacks, such as MULE_INTERNAL: UTF-8)."""
    import codecs

    name = encoding.upper()
    codec = _PG_CODECS.get(name)
    if codec is None:
        if name.startswith("WIN"):
            codec = "cp" + name[3:]                   # WIN1251 -> cp1251, WIN866 -> cp866
        else:
            codec = name.lower().replace("iso_8859_", "iso8859-")   # EUC_JP, ISO_8859_5
    try:
        return codecs.lookup(codec).name
    except LookupError:
        return "utf-8"
