"""Writers carry plain settings, not the recipe's pydantic outputs.

A writer is pickled into every slab unit; a worker that unpickles one must not need pydantic
or :mod:`emflow.recipe` (~0.1 CPU-s of imports per worker process). The settings a writer keeps
give the same storage layout and metadata as the recipe output they come from.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from emflow.io.omezarr import OmeZarrSettings, OmeZarrWriter
from emflow.io.precomputed import PrecomputedSettings, PrecomputedWriter
from emflow.plan import make_writers, plan_output
from emflow.recipe import recipe_from_dict

OUTPUTS = [
    {"format": "precomputed", "jpeg_quality": 83, "chunk_size_xyz": [32, 64, 16]},
    {"format": "precomputed", "name": "raw", "encoding": "raw", "sharded": False},
    {"format": "omezarr", "name": "z5", "codec": "blosc-zstd", "codec_level": 5},
    {"format": "omezarr", "name": "z5s", "shard_size_xyz": [128, 128, 64]},
    {"format": "omezarr", "name": "z4", "version": "0.4", "codec": "none"},
]


def _writers():
    r = recipe_from_dict(
        {
            "source": {"glob": "x/*.png"},
            "voxel_size_nm": [4, 4, 40],
            "output_dir": "o",
            "outputs": OUTPUTS,
        }
    )
    plan = plan_output(r, 100, (1000, 1300), "uint8")
    return r, plan, make_writers(r, plan, Path("/nonexistent"), token="t")


def _metadata(w) -> list:
    """Every level's storage extent and the metadata the writer would create."""
    n = len(w.levels)
    if isinstance(w, PrecomputedWriter):
        return [(w.storage_zyx(k), w._scale_metadata(k)) for k in range(n)]
    return [(w.storage_zyx(k), w._array_spec(k, create=True)) for k in range(n)]


def test_writers_hold_plain_settings_equal_to_the_recipe_outputs():
    r, plan, writers = _writers()
    assert len(writers) == len(OUTPUTS)
    for o, w in zip(r.outputs, writers, strict=True):
        cls = PrecomputedSettings if isinstance(w, PrecomputedWriter) else OmeZarrSettings
        assert type(w.config) is cls
        for name in cls.__dataclass_fields__:
            value = getattr(o, name)
            assert getattr(w.config, name) == (tuple(value) if isinstance(value, list) else value)
        # a writer made from the settings writes the same layout and metadata
        again = type(w)(w.name, w.path, w.config, plan.levels, plan.out_dtype, plan.cells, "t")
        assert json.dumps(_metadata(again)) == json.dumps(_metadata(w))
    z4 = writers[-1]
    assert isinstance(z4, OmeZarrWriter) and z4.config.shard_size_xyz is None
    assert writers[3].storage_zyx(0) == (64, 128, 128)
    assert writers[0]._scale_metadata(0)["jpeg_quality"] == 83


@pytest.mark.integration
def test_a_worker_unpickles_writers_without_pydantic(tmp_path):
    _, _, writers = _writers()
    blob = tmp_path / "writers.pickle"
    blob.write_bytes(pickle.dumps(writers))
    code = (
        "import json, pickle, sys\n"
        f"ws = pickle.loads(open({str(blob)!r}, 'rb').read())\n"
        "print(json.dumps({'n': len(ws), 'loaded': sorted(m for m in ('pydantic', "
        "'emflow.recipe') if m in sys.modules), 'quality': ws[0].config.jpeg_quality}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"n": len(OUTPUTS), "loaded": [], "quality": 83}
