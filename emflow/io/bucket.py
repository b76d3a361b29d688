"""Outputs in a bucket (output_dir ``s3://...`` or ``gs://...``): probe, ownership, publish.

The same rules as on a file system (:mod:`emflow.io.ownership`), with objects for files:

* before any work, a probe object is written and deleted under output_dir: wrong
  credentials or a missing bucket stop the run with exit 2 naming the bucket, an
  unreachable store with exit 3 naming the endpoint;
* every output prefix gets emflow's marker object (:data:`MARKER`) *first*, naming the
  output_dir's owner id; a prefix holding objects without our marker is never touched;
* the owner id lives in the bucket's run folder (``output_dir/emflow-run/MARKER``) and in
  the driver's local working copy of the run folder, so a run can continue from any machine;
* there is no ``.partial`` and no rename: chunks are written with the metadata assumed
  and each writer's ``finalize()`` publishes the metadata last, so a reader never sees a
  half-written volume as complete.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from emflow.errors import OutputError
from emflow.io import ownership
from emflow.io.location import Location

MARKER = ownership.MARKER
RUN_FOLDER = "emflow-run"
#: the objects that make a volume readable: deleted first when an output is replaced
METADATA = ("info", "zarr.json", ".zattrs", ".zgroup")


def probe(root: str) -> None:
    """Write and delete a small object under ``root``: checks bucket, credentials and write
    permission in one request (a read of a missing bucket would just say 'missing')."""
    loc = Location.of(root)
    key = f".emflow-probe-{uuid.uuid4().hex[:12]}"
    loc.write(key, b"emflow write probe\n")
    loc.delete(key)


def read_marker(url: str) -> dict | None:
    """The ownership marker object of the output (or run folder) at ``url``, or None."""
    raw = Location.of(url).read(MARKER)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("owner"), str) else None


def bucket_owner(root: str) -> str | None:
    """The owner id of the run folder in the bucket, or None (no run there yet)."""
    data = read_marker(f"{root}/{RUN_FOLDER}")
    return data["owner"] if data and data.get("kind") == "run-folder" else None


def claim_run_folder(root: str, run_dir: Path) -> str:
    """The output_dir's owner id: the bucket's if it has a run folder (copied into the local
    working copy ``run_dir``), else a new one written to both (the bucket's first)."""
    owner = bucket_owner(root)
    if owner is None:
        owner = uuid.uuid4().hex
        payload = {"kind": "run-folder", "owner": owner, "created": time.time()}
        Location.of(f"{root}/{RUN_FOLDER}").write(MARKER, json.dumps(payload).encode())
    if ownership.owner_of(run_dir) != owner:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        payload = {"kind": "run-folder", "owner": owner, "created": time.time()}
        ownership._write_marker(run_dir, payload)
    return owner


def is_owned(url: str, owner: str | None) -> bool:
    data = read_marker(url)
    return owner is not None and data is not None and data["owner"] == owner


def check_output(url: str, owner: str | None) -> None:
    """Refuse (before any work) an output prefix that holds objects emflow did not write."""
    data = read_marker(url)
    if data is not None:
        if owner is None or data["owner"] != owner:
            raise refused(url, "was not written by emflow for this output_dir")
        return
    if Location.of(url).list():
        raise refused(url, "holds objects emflow did not write")


def claim(url: str, owner: str, name: str) -> None:
    """Make the output prefix ``url`` empty with emflow's marker object (written first).

    An earlier output emflow wrote stops being readable first (its metadata goes), then
    every object under the prefix is deleted; a prefix emflow does not own is refused.
    """
    check_output(url, owner)
    from emflow.io import runmirror

    runmirror.flush_all()  # the bucket's run folder must stop vouching for its units first
    loc = Location.of(url)
    for key in METADATA:
        loc.delete(key)
    loc.delete_all()
    payload = {"kind": "output", "owner": owner, "name": name}
    loc.write(MARKER, json.dumps(payload).encode())


def exists(url: str) -> bool:
    """True when the output prefix was claimed (its marker object is there)."""
    return Location.of(url).exists(MARKER)


def refused(url: str, why: str) -> OutputError:
    return OutputError(
        f"{url} already exists and {why}; emflow replaces only what it wrote: delete it, or "
        "choose another output name or output_dir"
    )


def publish(writer: Any) -> dict:
    """The finalize unit of a bucket output: publish its metadata (idempotent)."""
    writer.finalize()
    return {"output": writer.name, "path": str(writer.path), "moved": False}
