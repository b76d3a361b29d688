"""The functions a notebook calls (re-exported from :mod:`emflow`).

A recipe can be a :class:`~emflow.recipe.Recipe`, a path to a YAML file or a dict with the
same fields. Messages go through :mod:`logging` (logger ``"emflow"``; a console handler is
added unless logging is configured, see :mod:`emflow.logs`); progress shows as a table in
Jupyter, a bar on a terminal, log lines elsewhere (:mod:`emflow.progress`). Every run
writes ``<output_dir>/emflow-run/run.log``.

Dask, distributed and tensorstore are imported where used, so ``import emflow`` stays cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emflow import logs
from emflow import progress as progress_display
from emflow.discover import SliceCatalog, discover_recipe
from emflow.recipe import Recipe, load_recipe, recipe_from_dict
from emflow.view import Served, serve
from emflow.volume import open

if TYPE_CHECKING:  # imported where used: Dask and tensorstore load only when a run starts
    from emflow.align.solve import Alignment
    from emflow.pipeline import RunResult
    from emflow.plan import Plan

__all__ = ["Served", "discover", "open", "plan", "run", "serve"]

RecipeLike = Recipe | str | Path | dict
#: the logger of a run's messages (the pipeline's own)
logger = logging.getLogger("emflow.pipeline")
RUN_FOLDER = "emflow-run"


def as_recipe(recipe: RecipeLike) -> Recipe:
    """A validated :class:`Recipe` from a Recipe, a YAML path or a dict (relative paths in a
    dict resolve from the current directory)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    return load_recipe(recipe)


def run(
    recipe: RecipeLike,
    *,
    client: Any = None,
    restart: bool = False,
    progress: bool | None = None,
    log: Callable[[str], Any] | None = None,
    alignment: str | Path | None = None,
) -> RunResult:
    """Run an ingest: discover → align → render → write every output's pyramid.

    Parameters
    ----------
    recipe
        A Recipe, a recipe YAML path, or a dict of recipe fields.
    client
        A ``distributed.Client`` to run the units on; None runs them here, in order.
    restart
        Discard an earlier (interrupted or finished) run of this recipe's output_dir;
        otherwise a run resumes where the last one stopped.
    progress
        None: a table in Jupyter, a bar on a terminal, log lines elsewhere; False: none.
    log
        Also send each message to this callable (e.g. ``print``); then no console log
        handler is added. Messages always go to logging and ``run.log``.
    alignment
        A saved ``alignment.json`` to re-export with (no feature matching).

    Returns
    -------
    RunResult
        Output paths, plan, catalog, alignment, stage times; shows a summary in Jupyter and
        opens with :func:`emflow.open`. A summary is also logged when the run ends.
    """
    from emflow.pipeline import run as _run
    from emflow.reprs import run_text

    if log is None:
        logs.use_default_handler()
        say: Callable[[str], Any] = logger.info
    else:

        def say(msg: str) -> None:
            logger.info(msg)
            log(msg)

    r = as_recipe(recipe)
    run_log = logs.RunLog(r.run_folder)
    # run.log starts with the first stage (the run folder is checked and claimed by then)
    with run_log, progress_display.run_board(on_stage=run_log.open):
        try:
            result = _run(
                r,
                client=client,
                restart=restart,
                progress=progress,
                log=say,
                alignment_path=alignment,
            )
        except BaseException as exc:  # into run.log; the caller sees the exception itself
            logger.error(
                "run stopped: %s: %s", type(exc).__name__, exc, extra={"emflow_shown": True}
            )
            raise
        for line in run_text(result):
            say(line)
    return result


def discover(recipe: RecipeLike) -> SliceCatalog:
    """The source slices of a recipe, in z order (reads file headers only).

    The catalog's ``shape_zyx`` is (slices, y px, x px); ``summary()`` prints it; in
    Jupyter it shows as a table.
    """
    return discover_recipe(as_recipe(recipe))


def _frame_of(alignment: Alignment | RunResult | str | Path | None) -> tuple[int, int] | None:
    """The output frame (y, x px) of an Alignment or a RunResult (None for a path or None)."""
    if alignment is None or isinstance(alignment, (str, Path)):
        return None
    if hasattr(alignment, "frame_shape_yx"):
        return tuple(int(v) for v in alignment.frame_shape_yx)  # type: ignore[return-value]
    if hasattr(alignment, "plan") and hasattr(alignment, "run_dir"):  # a RunResult
        return tuple(alignment.plan.frame_shape_yx)  # type: ignore[return-value]
    raise TypeError(
        "alignment= takes an Alignment, a RunResult or an alignment.json path, not "
        f"{type(alignment).__name__}"
    )


def plan(
    recipe: RecipeLike, *, alignment: Alignment | RunResult | str | Path | None = None
) -> Plan:
    """The plan a run of this recipe executes: levels, stages, units, memory per unit.

    The output frame is the aligned one when an alignment is known: ``alignment`` (an
    :class:`~emflow.align.solve.Alignment` you computed, a RunResult, or an alignment.json
    path), else the run folder's ``alignment.json`` of an earlier run; without one it is
    the source slices' and an aligned run plans again after its solve (the frame usually
    grows by the drift; a log line says so). A run folder holding this recipe's stored plan
    returns that plan.
    """
    from emflow.plan import plan_output, plan_preview, windowed_stack

    r = as_recipe(recipe)
    cat = discover_recipe(r)
    frame = _frame_of(alignment)
    if frame is not None:  # an aligned run: its bricks never read slices by window
        windowed = windowed_stack(r, cat.slices, aligned=True)
        return plan_output(r, len(cat.slices), frame, cat.dtype, windowed=windowed)
    p, note = plan_preview(
        r, len(cat.slices), cat.shape_yx, cat.dtype, alignment_path=alignment, refs=cat.slices
    )
    logs.use_default_handler()
    logger.info(note)
    return p
