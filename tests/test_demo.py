"""README command 1: `emflow demo` makes a misaligned stack, aligns it and writes both formats."""

from __future__ import annotations

import numpy as np
import pytest

from tests import clirun
from tests.readers import precomputed_tensorstore, validate_ome_zarr, zarr_python

pytestmark = pytest.mark.integration


def test_demo_end_to_end(tmp_path):
    proc = clirun.emflow(
        "demo",
        str(tmp_path / "d"),
        "--slices",
        "12",
        "--size",
        "384",
        "--workers",
        "0",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "d" / "output"
    assert "emflow serve" in proc.stdout
    validate_ome_zarr(out / "em.ome.zarr")
    level0 = zarr_python(out / "em.ome.zarr", 0)
    np.testing.assert_array_equal(precomputed_tensorstore(out / "em_jpeg", 0).shape, level0.shape)
    assert level0.shape[0] == 12 and level0.shape[1] >= 384  # aligned frame covers every slice
    assert (out / "emflow-run" / "alignment.json").is_file() and (
        out / "emflow-run" / "qc" / "reslices.png"
    ).is_file()
