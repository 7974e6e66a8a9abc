"""The command line: parse, call one function, render text or JSON.

This is the only place where errors become exit codes (cli.md): 0 success,
1 failed, 2 usage, 3 repository damaged, 4 locked, 5 database unreachable or
refused.  No traceback is shown unless ``--debug`` is given.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import signal
import stat
import sys
import threading
import time
import traceback
from datetime import datetime
from typing import Any

import click

from . import interrupts
from .errors import FpvaultError, RepositoryDamaged
from .manifest import SnapshotHead
from .locks import Lock
from .vault import Vault, default_repo, is_remote, parse_time, snapshot_id, utc_iso


# A command that takes the exclusive lock (forget, prune, repair index, key passwd)
# waits this long by default for the snaps, restores and verifies running to finish: prune is safe while a snap runs, by waiting
# for it (the original contract), where refusing would fail a cron job that overlaps.
EXCLUSIVE_LOCK_WAIT = 30 * 60


class Ctx:
    def __init__(self) -> None:
        self.repo: str | None = None
        self.quiet = False
        self.debug = False
        self.lock_wait: float | None = None   # --lock-wait; None: the command's default
        self.password_file: str | None = None
        self.no_lock = False

    def location(self) -> str:
        return self.repo or os.environ.get("FPVAULT_REPO") or default_repo()

    def open(self, create: bool = False) -> Vault:
        return Vault.open(self.location(), create=create, password=self.password)

    def password(self, prompt: str = "Repository password", confirm: bool = False,
                 env: str = "FPVAULT_PASSWORD", file: str | None = None) -> str:
        """From ``env``, else the password file, else a prompt on a terminal."""
        if os.environ.get(env):
            return os.environ[env]
        path = file or (self.password_file if env == "FPVAULT_PASSWORD" else None)
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.readline().rstrip("\r\n")
            except OSError as exc:
                raise FpvaultError(f"Cannot read the password file {path}: {exc.strerror}.") from None
            if not text:
                raise FpvaultError(f"The password file {path} is empty.")
            return text
        if sys.stdin.isatty():
            return click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
        raise FpvaultError(f"A password is needed: set {env} or pass a password file "
                           "(there is no terminal to ask on).")

    def lock(self, vault: Vault, exclusive: bool, command: str):
        """Shared for commands that add or read data, exclusive for those that delete
        (none with --no-lock, which only commands that read accept)."""
        if self.no_lock:
            return contextlib.nullcontext()
        wait = self.lock_wait
        if wait is None:
            wait = EXCLUSIVE_LOCK_WAIT if exclusive else 0.0
        return Lock(vault.backend, exclusive=exclusive, command=command, wait=wait)


def _set_repo(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(Ctx).repo = value


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Ctx).quiet = True


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Ctx).debug = True


def _set_no_lock(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Ctx).no_lock = True


# For the commands that only read: restic's --no-lock, for a repository on read-only
# media (a mounted backup disk, a snapshot of a file system), where no lock can be written.
no_lock_option = click.option(
    "--no-lock", is_flag=True, expose_value=False, callback=_set_no_lock,
    help="Take no lock, for a repository that cannot be written (read-only media). Safe "
         "only while no prune, forget or repair runs on it.")


def _set_lock_wait(ctx: click.Context, _param: click.Parameter, value: float | None) -> None:
    if value is not None:
        ctx.ensure_object(Ctx).lock_wait = value


def _set_password_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(Ctx).password_file = value


def _set_env(name: str):
    def callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            os.environ[name] = value
    return callback


def common_options(f):
    """-r/--repo, -q, --lock-wait, --password-file, --s3-endpoint, --s3-region and
    --debug are accepted before or after the command name."""
    f = click.option("--s3-region", metavar="REGION", expose_value=False,
                     callback=_set_env("FPVAULT_S3_REGION"),
                     help="Region of an s3:// repository (else $FPVAULT_S3_REGION, the AWS "
                          "configuration).")(f)
    f = click.option("--s3-endpoint", metavar="URL", expose_value=False,
                     callback=_set_env("FPVAULT_S3_ENDPOINT"),
                     help="Endpoint of an S3-compatible service, e.g. MinIO or R2 (else "
                          "$FPVAULT_S3_ENDPOINT, $AWS_ENDPOINT_URL).")(f)
    f = click.option("--password-file", metavar="FILE", expose_value=False,
                     callback=_set_password_file,
                     help="Read an encrypted repository's password from FILE "
                          "(else $FPVAULT_PASSWORD, else a prompt).")(f)
    f = click.option("--lock-wait", type=click.FloatRange(0), default=None, expose_value=False,
                     callback=_set_lock_wait, metavar="SECONDS",
                     help="Wait this long for a conflicting lock to go away (default: 0; "
                          "1800 for forget, prune, repair and key, which take an exclusive "
                          "lock).")(f)
    f = click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug,
                     help="Show tracebacks.")(f)
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_quiet,
                     help="Print nothing but errors (and the result a script needs).")(f)
    f = click.option("-r", "--repo", metavar="PATH", expose_value=False, callback=_set_repo,
                     help="Repository: a path or s3://bucket/prefix (default: $FPVAULT_REPO, "
                          "else $XDG_DATA_HOME/fpvault or ~/.local/share/fpvault).")(f)
    return f


def info(ctx: Ctx, msg: str, json_mode: bool = False) -> None:
    """Human output: stdout normally, stderr when stdout carries JSON."""
    if ctx.quiet:
        return
    click.echo(msg, err=json_mode)


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def local_time(iso: str) -> str:
    return parse_time(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="Example:\n\n\b\n  fpvault init -r /backups/app\n"
                    "  fpvault snap -r /backups/app -d appdb --tag nightly\n"
                    "  fpvault restore -r /backups/app latest --to newdb")
@common_options
@click.version_option(package_name="fpvault")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Incremental, deduplicated history of a PostgreSQL database.

    Every snapshot is a complete, consistent logical backup (schema and
    data); unchanged data is stored once.
    """
    ctx.ensure_object(Ctx)


@cli.command(epilog="Examples:\n\n\b\n  fpvault init -r /backups/app\n"
                    "  FPVAULT_PASSWORD=... fpvault init -r s3://backups/app --encrypt")
@click.option("--encrypt", is_flag=True,
              help="Encrypt the repository (ChaCha20-Poly1305; key from a password via scrypt).")
@common_options
@click.pass_obj
def init(ctx: Ctx, encrypt: bool) -> None:
    """Create an empty repository (an error if one exists there)."""
    password = ctx.password("New repository password", confirm=True) if encrypt else None
    vault = Vault.create(ctx.location(), password=password)
    info(ctx, f"Created {'encrypted ' if encrypt else ''}repository {vault.config.id[:8]} at "
              f"{vault.backend.describe()}")
    if is_remote(ctx.location()) and not encrypt:
        click.echo("fpvault: warning: this repository is not encrypted: anyone who can read the "
                   "bucket can read the backed-up data. Use 'init --encrypt' for a remote "
                   "repository, or at least restrict the bucket (docs/s3.md).", err=True)


class TermProgress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second (a
    snapshot.Progress)."""

    def __init__(self) -> None:
        self.tables = self.done = 0
        self.total = self.read = 0
        self.started = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def start(self, tables: int, total_bytes: int) -> None:
        self.tables, self.total = tables, total_bytes

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.read += nbytes
            self._draw()

    def table_done(self, qname: str) -> None:
        with self._lock:
            self.done += 1
            self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        rate = self.read / max(now - self.started, 1e-6)
        click.echo(f"\r  tables {self.done}/{self.tables}  read {human_bytes(self.read)}"
                   f"  {human_bytes(rate)}/s   ", nl=False, err=True)

    def finish(self) -> None:
        click.echo("\r" + " " * 70 + "\r", nl=False, err=True)


@cli.command(epilog="Examples:\n\n\b\n  fpvault snap -d appdb --tag before-migration\n"
                    "  fpvault snap -d 'host=db1 user=backup dbname=app' -n public -j 2 --json")
@click.option("-d", "--dbname", "conninfo", default="", metavar="CONNINFO",
              help="Database name, key=value string or postgresql:// URI (PG* variables, "
                   "~/.pgpass and services fill in the rest).")
@click.option("--tag", "tags", multiple=True, help="Label the snapshot (repeatable).")
@click.option("-n", "--schema", "schemas", multiple=True, metavar="PATTERN",
              help="Only these schemas (pg_dump patterns, repeatable).")
@click.option("-N", "--exclude-schema", "exclude_schemas", multiple=True, metavar="PATTERN",
              help="Leave out these schemas.")
@click.option("-t", "--table", "tables", multiple=True, metavar="PATTERN",
              help="Only these tables.")
@click.option("-T", "--exclude-table", "exclude_tables", multiple=True, metavar="PATTERN",
              help="Leave out these tables.")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Connections reading tables in parallel (all in one snapshot); a table "
                   "larger than its share is read in key (or block) ranges by several of "
                   "them.")
@click.option("--reread", is_flag=True,
              help="Read every table, even those whose rows have not changed since the "
                   "previous snapshot, and dump the schema even if the catalog has not.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@common_options
@click.pass_obj
def snap(ctx: Ctx, conninfo: str, tags, schemas, exclude_schemas, tables, exclude_tables,
         jobs: int, reread: bool, as_json: bool) -> None:
    """Take a snapshot of a database.

    Creates the default repository on first use.  Tables whose rows have not
    changed since the previous snapshot of the database are taken from it
    without reading them: all of them, and the schema, without a look or
    pg_dump, if no transaction has ended on the server since; otherwise a
    table whose every row is older than that snapshot, as many as it counted
    (one scan of the table, no COPY); large objects likewise, where the role
    may read pg_largeobject.  Sequences are read as always.  Tables with a
    key are read in key order; a table the previous snapshot does not hold
    (usually its first snapshot) is read as its heap lies, as pg_dump reads
    it, when the server's statistics say that is key order anyway.  Text output ends with
    the snapshot id on its own line (printed even with -q).
    """
    for tag in tags:
        if not tag.strip() or any(ord(c) < 32 or c == "\x7f" or c == "," for c in tag):
            raise click.UsageError(f"Tag {tag!r}: a tag is a non-empty word without commas or "
                                   "control characters (give --tag once per tag).")
    # Only the default repository is made on first use: a -r or FPVAULT_REPO that names
    # none is a typo, or a backup disk not mounted, not a place to start a new history.
    vault = ctx.open(create=ctx.repo is None and not os.environ.get("FPVAULT_REPO"))
    progress = TermProgress() if (sys.stderr.isatty() and not ctx.quiet) else None
    from . import snapshot as snapshot_mod
    filters = snapshot_mod.Filters(schemas, exclude_schemas, tables, exclude_tables)
    with ctx.lock(vault, exclusive=False, command="snap"):
        result = snapshot_mod.take(vault, conninfo, tags=tags, filters=filters, jobs=jobs,
                                   progress=progress, reread=reread)
    s = result.snapshot
    if as_json:
        emit_json({"id": result.id, "time": s.time, "tables": len(s.tables), "rows": s.rows,
                   "bytes_read": result.bytes_read, "bytes_added": result.bytes_added,
                   "tables_reused": s.tables_reused, "seconds": round(result.seconds, 3)})
        return
    info(ctx, f"snapshot of {s.source.database} (PostgreSQL {s.source.server_version}): "
              f"{len(s.tables)} tables, {s.rows} rows, {len(s.sequences)} sequences, "
              f"{len(s.large_objects)} large objects")
    if s.tables_reused:
        info(ctx, f"{s.tables_reused} tables taken from the previous snapshot unread: none "
                  "of their rows has changed since (--reread reads them)")
    info(ctx, f"read {human_bytes(result.bytes_read)}, added {human_bytes(result.bytes_added)} "
              f"in {result.seconds:.1f} s")
    click.echo(result.id)


def _snapshot_row(s: SnapshotHead) -> dict[str, Any]:
    return {"id": snapshot_id(s), "time": s.time, "tags": s.tags, "database": s.source.database,
            "tables": s.table_count, "rows": s.rows, "bytes": s.bytes,
            "bytes_added": s.bytes_added}


@cli.command(name="list", epilog="Examples:\n\n\b\n  fpvault list\n  fpvault list --tag nightly --json")
@click.option("--tag", "tags", multiple=True, help="Only snapshots with this tag (repeatable: any).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@common_options
@click.pass_obj
def list_(ctx: Ctx, tags, as_json: bool) -> None:
    """List snapshots, oldest first."""
    vault = ctx.open()
    snaps = [s for s in vault.snapshots() if not tags or set(tags) & set(s.tags)]
    for sid, _why in vault.damaged_snapshots:
        click.echo(f"fpvault: snapshot {sid[:8]} is not listed: its manifest cannot be read; "
                   "run 'fpvault verify'.", err=True)
    rows = [_snapshot_row(s) for s in snaps]
    if as_json:
        emit_json(rows)
        return
    header = f"{'id':<8}  {'time':<19}  {'database':<16} {'tables':>6} {'rows':>11} {'size':>10} {'added':>10}  tags"
    click.echo(header)
    for r in rows:
        click.echo(f"{r['id'][:8]:<8}  {local_time(r['time']):<19}  {r['database'][:16]:<16} "
                   f"{r['tables']:>6} {r['rows']:>11} {human_bytes(r['bytes']):>10} "
                   f"{human_bytes(r['bytes_added']):>10}  {','.join(r['tags'])}")
    info(ctx, f"{len(rows)} snapshots")


@cli.command(epilog="Examples:\n\n\b\n  fpvault show latest\n  fpvault show 3f2a91c0 --json")
@click.argument("snapshot")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@common_options
@click.pass_obj
def show(ctx: Ctx, snapshot: str, as_json: bool) -> None:
    """Show a snapshot's tables in restore order, with rows and bytes."""
    sid, s = ctx.open().resolve(snapshot)
    tables = [{"name": t.qname, "rows": t.rows, "bytes": t.data.bytes,
               "key": t.key, "chunks": t.data.chunks, "extension": t.extension or None,
               "order": "key" if t.key and not t.physical else "physical"}
              for t in s.tables]
    if as_json:
        emit_json({"id": sid, "time": s.time, "tags": s.tags, "database": s.source.database,
                   "server_version": s.source.server_version, "tables": tables,
                   "sequences": [{"name": q.qname, "last_value": q.last_value,
                                  "is_called": q.is_called} for q in s.sequences],
                   "large_objects": [{"oid": lo.oid, "bytes": lo.data.bytes}
                                     for lo in s.large_objects]})
        return
    src = s.source
    click.echo(f"snapshot {sid}\ntime     {local_time(s.time)}\ntags     {', '.join(s.tags)}\n"
               f"source   {src.database} on {src.host}:{src.port} as {src.user} "
               f"(PostgreSQL {src.server_version}, {src.encoding})")
    if s.filters:
        click.echo("filters  " + "; ".join(f"{k}={','.join(v)}" for k, v in s.filters.items()))
    click.echo(f"\n{'rows':>11} {'size':>10}  table")
    for t in tables:
        of = f"  (configuration of extension {t['extension']})" if t["extension"] else ""
        click.echo(f"{t['rows']:>11} {human_bytes(t['bytes']):>10}  {t['name']}{of}")
    click.echo(f"\n{len(tables)} tables, {s.rows} rows, {human_bytes(s.bytes)}; "
               f"{len(s.sequences)} sequences, {len(s.large_objects)} large objects")


@cli.command(epilog="Examples:\n\n\b\n  fpvault restore latest --to newdb\n"
                    "  fpvault restore latest~3 -t public.orders --data-only --to appdb\n"
                    "  fpvault restore --at '2026-11-25 08:00' -o before.sql")
@click.argument("snapshot", required=False)
@click.option("--to", "to", metavar="CONNINFO", help="Restore into this database.")
@click.option("-o", "--output", metavar="FILE|-",
              help="Write a SQL script ('-': stdout); a file is written whole, as "
                   "FILE.partial renamed when complete.")
@click.option("--schema-only", is_flag=True, help="Only the schema, no data.")
@click.option("--data-only", is_flag=True,
              help="Only data, into an existing schema (needs a superuser: triggers and "
                   "foreign-key checks are off while loading).")
@click.option("-t", "--table", "tables", multiple=True, metavar="TABLE",
              help="Only this table (schema.table; repeatable).")
@click.option("--no-owner", is_flag=True, help="Do not set object owners.")
@click.option("--no-privileges", is_flag=True, help="Do not restore grants.")
@click.option("--at", "at", metavar="TIME",
              help="Use the latest snapshot taken at or before TIME (ISO 8601) instead of SNAPSHOT.")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="With --to: load tables, then build their indexes and keys, over this many "
                   "connections; a table larger than its share loads in parts at once "
                   "(faster; a failure then leaves a partial restore instead of rolling back).")
@no_lock_option
@common_options
@click.pass_obj
def restore(ctx: Ctx, snapshot: str | None, to: str | None, output: str | None,
            schema_only: bool, data_only: bool, tables, no_owner: bool, no_privileges: bool,
            at: str | None, jobs: int) -> None:
    """Restore a snapshot into a database, or write it as a SQL script.

    A full restore needs an empty database and runs in one transaction:
    if anything fails, the database is left as it was.  The script loads
    with: psql -X -v ON_ERROR_STOP=1 -f FILE
    """
    if (to is None) == (output is None):
        raise click.UsageError("Give exactly one of --to CONNINFO or -o FILE.")
    if (snapshot is None) == (at is None):
        raise click.UsageError("Give a SNAPSHOT or --at TIME (one of them).")
    if jobs > 1 and to is None:
        raise click.UsageError("-j/--jobs goes with --to (a script is written in one stream).")
    if output is not None and output != "-":
        script_target(output)   # a bad path fails before anything is read
    vault = ctx.open()
    with ctx.lock(vault, exclusive=False, command="restore"):
        _restore(ctx, vault, snapshot, to, output, at, schema_only, data_only, tables, no_owner,
                 no_privileges, jobs)


def script_target(output: str) -> bool:
    """Whether ``-o`` names a regular file, or nothing yet: written beside it and renamed
    into place when complete.  False for a pipe, a device or a socket, which are written
    as they are; a directory or a missing directory is a usage error."""
    try:
        st = os.stat(output)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            raise click.UsageError(f"-o {output}: there is no directory {parent}.") from None
        return True
    except OSError as exc:
        raise click.UsageError(f"-o {output}: {exc.strerror}.") from exc
    if stat.S_ISDIR(st.st_mode):
        raise click.UsageError(f"-o {output} is a directory: name a file in it.")
    return stat.S_ISREG(st.st_mode)


def _restore(ctx: Ctx, vault: Vault, snapshot, to, output, at, schema_only, data_only, tables,
             no_owner, no_privileges, jobs) -> None:
    sid, s = vault.resolve_at(at) if at else vault.resolve(snapshot)
    from . import restore as restore_mod
    opts = restore_mod.Options(schema_only=schema_only, data_only=data_only, tables=tables,
                               no_owner=no_owner, no_privileges=no_privileges)
    plan = restore_mod.make_plan(vault, sid, s, opts)
    started = time.monotonic()
    if to is not None:
        restore_mod.to_database(vault, plan, to, jobs=jobs)
        info(ctx, f"restored snapshot {sid[:8]} ({len(plan.tables)} tables) in "
                  f"{time.monotonic() - started:.1f} s", json_mode=True)
        return
    if output == "-":
        try:
            restore_mod.to_script(vault, plan, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        except OSError as exc:
            raise _write_error(exc, "standard output") from exc
        return
    if not script_target(output):
        # A pipe, a device (/dev/null), a socket: written as it is.  Renaming a file
        # over it would replace the device node itself.
        try:
            with _open_output(output, output) as f:
                restore_mod.to_script(vault, plan, f)
        except OSError as exc:
            raise _write_error(exc, output) from exc
    else:
        # Through a symlink to the file it names: the link stays a link.
        target = os.path.realpath(output)
        tmp = target + ".partial"
        f = _open_output(output, tmp)
        try:
            try:
                with f:
                    restore_mod.to_script(vault, plan, f)
                os.replace(tmp, target)
            except OSError as exc:
                raise _write_error(exc, output, removed=tmp) from exc
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    info(ctx, f"wrote snapshot {sid[:8]} ({len(plan.tables)} tables) to {output}", json_mode=True)


def stdout_gone() -> None:
    """The reader of our standard output went away (| head): point it at /dev/null, or
    Python's own flush at exit reports the broken pipe once more."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _write_error(exc: OSError, where: str, removed: str | None = None) -> FpvaultError:
    """What went wrong writing a script (the repository's own reads raise theirs)."""
    gone = f" {removed} was removed; nothing was written to {where}." if removed else ""
    if exc.errno == errno.ENOSPC:
        return FpvaultError(f"No space left on the device while writing the script to {where}."
                            f"{gone} Free some space, or write it elsewhere.")
    if exc.errno == errno.EPIPE:
        if where == "standard output":
            stdout_gone()
        return FpvaultError(f"The script was not written whole: the reader of {where} stopped "
                            "reading.")
    return FpvaultError(f"Writing the script to {where} failed: {exc.strerror or exc}.{gone}")


def _open_output(output: str, path: str):
    try:
        return open(path, "wb")
    except OSError as exc:
        first = f" (as {path} first, renamed when complete)" if path != output else ""
        raise click.UsageError(f"Cannot write -o {output}{first}: {exc.strerror}.") from exc


@cli.command(name="diff", epilog="Examples:\n\n\b\n  fpvault diff latest~1 latest\n"
                                 "  fpvault diff 3f2a latest --rows -t public.orders\n"
                                 "  fpvault diff latest~5 latest --stat --exit-code")
@click.argument("a")
@click.argument("b")
@click.option("--rows", is_flag=True, help="List inserted, deleted and updated rows of changed tables.")
@click.option("-t", "--table", "tables", multiple=True, metavar="TABLE",
              help="Only this table (schema.table; repeatable).")
@click.option("--stat", is_flag=True, help="Only the per-table summary, no schema text.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--exit-code", is_flag=True, help="Exit 1 if the snapshots differ, 0 if not.")
@no_lock_option
@common_options
@click.pass_obj
def diff_(ctx: Ctx, a: str, b: str, rows: bool, tables, stat: bool, as_json: bool,
          exit_code: bool) -> None:
    """Show what changed from snapshot A to snapshot B.

    Tables whose data is byte-for-byte the same are recognised from the
    manifests without reading data; --rows decodes only the chunks that
    differ and matches rows by key (tables without a key: as multisets).
    """
    from . import diff as diff_mod

    vault = ctx.open()
    a_id, sa = vault.resolve(a)
    b_id, sb = vault.resolve(b)
    with ctx.lock(vault, exclusive=False, command="diff"):
        d = diff_mod.diff(vault, a_id, sa, b_id, sb, tables=list(tables), rows=rows,
                          schema_text=not stat)
    if as_json:
        emit_json(d.as_json())
    else:
        _print_diff(d, stat)
    if exit_code and d.differs:
        raise click.exceptions.Exit(1)


def _print_diff(d, stat: bool) -> None:
    echo = click.echo
    echo(f"diff {d.from_id[:8]} -> {d.to_id[:8]}")
    changed = [t for t in d.tables if t.status != "unchanged" or t.schema_changed]
    width = max((len(t.name) for t in changed), default=10)
    for t in changed:
        if t.status == "added":
            what = f"added      {t.rows_after} rows"
        elif t.status == "removed":
            what = f"removed    {t.rows_before} rows"
        elif t.status == "changed":
            what = f"changed    {t.rows_before} -> {t.rows_after} rows"
            if t.rows is not None:
                what += f"   +{t.rows.inserted} -{t.rows.deleted} ~{t.rows.updated}"
        else:
            what = "unchanged rows"
        if t.schema_changed and t.status in ("changed", "unchanged"):
            what += "   [schema]"
        echo(f" {t.name:<{width}} | {what}")
    for s in d.sequences:
        echo(f" sequence {s['name']}: {s['before']} -> {s['after']}")
    for lo in d.large_objects:
        echo(f" large object {lo['oid']}: {lo['status']}")
    counts = {k: sum(1 for t in d.tables if t.status == k)
              for k in ("changed", "added", "removed", "unchanged")}
    summary = (f" {counts['changed']} tables changed, {counts['added']} added, "
               f"{counts['removed']} removed, {counts['unchanged']} unchanged")
    if d.schema_changed:
        summary += (f"; schema: {len(d.objects_added)} objects added, "
                    f"{len(d.objects_removed)} removed, {len(d.objects_altered)} altered")
    echo(summary)
    if stat:
        return
    for t in changed:
        if t.columns_added or t.columns_removed or t.objects:
            echo(f"\n{t.name}:")
            for c in t.columns_added:
                echo(f"  column added: {c}")
            for c in t.columns_removed:
                echo(f"  column removed: {c}")
            for o in t.objects:
                echo(f"  {o}")
    others = [f"{w} {o}" for w, objs in (("added", d.objects_added), ("removed", d.objects_removed),
                                         ("altered", d.objects_altered)) for o in objs]
    if others:
        echo("\nschema objects:")
        for o in others:
            echo(f"  {o}")
    for t in changed:
        if t.rows is None or not t.rows.rows:
            continue
        echo(f"\n{t.name}: +{t.rows.inserted} -{t.rows.deleted} ~{t.rows.updated} "
             f"(decoded {t.rows.chunks_decoded} of {t.rows.chunks_total} chunks)")
        for r in t.rows.rows:
            key = json.dumps(r.key, ensure_ascii=False) if r.key else ""
            times = f" x{r.count}" if r.count != 1 else ""
            if r.op == "insert":
                echo(f"  + {key} {json.dumps(r.after, ensure_ascii=False)}{times}")
            elif r.op == "delete":
                echo(f"  - {key} {json.dumps(r.before, ensure_ascii=False)}{times}")
            else:
                parts = ", ".join(f"{c}: {json.dumps(r.before[c], ensure_ascii=False)} -> "
                                  f"{json.dumps(r.after[c], ensure_ascii=False)}" for c in r.changed)
                echo(f"  ~ {key} {parts}")
    if d.schema_diff:
        echo("")
        echo(d.schema_diff.rstrip("\n"))


@cli.command(epilog="Examples:\n\n\b\n  fpvault forget --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --prune\n"
                    "  fpvault forget --keep-within 2d --keep-tag release --dry-run\n"
                    "  fpvault forget 3f2a91c0")
@click.argument("snapshots", nargs=-1)
@click.option("--keep-last", type=click.IntRange(0), default=0, metavar="N", help="Keep the N newest.")
@click.option("--keep-hourly", type=click.IntRange(0), default=0, metavar="N",
              help="Keep the newest of each of the last N hours that have snapshots.")
@click.option("--keep-daily", type=click.IntRange(0), default=0, metavar="N", help="Same, per day.")
@click.option("--keep-weekly", type=click.IntRange(0), default=0, metavar="N",
              help="Same, per ISO week.")
@click.option("--keep-monthly", type=click.IntRange(0), default=0, metavar="N", help="Same, per month.")
@click.option("--keep-yearly", type=click.IntRange(0), default=0, metavar="N", help="Same, per year.")
@click.option("--keep-within", default="", metavar="DURATION",
              help="Keep all taken within DURATION (e.g. 7d, 1y6m, 36h) of the newest.")
@click.option("--keep-tag", "keep_tags", multiple=True, metavar="TAG", help="Keep all with this tag.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@click.option("--prune", "then_prune", is_flag=True, help="Run prune afterwards.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@common_options
@click.pass_obj
def forget(ctx: Ctx, snapshots, keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly,
           keep_yearly, keep_within, keep_tags, dry_run, then_prune, as_json) -> None:
    """Remove snapshots by policy (restic's semantics) or by id.

    Snapshots are grouped by source (host, port, database); the policy keeps
    the newest of each hour/day/week/month/year that has snapshots.  Data is
    only freed by prune (--prune).
    """
    from . import retention

    policy = retention.Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly,
                              keep_yearly, keep_within, tuple(keep_tags))
    if keep_within:
        try:
            retention.parse_duration(keep_within)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    if policy.empty() and not snapshots:
        raise click.UsageError("Give snapshot ids to forget, or a policy (--keep-*); "
                               "nothing was removed.")
    if snapshots and not policy.empty():
        raise click.UsageError("Give either snapshot ids or a policy, not both.")
    vault = ctx.open()
    # A dry run changes nothing: a shared lock, so it runs beside a snap.
    with ctx.lock(vault, exclusive=not dry_run, command="forget"):
        if snapshots:
            chosen = {}
            healthy = [s.id for s in vault.snapshots()]
            damaged = {sid for sid, _ in vault.damaged_snapshots}
            for ref in snapshots:
                hits = [d for d in damaged if d.startswith(ref.lower()) and len(ref) >= 4]
                # Only the damaged one: resolve() would refuse it; one a healthy
                # snapshot's id shares is ambiguous, which resolve() says.
                if len(hits) == 1 and not any(h.startswith(ref.lower()) for h in healthy):
                    chosen[hits[0]] = None
                    continue
                sid, s = vault.resolve_head(ref)
                chosen[sid] = s
            groups = [{"group": None, "keep": [],
                       "remove": [{"id": sid, "time": s.time if s else None} for sid, s in chosen.items()]}]
        else:
            decisions = retention.plan(vault.snapshots(strict=False), policy)
            groups = [{"group": g.group,
                       "keep": [{"id": i.id, "time": utc_iso(i.time), "reasons": r}
                                for i, r in g.keep],
                       "remove": [{"id": i.id, "time": utc_iso(i.time)} for i in g.remove]}
                      for g in decisions]
        if not dry_run:
            for g in groups:
                for item in g["remove"]:
                    vault.forget_snapshot(item["id"])
    if as_json:
        doc: dict[str, Any] = {"dry_run": dry_run, "groups": groups}
    else:
        for g in groups:
            if g["group"]:
                grp = g["group"]
                only = "; ".join(f"{k.replace('_', ' ')} {', '.join(v)}"
                                 for k, v in grp["filters"].items())
                info(ctx, f"{grp['database']} on {grp['host']}:{grp['port']}"
                          f"{f' ({only})' if only else ''}")
            for k in g["keep"]:
                info(ctx, f"  keep    {k['id'][:8]}  {local_time(k['time'])}  {', '.join(k['reasons'])}")
            for r in g["remove"]:
                when = local_time(r["time"]) if r["time"] else "(damaged manifest)"
                info(ctx, f"  {'would remove' if dry_run else 'remove '} {r['id'][:8]}  {when}")
        removed = sum(len(g["remove"]) for g in groups)
        info(ctx, f"{'would remove' if dry_run else 'removed'} {removed} snapshots")
    if then_prune and not dry_run:
        stats = _run_prune(ctx, vault, dry_run=False)
    elif then_prune:   # what the prune would do once these are forgotten
        stats = _run_prune(ctx, vault, dry_run=True,
                           forgotten={item["id"] for g in groups for item in g["remove"]})
    if then_prune:
        if as_json:
            doc["prune"] = stats.as_json()
        else:
            _print_prune(ctx, stats)
    if as_json:
        emit_json(doc)


def _run_prune(ctx: Ctx, vault: Vault, dry_run: bool, forgotten: set[str] = frozenset()):
    from . import gc

    # A dry run deletes nothing: a shared lock, so it runs beside a snap.
    with ctx.lock(vault, exclusive=not dry_run, command="prune"):
        return gc.prune(vault, dry_run=dry_run, forgotten=forgotten)


def _print_prune(ctx: Ctx, stats) -> None:
    verb = "would delete" if stats.dry_run else "deleted"
    info(ctx, f"{verb} {stats.packs_deleted} packs ({stats.orphan_packs} left by interrupted "
              f"snaps), repacked {stats.packs_repacked} into {stats.packs_written}, removed "
              f"{stats.blobs_removed} blobs; packs {human_bytes(stats.bytes_before)} -> "
              f"{human_bytes(stats.bytes_after)} in {stats.seconds:.1f} s")


@cli.command(epilog="Examples:\n\n\b\n  fpvault prune\n  fpvault prune --dry-run")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@common_options
@click.pass_obj
def prune(ctx: Ctx, dry_run: bool, as_json: bool) -> None:
    """Delete data that no snapshot references.

    Takes an exclusive lock: it waits for a snap that runs (--lock-wait, by
    default 30 minutes), so it never deletes what a running snap is using
    (--dry-run takes a shared one).  Packs mostly garbage are rewritten with
    their live blobs.
    """
    stats = _run_prune(ctx, ctx.open(), dry_run)
    if as_json:
        emit_json(stats.as_json())
    else:
        _print_prune(ctx, stats)


@cli.command(epilog="Examples:\n\n\b\n  fpvault unlock\n  fpvault unlock --remove-all")
@click.option("--remove-all", is_flag=True, help="Remove every lock, live or not (dangerous).")
@common_options
@click.pass_obj
def unlock(ctx: Ctx, remove_all: bool) -> None:
    """Remove locks left by processes that no longer run.

    A lock of a dead process on the same host is ignored even without this;
    locks from other hosts are stale after 30 minutes without a refresh.
    """
    from .locks import describe, remove_stale

    removed = remove_stale(ctx.open().backend, all_locks=remove_all)
    for lock_info in removed:
        info(ctx, f"removed {describe(lock_info)}")
    info(ctx, f"removed {len(removed)} locks")


@cli.command(epilog="Examples:\n\n\b\n  fpvault verify\n  fpvault verify --read-data\n"
                    "  fpvault verify --read-data-subset 10% --restore-test scratchdb")
@click.argument("snapshots", nargs=-1)
@click.option("--read-data", is_flag=True, help="Read and re-hash every byte of every pack.")
@click.option("--read-data-subset", "subset", metavar="N%",
              help="Read and re-hash a random N% of the packs.")
@click.option("--restore-test", metavar="CONNINFO",
              help="Restore into this (empty, scratch) database in a transaction, compare every "
                   "table with the manifest, and roll back.  Tests SNAPSHOTS, else the latest.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@no_lock_option
@common_options
@click.pass_obj
def verify(ctx: Ctx, snapshots, read_data: bool, subset: str | None, restore_test: str | None,
           as_json: bool) -> None:
    """Check the repository; exit 3 on any damage, naming what it affects."""
    from . import verify as verify_mod

    if read_data and subset is not None:
        raise click.UsageError("--read-data reads every pack, --read-data-subset a sample of "
                               "them: give one of the two.")
    fraction = None
    if subset is not None:
        try:
            fraction = float(subset.rstrip("%"))
            if not 0 < fraction <= 100:
                raise ValueError
        except ValueError:
            raise click.UsageError(f"--read-data-subset takes a percentage such as 10%, "
                                   f"not {subset!r}.") from None
    if snapshots and not restore_test:
        raise click.UsageError("SNAPSHOTS name what --restore-test restores; without it verify "
                               "checks the whole repository: give --restore-test CONNINFO, or "
                               "no SNAPSHOTS.")
    try:
        vault = ctx.open()
    except RepositoryDamaged as exc:
        if as_json:   # damage too bad to check anything is still a report, for monitoring
            emit_json(verify_mod.Report(problems=[str(exc)]).as_json())
        raise
    for ref in snapshots:
        try:
            vault.resolve(ref)   # a reference that names nothing fails now, not after the checks
        except RepositoryDamaged:
            pass                 # reported with the rest
    progress = None
    if sys.stderr.isatty() and not ctx.quiet and not as_json:
        progress = lambda msg: click.echo(f"\r  {msg}   ", nl=False, err=True)  # noqa: E731
    with ctx.lock(vault, exclusive=False, command="verify"):
        report = verify_mod.verify(vault, read_data=read_data, subset=fraction,
                                   restore_test=restore_test,
                                   restore_snapshots=list(snapshots) or None, progress=progress)
    if progress:
        click.echo("\r" + " " * 60 + "\r", nl=False, err=True)
    if as_json:
        emit_json(report.as_json())
    else:
        for p in report.problems:
            click.echo(f"problem: {p}", err=True)
        if report.affected:
            click.echo("affected snapshots:", err=True)
            for sid, what in sorted(report.affected.items()):
                click.echo(f"  {sid[:8]}: {', '.join(sorted(what))}", err=True)
        info(ctx, f"checked {report.snapshots} snapshots, {report.packs} packs"
                  + (f", read {report.packs_read} packs ({report.blobs_checked} blobs)"
                     if report.packs_read else "")
                  + (f", restored {report.tables_restored} tables" if restore_test else "")
                  + (": no problems" if report.ok else f": {len(report.problems)} problems"))
    if not report.ok:
        raise click.exceptions.Exit(3)


@cli.command(epilog="Examples:\n\n\b\n  fpvault stats\n  fpvault stats --json")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@common_options
@click.pass_obj
def stats(ctx: Ctx, as_json: bool) -> None:
    """Logical size of all snapshots, stored size, dedup ratio, chunk and pack counts."""
    vault = ctx.open()
    snaps = vault.snapshots()
    backend = vault.backend
    listed = {prefix: list(backend.list_sizes(prefix))
              for prefix in ("data/", "index/", "snapshots/")}
    pack_names = [name for name, _ in listed["data/"]]
    stored = {prefix: sum(size for _, size in objects) for prefix, objects in listed.items()}
    logical = sum(s.bytes for s in snaps)
    total = sum(stored.values())
    doc = {"snapshots": len(snaps), "logical_bytes": logical, "stored_bytes": total,
           "pack_bytes": stored["data/"], "index_bytes": stored["index/"],
           "manifest_bytes": stored["snapshots/"],
           "dedup_ratio": round(logical / total, 2) if total else None,
           "blobs": len(vault.index), "packs": len(pack_names), "index_files": len(vault.index.files)}
    if as_json:
        emit_json(doc)
        return
    click.echo(f"snapshots      {doc['snapshots']}\nlogical size   {human_bytes(logical)}\n"
               f"stored size    {human_bytes(total)} (packs {human_bytes(stored['data/'])}, "
               f"index {human_bytes(stored['index/'])}, manifests {human_bytes(stored['snapshots/'])})\n"
               f"ratio          {doc['dedup_ratio'] or '-'}x\nblobs          {doc['blobs']}\n"
               f"packs          {doc['packs']}")


@cli.group(epilog="Example:\n\n\b\n  fpvault key passwd")
@common_options
def key() -> None:
    """Manage the password of an encrypted repository."""


@key.command(name="passwd", epilog="Examples:\n\n\b\n  fpvault key passwd\n"
                                   "  FPVAULT_PASSWORD=old FPVAULT_NEW_PASSWORD=new fpvault key passwd")
@click.option("--new-password-file", metavar="FILE",
              help="Read the new password from FILE (else $FPVAULT_NEW_PASSWORD, else a prompt).")
@common_options
@click.pass_obj
def key_passwd(ctx: Ctx, new_password_file: str | None) -> None:
    """Change the password: the master key is wrapped anew, no data is re-encrypted."""
    from . import crypto

    vault = Vault.open(ctx.location(), password=ctx.password)
    if not vault.config.encrypted:
        raise FpvaultError(f"The repository at {vault.backend.describe()} is not encrypted; "
                           "it has no password to change.")
    with ctx.lock(vault, exclusive=True, command="key passwd"):
        _codec, old, master = crypto.unlock(vault.backend, ctx.password())
        new_password = ctx.password("New repository password", confirm=True,
                                    env="FPVAULT_NEW_PASSWORD", file=new_password_file)
        vault.backend.put(crypto.KEYS + secrets.token_hex(16),
                          crypto.wrap(master, new_password, datetime.now().astimezone().isoformat()))
        vault.backend.delete(old)
    info(ctx, "Password changed.")


@cli.group(epilog="Example:\n\n\b\n  fpvault repair index")
@common_options
def repair() -> None:
    """Repair a damaged repository."""


@repair.command(name="index", epilog="Example:\n\n\b\n  fpvault repair index")
@common_options
@click.pass_obj
def repair_index(ctx: Ctx) -> None:
    """Rebuild the index from the packs (after an index file was lost or damaged).

    A pack whose trailer cannot be read keeps the entries the old index had for
    it; the command then exits 3, the damage named.
    """
    from . import gc

    vault = ctx.open()
    with ctx.lock(vault, exclusive=True, command="repair index"):
        result = gc.repair_index(vault)
    for problem in result.unreadable:
        click.echo(f"unreadable pack: {problem}", err=True)
    info(ctx, f"indexed {result.blobs} blobs in {result.packs} packs; replaced "
              f"{result.index_files_removed} index files")
    if result.unreadable:
        raise RepositoryDamaged(
            f"{len(result.unreadable)} pack(s) could not be read to index them; the "
            f"{result.kept} entries the old index had for them were kept. Run 'fpvault verify "
            "--read-data' to see which snapshots the damage affects.")


def keep_freed_buffers() -> None:
    """Have glibc keep freed buffers of up to 32 MiB for reuse, instead of giving
    them back to the kernel and faulting in fresh zeroed pages for the next one.

    A snapshot moves every byte through a few buffers of 1 to 32 MiB (the pipe
    reads, the chunker, frames, the pack); with glibc's defaults, 555 MiB of COPY
    text cost 130,000-200,000 page faults and 1.0-1.4 s of system time, and with
    this 35,000-47,000 faults and 0.6-0.7 s less system time.  What each thread's
    arena keeps is bounded by the trim threshold: at 256 MiB, snap -j 2 peaked at
    182 MiB; at 64 MiB, 157-168 MiB (-j 1: 116-124 MiB), against 138 MiB with
    glibc's defaults.

    And one arena for all threads: glibc gives each thread that allocates at once
    an arena of its own, and each keeps what was freed in it.  restore -j 2 of the
    bench database had five of them, 29-39 MiB resident each, and peaked at
    218-223 MiB (210 MiB with glibc's defaults); with one arena 169-170 MiB
    (two: 193-198), with the same CPU time, and a first snapshot as fast.  Our
    threads allocate few, large buffers, so they hardly contend for it.

    Settings given in the environment (MALLOC_*_) win.  A process-wide choice, so
    the command line makes it, not the library."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt   # glibc (and musl, where it does nothing)
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)
    mallopt(m_arena_max, 1)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cron job's timeout, a service stopped): unwound as Ctrl-C is, so
    that locks, temporary files and child processes such as pg_dump are cleaned up."""


def _terminated(_signum, _frame) -> None:
    interrupts.interrupt(Terminated)


def _interrupt(_signum, _frame) -> None:
    interrupts.interrupt(KeyboardInterrupt)


def main(argv: list[str] | None = None, *, in_process: bool = True) -> None:
    """The command line, as a call that returns (by SystemExit), its signal handlers
    put back; ``entry`` is the console script's."""
    ctx = Ctx()
    keep_freed_buffers()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    interrupts.reset()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum, handler in ((signal.SIGTERM, _terminated), (signal.SIGINT, _interrupt)):
            # (A signal the parent had ignored stays ignored: a shell's background job.)
            if signal.getsignal(signum) is not signal.SIG_IGN:
                handlers[signum] = signal.signal(signum, handler)
    code: int | str | None = 1
    try:
        _main(ctx, argv, debug)
    except SystemExit as exc:
        code = exc.code
        raise
    finally:
        if in_process:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            interrupts.reset()
        else:
            # Interpreter exit joins the worker threads: a signal meanwhile would
            # kill the process (-15) after the command said how it ended.
            def exit_now(_signum, _frame) -> None:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code if isinstance(code, int) else (0 if code is None else 1))

            for signum in handlers:
                signal.signal(signum, exit_now)


def entry() -> None:
    """The console script: the process ends with the command, and a signal that comes
    once its exit code is known ends it with that code."""
    main(in_process=False)


def _interrupted(exc: BaseException | None) -> None:
    """Ctrl-C (130) or SIGTERM (143): what was not committed is as if never begun,
    unless the command says otherwise (a restore with -j leaves the tables it loaded)."""
    word = "Terminated" if isinstance(exc, Terminated) else "Interrupted"
    notes = list(getattr(exc, "__notes__", None) or [])
    if interrupts.held():   # a second signal, after the work was done
        done = interrupts.held()
        notes.append(f"{done[0].upper()}{done[1:]} before that: it is complete.")
    click.echo(" ".join([f"{word}.", *notes]), err=True)
    sys.exit(143 if isinstance(exc, Terminated) else 130)


def _main(ctx: "Ctx", argv: list[str] | None, debug: bool) -> None:
    try:
        # Without standalone mode, click returns the code of an Exit (--exit-code).
        code = cli.main(args=argv, obj=ctx, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort as exc:
        _interrupted(exc.__cause__)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except FpvaultError as exc:
        if debug:   # the traceback, and still the exit code scripts rely on
            traceback.print_exc()
        click.echo(f"fpvault: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        stdout_gone()
        sys.exit(1)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except Exception as exc:  # a bug: say so plainly
        if debug:
            raise
        click.echo(f"fpvault: internal error: {type(exc).__name__}: {exc}. "
                   "Rerun with --debug for a traceback and report it.", err=True)
        sys.exit(1)
    if interrupts.pending() is not None:
        word = "Terminated" if interrupts.pending() is Terminated else "Interrupted"
        click.echo(f"{word} once {interrupts.held()}: it is complete.", err=True)
    sys.exit(0)


if __name__ == "__main__":
    entry()
