"""Every bad input gives one clear line naming the file or field, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from emflow.testing import synthetic_slices, write_stack
from tests import clirun


def emflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return clirun.emflow(*args, cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("emflow: error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


RECIPE = """\
source:
  {source}
voxel_size_nm: [4, 4, 40]
align: false
output_dir: out
outputs:
  - format: precomputed
    encoding: raw
{extra}"""


def make(
    tmp_path: Path, source: str = "glob: src/*.png", extra: str = "", n: int = 6, shape=(64, 80)
) -> Path:
    if not (tmp_path / "src").exists():
        write_stack(synthetic_slices((n, *shape), seed=1), tmp_path / "src", pattern="s%03d.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(source=source, extra=extra))
    return recipe


def test_missing_slice(tmp_path):
    make(tmp_path)
    (tmp_path / "src" / "s003.png").unlink()
    proc = emflow("run", "recipe.yaml", "--serial", cwd=tmp_path)
    assert_one_line_error(proc, "missing", "3", "source.missing")
    # fill_previous makes the same stack runnable
    make(tmp_path, source="glob: src/*.png\n  missing: fill_previous")
    assert emflow("run", "recipe.yaml", "--serial", "-q", cwd=tmp_path).returncode == 0


def test_truncated_image_fails_on_the_cluster_and_leaves_nothing_looking_complete(tmp_path):
    make(tmp_path)
    bad = tmp_path / "src" / "s002.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    proc = emflow("run", "recipe.yaml", "--workers", "1", "--dashboard", ":0", cwd=tmp_path)
    assert_one_line_error(proc, "s002.png", "truncated")
    assert not (tmp_path / "out" / "precomputed").exists()
    assert not (tmp_path / "out" / "emflow-run" / "COMPLETE").exists()


def test_corrupt_image(tmp_path):
    make(tmp_path)
    bad = tmp_path / "src" / "s001.png"
    data = bytearray(bad.read_bytes())
    data[60:400] = bytes(340)  # destroy compressed data after the header
    bad.write_bytes(bytes(data))
    assert_one_line_error(emflow("run", "recipe.yaml", "--serial", cwd=tmp_path), "s001.png")


def test_mixed_shapes_name_the_first_offending_file(tmp_path):
    make(tmp_path)
    write_stack([np.full((50, 50), 9, np.uint8)], tmp_path / "src", pattern="s%03d.png", z_start=4)
    assert_one_line_error(
        emflow("validate", "recipe.yaml", cwd=tmp_path), "s004.png", "50 × 50", "64"
    )


@pytest.mark.parametrize(
    "extra,needles",
    [
        ("pyramid:\n  levles: 3\n", ("pyramid.levles", "unknown key")),
        ("pyramid:\n  levels: three\n", ("pyramid.levels", "integer")),
        ("run:\n  slab_depth: 30\n", ("run.slab_depth", "multiple")),
    ],
)
def test_bad_recipe_fields(tmp_path, extra, needles):
    make(tmp_path, extra=extra)
    assert_one_line_error(emflow("run", "recipe.yaml", "--serial", cwd=tmp_path), *needles)


def test_bad_yaml_and_missing_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("source: [unclosed\n")
    assert_one_line_error(emflow("validate", "r.yaml", cwd=tmp_path), "r.yaml", "YAML")
    assert_one_line_error(
        emflow("run", "nothing.yaml", cwd=tmp_path), "nothing.yaml", "does not exist"
    )


def test_nonexistent_source_path_and_empty_match(tmp_path):
    make(tmp_path, source="directory: no/such/dir")
    assert_one_line_error(
        emflow("validate", "recipe.yaml", cwd=tmp_path), "no/such/dir", "does not exist"
    )
    make(tmp_path, source="glob: src/*.tif")
    assert_one_line_error(
        emflow("validate", "recipe.yaml", cwd=tmp_path), "src/*.tif", "no image files"
    )


def test_unwritable_output(tmp_path):
    make(tmp_path)
    (tmp_path / "blocker").write_text("a file where a directory should be")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("output_dir: out", "output_dir: blocker/out"))
    assert_one_line_error(
        emflow("run", "recipe.yaml", "--serial", cwd=tmp_path), "blocker/out", "not writable"
    )


def test_validate_prints_resolved_recipe_and_stack(tmp_path):
    make(tmp_path)
    proc = emflow("validate", "recipe.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "jpeg_quality: 90" in proc.stdout and "slices: 6 (x 80 × y 64 px, uint8)" in proc.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (("run", "recipe.yaml", "--bogus"), "No such option: --bogus"),
        (("run", "recipe.yaml", "--workers", "0"), "'--workers'"),
        (("run",), "Missing argument"),
    ],
)
def test_usage_errors_print_usage_not_a_traceback(tmp_path, args, needle):
    make(tmp_path)
    proc = emflow(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr


def test_bad_alignment_file_leaves_the_run_folder_alone(tmp_path):
    make(tmp_path)
    assert emflow("run", "recipe.yaml", "--serial", "-q", cwd=tmp_path).returncode == 0
    markers = sorted((tmp_path / "out" / "emflow-run" / "done").rglob("*.json"))
    proc = emflow(
        "run", "recipe.yaml", "--serial", "--restart", "--alignment", "nope.json", cwd=tmp_path
    )
    assert_one_line_error(proc, "nope.json", "cannot read alignment file")
    assert markers and sorted((tmp_path / "out" / "emflow-run" / "done").rglob("*.json")) == markers
