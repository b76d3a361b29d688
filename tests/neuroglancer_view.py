"""The real neuroglancer client in headless Chromium, for tests that open emflow's outputs.

Needs Debian's chromium + chromium-driver (installed by .ci/run) and the `neuroglancer` and
`selenium` packages (the test extra); :func:`require` skips the calling module without them.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

#: software GL (swiftshader) and no network chatter: the same picture on any headless machine
CHROME_ARGS = [
    "--no-sandbox",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def require() -> None:
    """Skip the calling test module unless neuroglancer, selenium and Chromium are installed."""
    pytest.importorskip("neuroglancer", reason="pip install neuroglancer (test extra)")
    pytest.importorskip("selenium", reason="pip install selenium (test extra)")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (.ci/run installs them)",
            allow_module_level=True,
        )


def view(source: str, timeout_s: float = 90) -> tuple[dict, bytes]:
    """Open ``source`` (e.g. ``precomputed://http://…``) as an image layer in headless Chromium.

    Returns neuroglancer's dimensions (``{axis: [scale, unit]}``, empty if it could not read
    the metadata within ``timeout_s``) and a 640 × 480 PNG screenshot of the xy panel.
    """
    import neuroglancer
    from neuroglancer import webdriver

    neuroglancer.set_server_bind_address("127.0.0.1")
    viewer = neuroglancer.Viewer()
    with viewer.txn() as s:
        s.layers["em"] = neuroglancer.ImageLayer(source=source)
        s.layout = "xy"
    with webdriver.Webdriver(
        viewer, headless=True, browser="chrome", extra_command_line_args=CHROME_ARGS
    ):
        deadline = time.monotonic() + timeout_s
        while not viewer.state.dimensions.names and time.monotonic() < deadline:
            time.sleep(0.25)
        dims = viewer.state.dimensions.to_json()
        shot = viewer.screenshot(size=[640, 480]).screenshot
    return dict(dims), shot.image


def assert_voxel_size(dims: dict, order: tuple[str, ...], nm: dict[str, float]) -> None:
    """neuroglancer read the axes in ``order`` and the voxel size (nm) in metres."""
    assert tuple(dims) == order, f"neuroglancer did not read the metadata (axes {tuple(dims)})"
    for axis, (scale, unit) in dims.items():
        assert unit == "m" and scale == pytest.approx(nm[axis] * 1e-9)


def assert_drew_em(png: bytes) -> None:
    """The screenshot's centre shows image data: dark membranes and bright cytoplasm."""
    import cv2

    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    centre = img[120:360, 160:480]
    assert centre.std() > 15, "neuroglancer drew no image data"
    assert (centre < 90).mean() > 0.01, "no dark membranes in neuroglancer's picture"
    assert (centre > 140).mean() > 0.2, "no bright cytoplasm in neuroglancer's picture"
