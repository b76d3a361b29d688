"""neuroglancer (headless Chromium) opens a precomputed volume emflow wrote into an S3 bucket.

emflow runs with ``output_dir: s3://BUCKET/out`` against moto's S3 server; the bucket gets a
public-read policy (as a lab publishing a volume would) and neuroglancer reads the sharded
JPEG volume over HTTP, path-style (``precomputed://http://HOST:PORT/BUCKET/out/em``), with the
server's CORS headers -- no emflow process serves anything.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from emflow import recipe_from_dict, run
from emflow.io import storage
from emflow.testing import synthetic_slices, write_stack
from tests.storage_servers import S3Server, s3_env

pytestmark = pytest.mark.integration
neuroglancer = pytest.importorskip("neuroglancer", reason="pip install neuroglancer (test extra)")
pytest.importorskip("selenium", reason="pip install selenium (test extra)")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (.ci/run installs them)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("neuroglancer.webdriver")

CHROME_ARGS = [
    "--no-sandbox",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture
def s3() -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()


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
    neuroglancer.set_server_bind_address("127.0.0.1")
    viewer = neuroglancer.Viewer()
    with viewer.txn() as s:
        s.layers["em"] = neuroglancer.ImageLayer(source=source)
        s.layout = "xy"
    with webdriver.Webdriver(
        viewer, headless=True, browser="chrome", extra_command_line_args=CHROME_ARGS
    ):
        deadline = time.monotonic() + 90
        while not viewer.state.dimensions.names and time.monotonic() < deadline:
            time.sleep(0.25)
        state = viewer.state.dimensions.to_json()
        shot = viewer.screenshot(size=[640, 480]).screenshot
    (tmp_path / "ng_s3.png").write_bytes(shot.image)
    assert tuple(state) == ("x", "y", "z"), "neuroglancer could not read the bucket's info"
    for axis, (scale, unit) in state.items():
        assert unit == "m" and scale == pytest.approx({"x": 4, "y": 4, "z": 40}[axis] * 1e-9)
    import cv2

    img = cv2.imdecode(np.frombuffer(shot.image, np.uint8), cv2.IMREAD_GRAYSCALE)
    centre = img[120:360, 160:480]
    assert centre.std() > 15, "neuroglancer drew no image data"
    assert (centre < 90).mean() > 0.01 and (centre > 140).mean() > 0.2
