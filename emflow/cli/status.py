"""``emflow status | pause | resume | cancel``: look at and steer a run through its run folder.

``RUN`` is the output directory, its ``emflow-run`` folder, or the recipe. A
live run is reached through the scheduler address the driver recorded in
``emflow-run/scheduler.json``; ``status`` falls back to the journal when no
run is live. ``resume`` continues a *paused* live run; an interrupted run is
resumed by running ``emflow run`` again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from emflow import lattice as lat
from emflow.errors import EmflowError, OutputError

RunArg = Annotated[
    Path, typer.Argument(help="output directory, its emflow-run folder, or the recipe YAML")
]
StageOpt = Annotated[
    str | None, typer.Option("--stage", help="only this stage (default: the whole run)")
]
RUN_FOLDER = "emflow-run"


class NoLiveRun(EmflowError):
    """The run is not running (its scheduler cannot be reached)."""


def find_run_dir(path: Path) -> Path:
    """The run folder of ``path`` (output dir, run folder or recipe file)."""
    p = Path(path)
    if p.is_file() and p.suffix in (".yaml", ".yml", ".json"):
        from emflow.recipe import load_recipe

        p = load_recipe(p).output_path / RUN_FOLDER
    if (p / lat.RUN_JSON).exists() or (p / lat.JOURNAL).exists():
        return p
    if (p / RUN_FOLDER / lat.RUN_JSON).exists() or (p / RUN_FOLDER / lat.JOURNAL).exists():
        return p / RUN_FOLDER
    raise OutputError(
        f"{path} holds no emflow run (no {RUN_FOLDER}/{lat.RUN_JSON}); "
        "pass the output_dir of a run, "
        "its emflow-run folder, or its recipe"
    )


def _require_live(run_dir: Path, live: Any) -> tuple[Any, dict[str, Any]]:
    if live is None:
        raise NoLiveRun(
            f"no live run in {run_dir}: its scheduler is not reachable "
            "(the run finished or stopped); "
            "'emflow status' shows the journal, 'emflow run' resumes an interrupted run"
        )
    return live


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 90 else (f"{s / 60:.0f}min" if s < 5400 else f"{s / 3600:.1f}h")


def format_snapshot(snap: dict[str, Any], *, source: str) -> str:
    """Human-readable status: one line per stage with counts, rate and ETA, then failed units."""
    lines: list[str] = []
    states = [s.value for s in lat.UnitState]
    for run in snap["runs"]:
        flags = [f for f, on in (("PAUSED", run["paused"]), ("CANCELLED", run["cancelled"])) if on]
        if run["paused_stages"]:
            flags.append("paused stages: " + ",".join(run["paused_stages"]))
        lines.append(f"run {run['run_id']} ({source}) {' '.join(flags)}".rstrip())
        lines.append(
            f"{'stage':<12}{'units':>7}"
            + "".join(f"{s:>10}" for s in states)
            + f"{'rate/s':>9}{'ETA':>8}"
        )
        for st in run["stages"]:
            c = st["counts"]
            lines.append(
                f"{st['stage']:<12}{st['total']:>7}"
                + "".join(f"{c[s]:>10}" for s in states)
                + f"{st['rate_per_s']:>9.2f}{_fmt_s(st['eta_s']):>8}"
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


def status(
    run: RunArg, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False
) -> None:
    """Show per-stage unit counts, rates, ETA and failed units, live or from the journal."""
    run_dir = find_run_dir(run)
    snap: dict[str, Any] | None = None
    source = "journal"
    with lat.live_run(run_dir) as live:
        if live is not None:
            client, info = live
            try:
                snap = client.sync(
                    client.scheduler.emflow_lattice, run_id=info.get("run_id"), cells=as_json
                )
            except Exception:
                snap = None
            if snap is not None and snap["runs"]:
                source = f"live, scheduler {info['address']}"
                if info.get("dashboard"):
                    source += f", dashboard {info['dashboard']}"
            else:
                snap = None
    if snap is None:
        snap = lat.summarize_journal(run_dir)
        if (run_dir / "COMPLETE").exists():
            source = "journal, run complete"
    if as_json:
        typer.echo(json.dumps({"source": source, **snap}))
    else:
        typer.echo(format_snapshot(snap, source=source))


def _control(run: Path, op: str, **kw: Any) -> dict[str, Any]:
    run_dir = find_run_dir(run)
    with lat.live_run(run_dir) as live:
        client, info = _require_live(run_dir, live)
        ans = client.sync(getattr(client.scheduler, op), run_id=info.get("run_id"), **kw)
    if not isinstance(ans, dict):
        raise NoLiveRun(
            f"the scheduler of {run_dir} has no emflow lattice plugin; cannot {op[7:]} the run"
        )
    with lat.Journal(
        run_dir
    ) as j:  # the driver also journals what it observes; this is the request
        j.append(f"{op[7:]}_request", **kw)
    return ans


def pause(run: RunArg, stage: StageOpt = None) -> None:
    """Stop releasing new units (of one stage or the whole run); running units finish."""
    _control(run, "emflow_pause", stage=stage)
    typer.echo(
        f"paused {'stage ' + stage if stage else 'run'}; running units finish, no new unit starts"
    )


def resume(run: RunArg, stage: StageOpt = None) -> None:
    """Release units of a paused run (or stage) again."""
    _control(run, "emflow_resume", stage=stage)
    typer.echo(f"resumed {'stage ' + stage if stage else 'run'}")


def cancel(run: RunArg) -> None:
    """Stop the run cleanly: no new units, running units finish; 'emflow run' resumes it later."""
    _control(run, "emflow_cancel")
    typer.echo(
        "cancel requested; running units finish, then the run stops (resumable with 'emflow run')"
    )


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("cancel")(cancel)
