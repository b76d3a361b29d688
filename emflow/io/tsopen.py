"""Open tensorstore arrays once per process (workers reuse handles across units)."""

from __future__ import annotations

import json
import threading
from typing import Any

import tensorstore as ts

_LOCK = threading.Lock()
_CACHE: dict[str, Any] = {}
_CONTEXT: ts.Context | None = None


def context() -> ts.Context:
    """One tensorstore context per process: shared cache pool and copy threads."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    return _CONTEXT


def open_store(spec: dict, *, token: str = "", assume_metadata: bool = False) -> ts.TensorStore:
    """Open an existing array for reading and writing, cached per (spec, token).

    ``token`` distinguishes runs that recreate the same path (a stale handle would
    keep old metadata). ``assume_metadata``: take the metadata from ``spec`` and never read
    or write it (an object-store volume whose metadata is published last).
    """
    key = token + str(assume_metadata) + json.dumps(spec, sort_keys=True)
    with _LOCK:
        store = _CACHE.get(key)
    if store is None:
        store = ts.open(
            spec,
            open=True,
            read=True,
            write=True,
            assume_metadata=assume_metadata,
            context=context(),
        ).result()
        with _LOCK:
            if len(_CACHE) > 256:
                _CACHE.clear()
            _CACHE[key] = store
    return store


def forget(token: str) -> None:
    """Drop cached handles of one run (after it finished)."""
    with _LOCK:
        for key in [k for k in _CACHE if k.startswith(token)]:
            del _CACHE[key]
