"""``emflow status | pause | resume | cancel``: look at and steer a run through its run folder.

``RUN`` is the output directory, its ``emflow-run`` folder, or the recipe. A
live run is reached through the scheduler address the driver recorded in
``emflow-run/scheduler.json``, with the client credentials it keeps in
``emflow-run/secrets/`` (readable by the run's owner only) on a TLS cluster. When
the run is not live (finished, stopped, killed, or its scheduler unreachable) every
command says why on stderr, shows the journal's view and exits 0. ``resume``
continues a *paused* live run; an interrupted run is resumed by running ``emflow
run`` again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from emflow.errors import OutputError

if TYPE_CHECKING:
    from emflow import lattice as lat

RunArg = Annotated[
    Path, typer.Argument(help="output directory, its emflow-run folder, or the recipe YAML")
]
StageOpt = Annotated[
    str | None, typer.Option("--stage", help="only this stage (default: the whole run)")
]
RUN_FOLDER = "emflow-run"


def find_run_dir(path: Path) -> Path:
    """The run folder of ``path`` (output dir, run folder or recipe file)."""
    from emflow import lattice as lat  # on use: distributed is not for every command

    p = Path(path)
    if p.is_file() and p.suffix in (".yaml", ".yml", ".json"):
        from emflow.recipe import load_recipe

        p = load_recipe(p).run_folder
    if (p / lat.RUN_JSON).exists() or (p / lat.JOURNAL).exists():
        return p
    if (p / RUN_FOLDER / lat.RUN_JSON).exists() or (p / RUN_FOLDER / lat.JOURNAL).exists():
        return p / RUN_FOLDER
    raise OutputError(
        f"{path} holds no emflow run (no {RUN_FOLDER}/{lat.RUN_JSON}); "
        "pass the output_dir of a run, "
        "its emflow-run folder, or its recipe"
    )


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 90 else (f"{s / 60:.0f}min" if s < 5400 else f"{s / 3600:.1f}h")


def format_snapshot(snap: dict[str, Any], *, source: str) -> str:
    """Human-readable status: one line per stage with counts, redo counts, rate and ETA,
    then failed units. ``redone``: units done after a failed or lost attempt; ``lost``:
    attempts lost with their worker (or with a driver that stopped)."""
    from emflow import lattice as lat  # on use: distributed is not for every command

    lines: list[str] = []
    states = [s.value for s in lat.UnitState]
    for run in snap["runs"]:
        flags = [f for f, on in (("PAUSED", run["paused"]), ("CANCELLED", run["cancelled"])) if on]
        if run["paused_stages"]:
            flags.append("paused stages: " + ",".join(run["paused_stages"]))
        lines.append(f"run {run['run_id']} ({source}) {' '.join(flags)}".rstrip())
        lines.append(
            f"{'stage':<12}{'units':>7}"
            + "".join(f"{s:>9}" for s in states)
            + f"{'lost':>6}{'rate/s':>8}{'ETA':>7}"
        )
        for st in run["stages"]:
            c = st["counts"]
            total = f"~{st['total']}" if st.get("planned") else str(st["total"])
            lines.append(
                f"{st['stage']:<12}{total:>7}"
                + "".join(f"{c.get(s, 0):>9}" for s in states)
                + f"{st.get('lost', 0):>6}{st['rate_per_s']:>8.2f}{_fmt_s(st['eta_s']):>7}"
            )
        if not run["stages"]:
            lines.append("no units recorded yet")
        failed = [(st["stage"], f) for st in run["stages"] for f in st["failed"]]
        if failed:
            lines.append(f"failed units ({len(failed)}):")
            for stage, f in failed:
                lines.append(f"  {stage}[{f['index']}] attempts {f['attempts']}: {f.get('error')}")
    if not snap["runs"]:
        lines.append(f"no units recorded yet ({source})")
    return "\n".join(lines)


def _journal_view(run_dir: Path, contact: lat.RunContact) -> tuple[dict[str, Any], str]:
    from emflow import lattice as lat  # on use: distributed is not for every command

    snap = lat.summarize_journal(run_dir, stopped=contact.stopped)
    if (run_dir / "COMPLETE").exists():
        return snap, "journal, run complete"
    return snap, "journal"


def status(
    run: RunArg, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False
) -> None:
    """Show per-stage unit counts, redo counts, rates, ETA and failed units, live or from the journal.

    A run whose scheduler cannot be reached (stopped, killed, unreachable) is shown from
    its journal, with the reason on stderr; the exit code is 0 either way.
    """
    from emflow import lattice as lat  # on use: distributed is not for every command

    run_dir = find_run_dir(run)
    snap: dict[str, Any] | None = None
    with lat.connect_run(run_dir) as contact:
        if contact.client is not None:
            info = contact.info or {}
            try:
                snap = contact.client.sync(
                    contact.client.scheduler.emflow_lattice,
                    run_id=info.get("run_id"),
                    cells=as_json,
                )
            except Exception as exc:
                contact.reason = f"its scheduler has no emflow lattice ({type(exc).__name__})"
                snap = None
            if snap is not None and snap["runs"]:
                source = f"live, scheduler {info['address']}"
                if info.get("dashboard"):
                    source += f", lattice page {info['dashboard']}"
            else:
                snap = None
    if snap is None:
        snap, source = _journal_view(run_dir, contact)
        if not (run_dir / "COMPLETE").exists():
            typer.echo(f"emflow: the run is not live: {contact.reason}", err=True)
    if as_json:
        typer.echo(json.dumps({"source": source, "live": contact.client is not None, **snap}))
    else:
        typer.echo(format_snapshot(snap, source=source))


def _control(run: Path, op: str, verb: str, **kw: Any) -> dict[str, Any] | None:
    """Send ``op`` to the live run; on a run that is not live say so, show the journal, None."""
    from emflow import lattice as lat  # on use: distributed is not for every command

    run_dir = find_run_dir(run)
    ans: Any = None
    with lat.connect_run(run_dir) as contact:
        if contact.client is not None:
            info = contact.info or {}
            try:
                ans = contact.client.sync(
                    getattr(contact.client.scheduler, op), run_id=info.get("run_id"), **kw
                )
            except Exception as exc:
                contact.reason = f"its scheduler has no emflow lattice ({type(exc).__name__})"
                ans = None
    if not isinstance(ans, dict):
        typer.echo(f"emflow: cannot {verb}: the run is not live: {contact.reason}", err=True)
        snap, source = _journal_view(run_dir, contact)
        typer.echo(format_snapshot(snap, source=source))
        return None
    with lat.Journal(run_dir) as j:  # the driver journals what it observes; this is the request
        j.append(f"{verb}_request", **kw)
    return ans


def pause(
    run: RunArg,
    stage: StageOpt = None,
) -> None:
    """Pause the run (or one stage): no unit starts any more, running units finish.

    Units already queued on a worker go back to waiting. ``emflow resume`` continues.
    """
    if _control(run, "emflow_pause", "pause", stage=stage) is not None:
        typer.echo(
            f"paused {'stage ' + stage if stage else 'run'}: no unit starts from now on; "
            "running units finish"
        )


def resume(run: RunArg, stage: StageOpt = None) -> None:
    """Release units of a paused run (or stage) again."""
    if _control(run, "emflow_resume", "resume", stage=stage) is not None:
        typer.echo(f"resumed {'stage ' + stage if stage else 'run'}")


def cancel(run: RunArg) -> None:
    """Stop the run cleanly: no unit starts any more, running units finish, then the run ends.

    ``emflow run`` with the same recipe resumes it later.
    """
    if _control(run, "emflow_cancel", "cancel") is not None:
        typer.echo(
            "cancel requested: no unit starts from now on; running units finish, then the run "
            "stops (resumable with 'emflow run')"
        )


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("cancel")(cancel)
