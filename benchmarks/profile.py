"""Sampling profile of one emflow run with py-spy (installed into benchmarks/.venvs/tools).

``py-spy record --subprocesses --format raw`` samples the driver and every Dask worker
(GIL-holding and GIL-released threads alike; idle threads are not sampled). Each stack is
attributed to the first pipeline stage found walking from the leaf to the root, so the
table says which stage costs what share of the sampled CPU.

Blind spot: tensorstore encodes and writes in its own native threads, which py-spy does not
see, and the Python thread waiting on ``.result()`` is idle (not sampled); so the write
stages are under-counted here. emflow's own per-unit phase timings (render / downsample /
write, from the run folder's done markers; see e2e.py) cover that.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks.proc import run_measured

VENV = Path(__file__).resolve().parent / ".venvs" / "tools"

#: (stage, substrings of a frame) checked leaf -> root; first match wins
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("decode (PNG)", ("imread", "imdecode", "io/readers.py")),
    ("CLAHE", ("enhance.py", "clahe", "_adapthist")),
    ("warp", ("align/warp.py", "warpAffine")),
    ("features (SIFT)", ("align/features.py", "detectAndCompute")),
    ("match (RANSAC)", ("align/match.py",)),
    ("downsample", ("pyramid.py",)),
    ("write precomputed (JPEG encode + I/O)", ("io/precomputed.py",)),
    ("write OME-Zarr (zstd + I/O)", ("io/omezarr.py",)),
    ("hand-off copy", ("io/handoff.py",)),
    ("tensorstore other", ("tensorstore",)),
    ("render: copy into the slab", ("render_slab", "_render_slice")),
    ("coarse pass (Python side)", ("build_coarse_block",)),
    ("bookkeeping (lattice/journal)", ("emflow/lattice/", "execute.py")),
    (
        "dask/distributed (event loop, system monitor)",
        ("distributed/", "tornado/", "asyncio/", "msgpack", "pickle", "psutil/"),
    ),
    ("imports/startup", ("<frozen importlib", "importlib/")),
]


def ensure_pyspy() -> Path | None:
    exe = VENV / "bin" / "py-spy"
    if exe.exists():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "py-spy"],
            check=True,
            timeout=600,
            capture_output=True,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return exe if exe.exists() else None


#: leaf functions of threads that wait (py-spy's idle detection misses some of them)
WAIT_FUNCS = (
    "_recv",
    "recv",
    "recv_bytes",
    "wait",
    "poll",
    "select",
    "sleep",
    "acquire",
    "get",
    "accept",
    "join",
    "_wait_for_tstate_lock",
    "_worker",
    "run_forever",
)


def classify(raw_file: Path) -> dict[str, float]:
    """Share of samples per stage from py-spy's raw (collapsed) output.

    Stacks whose leaf is a waiting call are counted as ``waiting`` and kept out of the
    shares of the working stages (``waiting`` is reported as a share of all samples).
    """
    counts: Counter[str] = Counter()
    total = 0
    waiting = 0
    for line in raw_file.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        k = int(n)
        total += k
        frames = stack.split(";")
        leaf = frames[-1].split(" (")[0].strip().rsplit(".", 1)[-1]
        if leaf in WAIT_FUNCS:
            waiting += k
            continue
        stage = "other"
        for frame in reversed(frames):
            hit = next((s for s, keys in STAGES if any(key in frame for key in keys)), None)
            if hit:
                stage = hit
                break
        counts[stage] += k
    working = total - waiting
    if not working:
        return {}
    out = {s: c / working for s, c in counts.most_common()}
    out["(waiting, share of all samples)"] = waiting / total
    return out


def profile(cmd: list[str], out_file: Path, cwd: Path, env: dict[str, str], rate: int = 50) -> dict:
    exe = ensure_pyspy()
    if exe is None:
        return {"error": "py-spy did not install"}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    m = run_measured(
        [
            str(exe),
            "record",
            "--subprocesses",
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--output",
            str(out_file),
            "--",
            *cmd,
        ],
        cwd=cwd,
        env=env,
    )
    if not out_file.exists():
        return {"error": f"py-spy failed: {m.stderr_tail[-500:]}"}
    return {
        "stage_share": classify(out_file),
        "wall_s": m.wall_s,
        "rate_hz": rate,
        "raw": str(out_file),
    }
