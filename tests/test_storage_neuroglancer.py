"""neuroglancer (headless Chromium) opens a precomputed volume emflow wrote into an S3 bucket.

emflow runs with ``output_dir: s3://BUCKET/out`` against moto's S3 server; the bucket gets a
public-read policy (as a lab publishing a volume would) and neuroglancer reads the sharded
JPEG volume over HTTP, path-style (``precomputed://http://HOST:PORT/BUCKET/out/em``), with the
server's CORS headers -- no emflow process serves anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emflow import recipe_from_dict, run
from emflow.io import storage
from emflow.testing import synthetic_slices, write_stack
from tests import neuroglancer_view
from tests.storage_servers import S3Server, s3_env

pytestmark = pytest.mark.integration
neuroglancer_view.require()


@pytest.fixture
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


def test_neuroglancer_opens_a_volume_published_from_the_bucket(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in {**s3_env(), "AWS_ENDPOINT_URL": s3.endpoint, "SE_OFFLINE": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("EMFLOW_RUN_CACHE", str(tmp_path / "runs"))
    storage.configure(storage.resolve(retries=2))
    try:
        bucket = s3.bucket()
        write_stack(synthetic_slices((16, 240, 320), seed=9), tmp_path / "src")
        result = run(
            recipe_from_dict(
                {
                    "source": {"glob": str(tmp_path / "src" / "*.png")},
                    "voxel_size_nm": [4, 4, 40],
                    "align": False,
                    "output_dir": f"s3://{bucket}/out",
                    "outputs": [{"format": "precomputed", "name": "em", "encoding": "jpeg"}],
                }
            ),
            progress=False,
        )
    finally:
        storage._CURRENT = None
    assert result.output_paths["em"] == f"s3://{bucket}/out/em"
    s3.make_public(bucket)
    source = f"precomputed://{s3.endpoint}/{bucket}/out/em"
    dims, png = neuroglancer_view.view(source, timeout_s=90)
    (tmp_path / "ng_s3.png").write_bytes(png)
    neuroglancer_view.assert_voxel_size(dims, ("x", "y", "z"), {"x": 4, "y": 4, "z": 40})
    neuroglancer_view.assert_drew_em(png)
