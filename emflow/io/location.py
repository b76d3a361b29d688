"""Where a volume or run folder lives: a local path or a URL, as a tensorstore key-value store.

The one place that turns what a user typed (``/data/run/em``, ``file:///...``,
``http://host/em``, ``gs://bucket/em``, ``s3://bucket/em``) into a tensorstore kvstore
spec. Everything that reads outputs (:func:`emflow.open`) goes through :class:`Location`,
so a new kind of storage is added here and nowhere else. Remote schemes are handled by
tensorstore's own URL parsing (credentials from the usual environment).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emflow.errors import OutputError

#: URL schemes tensorstore reads (file, http(s), Google Cloud Storage, S3)
SCHEMES = ("file", "http", "https", "gs", "s3")


@dataclass(frozen=True)
class Location:
    """A folder (key prefix) in a key-value store; ``url`` is how the user knows it."""

    url: str
    kvstore: Any  # tensorstore kvstore spec: a dict, or a URL string

    @classmethod
    def of(cls, where: str | os.PathLike[str] | Location) -> Location:
        """A local path (made absolute) or a URL with one of :data:`SCHEMES`."""
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        scheme, sep, _ = text.partition("://")
        if not sep:
            path = Path(text).expanduser().absolute()
            return cls(str(path), {"driver": "file", "path": str(path).rstrip("/") + "/"})
        if scheme not in SCHEMES:
            raise OutputError(
                f"{text}: unknown storage scheme {scheme!r}; use a local path or one of "
                + ", ".join(f"{s}://" for s in SCHEMES)
            )
        url = text.rstrip("/")
        if scheme == "file":
            return cls.of(url[len("file://") :])
        return cls(url, url + "/")

    @property
    def path(self) -> Path | None:
        """The local folder, or None for a remote location."""
        if isinstance(self.kvstore, dict) and self.kvstore.get("driver") == "file":
            return Path(self.url)
        return None

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> Location:
        """The folder ``name`` inside this one."""
        name = name.strip("/")
        if isinstance(self.kvstore, dict):
            kv = dict(self.kvstore)
            kv["path"] = kv["path"] + name + "/"
            return Location(f"{self.url}/{name}", kv)
        return Location(f"{self.url}/{name}", f"{self.url}/{name}/")

    def read(self, key: str) -> bytes | None:
        """The value at ``key`` in this folder, or None if there is none."""
        import tensorstore as ts

        try:
            store = ts.KvStore.open(self.kvstore).result()
            got = store.read(key).result()
        except ValueError as exc:  # unreachable host, bad credentials, ...
            raise OutputError(f"cannot read {self.url}/{key}: {exc}") from None
        return bytes(got.value) if got.state == "value" else None

    def exists(self, key: str) -> bool:
        return self.read(key) is not None
