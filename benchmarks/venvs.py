"""Peer-tool virtualenvs under ``benchmarks/.venvs`` (git-ignored), created once and cached.

Each peer gets its own venv because their dependency sets conflict (igneous-pipeline pulls
zfpy, which breaks ``import numcodecs``; see ../shared/notes/PERFORMANCE.md §5). A venv is
reused while its stamp file matches the requirement list; a failed install is remembered in
the stamp too (with the pip log tail) so later runs skip it quickly with the same note.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

VENVS = Path(__file__).resolve().parent / ".venvs"

#: peer name -> pip requirements (psutil/opencv for the shared decode + measurement helpers)
PEERS: dict[str, list[str]] = {
    "igneous": ["igneous-pipeline", "cloud-volume", "opencv-python-headless", "psutil"],
    "ngff-zarr": ["ngff-zarr[dask-image]", "opencv-python-headless", "psutil"],
    "ome-zarr-py": ["ome-zarr", "opencv-python-headless", "psutil"],
}


@dataclass
class PeerEnv:
    """One peer's venv: ``python`` is usable when ``ok``; ``note`` says why not otherwise."""

    name: str
    python: Path
    ok: bool
    note: str
    versions: dict[str, str]
    setup_s: float


def _stamp_key(reqs: list[str]) -> str:
    return hashlib.sha256(json.dumps([sys.version_info[:2], reqs]).encode()).hexdigest()[:16]


def _versions(python: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def ensure(name: str, *, timeout_s: float = 900.0, retry_failed: bool = False) -> PeerEnv:
    """Create (or reuse) the venv of peer ``name``; never raises for install failures."""
    reqs = PEERS[name]
    root = VENVS / name
    python = root / "bin" / "python"
    stamp = root / "emflow-bench-stamp.json"
    key = _stamp_key(reqs)
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("key") == key and (info["ok"] or not retry_failed):
            return PeerEnv(name, python, info["ok"], info["note"], info.get("versions", {}), 0.0)
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "pip.log"
    ok, note = True, ""
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
        with open(log, "w") as fh:
            subprocess.run(
                [str(python), "-m", "pip", "install", "--upgrade", "pip"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
            proc = subprocess.run(
                [str(python), "-m", "pip", "install", *reqs],
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
        if proc.returncode != 0:
            ok = False
            tail = log.read_text().strip().splitlines()[-3:]
            note = f"pip install {' '.join(reqs)} failed: " + " | ".join(tail)
    except (subprocess.SubprocessError, OSError) as exc:
        ok, note = False, f"venv setup failed: {exc}"
    versions = {}
    if ok:
        try:
            versions = _versions(python)
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            ok, note = False, f"venv unusable: {exc}"
    stamp.write_text(json.dumps({"key": key, "ok": ok, "note": note, "versions": versions}))
    return PeerEnv(name, python, ok, note, versions, time.perf_counter() - t0)


def ensure_all(names: list[str] | None = None) -> dict[str, PeerEnv]:
    """Set up every peer venv (sequentially; pip is network- and disk-bound)."""
    return {n: ensure(n) for n in (names or list(PEERS))}


if __name__ == "__main__":  # python -m benchmarks.venvs  (pre-warm the cache)
    for env in ensure_all(sys.argv[1:] or None).values():
        print(env.name, "ok" if env.ok else "SKIP", f"{env.setup_s:.0f}s", env.note)
