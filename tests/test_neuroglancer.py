"""The real neuroglancer client (headless Chromium) opens emflow's outputs served by `emflow serve`.

Needs Debian's chromium + chromium-driver (installed by .ci/run) and the `neuroglancer` and
`selenium` packages (the test extra). The screenshot is kept in the test's tmp folder.
"""

from __future__ import annotations

import threading

import pytest

from emflow import recipe_from_dict, run
from emflow.cli.serve import make_server
from emflow.testing import synthetic_slices, write_stack
from tests import neuroglancer_view

pytestmark = pytest.mark.integration
neuroglancer_view.require()


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
    "name,scheme,axes",
    [
        ("em_jpeg", "precomputed", ("x", "y", "z")),
        ("em.ome.zarr", "zarr3", ("z", "y", "x")),
        ("em4.ome.zarr", "zarr", ("z", "y", "x")),
    ],
)
def test_neuroglancer_opens_the_volume(served, name, scheme, axes):
    """The source emflow prints for each output (one scheme per format) opens in neuroglancer."""
    from emflow.cli.summary import neuroglancer_source

    base, root = served
    source = neuroglancer_source(base, root / "out" / name)
    assert source == f"{scheme}://{base}/{name}"
    dims, png = neuroglancer_view.view(source, timeout_s=60)
    (root / f"ng_{scheme}.png").write_bytes(png)
    neuroglancer_view.assert_voxel_size(dims, axes, {"x": 4, "y": 4, "z": 40})
    neuroglancer_view.assert_drew_em(png)
