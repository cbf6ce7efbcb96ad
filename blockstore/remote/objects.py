"""The object store behind one small interface, with the two well-kept S3 clients the bench measures
(bench/remote.py): boto3 and obstore (Rust's object_store), both from requirements/remote.txt (the plugin
is imported only by those who use it, so its clients load at import). Every failure to reach the store becomes
RemoteUnavailable, so callers keep the work pending instead of guessing."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bx
import obstore
from botocore.config import Config
from obstore.store import S3Store

from blockstore.errors import TruncatedError
from blockstore.remote.errors import RemoteError, RemoteObjectMissing, RemoteUnavailable


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    timeout_s: float = 30.0  # per request; a paused store is seen as unavailable after this
    retries: int = 3


class ObjectStore(Protocol):
    settings: S3Settings

    def put(self, key: str, data: bytes) -> None: ...
    def size(self, key: str) -> int | None: ...  # None: no such object
    def get(self, key: str) -> bytes: ...
    # [start, end) each; buffers, not copies (a reader verifies them, then copies out only payloads)
    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]: ...
    def list_after(self, prefix: str, after: str | None) -> list[str]: ...
    def list_children(self, prefix: str) -> list[str]: ...  # the next path level under prefix
    def delete(self, key: str) -> None: ...


_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_settings(settings: S3Settings) -> None:
    """Before a client is made: settings a client cannot use, refused naming the field. Unchecked, an endpoint
    without a scheme ("127.0.0.1:9000") or a bucket with a space made obstore panic at the first request (a
    pyo3 PanicException, a BaseException: it ended the tier's upload thread), and a str or negative timeout or
    retries raised TypeError/OverflowError/ValueError from inside the client."""
    def bad(name: str, why: str) -> RemoteError:
        got = getattr(settings, name)
        shown = f"a {type(got).__name__}" if name == "secret_key" else repr(got)  # never a secret in a message
        return RemoteError(f"S3 settings: {name} {why}, got {shown}")

    endpoint = settings.endpoint
    if not isinstance(endpoint, str):
        raise bad("endpoint", "must be a URL string")
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname or any(c.isspace() or ord(c) < 32 for c in endpoint):
        raise bad("endpoint", "must be an http:// or https:// URL with a host (e.g. http://127.0.0.1:8333)")
    if not isinstance(settings.bucket, str) or not _BUCKET.fullmatch(settings.bucket):
        raise bad("bucket", "must be 1-255 characters of [A-Za-z0-9._-], starting with a letter or digit")
    for name in ("access_key", "secret_key", "region"):
        if not isinstance(getattr(settings, name), str):
            raise bad(name, "must be a string")
    t = settings.timeout_s
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 3600:
        raise bad("timeout_s", "must be a number of seconds in (0, 3600]")
    r = settings.retries
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= 100:
        raise bad("retries", "must be an int in 0..100")


def make_object_store(settings: S3Settings, client: str = "obstore") -> ObjectStore:
    """`client`: "obstore" (the default: bench/remote.py measures both; obstore's ranged reads ran 2-3x
    boto3's on the same cluster, uploads were even; docs/remote.md gives the numbers) or "boto3"."""
    if client == "boto3":
        return Boto3Objects(settings)
    if client == "obstore":
        return ObstoreObjects(settings)
    raise RemoteError(f"unknown S3 client {client!r}: expected 'boto3' or 'obstore'")


class Boto3Objects:
    def __init__(self, settings: S3Settings) -> None:
        check_settings(settings)
        self.settings = settings
        self._bx = bx
        self._client = boto3.client(
            "s3", endpoint_url=settings.endpoint, aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key, region_name=settings.region,
            config=Config(connect_timeout=settings.timeout_s, read_timeout=settings.timeout_s,
                          retries={"max_attempts": settings.retries, "mode": "standard"},
                          max_pool_connections=32),
        )

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        bx = self._bx
        try:
            return fn(Bucket=self.settings.bucket, **kw)
        except (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                bx.ConnectTimeoutError) as e:
            raise RemoteUnavailable(f"{what}: object store unreachable: {e}") from e
        except bx.ClientError as e:
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status >= 500:
                raise RemoteUnavailable(f"{what}: object store error {status}: {e}") from e
            raise

    def put(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", self._client.put_object, Key=key, Body=data)

    def size(self, key: str) -> int | None:
        try:
            return int(self._call(f"head {key}", self._client.head_object, Key=key)["ContentLength"])
        except self._bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise RemoteError(f"head {key}: {e}") from e

    def get(self, key: str) -> bytes:
        return self._get(key, None)

    def _get(self, key: str, rng: str | None) -> bytes:
        try:
            kw = {"Key": key} if rng is None else {"Key": key, "Range": rng}
            body = self._call(f"get {key}", self._client.get_object, **kw)["Body"]
            try:
                return bytes(body.read())
            except (self._bx.ReadTimeoutError, self._bx.ResponseStreamingError) as e:
                raise RemoteUnavailable(f"get {key}: body cut short: {e}") from e
        except self._bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise RemoteObjectMissing(f"get {key}: no such object") from e
            if e.response.get("Error", {}).get("Code") == "InvalidRange":
                raise _cut_short(key, rng) from e
            raise RemoteError(f"get {key}: {e}") from e

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        # S3 answers one range per request; the reader coalesces neighbours and runs requests in parallel
        return [memoryview(self._get(key, f"bytes={s}-{e - 1}")) for s, e in ranges]

    def list_after(self, prefix: str, after: str | None) -> list[str]:
        out: list[str] = []
        kw: dict[str, Any] = {"Prefix": prefix}
        if after is not None:
            kw["StartAfter"] = after
        while True:
            page = self._call(f"list {prefix}", self._client.list_objects_v2, **kw)
            out.extend(o["Key"] for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return out
            kw = {"Prefix": prefix, "ContinuationToken": page["NextContinuationToken"]}

    def list_children(self, prefix: str) -> list[str]:
        out: list[str] = []
        kw: dict[str, Any] = {"Prefix": prefix, "Delimiter": "/"}
        while True:
            page = self._call(f"list {prefix}", self._client.list_objects_v2, **kw)
            out.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
            if not page.get("IsTruncated"):
                return out
            kw = {"Prefix": prefix, "Delimiter": "/", "ContinuationToken": page["NextContinuationToken"]}

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self._client.delete_object, Key=key)


class ObstoreObjects:
    def __init__(self, settings: S3Settings) -> None:
        check_settings(settings)
        self.settings = settings
        self._obs = obstore
        self._store = S3Store(
            settings.bucket, endpoint=settings.endpoint, access_key_id=settings.access_key,
            secret_access_key=settings.secret_key, region=settings.region, virtual_hosted_style_request=False,
            client_options={"allow_http": True, "timeout": timedelta(seconds=settings.timeout_s),
                            "connect_timeout": timedelta(seconds=settings.timeout_s)},
            retry_config={"max_retries": settings.retries, "retry_timeout": timedelta(seconds=settings.timeout_s),
                          "backoff": {"init_backoff": timedelta(milliseconds=100),
                                      "max_backoff": timedelta(seconds=2), "base": 2}},
        )

    def _call(self, what: str, fn: Any, *a: Any, **kw: Any) -> Any:
        try:
            return fn(self._store, *a, **kw)
        except FileNotFoundError:
            raise
        except Exception as e:  # obstore raises its own GenericError etc. for transport failures
            raise RemoteUnavailable(f"{what}: {type(e).__name__}: {e}") from e

    def put(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", self._obs.put, key, data)

    def size(self, key: str) -> int | None:
        try:
            return int(self._call(f"head {key}", self._obs.head, key)["size"])
        except FileNotFoundError:
            return None

    def get(self, key: str) -> bytes:
        try:
            return bytes(self._call(f"get {key}", lambda s, k: self._obs.get(s, k).bytes(), key))
        except FileNotFoundError as e:
            raise RemoteObjectMissing(f"get {key}: no such object") from e

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        try:
            got = self._call(f"get {key}", self._obs.get_ranges, key, starts=[s for s, _ in ranges],
                             ends=[e for _, e in ranges])
        except FileNotFoundError as e:
            raise RemoteObjectMissing(f"get {key}: no such object") from e
        except RemoteUnavailable as e:
            if "416 Range Not Satisfiable" in str(e):  # obstore has no error class of its own for it
                raise _cut_short(key, ", ".join(f"[{a}, {b})" for a, b in ranges)) from e.__cause__
            raise
        return [memoryview(b) for b in got]  # obstore's Bytes: Rust-owned, exposed without a copy

    def list_after(self, prefix: str, after: str | None) -> list[str]:
        def listing(store: Any) -> list[str]:  # the stream is lazy: its pages fail inside _call too
            return [o["path"] for batch in self._obs.list(store, prefix=prefix, offset=after) for o in batch]
        return list(self._call(f"list {prefix}", listing))

    def list_children(self, prefix: str) -> list[str]:
        got = self._call(f"list {prefix}", self._obs.list_with_delimiter, prefix=prefix)
        return [p if p.endswith("/") else p + "/" for p in got["common_prefixes"]]

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self._obs.delete, key)


def _cut_short(key: str, ranges: str | None) -> TruncatedError:
    """A ranged GET past the end of the object (HTTP 416): the object is shorter than the block it stands for,
    so it was truncated or replaced in the bucket. Corruption, not the store being unreachable: retrying
    cannot help, and on_corrupt="miss" reads it as a miss."""
    return TruncatedError(f"get {key}: the object ends before the range {ranges} (HTTP 416): it was truncated "
                          "or replaced in the bucket")
