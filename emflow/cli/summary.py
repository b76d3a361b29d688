"""The closing lines of a run: what was written, where, and how to look at it.

One neuroglancer URL scheme per format, used everywhere (these lines, ``emflow
serve``, the README): ``precomputed://`` for neuroglancer precomputed,
``zarr3://`` for OME-Zarr 0.5 (Zarr v3) and ``zarr://`` for OME-Zarr 0.4 (Zarr v2,
understood by every neuroglancer version). On a remote host (an SSH session or
a batch job) the lines add the ssh port-forward that brings the viewer's port to
the user's own computer.
"""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path
from typing import Any

from emflow.recipe import OmeZarrOutput, PrecomputedOutput, Recipe

DEFAULT_PORT = 8000


def neuroglancer_scheme(path: Path) -> str | None:
    """The neuroglancer data-source scheme for an output folder, or None if it is not a volume."""
    path = Path(path)
    if (path / "info").is_file():
        return "precomputed"
    if (path / "zarr.json").is_file():
        return "zarr3"
    if (path / ".zattrs").is_file() or (path / ".zgroup").is_file():
        return "zarr"
    return None


def neuroglancer_source(base_url: str, path: Path) -> str | None:
    """``<scheme>://<base_url>/<name>`` for an output folder served at ``base_url``."""
    scheme = neuroglancer_scheme(path)
    return None if scheme is None else f"{scheme}://{base_url}/{Path(path).name}"


def remote_host() -> str | None:
    """This host's name when the user is probably elsewhere (SSH session or batch job), else None."""
    remote_env = (
        "SSH_CONNECTION",
        "SSH_CLIENT",
        "SSH_TTY",
        "SLURM_JOB_ID",
        "LSB_JOBID",
        "PBS_JOBID",
    )
    if any(os.environ.get(k) for k in remote_env):
        return socket.getfqdn()
    return None


def port_forward_hint(port: int = DEFAULT_PORT) -> str | None:
    """The ssh command that brings ``port`` of this (remote) host to the user's computer."""
    host = remote_host()
    if host is None:
        return None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "you"
    via = ""
    if any(os.environ.get(k) for k in ("SLURM_JOB_ID", "LSB_JOBID", "PBS_JOBID")):
        via = f" (from a batch node: ssh -N -L {port}:{host}:{port} {user}@<login node>)"
    return (
        f"this host ({host}) is remote: on your own computer run "
        f"'ssh -N -L {port}:localhost:{port} {user}@{host}'{via}, then open the link there"
    )


def _describe(o: Any) -> str:
    if isinstance(o, PrecomputedOutput):
        enc = f"JPEG q{o.jpeg_quality}" if o.encoding == "jpeg" else "raw"
        return f"neuroglancer precomputed ({enc}{', sharded' if o.sharded else ''})"
    if isinstance(o, OmeZarrOutput):
        return f"OME-Zarr {o.version} ({'Zarr v3, sharded' if o.version == '0.5' else 'Zarr v2'})"
    return str(getattr(o, "format", "volume"))


def closing_lines(recipe: Recipe, result: Any, port: int = DEFAULT_PORT) -> list[str]:
    """What a complete run wrote, where, and how to look at it (QC images, serve, links)."""
    remote = getattr(recipe, "output_remote", False)
    root = recipe.output_root if remote else Path(recipe.output_path).resolve()
    plan = result.plan
    z, y, x = plan.levels[0].shape_zyx
    vz, vy, vx = plan.levels[0].voxel_size_nm_zyx
    width = max(len(o.name) for o in recipe.outputs)
    lines = [f"wrote {len(recipe.outputs)} volume(s) to {root}:"]
    for o in recipe.outputs:
        lines.append(
            f"  {o.name:<{width}}  {_describe(o)}: {len(plan.levels)} level(s), level 0 "
            f"{x} × {y} × {z} px of {vx:g} × {vy:g} × {vz:g} nm, {plan.out_dtype}"
        )
    qc = Path(result.run_dir).resolve() / "qc"
    if (qc / "reslices.png").is_file():
        lines.append(
            f"check the alignment: {qc / 'reslices.png'} (XZ/YZ reslices before and after), "
            f"{qc / 'pairs.png'} (per-pair residuals)"
        )
    if remote:  # emflow.open reads it from the bucket; neuroglancer needs it served with CORS
        lines.append(f"open it: emflow.open('{root}/{recipe.outputs[0].name}')")
        lines.append(f"run folder: {Path(result.run_dir).resolve()} (a copy of {root}/emflow-run)")
        return lines
    base = f"http://localhost:{port}"
    lines.append(f"view it: emflow serve {root}   (serves it and prints a neuroglancer link)")
    for o in recipe.outputs:
        src = neuroglancer_source(base, root / o.name)
        if src:
            lines.append(f"  neuroglancer layer: {src}")
    zarrs = [o.name for o in recipe.outputs if isinstance(o, OmeZarrOutput)]
    if zarrs:
        lines.append(f"  napari: napari --plugin napari-ome-zarr {root / zarrs[0]}")
    hint = port_forward_hint(port)
    if hint:
        lines.append(f"  {hint}")
    lines.append(f"run folder: {Path(result.run_dir).resolve()} (run.log, run.json, journal)")
    return lines
