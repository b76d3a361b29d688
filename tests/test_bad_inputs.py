"""The bad-input corpus: ordinary mistakes, run through the real CLI in subprocesses.

Every case asserts the exit code (0 done, 2 bad input or refused, 3 incomplete but
resumable, 130 interrupted), that the one error line names the file, field or path,
that no traceback reaches the terminal, that the sources' checksums are unchanged,
and that nothing left behind looks complete (a refusal writes nothing at all).
Stacks are tiny and synthetic; the few cases that need root (tmpfs mounts) skip
without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from emflow.testing import synthetic_slices, write_stack
from tests import clirun
from tests.clirun import finish, kill_group
from tests.clirun import start_emflow as start_cli
from tests.conftest import tree_digest
from tests.readers import precomputed_tensorstore, zarr_python

pytestmark = pytest.mark.integration

N, SIZE = 4, 64  # the default stack: 4 slices of 64 × 64 px


# ---------------------------------------------------------------------------------------
# the project a user would have: slices, a recipe, an output folder
# ---------------------------------------------------------------------------------------
class Project:
    """A folder with source slices (``src``) and a recipe; runs ``emflow`` in a subprocess."""

    def __init__(self, root: Path, n: int = N, size: int = SIZE, src: str = "src") -> None:
        self.root = root
        self.src = root / src
        if n:
            write_stack(synthetic_slices((n, size, size), seed=1), self.src, pattern="s%03d.png")
        self.recipe()

    def recipe(
        self,
        extra: str = "",
        *,
        source: str | None = None,
        output_dir: str = "out",
        outputs: str = "  - {format: precomputed, name: em, encoding: raw}\n"
        "  - {format: omezarr, name: em.ome.zarr}\n",
        align: str = "align: false\n",
    ) -> Path:
        source = source or f"glob: '{self.src.name}/*.png'"
        text = (
            f"source: {{{source}}}\nvoxel_size_nm: [4, 4, 40]\noutput_dir: '{output_dir}'\n"
            f"outputs:\n{outputs}{align}enhance: {{clip_limit: 0}}\n{extra}"
        )
        path = self.root / "recipe.yaml"
        path.write_text(text)
        return path

    @property
    def out(self) -> Path:
        return self.root / "out"

    def start(self, *args: str) -> subprocess.Popen:
        return start_cli(args, self.root)

    def emflow(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.emflow_many(args, timeout=timeout)[0]

    def emflow_many(self, *commands: tuple[str, ...], timeout: float = 300):
        """Run several emflow commands at once (each must leave the others' files alone)."""
        procs: list[subprocess.Popen] = []
        try:
            for args in commands:
                procs.append(self.start(*args))
            return [finish(proc, timeout) for proc in procs]
        finally:
            for proc in procs:
                kill_group(proc)

    def sources(self) -> dict[str, str]:
        return tree_digest(self.src) if self.src.exists() else {}


def cli(
    args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return clirun.emflow(*args, cwd=cwd, timeout=timeout, env=env)


def files(root: Path) -> dict[str, str]:
    """Every file under root with its checksum (what 'nothing was written' compares)."""
    return tree_digest(root)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    for stream in (proc.stdout, proc.stderr):
        assert "Traceback" not in stream and "Warning:" not in stream, stream[-3000:]


def error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The single 'emflow: error:' line, after checking the exit code and the terminal."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    no_traceback(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("emflow: error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def nothing_complete(out: Path) -> None:
    """No COMPLETE mark, and every output folder present is still '<name>.partial'."""
    run_dir = out / "emflow-run"
    assert not (run_dir / "COMPLETE").exists()
    for name in ("em", "em.ome.zarr"):
        assert not (out / name).exists(), f"{out / name} looks complete"


def refused(p: Project, *commands: tuple[str, ...], needles: tuple[str, ...], code: int = 2):
    """Each command is refused with one line naming ``needles``; none writes anything at all."""
    before, src = files(p.root), p.sources()
    for proc in p.emflow_many(*commands):
        error_line(proc, code, *needles)
    assert files(p.root) == before, "a refused command wrote or changed files"
    assert p.sources() == src


def both_refuse(p: Project, *needles: str) -> None:
    """validate and run refuse alike, naming the same things, and neither writes anything."""
    refused(p, ("validate", "recipe.yaml"), ("run", "recipe.yaml", "--serial"), needles=needles)


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path)


# ---------------------------------------------------------------------------------------
# damaged and odd source files (refused by validate and run before anything is written)
# ---------------------------------------------------------------------------------------
def _png(p: Project, z: int) -> Path:
    return p.src / f"s{z:03d}.png"


def _tif_stack(p: Project, **kw) -> list[Path]:
    shutil.rmtree(p.src)
    paths = write_stack(synthetic_slices((N, SIZE, SIZE), seed=1), p.src, pattern="s%03d.tif")
    p.recipe(source="glob: 'src/*.tif'")
    return paths


def _jpg_stack(p: Project) -> list[Path]:
    shutil.rmtree(p.src)
    paths = write_stack(synthetic_slices((N, SIZE, SIZE), seed=1), p.src, pattern="s%03d.jpg")
    p.recipe(source="glob: 'src/*.jpg'")
    return paths


def _empty(f: Path) -> None:
    f.write_bytes(b"")


def _cut_to(n: int | None):
    """Keep the first ``n`` bytes of a file (``None``: half of it)."""

    def cut(f: Path) -> None:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2 if n is None else n])

    return cut


def _replace_with(data: bytes):
    return lambda f: f.write_bytes(data)


#: (stack format, slice z, damage, what the message must say): one broken file of each kind
DAMAGED_SLICES = {
    "zero_byte_png": ("png", 2, _empty, "empty"),
    "truncated_png": ("png", 1, _cut_to(None), "truncated"),
    "text_file_named_png": (
        "png",
        3,
        _replace_with(b"these are my notes, not an image\n"),
        "not a PNG",
    ),
    "zero_byte_tiff": ("tif", 0, _empty, "empty"),
    "truncated_tiff": ("tif", 2, _cut_to(2000), "truncated"),
    "corrupt_tiff": (
        "tif",
        1,
        _replace_with(b"II*\x00" + bytes(range(256)) * 4),
        "not a readable TIFF",
    ),
    "zero_byte_jpeg": ("jpg", 1, _empty, "JPEG"),
    "truncated_jpeg": ("jpg", 2, _cut_to(600), "truncated"),
    "text_file_named_jpeg": ("jpg", 3, _replace_with(b"<html>not found</html>"), "JPEG"),
}


@pytest.mark.parametrize("case", list(DAMAGED_SLICES))
def test_damaged_slice(project, case):
    """validate and run refuse a stack with one damaged slice, naming the file and the damage."""
    kind, z, damage, needle = DAMAGED_SLICES[case]
    paths = {"png": lambda p: [_png(p, i) for i in range(N)], "tif": _tif_stack, "jpg": _jpg_stack}[
        kind
    ](project)
    damage(paths[z])
    both_refuse(project, f"s{z:03d}.{kind}", needle)


def test_mixed_shapes(project):
    write_stack([np.full((50, 50), 9, np.uint8)], project.src, pattern="s%03d.png", z_start=4)
    both_refuse(project, "s004.png", "50 × 50", "one size")


def test_mixed_dtypes(project):
    cv2.imwrite(str(_png(project, 4)), np.full((SIZE, SIZE), 900, np.uint16))
    both_refuse(project, "s004.png", "uint16", "bit depth")


def test_rgb_png(project):
    cv2.imwrite(str(_png(project, 0)), np.zeros((SIZE, SIZE, 3), np.uint8))
    both_refuse(project, "s000.png", "colour")


def test_rgb_tiff(project):
    paths = _tif_stack(project)
    tifffile.imwrite(paths[0], np.zeros((SIZE, SIZE, 3), np.uint8), photometric="rgb")
    both_refuse(project, "s000.tif", "greyscale")


def test_float_tiff(project):
    paths = _tif_stack(project)
    tifffile.imwrite(paths[3], np.zeros((SIZE, SIZE), np.float32))
    both_refuse(project, "s003.tif", "float32")


def _declare_size(path: Path, width: int, height: int) -> None:
    """Rewrite a little-endian TIFF's ImageWidth/ImageLength tags as LONG values."""
    data = bytearray(path.read_bytes())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        (tag,) = struct.unpack_from("<H", data, entry)
        if tag in (256, 257):
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    path.write_bytes(bytes(data))


def test_huge_declared_tiff_size_uncompressed(project):
    paths = _tif_stack(project)
    for f in paths:
        _declare_size(f, 200_000, 200_000)
    both_refuse(project, "s000.tif", "200000 × 200000", "damaged")


def test_huge_declared_tiff_size_compressed(project):
    shutil.rmtree(project.src)
    project.src.mkdir()
    for z in range(N):
        f = project.src / f"s{z:03d}.tif"
        tifffile.imwrite(f, np.zeros((SIZE, SIZE), np.uint8), compression="zlib")
        _declare_size(f, 300_000, 300_000)
    project.recipe(source="glob: 'src/*.tif'")
    both_refuse(project, "s000.tif", "300000 × 300000", "GiB")


def test_symlink_loop(project):
    os.symlink("s009.png", project.src / "s009.png")  # a link to itself
    both_refuse(project, "s009.png", "symbolic link")


def test_broken_symlink_in_a_pattern(project):
    os.symlink("/nonexistent/slice.png", project.src / "s004.png")
    project.recipe(source="pattern: 'src/s%03d.png', z_start: 0, z_stop: 5")
    both_refuse(project, "s004.png", "symbolic link")


def test_missing_slice_names_z_and_the_fix(project):
    _png(project, 2).unlink()
    both_refuse(project, "2", "source.missing")


def test_no_matching_files(project):
    project.recipe(source="glob: 'src/*.tiff'")
    both_refuse(project, "src/*.tiff", "no image files")


def test_source_folder_does_not_exist(project):
    project.recipe(source="directory: 'no/such/folder'")
    both_refuse(project, "no/such/folder", "does not exist")


def test_corrupt_pixel_data_is_found_by_validate_decode_and_by_run(project):
    """Damage inside the compressed data passes the header checks; --decode and run find it."""
    f = _png(project, 1)
    data = bytearray(f.read_bytes())
    data[60:400] = bytes(340)
    f.write_bytes(bytes(data))
    refused(project, ("validate", "recipe.yaml", "--decode"), needles=("s001.png", "corrupt"))
    src = project.sources()
    proc = project.emflow("run", "recipe.yaml", "--workers", "1", "--dashboard", ":0")
    error_line(proc, 2, "s001.png", "corrupt")
    assert project.sources() == src
    nothing_complete(project.out)
    # the worker's own report went to the run's logs, not to the terminal
    assert "s001.png" in (project.out / "emflow-run" / "run.log").read_text()


# ---------------------------------------------------------------------------------------
# stacks at the edges of the size range
# ---------------------------------------------------------------------------------------
def test_one_slice_stack_aligns_by_default(tmp_path):
    p = Project(tmp_path, n=1, size=256)
    p.recipe(align="")  # the default: alignment on
    proc = p.emflow("run", "recipe.yaml", "--serial")
    assert proc.returncode == 0, proc.stderr[-2000:]
    no_traceback(proc)
    vol = zarr_python(p.out / "em.ome.zarr", 0)
    assert vol.shape[0] == 1 and vol.shape[1:] >= (256, 256)


@pytest.mark.parametrize("shape", [(3, 1, 1), (2, 1, 7), (5, 16, 16)])
def test_one_pixel_and_tiny_stacks(tmp_path, shape):
    p = Project(tmp_path, n=0)
    write_stack(synthetic_slices(shape, seed=2), p.src, pattern="s%03d.png")
    # alignment (the default) cannot work on them: refused before anything is written
    p.recipe(align="")
    refused(
        p,
        ("run", "recipe.yaml", "--serial"),
        ("validate", "recipe.yaml"),
        needles=("align", "too small", "align: false"),
    )
    p.recipe()
    proc = p.emflow("run", "recipe.yaml", "--serial")
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = np.stack([cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in sorted(p.src.iterdir())])
    np.testing.assert_array_equal(zarr_python(p.out / "em.ome.zarr", 0), expected)
    np.testing.assert_array_equal(precomputed_tensorstore(p.out / "em", 0), expected)


def test_single_level_pyramid(project):
    project.recipe("pyramid: {levels: 1}\n")
    proc = project.emflow("run", "recipe.yaml", "--serial")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((project.out / "em" / "info").read_text())
    assert len(info["scales"]) == 1
    expected = np.stack([cv2.imread(str(_png(project, z)), 0) for z in range(N)])
    np.testing.assert_array_equal(precomputed_tensorstore(project.out / "em", 0), expected)


def test_too_many_levels(project):
    project.recipe("pyramid: {levels: 12}\n")
    both_refuse(project, "pyramid.levels", "at most")


def test_paths_with_spaces_and_unicode(tmp_path):
    p = Project(tmp_path, src="my slices ß∆")
    p.recipe(source="glob: 'my slices ß∆/*.png'", output_dir="out put ü")
    proc = p.emflow("run", "recipe.yaml", "--serial")
    assert proc.returncode == 0, proc.stderr[-2000:]
    no_traceback(proc)
    expected = np.stack([cv2.imread(str(f), 0) for f in sorted(p.src.glob("*.png"))])
    np.testing.assert_array_equal(zarr_python(tmp_path / "out put ü" / "em.ome.zarr", 0), expected)
    assert "out put ü" in proc.stdout


# ---------------------------------------------------------------------------------------
# outputs: only paths emflow made, never over sources, names are plain names
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,needle",
    [("../escaped", "path separator"), ("/tmp/abs", "path separator"), ("..", "not a folder name")],
)
def test_output_names_are_plain_names(project, name, needle):
    project.recipe(outputs=f"  - {{format: omezarr, name: '{name}'}}\n")
    both_refuse(project, "outputs.0.name", needle)


def test_foreign_folder_with_the_output_name_is_kept(project):
    (project.out / "em").mkdir(parents=True)
    (project.out / "em" / "notes.txt").write_text("a week of work")
    both_refuse(project, str(project.out / "em"), "not written by emflow", "outputs.0.name")


def test_output_named_like_the_source_folder(project):
    project.recipe(output_dir=".", outputs="  - {format: omezarr, name: src}\n")
    both_refuse(project, "src", "source folder", "never writes over its sources")


def test_output_named_like_a_source_file(project):
    project.recipe(output_dir="src", outputs="  - {format: omezarr, name: s001.png}\n")
    both_refuse(project, "s001.png", "source slice")


def test_foreign_run_folder(project):
    (project.out / "emflow-run").mkdir(parents=True)
    (project.out / "emflow-run" / "mine.txt").write_text("not emflow's")
    both_refuse(project, "emflow-run", "not a run folder emflow made")


def test_output_dir_is_a_file(project):
    (project.root / "out").write_text("a file")
    both_refuse(project, "out", "not writable", "not a directory")


def test_output_inside_the_input_folder_is_safe(project):
    """output_dir inside the source folder: outputs never join the stack; sources untouched."""
    project.recipe(source="directory: src", output_dir="src/aligned")
    src = project.sources()
    first = project.emflow("run", "recipe.yaml", "--serial")
    assert first.returncode == 0, first.stderr[-2000:]
    assert tree_digest(project.src / "aligned") and all(
        project.sources()[k] == v for k, v in src.items()
    )
    again = project.emflow("run", "recipe.yaml", "--serial")
    assert again.returncode == 0 and "slices: 4 " in again.stderr, again.stderr[-2000:]


def test_rerun_replaces_only_its_own_outputs(project):
    assert project.emflow("run", "recipe.yaml", "--serial", "-q").returncode == 0
    marker = json.loads((project.out / "em" / ".emflow-output.json").read_text())
    # an output copied in from another run is not this output_dir's: refused
    shutil.copytree(project.out / "em.ome.zarr", project.root / "copy")
    shutil.rmtree(project.out / "em.ome.zarr")
    (project.out / "em.ome.zarr").mkdir()
    (project.out / "em.ome.zarr" / ".emflow-output.json").write_text(
        json.dumps({**marker, "owner": "someone-else"})
    )
    refused(
        project,
        ("run", "recipe.yaml", "--serial", "--restart"),
        ("validate", "recipe.yaml", "--restart"),
        needles=("em.ome.zarr", "not written"),
    )
    # its own outputs are replaced on --restart
    shutil.rmtree(project.out / "em.ome.zarr")
    proc = project.emflow("run", "recipe.yaml", "--serial", "--restart", "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project.out / "em.ome.zarr" / "zarr.json").is_file()


# ---------------------------------------------------------------------------------------
# mounts: read-only sources, unwritable output, disk full (root only)
# ---------------------------------------------------------------------------------------
@pytest.fixture
def mount(tmp_path):
    """``mount(path, size_mb, ro=False)`` a tmpfs; unmounted after the test. Needs root."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    mounted: list[Path] = []

    def do(path: Path, size_mb: int, *, ro: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size_mb}m" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], timeout=60)
        if r.returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        return path

    yield do
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], timeout=60)


def _remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True, timeout=60)


def test_sources_on_a_read_only_mount_are_only_read(tmp_path, mount):
    ro = mount(tmp_path / "ro", 8)
    p = Project(tmp_path, src="ro/src")
    p.recipe(source="glob: 'ro/src/*.png'", align="")
    shutil.rmtree(p.src)
    write_stack(synthetic_slices((N, 256, 256), seed=3), p.src, pattern="s%03d.png")
    src = p.sources()
    _remount(ro, "ro")
    proc = p.emflow("run", "recipe.yaml", "--serial")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert p.sources() == src


def test_unwritable_output_dir(project, mount):
    mount(project.root / "out", 1, ro=True)
    both_refuse(project, "out", "not writable")


def _noise_stack(p: Project, n: int = 24, size: int = 512) -> None:
    shutil.rmtree(p.src)
    rng = np.random.default_rng(0)
    write_stack(rng.integers(0, 256, (n, size, size), dtype=np.uint8), p.src, pattern="s%03d.png")


def test_disk_full_stops_at_once_and_resumes_after(project, mount):
    _noise_stack(project)  # 6 MB of noise: two uncompressed pyramids do not fit in 8 MB
    small = mount(project.root / "small", 8)
    project.recipe(
        output_dir="small/out",
        outputs="  - {format: precomputed, name: em, encoding: raw}\n"
        "  - {format: omezarr, name: em.ome.zarr, codec: none}\n",
    )
    src = project.sources()
    proc = project.emflow("run", "recipe.yaml", "--serial")
    error_line(proc, 3, "no space left", "small/out", "run the same command to resume")
    assert project.sources() == src
    nothing_complete(small / "out")
    failed = [
        json.loads(line)
        for line in (small / "out" / "emflow-run" / "journal.jsonl").read_text().splitlines()
        if '"failed"' in line
    ]
    assert failed and all(e["attempts"] == 1 for e in failed), failed  # not retried
    assert "no space left" in (small / "out" / "emflow-run" / "run.log").read_text()
    _remount(small, "size=64m")
    again = project.emflow("run", "recipe.yaml", "--serial", "-q")
    assert again.returncode == 0, again.stderr[-2000:]
    vol = np.stack([cv2.imread(str(f), 0) for f in sorted(project.src.glob("*.png"))])
    np.testing.assert_array_equal(zarr_python(small / "out" / "em.ome.zarr", 0), vol)


def test_disk_full_on_a_local_cluster(project, mount):
    _noise_stack(project, n=16)
    small = mount(project.root / "small", 4)
    project.recipe(output_dir="small/out", align="", extra="run: {retries: 3}\n")
    proc = project.emflow("run", "recipe.yaml", "--workers", "1", "--dashboard", ":0")
    error_line(proc, 3, "no space left", "small/out")
    nothing_complete(small / "out")


# ---------------------------------------------------------------------------------------
# the recipe file
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,needles",
    [
        ("source: [unclosed\n", ("recipe.yaml", "line", "YAML")),
        ("- source: {glob: '*.png'}\n- output_dir: out\n", ("recipe.yaml", "mapping")),
        ("", ("recipe.yaml", "mapping")),
        ("source: {glob: '*.png'}\n", ("outputs", "missing")),
    ],
    ids=["invalid-yaml", "yaml-list", "empty-file", "missing-fields"],
)
def test_broken_recipe_files(project, text, needles):
    (project.root / "recipe.yaml").write_text(text)
    both_refuse(project, *needles)


def test_recipe_not_utf8(project):
    (project.root / "recipe.yaml").write_bytes("output_dir: 'ö'\n".encode("latin-1"))
    both_refuse(project, "recipe.yaml", "UTF-8")


def test_recipe_missing_or_a_folder(project):
    refused(project, ("validate", "nothing.yaml"), needles=("nothing.yaml", "does not exist"))
    refused(project, ("run", "src"), needles=("src", "is a directory"))


@pytest.mark.parametrize(
    "extra,needles",
    [
        ("pyramid: {levles: 3}\n", ("pyramid.levles", "unknown key", "allowed here: levels")),
        ("colour: red\n", ("'colour'", "unknown key", "outputs")),
        ("pyramid: {levels: three}\n", ("pyramid.levels", "integer")),
        ("enhance: {clip_limit: 2}\n", ("enhance.clip_limit",)),
        ("run: {memory_per_worker: lots}\n", ("run.memory_per_worker", "'lots'", "4GiB")),
        ("run: {slab_depth: 30}\n", ("run.slab_depth", "multiple")),
        ("depth: {window: [100, 10]}\n", ("depth.window",)),
        ("run: {keep: [everything]}\n", ("run.keep",)),
    ],
    ids=["unknown-nested", "unknown-top", "type", "range", "memory", "slab", "window", "keep"],
)
def test_bad_recipe_fields(project, extra, needles):
    project.recipe(extra)
    both_refuse(project, *needles)


def test_negative_voxel_size(project):
    text = (project.root / "recipe.yaml").read_text().replace("[4, 4, 40]", "[4, -4, 40]")
    (project.root / "recipe.yaml").write_text(text)
    both_refuse(project, "voxel_size_nm.1")


def test_jpeg_needs_8_bit_output(project):
    shutil.rmtree(project.src)
    write_stack(
        synthetic_slices((N, SIZE, SIZE), seed=1, dtype=np.uint16), project.src, pattern="s%03d.png"
    )
    project.recipe("depth: {output: uint16}\n", outputs="  - {format: precomputed, name: em}\n")
    both_refuse(project, "outputs.0.encoding", "JPEG", "uint16")
    # the corrected recipe runs without --restart: the refused run left nothing behind
    project.recipe("depth: {output: uint8}\n", outputs="  - {format: precomputed, name: em}\n")
    assert project.emflow("run", "recipe.yaml", "--serial", "-q").returncode == 0


def test_memory_option_that_is_not_a_size(project):
    for cmd in ("run", "validate"):
        before = files(project.root)
        proc = project.emflow(cmd, "recipe.yaml", "--memory-per-worker", "banana")
        assert proc.returncode == 2, proc.stderr
        no_traceback(proc)
        assert "--memory-per-worker" in proc.stderr and "'banana'" in proc.stderr
        assert files(project.root) == before


def test_validate_prints_the_resolved_alignment_default(project):
    project.recipe(align="")
    shutil.rmtree(project.src)
    write_stack(synthetic_slices((N, 256, 256), seed=1), project.src, pattern="s%03d.png")
    proc = project.emflow("validate", "recipe.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "align: on (the default" in proc.stdout and "nothing was written" in proc.stdout
    assert not project.out.exists()
    project.recipe()
    assert "align: off (set in the recipe" in project.emflow("validate", "recipe.yaml").stdout


# ---------------------------------------------------------------------------------------
# cluster requests and configs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config,needles",
    [
        ("n_wrokers: 2\n", ("n_wrokers",)),
        ("memory_limit: lots\n", ("memory_limit", "'lots'")),
        ("[1, 2\n", ("cluster.yaml",)),
    ],
    ids=["unknown-key", "memory", "invalid-yaml"],
)
def test_bad_cluster_config(project, config, needles):
    (project.root / "cluster.yaml").write_text(config)
    refused(
        project,
        *[(cmd, "recipe.yaml", "--cluster-config", "cluster.yaml") for cmd in ("validate", "run")],
        needles=needles,
    )


def test_unknown_cluster_kind_and_missing_config(project):
    refused(project, ("run", "recipe.yaml", "--cluster", "bogus"), needles=("bogus", "unknown"))
    refused(
        project, ("run", "recipe.yaml", "--cluster-config", "nope.yaml"), needles=("nope.yaml",)
    )


# ---------------------------------------------------------------------------------------
# alignment files
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content,needles",
    [
        ("[]", ("a.json", "not a valid alignment file")),
        ("{not json", ("a.json", "cannot read")),
        ("FRAME", ("a.json", "frame_shape_yx", "positive")),
        ("OTHER", ("a.json", "no transform for z")),
    ],
    ids=["list", "not-json", "negative-frame", "other-stack"],
)
def test_bad_alignment_files(project, content, needles):
    if content in ("FRAME", "OTHER"):
        shutil.rmtree(project.src)
        write_stack(synthetic_slices((N, 256, 256), seed=1), project.src, pattern="s%03d.png")
        project.recipe(align="")
        assert project.emflow("run", "recipe.yaml", "--serial", "-q").returncode == 0
        data = json.loads((project.out / "emflow-run" / "alignment.json").read_text())
        if content == "FRAME":
            data["frame_shape_yx"] = [-5, 300]
        else:
            data["transforms"] = {"0": data["transforms"]["0"]}
        content = json.dumps(data)
    (project.root / "a.json").write_text(content)
    refused(
        project,
        ("validate", "recipe.yaml", "--alignment", "a.json"),
        ("run", "recipe.yaml", "--serial", "--alignment", "a.json"),
        needles=needles,
    )


# ---------------------------------------------------------------------------------------
# stale outputs: a changed stack or recipe is detected, never reported complete
# ---------------------------------------------------------------------------------------
def test_added_slice_after_a_complete_run(project):
    assert project.emflow("run", "recipe.yaml", "--serial", "-q").returncode == 0
    write_stack(
        synthetic_slices((1, SIZE, SIZE), seed=7), project.src, pattern="s%03d.png", z_start=4
    )
    refused(
        project,
        ("run", "recipe.yaml", "--serial"),
        ("validate", "recipe.yaml"),
        needles=("source stack changed", "s004.png", "--restart"),
    )
    proc = project.emflow("run", "recipe.yaml", "--serial", "--restart", "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert zarr_python(project.out / "em.ome.zarr", 0).shape[0] == N + 1


def test_replaced_slice_after_a_complete_run(project):
    assert project.emflow("run", "recipe.yaml", "--serial", "-q").returncode == 0
    time.sleep(0.01)
    cv2.imwrite(str(_png(project, 2)), np.full((SIZE, SIZE), 77, np.uint8))
    refused(
        project,
        ("run", "recipe.yaml", "--serial"),
        ("validate", "recipe.yaml"),
        needles=("modified", "s002.png", "--restart"),
    )


def test_changed_recipe_after_a_complete_run(project):
    assert project.emflow("run", "recipe.yaml", "--serial", "-q").returncode == 0
    project.recipe(outputs="  - {format: precomputed, name: em, encoding: jpeg}\n")
    refused(
        project,
        ("run", "recipe.yaml", "--serial"),
        ("validate", "recipe.yaml"),
        needles=("different recipe", "--restart"),
    )


# ---------------------------------------------------------------------------------------
# exit codes of the whole process: interrupts, demo, the run's own log and front door
# ---------------------------------------------------------------------------------------
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and any(path.iterdir()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never filled (exit {proc.poll()})")


@pytest.mark.parametrize("mode", ["cluster", "serial"])
def test_sigint_mid_run_to_the_process_group(tmp_path, mode):
    p = Project(tmp_path, n=0)
    write_stack(synthetic_slices((16, 384, 384), seed=4), p.src, pattern="s%03d.png")
    p.recipe(align="")
    src = p.sources()
    args = ["--workers", "2", "--dashboard", ":0"] if mode == "cluster" else ["--serial"]
    proc = start_cli(["run", "recipe.yaml", *args], tmp_path)
    try:
        _wait_for(p.out / "emflow-run" / "done" / "features", proc)
        os.killpg(proc.pid, signal.SIGINT)
        done = finish(proc, 180)
    finally:
        kill_group(proc)
    err = done.stderr
    assert done.returncode == 130, (done.returncode, err[-3000:])
    no_traceback(done)
    assert err.rstrip().endswith("emflow: interrupted; run the same command to resume"), err
    assert p.sources() == src
    nothing_complete(p.out)
    again = p.emflow("run", "recipe.yaml", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    no_traceback(again)
    assert zarr_python(p.out / "em.ome.zarr", 0).shape[0] == 16


def test_demo_exit_codes(tmp_path):
    """demo failures exit non-zero; the demo never writes into a folder that is not its own."""
    proc = cli(
        ["demo", str(tmp_path / "d"), "--slices", "3", "--size", "96", "--workers", "0"], tmp_path
    )
    error_line(proc, 2, "no usable alignment", "neighbour pairs failed", "align: false")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "slices").mkdir()
    (mine / "slices" / "slice_0000.png").write_bytes(b"precious")
    proc = cli(["demo", str(mine), "--slices", "2"], tmp_path)
    error_line(proc, 2, str(mine), "not an emflow demo folder")
    assert (mine / "slices" / "slice_0000.png").read_bytes() == b"precious"


def test_busy_dashboard_port_is_one_emflow_line(project):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = project.emflow("run", "recipe.yaml", "--workers", "1", "--dashboard", f":{port}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_traceback(proc)
    assert f"dashboard port {port} is in use" in proc.stderr
    assert "UserWarning" in (project.out / "emflow-run" / "libraries.log").read_text()


def test_closing_lines_say_what_was_written_and_how_to_look(tmp_path):
    p = Project(tmp_path, n=0)
    write_stack(synthetic_slices((6, 256, 256), seed=1), p.src, pattern="s%03d.png")
    p.recipe(
        align="",
        outputs="  - {format: precomputed, name: em}\n  - {format: omezarr, name: v5}\n"
        "  - {format: omezarr, name: v4, version: '0.4'}\n",
    )
    # run over ssh: the closing lines also say how to bring the viewer's port home
    ssh = {"SSH_CONNECTION": "10.0.0.9 50000 10.0.0.1 22"}
    proc = cli(["run", "recipe.yaml", "--serial"], tmp_path, env=ssh)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = p.out.resolve()
    for line in (
        "is remote: on your own computer run 'ssh -N -L 8000:localhost:8000 ",
        f"wrote 3 volume(s) to {out}",
        f"{out / 'emflow-run' / 'qc' / 'reslices.png'}",
        f"emflow serve {out}",
        "precomputed://http://localhost:8000/em",
        "zarr3://http://localhost:8000/v5",
        "zarr://http://localhost:8000/v4",
    ):
        assert line in proc.stdout, (line, proc.stdout)
    run_json = json.loads((p.out / "emflow-run" / "run.json").read_text())
    assert run_json["resolved"]["align_enabled"] is True
    # intermediates are gone; the QC images and alignment stay
    assert not (p.out / "emflow-run" / "features").exists()
    assert (p.out / "emflow-run" / "alignment.json").is_file()


def test_port_forward_hint_only_on_a_remote_host(monkeypatch):
    from emflow.cli.summary import port_forward_hint

    for k in ("SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY", "SLURM_JOB_ID", "LSB_JOBID", "PBS_JOBID"):
        monkeypatch.delenv(k, raising=False)
    assert port_forward_hint(8123) is None  # a local run: localhost links work as printed
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    hint = port_forward_hint(8123)
    assert "ssh -N -L 8123:localhost:8123 " in hint and "<login node>" in hint


def test_bad_slice_error_names_the_recipe_key(tmp_path):
    """align.bad_slices: error stops at a blank slice, naming the slice and the recipe key."""
    from emflow.testing.transforms import insert_bad_slices

    p = Project(tmp_path, n=0)
    stack = insert_bad_slices(np.stack(list(synthetic_slices((5, 256, 256), seed=3))), {2: "blank"})
    write_stack(stack, p.src, pattern="s%03d.png")
    p.recipe(align="align: {bad_slices: error}\n")
    src = p.sources()
    proc = p.emflow("run", "recipe.yaml", "--serial")
    error_line(proc, 2, "z=2", "align.bad_slices", "bridge")
    assert p.sources() == src
    nothing_complete(p.out)


def test_16_bit_window_is_stored_exactly_and_reproduces_the_run(tmp_path):
    """The 16-bit window a run measured is printed and stored exactly (run.json): a recipe
    that sets it writes the very same bytes."""
    p = Project(tmp_path, n=0)
    vol = synthetic_slices((N, SIZE, SIZE), seed=5, dtype=np.uint16)
    write_stack(vol, p.src, pattern="s%03d.tif")
    p.recipe(source="glob: 'src/*.tif'", outputs="  - {format: omezarr, name: v}\n")
    proc = p.emflow("run", "recipe.yaml", "--serial")
    assert proc.returncode == 0, proc.stderr[-2000:]
    window = json.loads((p.out / "emflow-run" / "run.json").read_text())["resolved"]["window"]
    assert f"16-bit window {window[0]!r}..{window[1]!r}" in proc.stderr, (window, proc.stderr)
    first = tree_digest(p.out / "v")
    shutil.rmtree(p.out)
    p.recipe(
        f"depth: {{window: [{window[0]!r}, {window[1]!r}]}}\n",
        source="glob: 'src/*.tif'",
        outputs="  - {format: omezarr, name: v}\n",
    )
    again = p.emflow("run", "recipe.yaml", "--serial", "-q")
    assert again.returncode == 0, again.stderr[-2000:]
    assert tree_digest(p.out / "v") == first
