"""A repository in S3-compatible object storage (AWS S3, MinIO, R2, B2, ...).

``s3://bucket/prefix`` names the repository: every object lives under
``prefix/``.  The endpoint and region come from ``FPVAULT_S3_ENDPOINT`` /
``FPVAULT_S3_REGION`` when set, else from the usual AWS configuration
(``AWS_ENDPOINT_URL``, ``AWS_REGION``, profiles, the credentials chain), as
boto3 reads it.  Credentials never enter the repository.

Object storage gives exactly the Backend protocol: whole-object PUT (atomic:
an object is either absent or complete), GET with a byte range, LIST by
prefix, DELETE.  There is no rename and no append, and none is needed: the
commit and lock protocols (docs/format.md) are built from whole-object
writes.  S3 is strongly consistent for these operations, so a lock listed
right after it was written is seen by every other writer.

Throttling (503 SlowDown) and transient errors are retried by botocore's
adaptive retry mode, with backoff, up to ``MAX_ATTEMPTS`` times.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

from .backend import ObjectMissing
from .errors import FpvaultError, RepositoryDamaged, UsageError

# Attempts per request, with botocore's backoff: rides out a throttling burst of
# tens of seconds without hanging a cron job for ever (FPVAULT_S3_ATTEMPTS overrides).
MAX_ATTEMPTS = 10
# Parallel connections per client: enough for parallel pack reads.
MAX_POOL = 16
# Seconds without an answer before a request is given up and retried: a 32 MiB
# pack upload on a slow link must fit; FPVAULT_S3_TIMEOUT overrides it.
DEFAULT_TIMEOUT = 120


def parse_url(url: str) -> tuple[str, str]:
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?", url)
    if not m:
        raise UsageError(f"Cannot read the repository URL {url!r}; write it as "
                         "s3://bucket or s3://bucket/prefix.")
    prefix = (m.group(2) or "").strip("/")
    return m.group(1), prefix + "/" if prefix else ""


class S3Backend:
    """Objects under ``prefix`` in ``bucket``."""

    # Each GET is a round trip: readers should keep several in flight.
    parallel_reads = True

    def __init__(self, url: str):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise FpvaultError("An s3:// repository needs boto3: pip install 'fpvault[s3]'.") from None
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        timeout = float(os.environ.get("FPVAULT_S3_TIMEOUT") or DEFAULT_TIMEOUT)
        attempts = int(os.environ.get("FPVAULT_S3_ATTEMPTS") or MAX_ATTEMPTS)
        config = Config(retries={"max_attempts": attempts, "mode": "adaptive"},
                        max_pool_connections=MAX_POOL, connect_timeout=min(timeout, 10),
                        read_timeout=timeout)
        session = boto3.session.Session(region_name=os.environ.get("FPVAULT_S3_REGION") or None)
        self.client = session.client("s3", endpoint_url=os.environ.get("FPVAULT_S3_ENDPOINT") or None,
                                     config=config)

    def describe(self) -> str:
        return self.url

    def _key(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return self.prefix + name

    def put(self, name: str, data: bytes) -> None:
        self._call("writing", name, self.client.put_object, Bucket=self.bucket,
                   Key=self._key(name), Body=bytes(data))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        kw = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            kw["Range"] = f"bytes={offset}-{end}"
        if length == 0:
            return b""
        resp = self._call("reading", name, self.client.get_object, Bucket=self.bucket,
                          Key=self._key(name), **kw)
        data = resp["Body"].read()
        if length is not None and len(data) != length:
            raise RepositoryDamaged(f"{name} in {self.url} is shorter than the index says (wanted "
                                    f"{length} bytes at offset {offset}); run 'fpvault verify'.")
        return data

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
            return True
        except ObjectMissing:
            return False

    def size(self, name: str) -> int:
        resp = self._call("looking up", name, self.client.head_object, Bucket=self.bucket,
                          Key=self._key(name))
        return int(resp["ContentLength"])

    def list(self, prefix: str) -> Iterator[str]:
        for name, _ in self.list_sizes(prefix):
            yield name

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(self.prefix):], int(obj["Size"])
        except Exception as exc:  # botocore errors: say what failed
            raise self._error(exc, "listing", prefix) from exc

    def delete(self, name: str) -> None:
        self._call("deleting", name, self.client.delete_object, Bucket=self.bucket,
                   Key=self._key(name))

    def _call(self, doing: str, name: str, fn, **kw):
        try:
            return fn(**kw)
        except Exception as exc:
            raise self._error(exc, doing, name) from exc

    def _error(self, exc: Exception, doing: str, name: str) -> FpvaultError:
        from botocore.exceptions import BotoCoreError, ClientError

        # A write or read that failed commits nothing; a delete may come after the
        # commit (a lock removed, packs pruned), so it does not say so.
        nothing = "" if doing == "deleting" else " Nothing was committed."

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404 and code != "NoSuchBucket":
                return ObjectMissing(f"{name} is missing from the repository at {self.url}; "
                                     "run 'fpvault verify' to see what it affects.")
            if code == "InvalidRange" or status == 416:
                return RepositoryDamaged(f"{name} in {self.url} is shorter than the index "
                                         "says; run 'fpvault verify'.")
            if code == "NoSuchBucket":
                return FpvaultError(f"The bucket {self.bucket!r} does not exist; create it first "
                                    f"(aws s3 mb s3://{self.bucket}).")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return FpvaultError(f"Access denied while {doing} {name} in {self.url} ({code}); "
                                    "check the credentials and the bucket policy (docs/s3.md).")
            return FpvaultError(f"S3 error while {doing} {name} in {self.url}: {code or exc} "
                                f"(HTTP {status}).{nothing}")
        if isinstance(exc, BotoCoreError):
            return FpvaultError(f"Cannot reach S3 while {doing} {name} in {self.url}: {exc}. "
                                "Check the endpoint (FPVAULT_S3_ENDPOINT or AWS_ENDPOINT_URL) "
                                f"and the network.{nothing}")
        if isinstance(exc, FpvaultError):
            return exc
        return FpvaultError(f"Error while {doing} {name} in {self.url}: {exc}.")
