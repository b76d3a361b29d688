"""Slice-to-slice alignment: features -> pair matches -> global solve -> warp (pure NumPy/OpenCV).

Transforms everywhere are 2x3 float64 matrices in full-resolution ``(x, y)`` pixel
coordinates; per-slice transforms map the source slice into the global aligned frame,
pair matrices map slice ``z_b`` into slice ``z_a``. No Dask here: ``emflow.pipeline`` maps
these functions onto a cluster.

The notebook helper ``emflow.align.match.match`` is deliberately not re-exported here: a
package attribute named ``match`` would shadow the ``emflow.align.match`` module.

The names load their module on first use (:mod:`emflow._lazy`): a run's render units import
``emflow.align.warp`` only, not SIFT, RANSAC and the solve.
"""

from typing import TYPE_CHECKING

from emflow._lazy import lazy_names

if TYPE_CHECKING:
    from emflow.align.features import Features, choose_downsample, compute_features
    from emflow.align.match import MatchConfig, PairResult, match_features
    from emflow.align.quality import assess_slice
    from emflow.align.solve import Alignment, identity_alignment, solve
    from emflow.align.warp import warp_slice

__all__ = [
    "Alignment",
    "Features",
    "MatchConfig",
    "PairResult",
    "assess_slice",
    "choose_downsample",
    "compute_features",
    "identity_alignment",
    "match_features",
    "solve",
    "warp_slice",
]

lazy_names(
    __name__,
    {
        **dict.fromkeys(
            ("Features", "choose_downsample", "compute_features"), "emflow.align.features"
        ),
        **dict.fromkeys(("MatchConfig", "PairResult", "match_features"), "emflow.align.match"),
        "assess_slice": "emflow.align.quality",
        **dict.fromkeys(("Alignment", "identity_alignment", "solve"), "emflow.align.solve"),
        "warp_slice": "emflow.align.warp",
    },
)
