"""Which pairs of slices to match, in two rounds, and how the outcome reads.

Round 1 matches every slice with its next neighbour ``(z, z+1)``. Round 2 matches second
neighbours ``(z, z+2)``, starting from the composition of the two round-1 links when both
succeeded (sections 90-100 nm apart share too little for a search from scratch to be
reliable), and *bridges*: wherever round 1 left a cut (a failed or skipped ``(z, z+1)``
pair), every pair between the two nearest usable slices on each side of it, so that a gap is
crossed by several independent links that can check each other (``emflow.align.solve``).

Pairs that involve a slice already judged unusable (blank, noise, missing) are not matched:
they are recorded as failed with the slice's reason. Pure functions on slice indices and
:class:`~emflow.align.match.PairResult`; the pipeline and :func:`align_slices` share them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from emflow.align.match import PairResult, failed_pair, sift_trusted

__all__ = [
    "BRIDGE_REACH",
    "bridge_pairs",
    "check_neighbours",
    "close_estimate",
    "composed_estimate",
    "failed_neighbours",
    "neighbour_pairs",
    "skipped",
    "summary_lines",
]

#: Usable slices taken on each side of a cut when planning bridges.
BRIDGE_REACH = 2
#: No bridge spans more sections than this.
MAX_BRIDGE = 6
#: More than this fraction of failed (z, z+1) pairs is worth a warning naming them.
WARN_FAILED_FRACTION = 0.10
#: More than this fraction stops the run: the stack is not alignable as given.
MAX_FAILED_FRACTION = 0.5


def neighbour_pairs(zs: Sequence[int]) -> list[tuple[int, int]]:
    """Round 1: ``(z, z')`` for consecutive slices of ``zs`` (sorted)."""
    s = sorted(int(z) for z in zs)
    return list(itertools.pairwise(s))


def skipped(z_a: int, z_b: int, bad: Mapping[int, str]) -> PairResult | None:
    """A failed result for a pair that touches an unusable slice (not matched), else None."""
    for z in (z_a, z_b):
        if z in bad:
            return failed_pair(z_a, z_b, f"slice {z} is unusable ({bad[z]})")
    return None


def composed_estimate(
    results: Mapping[tuple[int, int], PairResult], z_a: int, z_b: int
) -> np.ndarray | None:
    """2x3 b -> a estimate composed from successful links ``(z, z+1)`` from ``z_a`` to ``z_b``."""
    m = np.eye(3)
    for z in range(z_a, z_b):
        p = results.get((z, z + 1))
        if p is None or not p.ok:
            return None
        m = m @ np.vstack([p.matrix_array, [0.0, 0.0, 1.0]])
    return m[:2]


def close_estimate(results: Mapping[tuple[int, int], PairResult], z_a: int, z_b: int) -> bool:
    """Whether the composed estimate of second neighbours ``(z_a, z_b)`` comes from two SIFT
    fits that stand alone (:func:`~emflow.align.match.sift_trusted`: slices that share their
    fine detail, e.g. FIB-SEM): the area matcher then measures once from it
    (``match_features(initial_close=True)``)."""
    if z_b - z_a != 2:
        return False
    links = [results.get((z, z + 1)) for z in (z_a, z_a + 1)]
    return all(p is not None and sift_trusted(p) for p in links)


def bridge_pairs(
    zs: Sequence[int],
    first: Mapping[tuple[int, int], PairResult],
    bad: Mapping[int, str],
) -> list[tuple[int, int, np.ndarray | None]]:
    """Round 2: ``(z_a, z_b, initial)`` for second neighbours and bridges over round-1 cuts.

    ``first`` holds the round-1 results by pair; ``initial`` is the composed estimate when
    both intermediate links succeeded, else None (the matcher searches from scratch).
    """
    s = sorted(int(z) for z in zs)
    pos = {z: i for i, z in enumerate(s)}
    usable = [z for z in s if z not in bad]
    out: dict[tuple[int, int], np.ndarray | None] = {}
    for i in range(len(s) - 2):
        a, b = s[i], s[i + 2]
        if a not in bad and b not in bad:
            out[(a, b)] = composed_estimate(first, a, b) if b - a == 2 else None
    for a, b in neighbour_pairs(s):
        p = first.get((a, b))
        if p is not None and p.ok:
            continue
        left = [z for z in usable if z <= a][-BRIDGE_REACH:]
        right = [z for z in usable if z >= b][:BRIDGE_REACH]
        for za in left:
            for zb in right:
                if pos[zb] - pos[za] >= 2 and zb - za <= MAX_BRIDGE and (za, zb) not in out:
                    out[(za, zb)] = None
    return [(a, b, m) for (a, b), m in sorted(out.items())]


def failed_neighbours(pairs: Sequence[PairResult]) -> list[PairResult]:
    """The failed (z, z+1) pairs."""
    return [p for p in pairs if p.distance == 1 and not p.ok]


def summary_lines(alignment, n_slices: int) -> list[str]:
    """Console / run.log lines: pairs by kind and status, gaps and bad slices."""
    from emflow.align.solve import KINDS

    names = {"neighbour": "neighbours", "second": "second neighbours", "bridge": "bridges"}
    counts = alignment.pair_summary()
    parts = []
    for kind in KINDS:
        c = counts[kind]
        total = sum(c.values())
        if total:
            parts.append(
                f"{names[kind]} {c['matched']}/{total} matched ({c['failed']} failed, "
                f"{c['rejected']} rejected)"
            )
    lines = [f"pairs: {'; '.join(parts)}"]
    for g in alignment.gaps:
        links = ", ".join(f"z{a}→z{b}" for a, b in g["links"]) or "none"
        where = f"z{g['after']}|z{g['before']}"
        if g["status"] == "bridged":
            lines.append(f"gap {where} bridged by {len(g['links'])} checked link(s): {links}")
        else:
            lines.append(f"gap {where} NOT bridged ({g['status']}): placed by {g['placed_by']}")
    if alignment.bad_slices:
        shown = {"bridge": "interpolated pose", "fill_previous": "previous slice", "zero": "zeros"}
        lines.append(
            f"bad slices ({len(alignment.bad_slices)} of {n_slices}, rendered as "
            f"{shown.get(alignment.bad_slice_policy, alignment.bad_slice_policy)} per "
            f"align.bad_slices): "
            + ", ".join(f"z{z} ({why})" for z, why in sorted(alignment.bad_slices.items()))
        )
    return lines


def check_neighbours(
    pairs: Sequence[PairResult], say: Callable[[str], None]
) -> tuple[list[PairResult], bool]:
    """Warn when more than 10 % of the (z, z+1) pairs failed; returns them and whether more
    than half failed (the caller stops the run)."""
    first = [p for p in pairs if p.distance == 1]
    failed = failed_neighbours(pairs)
    if not first:
        return failed, False
    frac = len(failed) / len(first)
    if frac > WARN_FAILED_FRACTION:
        listing = "; ".join(f"z{p.z_a}→z{p.z_b}: {p.reason}" for p in failed[:10])
        more = f" (and {len(failed) - 10} more in qc/pairs.csv)" if len(failed) > 10 else ""
        say(
            f"warning: {len(failed)} of {len(first)} neighbour pairs failed ({100 * frac:.0f} %): "
            f"{listing}{more}"
        )
    return failed, frac > MAX_FAILED_FRACTION
