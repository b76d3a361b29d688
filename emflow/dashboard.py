"""The lattice page on the scheduler's own Dask dashboard.

* ``/emflow`` — a Bokeh page: the stage x unit grid of each run coloured by
  unit state (stages top to bottom in run order, units left to right; stages
  with more than :data:`MAX_COLUMNS` units are binned and a bin shows its most
  urgent state: failed > orphaned > running > waiting > done > skipped), a
  table of per-stage counts, rate and ETA, and the failed units with their
  errors. Refreshed every second.
* ``/emflow/lattice.json`` — the same data as JSON
  (:meth:`emflow.lattice.Lattice.snapshot`); ``?run=<run_id>`` selects a run,
  ``?cells=0`` drops the per-unit state letters.

Both are installed by :class:`emflow.lattice.LatticePlugin` when it starts
(:func:`install`); :func:`dashboard_url` gives the page's address for a client.
"""

from __future__ import annotations

import html
import logging
import math
import time
from typing import Any

from emflow.lattice import PLUGIN_NAME, UnitState

__all__ = ["COLORS", "MAX_COLUMNS", "dashboard_url", "grid_data", "install"]

logger = logging.getLogger(__name__)

PAGE = "/emflow"
JSON_ROUTE = "/emflow/lattice.json"
MAX_COLUMNS = 400  # grid columns per stage; beyond that units are binned
COLORS = {
    "waiting": "#d9d9d9",
    "running": "#1f77b4",
    "done": "#2ca02c",
    "failed": "#d62728",
    "skipped": "#a1d99b",
    "orphaned": "#ff7f0e",
}
_PRIORITY = "forwds"  # failed, orphaned, running, waiting, done, skipped
_NAME = {s.code: s.value for s in UnitState}


def dashboard_url(client: Any) -> str:
    """Address of the ``/emflow`` page on the dashboard of ``client``'s scheduler."""
    link = str(client.dashboard_link)
    base, sep, last = link.rstrip("/").rpartition("/")
    if sep and last == "status":
        return f"{base}{PAGE}"
    return link.rstrip("/") + PAGE


def _prefix(scheduler: Any) -> str:
    """The dashboard's URL prefix (``--dashboard-prefix``), read from the ``/status`` Bokeh app."""
    for app in getattr(scheduler.http_application, "applications", []):
        p = getattr(app, "_prefix", None)
        if isinstance(p, str) and p.strip("/"):
            return "/" + p.strip("/")
    return ""


def install(scheduler: Any, plugin: Any) -> None:
    """Add the JSON route and the Bokeh page to a running scheduler (no-op without a dashboard)."""
    http_app = getattr(scheduler, "http_application", None)
    if http_app is None:
        return
    prefix = _prefix(scheduler)
    try:
        from distributed.http.utils import RequestHandler

        class LatticeJSON(RequestHandler):
            def get(self) -> None:
                run = self.get_argument("run", None)
                cells = self.get_argument("cells", "1") not in ("0", "false", "no")
                self.set_header("Content-Type", "application/json")
                self.set_header("Cache-Control", "no-store")
                import json

                self.write(json.dumps(plugin.snapshot(run, cells=cells)))

        http_app.add_handlers(
            r".*", [(prefix + JSON_ROUTE, LatticeJSON, {"dask_server": scheduler})]
        )
    except Exception:
        logger.warning("emflow: could not add %s", JSON_ROUTE, exc_info=True)
    try:
        from distributed.dashboard.core import BokehApplication
        from tornado.ioloop import IOLoop

        app = BokehApplication({PAGE: lattice_doc}, scheduler, prefix=prefix or "/")
        http_app.add_application(app)
        app.initialize(IOLoop.current())
    except Exception:  # no bokeh: the JSON route still works
        logger.warning("emflow: could not add the %s dashboard page", PAGE, exc_info=True)


# --------------------------------------------------------------------------- page data


def _bin_state(codes: str) -> str:
    for c in _PRIORITY:
        if c in codes:
            return c
    return "w"


def grid_data(snapshot: dict[str, Any], max_columns: int = MAX_COLUMNS) -> dict[str, list[Any]]:
    """Columns of the grid's rectangles from a snapshot: one rect per unit, or per bin of units."""
    data: dict[str, list[Any]] = {
        k: [] for k in ("x", "y", "w", "color", "state", "units", "detail")
    }
    for run in snapshot["runs"]:
        many = len(snapshot["runs"]) > 1
        for st in run["stages"]:
            cells: str = st.get("cells", "")
            total = len(cells)
            if not total:
                continue
            label = f"{run['run_id'][:8]}/{st['stage']}" if many else st["stage"]
            size = max(1, math.ceil(total / max_columns))
            ncol = math.ceil(total / size)
            for b in range(ncol):
                chunk = cells[b * size : (b + 1) * size]
                code = _bin_state(chunk)
                data["x"].append((b + 0.5) / ncol)
                data["w"].append(1.0 / ncol)
                data["y"].append(label)
                data["color"].append(COLORS[_NAME[code]])
                data["state"].append(_NAME[code])
                lo, hi = b * size, min(total, (b + 1) * size) - 1
                data["units"].append(str(lo) if lo == hi else f"{lo}-{hi}")
                if size == 1:
                    data["detail"].append(_NAME[code])
                else:
                    counts = {_NAME[c]: chunk.count(c) for c in set(chunk)}
                    data["detail"].append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return data


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def summary_html(snapshot: dict[str, Any]) -> str:
    """Per-stage counts, rate and ETA, then failed units with their errors, as an HTML fragment."""
    states = [s.value for s in UnitState]
    parts = []
    for run in snapshot["runs"]:
        flags = []
        if run["paused"]:
            flags.append("<b style='color:#b15928'>PAUSED</b>")
        if run["paused_stages"]:
            flags.append("paused stages: " + html.escape(", ".join(run["paused_stages"])))
        if run["cancelled"]:
            flags.append("<b style='color:#d62728'>CANCELLED</b>")
        parts.append(
            f"<h3 style='margin:4px 0'>run {html.escape(run['run_id'])} {' '.join(flags)}</h3>"
            "<div style='font-size:11px;color:#666'>"
            f"{html.escape(str(run.get('run_dir') or ''))}</div>"
        )
        head = "".join(
            f"<th style='padding:2px 8px'><span style='color:{COLORS[s]}'>&#9632;</span> {s}</th>"
            for s in states
        )
        rows = []
        for st in run["stages"]:
            c = st["counts"]
            cells = "".join(
                f"<td style='text-align:right;padding:2px 8px'>{c[s]}</td>" for s in states
            )
            rows.append(
                f"<tr><td style='padding:2px 8px'><b>{html.escape(st['stage'])}</b></td>"
                f"<td style='text-align:right;padding:2px 8px'>{st['total']}</td>{cells}"
                f"<td style='text-align:right;padding:2px 8px'>{st['rate_per_s']:.2f}/s</td>"
                f"<td style='text-align:right;padding:2px 8px'>{_fmt_s(st['eta_s'])}</td></tr>"
            )
        parts.append(
            "<table style='border-collapse:collapse;font-family:sans-serif;font-size:13px'>"
            "<tr><th style='padding:2px 8px'>stage</th><th>units</th>"
            f"{head}<th>rate</th><th>ETA</th></tr>" + "".join(rows) + "</table>"
        )
        failed = [(st["stage"], f) for st in run["stages"] for f in st["failed"]]
        if failed:
            items = "".join(
                f"<li><b>{html.escape(stage)}[{f['index']}]</b> attempts {f['attempts']}"
                f" on {html.escape(str(f.get('worker') or '?'))}: "
                f"<code>{html.escape(str(f.get('error') or ''))[:500]}</code></li>"
                for stage, f in failed[:50]
            )
            more = f"<li>… and {len(failed) - 50} more</li>" if len(failed) > 50 else ""
            parts.append(
                f"<h4 style='margin:6px 0;color:#d62728'>failed units ({len(failed)})</h4>"
                f"<ul style='font-size:12px'>{items}{more}</ul>"
            )
    if not snapshot["runs"]:
        parts.append("<p>No emflow run has reached this scheduler yet.</p>")
    return "".join(parts)


def lattice_doc(scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """Bokeh document of the ``/emflow`` page (``doc_fn`` of ``BokehApplication``)."""
    from bokeh.layouts import column
    from bokeh.models import ColumnDataSource, Div, FactorRange, HoverTool
    from bokeh.plotting import figure

    plugin = scheduler.plugins.get(PLUGIN_NAME)

    def snap() -> dict[str, Any]:
        if plugin is None:
            return {"time": time.time(), "runs": []}
        return plugin.snapshot(None, cells=True)

    s0 = snap()
    source = ColumnDataSource(grid_data(s0))
    factors = list(dict.fromkeys(reversed(source.data["y"]))) or ["(no stage yet)"]
    fig = figure(
        y_range=FactorRange(*factors),
        x_range=(0, 1),
        height=80 + 34 * len(factors),
        sizing_mode="stretch_width",
        title="emflow lattice: units of each stage (left → right), coloured by state",
        tools="",
        toolbar_location=None,
    )
    fig.rect(
        x="x",
        y="y",
        width="w",
        height=0.85,
        fill_color="color",
        line_color="white",
        line_width=0.5,
        source=source,
    )
    fig.add_tools(
        HoverTool(tooltips=[("stage", "@y"), ("unit(s)", "@units"), ("state", "@detail")])
    )
    fig.xaxis.visible = False
    fig.xgrid.visible = False
    fig.ygrid.visible = False
    legend = Div(
        text=" ".join(
            f"<span style='margin-right:14px'><span style='color:{c};font-size:16px'>&#9632;</span>"
            f" {s}</span>"
            for s, c in COLORS.items()
        ),
        styles={"font-family": "sans-serif", "font-size": "13px"},
    )
    table = Div(text=summary_html(s0), sizing_mode="stretch_width")
    title = Div(text="<h2 style='font-family:sans-serif;margin:4px 0'>emflow — lattice</h2>")
    doc.title = "emflow: lattice"
    doc.add_root(column(title, legend, fig, table, sizing_mode="stretch_width"))

    def update() -> None:
        s = snap()
        data = grid_data(s)
        new_factors = list(dict.fromkeys(reversed(data["y"]))) or ["(no stage yet)"]
        if new_factors != list(fig.y_range.factors):
            fig.y_range.factors = new_factors
            fig.height = 80 + 34 * len(new_factors)
        source.data = data
        table.text = summary_html(s)

    doc.add_periodic_callback(update, 1000)
