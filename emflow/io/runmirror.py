"""The run folder of a remote output_dir: kept in the bucket, worked on in a local copy.

When ``output_dir`` is ``s3://...`` or ``gs://...`` the run folder is
``output_dir/emflow-run/`` **in the bucket**, so a run resumes from any machine -- a
Kubernetes driver pod rescheduled elsewhere, a laptop after a crash -- with no shared
disk. The driver works on a local copy (:func:`local_dir_for`, under
``$EMFLOW_RUN_CACHE`` or ``~/.cache/emflow/runs``), so the run-folder code keeps using
plain files:

* :meth:`RunMirror.restore` replaces the local copy with the bucket's at the start of a
  run (the bucket is the truth);
* :meth:`RunMirror.flush` makes the bucket equal to the local copy: deletions first, then
  changed files in the order they were written (a done marker never reaches the bucket
  before what it vouches for); called at every stage start and end, before anything in
  the bucket is deleted or replaced, and every :data:`LIVE_INTERVAL_S` during a stage
  (then uploads only);
* workers never see the local copy: their unit markers are written by the driver, and
  their intermediates (:data:`DATA`) live in the bucket only.

Never uploaded: ``secrets/`` (TLS keys), ``scheduler.json`` (this machine's live run),
``worker-logs/`` and temporary files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from emflow.io.location import Location

logger = logging.getLogger(__name__)

#: seconds between uploads of new markers while a stage runs
LIVE_INTERVAL_S = 10.0
#: run-folder entries that stay on the driver's disk
LOCAL_ONLY = ("secrets", "scheduler.json", "worker-logs")
#: run-folder entries workers write straight to the bucket (never mirrored)
DATA = ("handoff", "rendered", "slice-cache", "features")
#: appended all the time: uploaded at stage boundaries only
BOUNDARY_ONLY = ("journal.jsonl", "run.log")

_MIRRORS: dict[str, RunMirror] = {}
_REGISTRY_LOCK = threading.Lock()


def cache_root() -> Path:
    """Where local copies of remote run folders live."""
    env = os.environ.get("EMFLOW_RUN_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emflow" / "runs"


def local_dir_for(run_url: str) -> Path:
    """The local working copy of the remote run folder ``run_url`` on this machine."""
    loc = Location.of(run_url)
    slug = f"{loc.scheme}-{loc.bucket}-{loc.key}".replace("/", "_").replace(":", "_")[-80:]
    digest = hashlib.sha256(loc.url.encode()).hexdigest()[:10]
    return cache_root() / f"{slug}-{digest}" / loc.name


def _skip(rel: str) -> bool:
    top = rel.split("/", 1)[0]
    name = rel.rsplit("/", 1)[-1]
    return top in LOCAL_ONLY or top in DATA or (name.startswith(".") and ".tmp" in name)


class RunMirror:
    """A remote run folder (``remote``) and its local working copy (``local``)."""

    def __init__(self, remote: Location, local: Path) -> None:
        self.remote = remote
        self.local = Path(local)
        self._synced: dict[str, tuple[int, int]] = {}  # rel path -> (mtime_ns, size) in bucket
        self._lock = threading.RLock()
        self._live: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- both ways -----------------------------------------------------------------------
    def restore(self) -> int:
        """Replace the local copy with the bucket's run folder; returns the files fetched."""
        with self._lock:
            if self.local.exists():
                for entry in self.local.iterdir():
                    if entry.name in LOCAL_ONLY:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            self.local.mkdir(parents=True, exist_ok=True)
            keys = [k for k in self.remote.list() if not _skip(k)]

            def fetch(key: str) -> None:
                data = self.remote.read(key)
                if data is None:  # deleted since the listing
                    return
                path = self.local / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(fetch, keys))
            self._synced = self._scan()
            return len(keys)

    def _scan(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        if not self.local.exists():
            return out
        for folder, dirs, files in os.walk(self.local):
            rel_dir = os.path.relpath(folder, self.local)
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            if rel_dir and _skip(rel_dir.rstrip("/")):
                dirs[:] = []
                continue
            dirs[:] = [d for d in dirs if not _skip(rel_dir + d)]
            for f in files:
                rel = rel_dir + f
                if _skip(rel):
                    continue
                try:
                    st = os.stat(os.path.join(folder, f))
                except FileNotFoundError:
                    continue
                out[rel] = (st.st_mtime_ns, st.st_size)
        return out

    def flush(self, *, deletes: bool = True, boundary: bool = True) -> int:
        """Make the bucket equal the local copy; returns the objects written or deleted.

        Deletions first (a dropped marker must be gone before anything newer lands), then
        changed files in the order they were written; done markers between two other
        files go up together. ``deletes=False, boundary=False``: only new and changed files
        other than the journal and log (the live flush during a stage).
        """
        with self._lock:
            now = self._scan()
            count = 0
            if deletes:
                gone = sorted(set(self._synced) - set(now))
                count += self._delete(gone)
                for rel in gone:
                    self._synced.pop(rel, None)
            changed = [
                rel
                for rel, stamp in now.items()
                if self._synced.get(rel) != stamp and (boundary or rel not in BOUNDARY_ONLY)
            ]
            changed.sort(key=lambda rel: (now[rel][0], rel))
            batch: list[str] = []
            for rel in changed:
                if rel.startswith("done/"):
                    batch.append(rel)
                    continue
                count += self._upload(batch, now)
                batch = []
                count += self._upload([rel], now)
            count += self._upload(batch, now)
            return count

    def _upload(self, rels: list[str], stamps: dict[str, tuple[int, int]]) -> int:
        if not rels:
            return 0

        def put(rel: str) -> None:
            try:
                data = (self.local / rel).read_bytes()
            except FileNotFoundError:  # replaced or removed meanwhile: the next flush sees it
                return
            self.remote.write(rel, data)
            self._synced[rel] = stamps[rel]

        if len(rels) == 1:
            put(rels[0])
        else:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(put, rels))
        return len(rels)

    def _delete(self, rels: list[str]) -> int:
        if not rels:
            return 0
        folders: set[str] = set()  # removed locally as a whole: one range delete each
        singles: list[str] = []
        for rel in rels:
            parts = rel.split("/")[:-1]
            gone = next(
                ("/".join(parts[:i]) for i in range(1, len(parts) + 1)
                 if not (self.local / "/".join(parts[:i])).exists()),
                None,
            )  # fmt: skip
            if gone:
                folders.add(gone)
            else:
                singles.append(rel)
        for folder in sorted(folders):
            if not any(folder.startswith(f + "/") for f in folders):
                self.remote.delete_all(folder + "/")
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(self.remote.delete, singles))
        return len(rels)

    # ---- during a stage -------------------------------------------------------------------
    def live(self, on: bool) -> None:
        """Upload new markers every :data:`LIVE_INTERVAL_S` (on) or stop doing so (off)."""
        if on and self._live is None:
            self._stop.clear()
            self._live = threading.Thread(target=self._run_live, name="emflow-mirror", daemon=True)
            self._live.start()
        elif not on and self._live is not None:
            self._stop.set()
            self._live.join(timeout=LIVE_INTERVAL_S + 60)  # a flush in flight: bounded retries
            self._live = None

    def _run_live(self) -> None:
        while not self._stop.wait(LIVE_INTERVAL_S):
            try:
                self.flush(deletes=False, boundary=False)
            except Exception as exc:  # the stage's own requests report an unreachable store
                log = logger.debug if store_down(exc) else logger.warning
                log("could not copy the run folder to %s: %s", self.remote.url, exc)


# ---------------------------------------------------------------------------------------
# the mirrors of this process
# ---------------------------------------------------------------------------------------
def open_mirror(remote: Location, local: Path | None = None) -> RunMirror:
    """The mirror of the remote run folder ``remote`` (registered for :func:`for_dir`)."""
    local = Path(local) if local is not None else local_dir_for(remote.url)
    with _REGISTRY_LOCK:
        mirror = _MIRRORS.get(str(local))
        if mirror is None or mirror.remote != remote:
            mirror = RunMirror(remote, local)
            _MIRRORS[str(local)] = mirror
    return mirror


def for_dir(run_dir: object) -> RunMirror | None:
    """The mirror whose local copy is ``run_dir``, or None (a run folder on local disk)."""
    if run_dir is None:
        return None
    with _REGISTRY_LOCK:
        return _MIRRORS.get(str(run_dir))


def flush_all() -> None:
    """Flush every mirror of this process (before anything in a bucket is deleted)."""
    with _REGISTRY_LOCK:
        mirrors = list(_MIRRORS.values())
    for m in mirrors:
        m.flush()


def close(run_dir: object) -> None:
    """Stop live copying and forget the mirror of ``run_dir`` (after its final flush)."""
    with _REGISTRY_LOCK:
        mirror = _MIRRORS.pop(str(run_dir), None)
    if mirror is not None:
        mirror.live(False)


def for_recipe(recipe: object) -> RunMirror | None:
    """The mirror of a recipe's run folder when its output_dir is a bucket, else None."""
    if not getattr(recipe, "output_remote", False):
        return None
    from emflow.io.bucket import RUN_FOLDER

    root = str(recipe.output_root)  # type: ignore[attr-defined]
    return open_mirror(Location.of(f"{root}/{RUN_FOLDER}"), recipe.run_folder)  # type: ignore[attr-defined]


def store_down(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what caused it) says an object store stopped answering: then a
    last copy of the run folder would only wait out the same retries again."""
    from emflow.io.location import StoreUnavailable

    while exc is not None:
        if isinstance(exc, StoreUnavailable):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def data_path(run_dir: object, name: str) -> str:
    """Where the run-folder intermediate ``name`` (one of :data:`DATA`) lives: in the bucket for
    a mirrored run folder (workers write it), else inside ``run_dir``."""
    mirror = for_dir(run_dir)
    if mirror is not None:
        return f"{mirror.remote.url}/{name}"
    return str(Path(str(run_dir)) / name)
