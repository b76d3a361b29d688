"""The real neuroglancer client (headless Chromium) opens emflow's outputs served by `emflow serve`.

Needs Debian's chromium + chromium-driver (installed by .ci/run) and the `neuroglancer` and
`selenium` packages (the test extra). The screenshot is kept in the test's tmp folder.
"""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from emflow import recipe_from_dict, run
from emflow.cli.serve import make_server
from emflow.testing import synthetic_slices, write_stack

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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ng")
    write_stack(synthetic_slices((40, 300, 420), seed=9), root / "src")
    result = run(
        recipe_from_dict(
            {
                "source": {"glob": str(root / "src" / "*.png")},
                "voxel_size_nm": [4, 4, 40],
                "align": False,
                "output_dir": str(root / "out"),
                "outputs": [
                    {
                        "format": "precomputed",
                        "name": "em_jpeg",
                        "encoding": "jpeg",
                        "sharded": True,
                    },
                    {"format": "omezarr", "name": "em.ome.zarr", "version": "0.5"},
                    {"format": "omezarr", "name": "em4.ome.zarr", "version": "0.4"},
                ],
            }
        )
    )
    server = make_server(result.output_paths["em_jpeg"].parent, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


@pytest.mark.parametrize(
    "name,scheme,dims",
    [
        ("em_jpeg", "precomputed", ("x", "y", "z")),
        ("em.ome.zarr", "zarr3", ("z", "y", "x")),
        ("em4.ome.zarr", "zarr", ("z", "y", "x")),
    ],
)
def test_neuroglancer_opens_the_volume(served, name, scheme, dims):
    """The source emflow prints for each output (one scheme per format) opens in neuroglancer."""
    from emflow.cli.summary import neuroglancer_source

    base, root = served
    source = neuroglancer_source(base, root / "out" / name)
    assert source == f"{scheme}://{base}/{name}"
    neuroglancer.set_server_bind_address("127.0.0.1")
    viewer = neuroglancer.Viewer()
    with viewer.txn() as s:
        s.layers["em"] = neuroglancer.ImageLayer(source=source)
        s.layout = "xy"
    with webdriver.Webdriver(
        viewer, headless=True, browser="chrome", extra_command_line_args=CHROME_ARGS
    ):
        deadline = time.monotonic() + 60
        while not viewer.state.dimensions.names and time.monotonic() < deadline:
            time.sleep(0.25)
        state = viewer.state.dimensions.to_json()
        shot = viewer.screenshot(size=[640, 480]).screenshot
    # neuroglancer read the metadata: axes, units and voxel size in metres
    assert tuple(state) == dims
    expected_nm = {"x": 4, "y": 4, "z": 40}
    for axis, (scale, unit) in state.items():
        assert unit == "m" and scale == pytest.approx(expected_nm[axis] * 1e-9)
    # it drew image data (membranes and cytoplasm), not an empty panel
    name = f"ng_{scheme}.png"
    (root / name).write_bytes(shot.image)
    import cv2

    img = cv2.imdecode(np.frombuffer(shot.image, np.uint8), cv2.IMREAD_GRAYSCALE)
    centre = img[120:360, 160:480]
    assert centre.std() > 15, "neuroglancer drew no image data"
    assert (centre < 90).mean() > 0.01 and (
        centre > 140
    ).mean() > 0.2  # dark membranes, bright cells
