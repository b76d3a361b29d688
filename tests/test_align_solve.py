"""Stack alignment: accumulated error vs truth (chain vs global), bad slices, alignment.json.

The solves here run with ``detrend="none"``: a synthetic truth is defined up to one global
transform, and trend removal (tests/test_align_trend.py) fixes the low frequencies by the
slices' footprints, which a misplaced stack clipped to its slice shape does not show.

Stack used for accuracy: the real, aligned ISBI 2012 ssTEM sections cross-faded in 8 steps
(slice z = (1 - w) S_k + w S_(k+1), k = z // 8, w = (z % 8) / 8), 30 slices, each then
distorted by a known random affine (translation <= 100 px, rotation <= 2 deg, scale/shear
<= 1 %). Cross-fading keeps the truth exact (all components sit in the same aligned frame)
while the content changes from slice to slice. Adjacent raw ISBI/VNC sections (50 nm apart
at 4-4.6 nm/px) share too little texture for SIFT (3-5 RANSAC inliers of 20-50 ratio-test
matches), so they cannot serve as a stack with known truth.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from emflow.align.area import area_copy
from emflow.align.features import Features, compute_features
from emflow.align.frame import footprint_hull
from emflow.align.match import MatchConfig, PairResult, match_features
from emflow.align.quality import assess_slice
from emflow.align.solve import Alignment, identity_alignment, solve
from emflow.errors import AlignmentError
from emflow.testing.transforms import (
    apply_to_stack,
    corner_error_px,
    insert_bad_slices,
    pair_truth,
    random_affines,
    stack_errors_px,
)
from tests.conftest import DATA

ISBI = sorted(str(p) for p in (DATA / "isbi2012-sstem" / "train").glob("*.png"))
N, STEPS = 30, 8
#: 100 px shifts on 512 px slices need a wider translation limit; the truth is affine, and
#: "auto" may pick a rigid model up to 1 px (model_corner_threshold_px) off per link, which
#: then accumulates along the stack.
WIDE = MatchConfig(max_translation_fraction=0.5, model="affine")


def _pairs(feats: list[Features], zs: range) -> list[PairResult]:
    return [
        match_features(feats[z], feats[z + k], z_a=z, z_b=z + k, config=WIDE)
        for k in (1, 2)
        for z in zs
        if z + k < len(feats)
    ]


@pytest.fixture(scope="module")
def stack():
    if not ISBI:
        pytest.skip(f"real EM test data not found at {DATA}")
    sections = np.stack([cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in ISBI]).astype(np.float64)
    slices = []
    for z in range(N):
        k, w = z // STEPS, (z % STEPS) / STEPS
        slices.append(np.rint((1 - w) * sections[k] + w * sections[k + 1]).astype(np.uint8))
    aligned = np.stack(slices)
    shape = aligned.shape[1:]
    warped, truth = apply_to_stack(aligned, random_affines(N, shape_yx=shape, seed=1))
    feats = [compute_features(s) for s in warped]
    return {
        "warped": warped,
        "truth": truth,
        "shape": shape,
        "feats": feats,
        "pairs": _pairs(feats, range(N)),
    }


def test_stack_error_chain_vs_global(stack):
    shape, truth, pairs = stack["shape"], stack["truth"], stack["pairs"]
    assert all(p.ok for p in pairs), [p.reason for p in pairs if not p.ok]
    first = [p for p in pairs if p.z_b - p.z_a == 1]
    e_pair = [
        corner_error_px(p.matrix_array, pair_truth(truth, p.z_a, p.z_b), shape) for p in first
    ]
    err = {}
    for method in ("chain", "global"):
        al = solve(pairs, range(N), shape, method=method, detrend="none")
        assert al.bad_slices == {}
        err[method] = stack_errors_px(al.transforms, truth, shape)
    print(f"\n1st-neighbour pairs: median {np.median(e_pair):.3f} px, max {np.max(e_pair):.3f} px")
    for m in ("chain", "global"):
        print(f"{m:6s}: max {max(err[m].values()):.3f} px, at z={N - 1}: {err[m][N - 1]:.3f} px")
    assert max(err["global"].values()) <= 1.0
    assert max(err["chain"].values()) <= 1.0


def test_bad_slices_are_reported_and_bridged(stack):
    bad = {10: "blank", 20: "noise"}
    warped = insert_bad_slices(stack["warped"], bad, seed=3)
    feats = list(stack["feats"])
    for z in bad:
        feats[z] = compute_features(warped[z])
    touched = {z + d for z in bad for d in (-2, -1, 0)}
    pairs = [p for p in stack["pairs"] if p.z_a not in touched] + [
        p for p in _pairs(feats, sorted(touched)) if p.z_a >= 0
    ]
    flagged = {z: r for z in range(N) if (r := assess_slice(warped[z]))}
    assert flagged == {10: "blank", 20: "featureless/noise"}
    shape, truth = stack["shape"], stack["truth"]
    results = {}
    for method in ("global", "chain"):
        # without being told: both neighbours' matches failed
        al = solve(pairs, range(N), shape, method=method, detrend="none")
        assert set(al.bad_slices) == {10, 20}
        assert {(a, b) for a, b, _ in al.rejected_pairs} >= {(9, 10), (10, 11), (19, 20), (20, 21)}
        e = stack_errors_px(al.transforms, truth, shape)
        results[method] = max(v for z, v in e.items() if z not in bad)
        told = solve(pairs, range(N), shape, method=method, bad_slices=flagged, detrend="none")
        assert told.bad_slices == flagged
    print(
        f"\nwith blank z=10 + noise z=20, max error of other slices: "
        f"global {results['global']:.3f} px, chain {results['chain']:.3f} px"
    )
    assert results["global"] <= 1.5
    assert results["chain"] <= 1.5


# ---- fast tests on hand-made pair results ------------------------------------------------

SHAPE = (100, 200)


def _pair(a: int, b: int, m: np.ndarray, ok: bool = True, reason: str = "") -> PairResult:
    t = tuple(tuple(float(v) for v in row) for row in m)
    return PairResult(a, b, ok, reason, "affine", t, t, 100, 120, 0.3, 0.0)  # type: ignore[arg-type]


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def _chain_pairs(n: int, fail: set[int] = frozenset()) -> list[PairResult]:
    """Pairs of a stack where slice z sits at (z, -2z) px relative to slice 0."""
    out = []
    for k in (1, 2):
        for a in range(n - k):
            b = a + k
            if a in fail or b in fail:
                out.append(_pair(a, b, np.eye(2, 3), ok=False, reason="too few inliers (3 < 20)"))
            else:
                out.append(_pair(a, b, _shift(1.0 * k, -2.0 * k)))
    return out


def test_frame_and_transforms_of_pure_shifts():
    al = solve(_chain_pairs(5), range(5), SHAPE, detrend="none", frame="union")
    # slice z content must land at the same global place: T_z = T_0 @ shift(z, -2z)
    assert al.frame_shape_yx == (100 + 8, 200 + 4)
    np.testing.assert_allclose(al.transforms[0], _shift(0, 8), atol=1e-9)
    np.testing.assert_allclose(al.transforms[4], _shift(4, 0), atol=1e-9)
    assert al.frame == "union" and al.cropped == {}


def test_slice_frame_sits_on_the_mean_content_and_reports_what_it_crops():
    """align.frame slice (default): the frame has the slice size, centred on the slices'
    mean placement (here slice 2's), and each slice's area outside it is reported."""
    al = solve(_chain_pairs(5), range(5), SHAPE, detrend="none")
    assert al.frame == "slice" and al.frame_shape_yx == SHAPE
    for z in range(5):
        np.testing.assert_allclose(al.transforms[z], _shift(z - 2, 4 - 2 * z), atol=1e-9)
    # slice 0 sits at (-2, +4): 198 x 96 of its 200 x 100 px are inside
    edge = 1 - 198 * 96 / 20000, 1 - 199 * 98 / 20000
    assert al.cropped == pytest.approx({0: edge[0], 1: edge[1], 3: edge[1], 4: edge[0]}, abs=1e-4)
    back = Alignment.from_dict(al.to_dict())
    assert back.frame == "slice" and back.cropped == al.cropped
    # footprints: the frame follows the slices' content, not their canvases
    feet = {z: (60.0, 30.0, 0.0) for z in range(5)}
    moved = solve(_chain_pairs(5), range(5), SHAPE, detrend="none", footprints=feet)
    np.testing.assert_allclose(moved.transforms[0], al.transforms[0], atol=1e-9)
    with pytest.raises(AlignmentError, match=r"align\.frame must be"):
        solve(_chain_pairs(3), range(3), SHAPE, frame="content")


@pytest.mark.parametrize("factor", [1, 4])
def test_frame_follows_the_content_not_the_canvas(factor):
    """Slices whose content fills only part of their canvas (exact-zero fill around it):
    the union frame covers the content, and the slice frame crops nothing when only fill
    sticks out of it."""
    image = np.zeros(SHAPE, np.uint8)
    image[20:80, 32:168] = np.random.default_rng(1).integers(1, 256, (60, 136))
    hull = footprint_hull(*area_copy(image, factor), SHAPE)
    np.testing.assert_array_equal(hull.min(axis=0), (32, 20))
    np.testing.assert_array_equal(hull.max(axis=0), (167, 79))
    assert footprint_hull(*area_copy(np.full(SHAPE, 9, np.uint8), factor), SHAPE) is None
    hulls = dict.fromkeys(range(5), hull)
    union = solve(_chain_pairs(5), range(5), SHAPE, detrend="none", frame="union", hulls=hulls)
    assert union.frame_shape_yx == (60 + 8, 136 + 4)  # the content walks (1, -2) px per slice
    np.testing.assert_allclose(union.transforms[0], _shift(-32, -20 + 8), atol=1e-9)
    sliced = solve(_chain_pairs(5), range(5), SHAPE, detrend="none", hulls=hulls)
    assert sliced.frame_shape_yx == SHAPE and sliced.cropped == {}  # only fill is cut


def test_outlier_link_is_rejected_and_reported():
    pairs = _chain_pairs(8)
    pairs[3] = _pair(3, 4, _shift(1.0 + 9.0, -2.0))  # a wrong (3, 4) link, 9 px off
    al = solve(pairs, range(8), SHAPE, method="global", detrend="none")
    assert (3, 4) in {(a, b) for a, b, _ in al.rejected_pairs}
    for z in range(8):
        np.testing.assert_allclose(
            al.transforms[z][:, 2] - al.transforms[0][:, 2], (z, -2 * z), atol=1e-6
        )
    chain = solve(pairs, range(8), SHAPE, method="chain", detrend="none")  # trusts the wrong link
    np.testing.assert_allclose(
        chain.transforms[7][:, 2] - chain.transforms[0][:, 2], (7 + 9, -14), atol=1e-6
    )


@pytest.mark.parametrize("policy", ["bridge", "fill_previous", "zero"])
def test_bad_slice_policies(policy):
    al = solve(_chain_pairs(6, fail={2}), range(6), SHAPE, bad_slice_policy=policy, detrend="none")
    assert set(al.bad_slices) == {2} and "neighbour" in al.bad_slices[2]
    rel = {z: al.transforms[z][:, 2] - al.transforms[0][:, 2] for z in range(6)}
    for z in (0, 1, 3, 4, 5):
        np.testing.assert_allclose(rel[z], (z, -2 * z), atol=1e-6)
        assert al.source_slice(z) == z
    if policy == "bridge":
        np.testing.assert_allclose(rel[2], (2, -4), atol=1e-6)  # interpolated
        assert al.source_slice(2) == 2
    elif policy == "fill_previous":
        np.testing.assert_allclose(rel[2], (1, -2), atol=1e-6)  # slice 1 shown in place
        assert al.source_slice(2) == 1
    else:
        assert al.source_slice(2) is None


@pytest.mark.parametrize("method", ["global", "chain"])
def test_a_stack_never_splits_silently(method):
    """Two consecutive failed slices and only 1st/2nd neighbour links: nothing crosses the gap."""
    pairs = [replace(p, inliers=0) if not p.ok else p for p in _chain_pairs(8, fail={3, 4})]
    with pytest.raises(AlignmentError, match=r"splits at z2\|z5.*align\.allow_segments"):
        solve(pairs, range(8), SHAPE, method=method, detrend="none")


def test_allowed_segments_are_placed_by_an_estimate_never_the_identity():
    pairs = [replace(p, inliers=0) if not p.ok else p for p in _chain_pairs(8, fail={3, 4})]
    with pytest.raises(AlignmentError, match="no pair across it produced any estimate"):
        solve(pairs, range(8), SHAPE, allow_segments=True, detrend="none")
    # a failed (2, 5) match that still produced an estimate (too few inliers to accept)
    estimate = _pair(2, 5, _shift(3.0, -6.0), ok=False, reason="too few inlier patches (9 < 12)")
    al = solve(
        [*pairs, replace(estimate, inliers=9)], range(8), SHAPE, allow_segments=True, detrend="none"
    )
    assert set(al.bad_slices) == {3, 4}
    assert al.segment_breaks == [(2, 5)]
    assert al.gaps[0]["status"] == "unbridged" and "z2→z5" in al.gaps[0]["placed_by"]
    rel = {z: al.transforms[z][:, 2] - al.transforms[0][:, 2] for z in range(8)}
    for z in (0, 1, 2, 5, 6, 7):  # all slices where they belong, none at the identity
        np.testing.assert_allclose(rel[z], (z, -2 * z), atol=1e-6)


def test_a_single_area_bridge_is_not_trusted():
    """One link across a bad slice, with real-section scatter: unchecked, so the run stops."""
    pairs = [
        p if p.z_b - p.z_a == 1 else replace(p, ok=False, reason="x", inliers=0)
        for p in _chain_pairs(8, fail={4})
    ]
    bridge = replace(_pair(3, 5, _shift(2.0, -4.0)), method="area", residual_px=4.0, downsample=2)
    with pytest.raises(
        AlignmentError, match=r"splits at z3\|z5.*only one link crosses it \(z3→z5\)"
    ):
        solve([*pairs, bridge], range(8), SHAPE, detrend="none")
    check = replace(_pair(2, 5, _shift(3.0, -6.0)), method="area", residual_px=4.0, downsample=2)
    al = solve([*pairs, bridge, check], range(8), SHAPE, detrend="none")
    assert (
        al.gaps
        == [
            {
                "after": 3,
                "before": 5,
                "links": [[2, 5], [3, 5]],
                "status": "bridged",
                "placed_by": "",
            }
        ]
        or al.gaps[0]["status"] == "bridged"
    )
    assert al.source_slice(4) == 4 and 4 in al.bad_slices


def test_error_policy_names_the_slices():
    with pytest.raises(AlignmentError, match=r"z=2: no successful match.*set align\.bad_slices to"):
        solve(_chain_pairs(6, fail={2}), range(6), SHAPE, bad_slice_policy="error", detrend="none")


def test_bad_first_slice_moves_the_reference():
    al = solve(_chain_pairs(5, fail={0}), range(5), SHAPE, bad_slices={0: "blank"}, detrend="none")
    assert al.bad_slices == {0: "blank"}
    np.testing.assert_allclose(al.transforms[4][:, 2] - al.transforms[1][:, 2], (3, -6), atol=1e-6)


def test_invalid_arguments_raise_alignment_error():
    with pytest.raises(AlignmentError, match=r"align\.method"):
        solve([], range(3), SHAPE, method="elastic")
    with pytest.raises(AlignmentError, match=r"align\.bad_slices must be"):
        solve([], range(3), SHAPE, bad_slice_policy="skip")
    with pytest.raises(AlignmentError, match=r"align\.detrend must be one of \('rigid', 'none'\)"):
        solve([], range(3), SHAPE, detrend="quadratic")


def test_default_solve_removes_a_steady_walk():
    """Slices that walk (1, -2) px per section: the default solve (align.detrend: rigid)
    takes the walk out, so every slice lands where it was and the frame is the slice size;
    with detrend "none" the walk stays (test_frame_and_transforms_of_pure_shifts)."""
    al = solve(_chain_pairs(5), range(5), SHAPE)
    assert al.detrend == "rigid" and al.frame_shape_yx == SHAPE
    for z in range(5):
        np.testing.assert_allclose(al.transforms[z], np.eye(2, 3), atol=1e-6)
    assert Alignment.from_dict(al.to_dict()).detrend == "rigid"


def test_alignment_json_round_trip_is_exact(tmp_path):
    pairs = _chain_pairs(6, fail={2})
    pairs[0] = _pair(
        0, 1, np.array([[0.9999999999999999, 1e-17, 1 / 3], [-2e-300, 1.0000001, 7.1]])
    )
    al = solve(pairs, range(6), SHAPE, method="global", detrend="none")
    path = tmp_path / "alignment.json"
    al.to_json(path)
    back = Alignment.from_json(path)
    assert back == al
    for z in al.transforms:
        assert back.transforms[z].tobytes() == al.transforms[z].tobytes()
    assert back.pairs[0].matrix == pairs[0].matrix
    assert "NaN" not in path.read_text()


def test_from_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "alignment.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(AlignmentError, match=r"alignment\.json"):
        Alignment.from_json(bad)


def test_identity_alignment():
    al = identity_alignment(range(3), SHAPE)
    assert al.method == "identity" and al.frame_shape_yx == SHAPE
    np.testing.assert_array_equal(al.transforms[2], np.eye(2, 3))
