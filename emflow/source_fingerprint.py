"""Fingerprint of the discovered source stack, kept in the run folder as ``stack.json``.

A run's output depends on the recipe (its fingerprint is in ``run.json``) *and* on
the slices it read. The stack fingerprint records, per source file, its size and
modification time, and for the stack the z → (file, page) map, the slice shape and
dtype (the image headers). The next run of the same output compares the stack it
discovers with the recorded one: a changed stack is refused (exit 2) with what
changed and ``--restart`` as the way forward, so an output is never reported
complete while it holds an older stack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from emflow.discover import SliceCatalog, _ranges
from emflow.errors import SourceError
from emflow.io.location import is_url

STACK_JSON = "stack.json"
VERSION = 1


def stack_fingerprint(catalog: SliceCatalog) -> dict[str, Any]:
    """What identifies the stack: per file (size, mtime in ns), per z (file, page, fill), shape, dtype."""
    files: dict[str, list[Any]] = {}
    urls = sorted({r.path for r in catalog.slices if r.path is not None and is_url(r.path)})
    if urls:  # objects: the store's version (ETag / generation) instead of size and mtime
        from concurrent.futures import ThreadPoolExecutor

        from emflow.io import remote

        with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
            files.update(zip(urls, ([g] for g in pool.map(remote.generation, urls)), strict=True))
    for ref in catalog.slices:
        if ref.path is None or ref.path in files:
            continue
        try:
            st = os.stat(ref.path)
        except OSError as exc:
            raise SourceError(f"{ref.path} cannot be read ({exc.strerror or exc})") from None
        files[ref.path] = [st.st_size, st.st_mtime_ns]
    return {
        "version": VERSION,
        "shape_yx": list(catalog.shape_yx),
        "dtype": catalog.dtype,
        "slices": [[r.path, r.page, r.fill] for r in catalog.slices],
        "files": files,
    }


def write_stack_fingerprint(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Store the fingerprint in the run folder (atomically)."""
    path = Path(run_dir) / STACK_JSON
    tmp = path.with_name(f".{STACK_JSON}.tmp")
    tmp.write_text(json.dumps(fingerprint))
    os.replace(tmp, path)


def read_stack_fingerprint(run_dir: Path) -> dict[str, Any] | None:
    """The recorded fingerprint, or None when the run folder has none (or it is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / STACK_JSON).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == VERSION else None


def _names(paths: list[str], limit: int = 3) -> str:
    shown = ", ".join(Path(p).name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def stack_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (empty list: the same stack)."""
    changes: list[str] = []
    if old["shape_yx"] != new["shape_yx"] or old["dtype"] != new["dtype"]:
        oy, ox = old["shape_yx"]
        ny, nx = new["shape_yx"]
        changes.append(
            f"slices were {ox} × {oy} px {old['dtype']}, now {nx} × {ny} px {new['dtype']}"
        )
    of, nf = old["files"], new["files"]
    added = sorted(set(nf) - set(of))
    removed = sorted(set(of) - set(nf))
    changed = sorted(p for p in set(of) & set(nf) if of[p] != nf[p])
    if added:
        changes.append(f"{len(added)} file(s) added ({_names(added)})")
    if removed:
        changes.append(f"{len(removed)} file(s) gone ({_names(removed)})")
    if changed:
        changes.append(f"{len(changed)} file(s) modified since ({_names(changed)})")
    if len(old["slices"]) != len(new["slices"]):
        changes.append(f"{len(old['slices'])} slices before, {len(new['slices'])} now")
    elif not changes:
        moved = [
            z for z, (a, b) in enumerate(zip(old["slices"], new["slices"], strict=True)) if a != b
        ]
        if moved:
            changes.append(f"slices at z {_ranges(moved)} now come from other files or pages")
    return changes
