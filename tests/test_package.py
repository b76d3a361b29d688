"""Package hygiene: the public surface imports, algorithms stay free of Dask, synthetic data is seeded."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

import emflow
from emflow.testing import synthetic_stack

PKG = Path(emflow.__file__).parent
# volume.py: emflow.open hands back outputs as dask-backed arrays (reading, not pipeline work)
DASK_ALLOWED = {"pipeline.py", "execute.py", "dashboard.py", "dask_preload.py", "volume.py"}
DASK_PACKAGES = {
    "cluster",
    "lattice",
    "cli",
}  # orchestration packages: emflow/cluster/, emflow/lattice/


def test_all_names_import():
    for name in emflow.__all__:
        assert getattr(emflow, name) is not None, name


def test_only_orchestration_modules_import_dask():
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name in DASK_ALLOWED or DASK_PACKAGES & set(path.relative_to(PKG).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("dask", "distributed", "dask_jobqueue") for n in names):
                offenders.append(str(path.relative_to(PKG)))
    assert not offenders, offenders


def test_synthetic_stack_is_seeded_and_em_like():
    a = synthetic_stack((3, 128, 160), seed=11)
    b = synthetic_stack((3, 128, 160), seed=11)
    c = synthetic_stack((3, 128, 160), seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == (3, 128, 160)
    # bright cytoplasm, dark membranes, realistic noise, no exact zeros (zero means fill)
    assert 130 < a.mean() < 180 and a.min() > 0 and np.percentile(a, 2) < 110
    # consecutive sections correlate more than distant ones
    s = synthetic_stack((12, 128, 128), seed=3).astype(float)
    near = np.corrcoef(s[0].ravel(), s[1].ravel())[0, 1]
    far = np.corrcoef(s[0].ravel(), s[11].ravel())[0, 1]
    assert near > far + 0.1
