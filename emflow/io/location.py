"""Where a volume, a slice or a run folder lives: a local path or a URL, as a tensorstore kvstore.

The one place that turns what a user typed (``/data/run/em``, ``file:///...``,
``http://host/em``, ``gs://bucket/em``, ``s3://bucket/em``) into a tensorstore kvstore
spec. Everything that reads or writes storage by URL goes through :class:`Location`, so
a new kind of storage is added here and nowhere else. Remote specs are built by
:mod:`emflow.io.storage` in the process that uses them (endpoint, region and credential
*type* from the run's settings and that process's environment; never a key).

Every tensorstore failure of a remote location becomes a one-line
:class:`~emflow.errors.EmflowError` naming the bucket and endpoint
(:func:`store_error`): an unreachable store is resumable (exit 3), denied access or a
missing bucket is bad input (exit 2).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emflow.errors import EmflowError, OutputError
from emflow.io import storage

#: URL schemes tensorstore reads (file, http(s), Google Cloud Storage, S3)
SCHEMES = ("file", "http", "https", "gs", "s3")
#: schemes emflow can write to
WRITABLE = ("file", "gs", "s3")


def is_url(text: object) -> bool:
    """True for ``scheme://...`` text with a remote scheme (not a local path, not file://)."""
    if not isinstance(text, str):
        return False
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme in SCHEMES and scheme != "file"


class StoreUnavailable(OutputError):
    """An object store did not answer (after bounded retries): resumable once it is back."""

    exit_code = 3


class StoreAccessError(OutputError):
    """Credentials were refused, or the bucket does not exist."""


@dataclass(frozen=True)
class Location:
    """A folder (key prefix) in a key-value store; ``url`` is how the user knows it."""

    url: str

    @classmethod
    def of(cls, where: str | os.PathLike[str] | Location) -> Location:
        """A local path (made absolute) or a URL with one of :data:`SCHEMES`."""
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        scheme, sep, rest = text.partition("://")
        if not sep:
            return cls(str(Path(text).expanduser().absolute()))
        if scheme not in SCHEMES:
            raise OutputError(
                f"{text}: unknown storage scheme {scheme!r}; use a local path or one of "
                + ", ".join(f"{s}://" for s in SCHEMES)
            )
        if scheme == "file":
            return cls.of(text[len("file://") :])
        if not rest.split("/", 1)[0]:
            what = "a host" if scheme.startswith("http") else "a bucket"
            raise OutputError(f"{text}: the URL names no {what} ({scheme}://NAME/...)")
        return cls(text.rstrip("/"))

    # ---- parts ------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        scheme, sep, _ = self.url.partition("://")
        return scheme if sep else "file"

    @property
    def is_remote(self) -> bool:
        return self.scheme != "file"

    @property
    def bucket(self) -> str:
        """The bucket (s3, gs) or ``host:port`` (http) of a remote location; '' for a local one."""
        if not self.is_remote:
            return ""
        return self.url.partition("://")[2].split("/", 1)[0]

    @property
    def key(self) -> str:
        """The key prefix inside the bucket (no leading or trailing '/'); the path if local."""
        if not self.is_remote:
            return self.url
        rest = self.url.partition("://")[2]
        return rest.split("/", 1)[1] if "/" in rest else ""

    @property
    def kvstore(self) -> dict[str, Any]:
        """The tensorstore kvstore spec of this folder, built in (and for) this process."""
        prefix = self.key + "/" if self.key else ""
        if self.scheme == "s3":
            return storage.s3_kvstore(self.bucket, prefix)
        if self.scheme == "gs":
            return storage.gcs_kvstore(self.bucket, prefix)
        if self.scheme in ("http", "https"):
            return storage.http_kvstore(f"{self.scheme}://{self.bucket}", "/" + prefix)
        return {"driver": "file", "path": self.url.rstrip("/") + "/"}

    @property
    def endpoint(self) -> str:
        """Where requests go (for messages): the S3 endpoint, the GCS server, the HTTP host."""
        if self.scheme in ("http", "https"):
            return f"{self.scheme}://{self.bucket}"
        return storage.endpoint_of(self.scheme, self.bucket)

    @property
    def where(self) -> str:
        """The location for messages: ``s3://bucket/prefix (endpoint http://...)``."""
        if self.scheme in ("s3", "gs"):
            return f"{self.url} (endpoint {self.endpoint})"
        return self.url

    @property
    def path(self) -> Path | None:
        """The local folder, or None for a remote location."""
        return None if self.is_remote else Path(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        head = self.url.rstrip("/").rsplit("/", 1)[0]
        if self.is_remote and "/" not in self.url.partition("://")[2]:
            return self
        return Location(head or "/")

    def child(self, name: str) -> Location:
        """The folder (or object) ``name`` inside this one (``name`` may hold '/')."""
        name = name.strip("/")
        return Location(f"{self.url.rstrip('/')}/{name}") if name else self

    def __str__(self) -> str:
        return self.url

    # ---- key-value operations (keys relative to this folder) ----------------------------
    def store(self) -> Any:
        """This folder's opened ``tensorstore.KvStore`` (cached per process and spec)."""
        spec = self.kvstore
        key = json.dumps(spec, sort_keys=True)
        with _LOCK:
            kv = _STORES.get(key)
        if kv is None:
            import tensorstore as ts

            try:
                kv = ts.KvStore.open(spec).result()
            except ValueError as exc:
                raise store_error(exc, self, "open") from None
            with _LOCK:
                if len(_STORES) > 64:
                    _STORES.clear()
                _STORES[key] = kv
        return kv

    def read(self, key: str) -> bytes | None:
        """The value at ``key`` in this folder, or None if there is none."""
        try:
            got = self.store().read(key).result()
        except ValueError as exc:
            raise store_error(exc, self, f"read {key}") from None
        return bytes(got.value) if got.state == "value" else None

    def read_range(self, key: str, start: int, stop: int | None = None) -> bytes | None:
        """Bytes ``start:stop`` of ``key`` (``stop`` None = to the end; clipped at the end)."""
        try:
            got = self.store().read(key, byte_range=slice(start, stop)).result()
        except ValueError as exc:
            if "OUT_OF_RANGE" in str(exc):  # shorter than asked: what there is
                return self.read_range(key, start, None) if stop is not None else b""
            raise store_error(exc, self, f"read {key}") from None
        return bytes(got.value) if got.state == "value" else None

    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` (one PUT on an object store: all or nothing)."""
        try:
            self.store().write(key, data).result()
        except ValueError as exc:
            raise store_error(exc, self, f"write {key}") from None

    def delete(self, key: str) -> None:
        try:
            self.store().delete_range(_exact(key)).result()
        except ValueError as exc:
            raise store_error(exc, self, f"delete {key}") from None

    def list(self, prefix: str = "") -> list[str]:
        """Every key under this folder starting with ``prefix`` (recursive), sorted."""
        try:
            if prefix:
                keys = self.store().list(_prefix_range(prefix)).result()
            else:
                keys = self.store().list().result()
        except NotImplementedError:
            raise OutputError(
                f"{self.url}: this store cannot list its keys (plain HTTP); name the files "
                "with source.pattern and a z range"
            ) from None
        except ValueError as exc:
            raise store_error(exc, self, "list") from None
        return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)

    def delete_all(self, prefix: str = "") -> None:
        """Delete every key under this folder starting with ``prefix``."""
        import tensorstore as ts

        rng = _prefix_range(prefix) if prefix else ts.KvStore.KeyRange()
        try:
            self.store().delete_range(rng).result()
        except ValueError as exc:
            raise store_error(exc, self, "delete") from None

    def exists(self, key: str) -> bool:
        return self.read(key) is not None


_LOCK = threading.Lock()
_STORES: dict[str, Any] = {}


def _exact(key: str) -> Any:
    import tensorstore as ts

    return ts.KvStore.KeyRange(key, key + "\x00")


def _prefix_range(prefix: str) -> Any:
    import tensorstore as ts

    data = prefix.encode()
    end = data[:-1] + bytes([data[-1] + 1]) if data and data[-1] < 255 else b""
    return ts.KvStore.KeyRange(data, end)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
_UNREACHABLE = re.compile(
    r"CURL error|retry attempts failed|Could not connect|Connection refused|Timeout was reached|"
    r"Operation too slow|Couldn't resolve host|Could not resolve host|UNAVAILABLE|DEADLINE_EXCEEDED"
)
#: the key a failed tensorstore request was for: 'Error writing "out/ng/c/1/1"'
_KEY_IN = re.compile(r'Error (reading|writing|deleting|listing) "([^"]{1,300})"')
_CONNECT_TO = re.compile(
    r"(?:Failed to connect to|resolve host:?|connect to host)\s+([\w.\-]+)(?:\s+port\s+(\d+))?"
)


def classify(exc: BaseException) -> EmflowError | None:
    """The one-line error for a failed object-store request (seen in a worker, where the
    location is not known), or None when ``exc`` is not one."""
    if isinstance(exc, EmflowError):
        return exc
    text = str(exc)
    if "CURL error" in text or "http_response_code=" in text or "NoSuchBucket" in text:
        return store_error(exc, None)
    return None


def store_error(exc: BaseException, loc: Location | None, doing: str = "") -> EmflowError:
    """The one-line error for a failed request to ``loc`` (never the store's response body).

    Unreachable (retries exhausted, refused, timed out) → :class:`StoreUnavailable`
    (exit 3); denied or unknown credentials → :class:`StoreAccessError` naming the bucket
    and how credentials are found; a missing bucket → :class:`StoreAccessError`. Anything
    else keeps tensorstore's first line, scrubbed of secrets and response bodies.
    """
    if isinstance(exc, EmflowError):
        return exc
    text = str(exc)
    where = loc.where if loc is not None else _endpoint_in(text)
    url = loc.url if loc is not None else where
    if loc is not None and not loc.is_remote:
        first = storage.scrub(text.splitlines()[0] if text else type(exc).__name__)
        return OutputError(f"{url}: {doing} failed ({first})")
    if text.startswith("PERMISSION_DENIED") or text.startswith("UNAUTHENTICATED"):
        return StoreAccessError(
            f"{where}: access denied ({_s3_code(text) or 'HTTP 403'}) — check the credentials "
            f"for bucket '{loc.bucket if loc else '?'}' ({_credential_hint(loc)})"
        )
    if "NoSuchBucket" in text or (
        text.startswith("NOT_FOUND") and "http_response_code='404'" in text and "write" in doing
    ):
        return StoreAccessError(
            f"{where}: bucket '{loc.bucket if loc else '?'}' does not exist; create it or fix "
            "the URL"
        )
    if _UNREACHABLE.search(text):
        why = _curl_reason(text)
        what = f" while trying to {doing or 'reach'} {url}" if loc is not None else ""
        key = _KEY_IN.search(text) if loc is None else None  # a worker's write or read
        if key is not None:
            what = f" while {key.group(1)} {key.group(2)}"
        store = f"object store {loc.endpoint if loc else where}"
        if loc is None and where == _NO_ENDPOINT:
            store = where
        return StoreUnavailable(
            f"{store} did not answer ({why}){what}: check "
            "that it is running and reachable, then run the same command again to resume"
        )
    first = storage.scrub(text.splitlines()[0] if text else type(exc).__name__)
    return OutputError(f"{url}: {doing or 'request'} failed ({first[:300]})")


def _s3_code(text: str) -> str:
    m = re.search(r"PERMISSION_DENIED:\s*(\w+)", text)
    return "" if m is None or m.group(1) == "Unknown" else m.group(1)


def _credential_hint(loc: Location | None) -> str:
    if loc is None or loc.scheme == "s3":
        return (
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, storage.profile or AWS_PROFILE, or "
            "storage.anonymous for a public bucket"
        )
    if loc.scheme == "gs":
        return "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`"
    return "the server refused the request"


def _curl_reason(text: str) -> str:
    reasons = (
        ("Could not resolve host", "host not found"),
        ("Couldn't resolve host", "host not found"),
        ("Connection refused", "connection refused"),
        ("Could not connect", "connection refused"),
        ("Operation too slow", "transfer stalled"),
        ("Timeout was reached", "timed out"),
    )
    reason = next((r for p, r in reasons if p in text), "no answer")
    server = re.search(r"http_response_code='(5\d\d)'", text)
    if reason == "no answer" and server is not None:  # it answered, with a server error
        reason = f"server error HTTP {server.group(1)}"
    m = re.search(r"All (\d+) retry attempts failed", text)
    return f"{reason}, {m.group(1)} attempts" if m else reason


_NO_ENDPOINT = "the object store"


def _endpoint_in(text: str) -> str:
    """A host:port named in a curl error, mapped to a configured endpoint when one matches."""
    m = _CONNECT_TO.search(text)
    if m is None:
        m2 = re.search(r"(gs|s3)://[\w.\-]+", text)
        return m2.group(0) if m2 else (storage.current().default.endpoint or _NO_ENDPOINT)
    host, port = m.group(1), m.group(2)
    settings = storage.current()
    for s in (settings.default, *settings.buckets.values()):
        if s.endpoint and host in s.endpoint and (port is None or f":{port}" in s.endpoint):
            return s.endpoint
    return f"{host}:{port}" if port else host


# ---------------------------------------------------------------------------------------
# single objects by path or URL (run-folder intermediates that workers write and read)
# ---------------------------------------------------------------------------------------
def _split(path_or_url: str | os.PathLike[str]) -> tuple[Location, str]:
    loc = Location.of(path_or_url)
    return loc.parent, loc.name


def put_bytes(path_or_url: str | os.PathLike[str], data: bytes) -> None:
    """Store ``data`` at a local path (atomically: temporary file + rename) or a URL (one PUT)."""
    if not is_url(path_or_url):
        path = Path(path_or_url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    folder, key = _split(path_or_url)
    folder.write(key, data)


def get_bytes(path_or_url: str | os.PathLike[str]) -> bytes | None:
    """The bytes at a local path or URL, or None when there is nothing there."""
    if not is_url(path_or_url):
        try:
            return Path(path_or_url).read_bytes()
        except FileNotFoundError:
            return None
    folder, key = _split(path_or_url)
    return folder.read(key)


def get_range(path_or_url: str | os.PathLike[str], start: int, stop: int) -> bytes | None:
    """Bytes ``start:stop`` at a local path or URL, or None when there is nothing there."""
    if not is_url(path_or_url):
        try:
            with open(path_or_url, "rb") as fh:
                fh.seek(start)
                return fh.read(stop - start)
        except FileNotFoundError:
            return None
    folder, key = _split(path_or_url)
    return folder.read_range(key, start, stop)


def join(path_or_url: str | os.PathLike[str], *names: str) -> str:
    """``path_or_url/name/...`` as text, for local paths and URLs alike."""
    base = os.fspath(path_or_url).rstrip("/")
    return "/".join([base, *(n.strip("/") for n in names)])


def remove_tree(path_or_url: str | os.PathLike[str]) -> None:
    """Delete a local folder, or every object under a URL prefix (nothing there: no error)."""
    if not is_url(path_or_url):
        import shutil

        shutil.rmtree(path_or_url, ignore_errors=True)
        return
    Location.of(path_or_url).delete_all()
