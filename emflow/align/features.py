"""SIFT keypoints and descriptors of one EM slice, computed on a reduced working copy.

Core representation: :class:`Features` holds keypoint positions as an ``(N, 2)`` float32
array of ``(x, y)`` pixel coordinates at FULL resolution (pixel centres at integers, x to
the right, y down) and their ``(N, 128)`` float32 SIFT descriptors. Features are
picklable and small next to a slice (~2 MB for 4000 keypoints, mostly descriptors), so
they travel between workers; the image does not.

The working copy is the slice block-averaged by an integer factor ``downsample`` (``f``);
working pixel ``(u, v)`` covers full-resolution pixels ``f*u .. f*u+f-1``, so its centre is
at full-resolution ``x = f*u + (f-1)/2`` (same for y). Exact-zero fill (warped-in
background, missing tiles) is masked and the mask eroded so that the fill edge does not
create features.

A second, coarse feature set (``COARSE_FACTOR`` x coarser) rides along: serial-section TEM
neighbours 40-50 nm apart share their large structures but few fine ones, so a pair that
finds too few matches at the working scale is retried on the coarse set (see ``match``).
It costs ~1/16 of the working-scale SIFT. It can also ride along *lazily*
(``compute_features(coarse="lazy")``): only its working copy is kept (:class:`CoarseCopy`,
64 KiB per 256² copy and mask) and SIFT runs on it when a pair first needs the coarse set
(:meth:`Features.coarse_set`), with the same keypoints and descriptors: stacks whose pairs
match at the working scale (FIB-SEM) never pay for it (0.04-0.07 CPU-s per 2048²-4096² slice).

The *area copy* (:func:`emflow.align.area.area_copy`, long side 512-1023 px, uint8, 0 = fill)
rides along as well: it is what area-based matching correlates (``emflow.align.area``), the
matcher that serial sections need, and what the QC measures the aligned links against.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import cv2
import numpy as np

from emflow.align.area import area_copy, has_zero
from emflow.align.stats import block_mean_percentiles

__all__ = [
    "BlockMeans",
    "CoarseCopy",
    "Features",
    "block_means",
    "choose_downsample",
    "compute_features",
    "thumbnail",
    "working_block_means",
    "working_copy",
]

#: Long side (px) above which the working copy is reduced; the working long side ends up
#: in [WORKING_LONG_SIDE_PX, 2 * WORKING_LONG_SIDE_PX) for inputs at least this large.
WORKING_LONG_SIDE_PX = 1024
#: Erosion (working px) of the valid mask away from exact-zero fill.
FILL_MARGIN_PX = 9
#: Zero regions smaller than this square (working px) are dark pixels, not fill.
MIN_FILL_SIZE_PX = 5
#: Long side (px) of the per-slice thumbnail kept for the QC reslices.
THUMB_PX = 256
#: The coarse feature set is this many times coarser than the working copy ...
COARSE_FACTOR = 4
#: ... and only made when its long side is at least this many px.
MIN_COARSE_LONG_SIDE_PX = 200


@dataclass(frozen=True)
class CoarseCopy:
    """The coarse working copy of a slice, kept instead of its coarse feature set until a pair
    needs that set (:meth:`Features.coarse_set`).

    ``work``/``valid``: uint8 ``(y, x)`` working copy and valid mask (:func:`working_copy`
    at ``downsample``); ``nfeatures``: SIFT's keypoint limit; ``shape_yx``: full-res slice shape.
    """

    work: np.ndarray
    valid: np.ndarray
    downsample: int
    nfeatures: int
    shape_yx: tuple[int, int]

    def features(self) -> Features:
        """SIFT of the copy: the coarse set :func:`compute_features` computes eagerly."""
        key = (
            self.work.shape, self.downsample, self.nfeatures, self.shape_yx,
            self.work.tobytes(), self.valid.tobytes(),
        )  # fmt: skip
        with _COARSE_LOCK:
            got = _COARSE_DONE.get(key)
        if got is None:
            got = _detect(self.work, self.valid, self.downsample, self.nfeatures, self.shape_yx)
            with _COARSE_LOCK:
                _COARSE_DONE[key] = got
                while len(_COARSE_DONE) > _COARSE_KEEP:
                    _COARSE_DONE.pop(next(iter(_COARSE_DONE)))
        return got


#: Coarse sets computed from a :class:`CoarseCopy` in this process, by the copy's content (a
#: slice is in up to 4 pairs; the units of one worker reuse it): at most _COARSE_KEEP (~1 MB each)
_COARSE_DONE: dict[tuple, Features] = {}
_COARSE_KEEP = 8
_COARSE_LOCK = threading.Lock()  # a worker's threads share the table


@dataclass(frozen=True)
class Features:
    """Keypoints (full-resolution ``(x, y)`` px) and SIFT descriptors of one slice.

    Attributes
    ----------
    keypoints_xy : numpy.ndarray
        ``(N, 2)`` float32, full-resolution pixel coordinates ``(x, y)``.
    descriptors : numpy.ndarray
        ``(N, 128)`` float32 SIFT descriptors, row ``i`` belongs to keypoint ``i``.
    shape_yx : tuple of int
        Full-resolution slice shape ``(height, width)`` in px.
    downsample : int
        Integer block-averaging factor of the working copy the features came from.
    coarse : Features or None
        The same slice's features at ``COARSE_FACTOR`` x coarser, the fallback for pairs
        that do not match at the working scale; None when not computed or too small.
    area : numpy.ndarray or None
        The slice's area copy (uint8 ``(y, x)``, 0 = fill) for area-based matching.
    area_factor : int
        Its integer reduction factor (area px ``u`` is centred on full-res ``f u + (f-1)/2``).
    coarse_copy : CoarseCopy or None
        The coarse working copy, when the coarse set is made lazily (``coarse`` is then None;
        :meth:`coarse_set` makes it).
    """

    keypoints_xy: np.ndarray
    descriptors: np.ndarray
    shape_yx: tuple[int, int]
    downsample: int
    coarse: Features | None = field(default=None, repr=False, compare=False)
    area: np.ndarray | None = field(default=None, repr=False, compare=False)
    area_factor: int = field(default=1, compare=False)
    coarse_copy: CoarseCopy | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.keypoints_xy.shape[0])

    def coarse_set(self) -> Features | None:
        """The coarse feature set: ``coarse``, or SIFT of ``coarse_copy`` (same keypoints and
        descriptors); None when the slice has none."""
        if self.coarse is not None:
            return self.coarse
        return None if self.coarse_copy is None else self.coarse_copy.features()


def choose_downsample(shape_yx: tuple[int, int]) -> int:
    """Integer reduction factor so the working copy's long side is ~1024-2048 px.

    Cost of SIFT is set by the working size, and accuracy is unchanged down to a
    ~512 px working copy (notes/ALIGNMENT.md), so large slices are reduced.

    Parameters
    ----------
    shape_yx : tuple of int
        Full-resolution slice shape ``(height, width)`` in px.

    Returns
    -------
    int
        ``max(1, long_side // 1024)``: 1 up to 2047 px, 2 for 2048-3071 px, 8 for 8192 px.

    Examples
    --------
    >>> choose_downsample((1024, 1024)), choose_downsample((8192, 6000))
    (1, 8)
    """
    long_side = max(int(shape_yx[0]), int(shape_yx[1]))
    return max(1, long_side // WORKING_LONG_SIDE_PX)


class BlockMeans(NamedTuple):
    """A slice reduced by an integer factor, as feature detection and slice QC both need it.

    ``means``: float32 ``(y, x)`` block means; ``fill``: uint8, each block's share of
    exact-zero (fill) px x 255 (block mean of the 0/255 fill mask). Trailing rows/columns
    that do not fill a block are dropped.
    """

    factor: int
    means: np.ndarray
    fill: np.ndarray


def block_means(image: np.ndarray, factor: int) -> BlockMeans:
    """:class:`BlockMeans` of a (y, x) slice (any integer or float dtype) by ``factor`` >= 1.

    One reduction of the full slice and its fill mask, shared by :func:`working_copy` and
    :func:`emflow.align.quality.assess_slice` (a features unit computes it once).
    """
    f = int(factor)
    h, w = (image.shape[0] // f) * f, (image.shape[1] // f) * f
    img = image[:h, :w]
    any_zero = has_zero(img)
    if f == 1:
        zero = np.zeros(img.shape, np.uint8)
        if any_zero:
            zero = (img == 0).view(np.uint8) * np.uint8(255)
        return BlockMeans(1, img.astype(np.float32), zero)
    # INTER_AREA with an integer factor is the exact block mean
    size = (w // f, h // f)
    native = img if img.dtype in (np.uint8, np.uint16, np.float32) else img.astype(np.float32)
    small = cv2.resize(native, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    if not any_zero:  # no fill: the block means of an all-zero mask are 0
        return BlockMeans(f, small, np.zeros(small.shape, np.uint8))
    zero = (img == 0).view(np.uint8) * np.uint8(255)
    return BlockMeans(f, small, cv2.resize(zero, size, interpolation=cv2.INTER_AREA))


def working_block_means(image: np.ndarray, downsample: int | None = None) -> BlockMeans | None:
    """:func:`block_means` of a (y, x) slice at its working factor (``downsample``, or
    :func:`choose_downsample`): computed once per slice, shared by slice QC and the working
    copy. None for a factor below 1 (:func:`working_copy` refuses it with the reason)."""
    f = choose_downsample(image.shape) if downsample is None else int(downsample)
    return block_means(image, f) if f >= 1 else None


def working_copy(
    image: np.ndarray, downsample: int, reduced: BlockMeans | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Block-mean reduced uint8 copy of a slice and its valid (non-fill) mask, both (y, x).

    The grey levels are stretched to 0..255 between the 0.1 and 99.9 percentiles of the
    non-zero pixels (any input dtype; per-slice scaling is fine for features only).

    Parameters
    ----------
    image : numpy.ndarray
        ``(y, x)`` slice, any integer or float dtype; exact 0 is fill.
    downsample : int
        Integer factor ``f >= 1``; trailing rows/columns that do not fill a block are dropped.
    reduced : BlockMeans, optional
        The slice's :func:`block_means` if already computed (used when its factor is ``f``).

    Returns
    -------
    work : numpy.ndarray
        ``(H // f, W // f)`` uint8 working copy.
    valid : numpy.ndarray
        Same shape, uint8, 255 where keypoints are allowed (fill removed and eroded).
    """
    if image.ndim != 2:
        raise ValueError(f"expected a (y, x) slice, got shape {image.shape}")
    f = int(downsample)
    if f < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    if reduced is None or reduced.factor != f:
        reduced = block_means(image, f)
    small = reduced.means
    # block fill share >= 0.5 (reduced.fill = share x 255, so >= 128); no fill: nothing to
    # open or grow (the usual slice: saves the 19 px dilation)
    fill = (reduced.fill >= 128).view(np.uint8)
    if fill.any():
        k_small = cv2.getStructuringElement(cv2.MORPH_RECT, (MIN_FILL_SIZE_PX, MIN_FILL_SIZE_PX))
        fill = cv2.morphologyEx(fill, cv2.MORPH_OPEN, k_small)
        k_grow = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * FILL_MARGIN_PX + 1, 2 * FILL_MARGIN_PX + 1)
        )
        fill = cv2.dilate(fill, k_grow)
    keep = fill == 0
    valid = keep.view(np.uint8) * np.uint8(255)
    if reduced.fill.any():
        keep &= reduced.fill < 255  # blocks wholly fill never count
    if np.count_nonzero(keep) < 16:
        return np.zeros(small.shape, np.uint8), valid
    lo, hi = block_mean_percentiles(small, keep, [0.1, 99.9], image.dtype)
    if not hi > lo:
        return np.zeros(small.shape, np.uint8), valid
    work = small - lo  # float64 (lo is), in place from here: the same values as before
    work *= 255.0 / (hi - lo)
    np.clip(work, 0, 255, out=work)
    return np.rint(work, out=work).astype(np.uint8), valid


def compute_features(
    image: np.ndarray,
    *,
    downsample: int | None = None,
    nfeatures: int = 4000,
    coarse: bool | str = True,
    area: bool = True,
    reduced: BlockMeans | None = None,
) -> Features:
    """SIFT keypoints (full-res ``(x, y)`` px) and descriptors of a (y, x) slice for matching.

    Parameters
    ----------
    image : numpy.ndarray
        ``(y, x)`` slice, uint8/uint16/float; exact 0 is treated as fill and masked.
    downsample : int, optional
        Working-copy factor; default :func:`choose_downsample` of the slice shape.
    nfeatures : int
        Keep at most this many strongest keypoints (OpenCV SIFT ``nfeatures``).
    coarse : bool or "lazy"
        Also compute the coarse fallback set (``Features.coarse``) when the coarse copy's
        long side is at least ``MIN_COARSE_LONG_SIDE_PX``; ``"lazy"``: keep only its
        working copy (``Features.coarse_copy``; :meth:`Features.coarse_set` computes it).
    area : bool
        Also keep the area copy (``Features.area``) for area-based matching.
    reduced : BlockMeans, optional
        The slice's :func:`block_means` at the working factor, if already computed.

    Returns
    -------
    Features
        Possibly with 0 keypoints (blank or featureless slice); never raises for those.
    """
    shape_yx = (int(image.shape[0]), int(image.shape[1]))
    f = choose_downsample(shape_yx) if downsample is None else int(downsample)
    out = _sift(image, f, nfeatures, shape_yx, reduced)
    fc = f * COARSE_FACTOR
    if coarse == "lazy" and max(shape_yx) // fc >= MIN_COARSE_LONG_SIDE_PX:
        work, valid = working_copy(image, fc)
        out = replace(out, coarse_copy=CoarseCopy(work, valid, fc, int(nfeatures), shape_yx))
    elif coarse and max(shape_yx) // fc >= MIN_COARSE_LONG_SIDE_PX:
        out = replace(out, coarse=_sift(image, fc, nfeatures, shape_yx))
    if area:
        copy, g = area_copy(image)
        out = replace(out, area=copy, area_factor=g)
    return out


def thumbnail(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Block mean of a (y, x) slice over ``s``² px, ``s = max(1, long side // THUMB_PX)``; and ``s``.

    Trailing rows/columns that do not fill a block are dropped, so thumbnail px ``u`` is
    centred on full-resolution ``x = s*u + (s-1)/2``.
    """
    s = max(1, max(image.shape) // THUMB_PX)
    h, w = (image.shape[0] // s) * s, (image.shape[1] // s) * s
    img = image[:h, :w]
    if s == 1:
        return np.array(img), 1
    native = img if img.dtype in (np.uint8, np.uint16, np.float32) else img.astype(np.float32)
    return cv2.resize(native, (w // s, h // s), interpolation=cv2.INTER_AREA), s


def _sift(
    image: np.ndarray,
    f: int,
    nfeatures: int,
    shape_yx: tuple[int, int],
    reduced: BlockMeans | None = None,
) -> Features:
    work, valid = working_copy(image, f, reduced)
    return _detect(work, valid, f, nfeatures, shape_yx)


def _detect(
    work: np.ndarray, valid: np.ndarray, f: int, nfeatures: int, shape_yx: tuple[int, int]
) -> Features:
    """SIFT of a working copy (factor ``f``) and its valid mask; keypoints at full res."""
    kps: list = []
    desc = None
    if work.size and work.max() > 0 and valid.any():
        sift = cv2.SIFT_create(nfeatures=int(nfeatures))
        kps, desc = sift.detectAndCompute(work, valid)
    if not kps or desc is None:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), shape_yx, f)
    uv = np.array([kp.pt for kp in kps], dtype=np.float64)
    xy = uv * f + (f - 1) / 2.0
    return Features(xy.astype(np.float32), np.asarray(desc, np.float32), shape_yx, f)
