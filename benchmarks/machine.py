"""Machine description and load average, recorded next to every figure."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time

import psutil

_LIBS = (
    "emflow",
    "numpy",
    "opencv-python-headless",
    "tensorstore",
    "zarr",
    "numcodecs",
    "simplejpeg",
    "scikit-image",
    "dask",
    "distributed",
    "psutil",
    "cloud-volume",
)


def load1() -> float:
    """The 1-minute load average (other engineers share this machine)."""
    return round(os.getloadavg()[0], 2)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_versions(names: tuple[str, ...] = _LIBS) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe() -> dict:
    """CPU model, cores, RAM, load average, Python and library versions, UTC time."""
    return {
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu_model": cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
    }
