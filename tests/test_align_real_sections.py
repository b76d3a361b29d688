"""Alignment on real serial sections at default settings (issue 13): the published, registered
VNC (1024², 45 nm) and ISBI train (512², 50 nm) stacks, and copies of them misplaced by our own
random draws (rotation ≤ 2°, translation ≤ 100 px, scale/shear ≤ 1 %).

To keep CI short the misplacement tests take the first 10 slices of each stack at full
slice size (the default working size is the point; a crop would test another one); the
scale and frame of the registered stacks are measured on the whole stacks (20 and 30
slices): ISBI's sections jitter by ±1.5 % in scale, so over 10 slices the end slices' own
jitter, not drift, would set the figure. ``benchmarks/align_quality.py`` measures the
misplaced whole stacks.

Real neighbouring sections are not related by an affine map (content moves 3-7 px between
them), so the published alignment is no px-exact truth. What is asserted instead:

* every neighbour pair matches and most second neighbours do, registered or misplaced;
* a pair fitted forwards and backwards gives inverse transforms (no bias from the direction);
* aligning the registered stack does not shrink or shear it, and its frame stays within
  1 % of the slice size, cropping little of any slice;
* robustness: the misplaced stack aligns like the registered one up to ONE global affine
  (``emflow.testing.transforms.robustness_px``), also with a blank and a noise slice in it.

Features are computed once per stack (module fixtures, two processes).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
import pytest
import tifffile

from emflow.align.match import linear_distortion, match_features
from emflow.align.solve import solve
from emflow.align.stack import align_features, slice_features
from emflow.align.trend import footprint_pose
from emflow.testing.transforms import (
    compose,
    corner_error_px,
    insert_bad_slices,
    robustness_px,
    scale_change,
    warp_stack,
)

pytestmark = [pytest.mark.real_data, pytest.mark.integration]

SEEDS = (3, 4, 5)
#: slices of each stack the tests align (the first ones)
SLICES = 10
BAD = {3: "blank", 6: "noise"}


@pytest.fixture(scope="module")
def pmap():
    """``map`` over two worker processes (spawned: OpenCV's threads do not survive a fork)."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
        yield ex.map


def _load(shared_data, name: str, n: int) -> np.ndarray:
    """The first ``n`` slices of a stack (VNC has 20, ISBI 30)."""
    if name == "vnc":
        src = shared_data / "sstem-drosophila-vnc" / "stack1" / "raw"
        return np.stack([tifffile.imread(src / f"{z:02d}.tif") for z in range(n)])
    src = shared_data / "isbi2012-sstem" / "train"
    return np.stack([cv2.imread(str(src / f"{z:02d}.png"), cv2.IMREAD_GRAYSCALE) for z in range(n)])


def _fit(job: tuple) -> object:
    fa, fb, z_a, z_b = job
    cv2.setNumThreads(1)
    return match_features(fa, fb, z_a=z_a, z_b=z_b)


def _aligned(stack: np.ndarray, pmap) -> dict:
    feats, bad = slice_features(stack, map_=pmap)
    return {"feats": feats, "bad": bad, "alignment": align_features(feats, bad, map_=pmap)}


@pytest.fixture(scope="module", params=["vnc", "isbi"])
def real(request, shared_data, pmap):
    """A real stack: registered, and misplaced by each seed of SEEDS; features and alignments."""
    stack = _load(shared_data, request.param, SLICES)
    out = {"name": request.param, "stack": stack, "registered": _aligned(stack, pmap)}
    for seed in SEEDS:
        warped, warps = warp_stack(stack, seed=seed)
        out[seed] = {"warped": warped, "warps": warps, **_aligned(warped, pmap)}
    return out


def test_every_neighbour_pair_matches_at_default_settings(real):
    for key in ("registered", *SEEDS):
        al = real[key]["alignment"]
        s = al.pair_summary()
        neighbours, second = s["neighbour"], s["second"]
        assert neighbours["failed"] == neighbours["rejected"] == 0, (real["name"], key, s)
        assert second["matched"] >= 0.8 * sum(second.values()), (real["name"], key, s)
        assert not al.bad_slices and not al.gaps


def test_pair_fit_forwards_backwards_are_inverse(real, pmap):
    """Fitting b onto a and a onto b gives inverse transforms: 0.1 % in scale, 1 px at corners."""
    feats = real["registered"]["feats"]
    shape = feats[0].shape_yx
    scales, corners = [], []
    zs = range(len(feats) - 1)
    fits = list(pmap(_fit, [(feats[z], feats[z + 1], z, z + 1) for z in zs]))
    fits_back = list(pmap(_fit, [(feats[z + 1], feats[z], z + 1, z) for z in zs]))
    for fwd, bwd in zip(fits, fits_back, strict=True):
        assert fwd.ok and bwd.ok, (fwd.reason, bwd.reason)
        cycle = compose(fwd.matrix_array, bwd.matrix_array)  # a -> b -> a: identity if inverse
        scales.append(abs(np.sqrt(np.linalg.det(cycle[:, :2])) - 1))
        corners.append(corner_error_px(cycle, np.eye(2, 3), shape))
    print(f"\n{real['name']}: fwd∘bwd scale {max(scales):.2e}, corners {max(corners):.3f} px")
    assert max(scales) <= 0.001
    assert max(corners) <= 1.0


#: Most of a slice's area the default frame (align.frame: slice) may crop on the whole
#: registered stacks (measured: VNC 0.8 %, ISBI 6.2 %; ISBI's sections jump by 25 px and
#: 10 % anisotropy at z9→10 and z19→20, README alignment paragraph).
MAX_CROPPED = {"vnc": 0.015, "isbi": 0.08}


@pytest.fixture(scope="module")
def whole(request, shared_data, pmap):
    """Whole registered stacks (VNC 20 × 1024², ISBI 30 × 512²) and their alignments, by name
    (computed on first use)."""
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            stack = _load(shared_data, name, {"vnc": 20, "isbi": 30}[name])
            done[name] = {"stack": stack, **_aligned(stack, pmap)}
        return done[name]

    return get


def test_registered_stack_is_not_shrunk_or_sheared(real, whole):
    """Aligning the whole registered stack keeps its scale end to end (first vs last slice,
    ≤ 0.5 %) and does not drift in shear: the mean linear part of the last three slices
    against that of the first three is within 0.5 % in scale and shear. (A single section
    keeps the distortion its content shows: up to ~10 % anisotropy between some ISBI
    neighbours.) The frame is within 1 % of the slice size (align.frame: slice, the
    default: the slice size on the stack's mean content) and crops little of any slice;
    the same placement in a frame covering every slice (align.frame: union) differs only
    by where the frame starts."""
    stack = whole(real["name"])
    al = stack["alignment"]
    zs = sorted(al.transforms)
    h, w = stack["stack"].shape[1:]
    change = scale_change(al.transforms, zs[0], zs[-1])
    first = sum(al.transforms[z][:, :2] for z in zs[:3]) / 3
    last = sum(al.transforms[z][:, :2] for z in zs[-3:]) / 3
    drift = np.hstack([np.linalg.inv(first) @ last, np.zeros((2, 1))])
    drift_scale, drift_shear = linear_distortion(drift)
    feet = {z: footprint_pose(f.area, f.area_factor) for z, f in enumerate(stack["feats"])}
    union = solve(al.pairs, zs, (h, w), bad_slices=stack["bad"], footprints=feet, frame="union")
    worst = max(al.cropped.values(), default=0.0)
    print(
        f"\n{real['name']} ({len(zs)} slices): end-to-end scale change {100 * change:.2f} %; "
        f"drift of the end slices {100 * drift_scale:.2f} % scale, {100 * drift_shear:.2f} % "
        f"shear; frame {al.frame_shape_yx} for {h} × {w} slices, cropping ≤ {100 * worst:.2f} "
        f"% of a slice; union frame {union.frame_shape_yx}"
    )
    assert abs(change) <= 0.005
    assert abs(drift_scale) <= 0.005 and drift_shear <= 0.005
    assert al.detrend == "rigid" and al.frame == "slice"
    assert h <= al.frame_shape_yx[0] <= 1.01 * h and w <= al.frame_shape_yx[1] <= 1.01 * w
    assert worst <= MAX_CROPPED[real["name"]], al.cropped
    assert union.frame_shape_yx[0] >= h and union.frame_shape_yx[1] >= w and not union.cropped
    offset = union.transforms[zs[0]][:, 2] - al.transforms[zs[0]][:, 2]
    for z in zs:
        np.testing.assert_allclose(union.transforms[z][:, :2], al.transforms[z][:, :2])
        np.testing.assert_allclose(union.transforms[z][:, 2] - al.transforms[z][:, 2], offset)


def test_robust_to_the_starting_misplacement(real):
    ref = real["registered"]["alignment"].transforms
    shape = real["stack"].shape[1:]
    for seed in SEEDS:
        med, worst, _ = robustness_px(
            ref, real[seed]["alignment"].transforms, real[seed]["warps"], shape
        )
        print(f"\n{real['name']} seed {seed}: {med:.2f} px median, {worst:.2f} px max")
        assert med <= 3.0 and worst <= 6.0, (real["name"], seed, med, worst)


def test_blank_and_noise_slices_are_bridged(real, pmap):
    """One blank and one noise slice in the misplaced stack: flagged, bridged by checked
    links, rendered per align.bad_slices, and the rest still aligns robustly."""
    if real["name"] != "vnc":
        pytest.skip(
            "bad slices are checked on VNC only (one stack keeps CI short; ISBI is covered by the misplacement tests)"
        )
    ref = real["registered"]["alignment"].transforms
    shape = real["stack"].shape[1:]
    for seed in SEEDS:
        warped = insert_bad_slices(real[seed]["warped"], BAD, seed=seed)
        new, bad = slice_features([warped[z] for z in BAD], map_=pmap)
        feats = list(real[seed]["feats"])
        for i, z in enumerate(BAD):
            feats[z] = new[i]
        flagged = {z: bad[i] for i, z in enumerate(BAD) if i in bad}
        assert flagged == {3: "blank", 6: "featureless/noise"}
        al = align_features(feats, flagged, map_=pmap)
        assert set(al.bad_slices) == set(BAD) and not al.segment_breaks
        assert [(g["after"], g["before"], g["status"]) for g in al.gaps] == [
            (2, 4, "bridged"),
            (5, 7, "bridged"),
        ]
        assert all(len(g["links"]) >= 2 for g in al.gaps)
        assert al.source_slice(6) == 6 and al.bad_slice_policy == "bridge"
        med, worst, _ = robustness_px(ref, al.transforms, real[seed]["warps"], shape, skip=BAD)
        print(f"\nVNC seed {seed} with a blank and a noise slice: {med:.2f} / {worst:.2f} px")
        assert med <= 6.0 and worst <= 10.0, (seed, med, worst)
