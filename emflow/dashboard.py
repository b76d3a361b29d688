"""The lattice page on the scheduler's own Dask dashboard.

* ``/emflow`` — a Bokeh page in the Dask dashboard's frame (its navigation bar,
  which also gains an *Emflow* entry on every Dask page): the stage x unit grid
  of each run coloured by unit state, every stage planned from the start
  (stages top to bottom in run order, units left to right; stages with more
  than :data:`MAX_COLUMNS` units are binned and a bin shows its most urgent
  state: failed > orphaned > running > queued > waiting > redone > done >
  skipped). Hovering a cell shows its unit(s) and label (a slab's z range).
  Below: per-stage counts, lost attempts, rate and ETA (frozen while paused),
  and the failed units with their errors. Refreshed every second.
* ``/emflow/lattice.json`` — the same data as JSON
  (:meth:`emflow.lattice.Lattice.snapshot`); ``?run=<run_id>`` selects a run,
  ``?cells=0`` drops the per-unit state letters and labels.

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
    "queued": "#9ecae1",
    "running": "#1f77b4",
    "done": "#2ca02c",
    "redone": "#6a3d9a",
    "failed": "#d62728",
    "skipped": "#a1d99b",
    "orphaned": "#ff7f0e",
}
#: the Dask dashboard's page frame (navigation bar) with this page's title
_FRAME = """{% extends "simple.html" %}
{% block extra_resources %}<script>document.title = "emflow: lattice";</script>{% endblock %}"""
_PRIORITY = "forqweds"  # failed, orphaned, running, queued, waiting, redone, done, skipped
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
    """Add the JSON route and the Bokeh page to a running scheduler (no-op without a dashboard).

    A scheduler whose dashboard loads on its first visit (emflow's local cluster,
    :mod:`emflow.cluster.lazy_dashboard`) gets the Bokeh page once the dashboard has loaded,
    so starting the plugin does not import Bokeh.
    """
    http_app = getattr(scheduler, "http_application", None)
    if http_app is None:
        return
    from emflow.cluster.lazy_dashboard import ATTRIBUTE

    on_visit = getattr(scheduler, ATTRIBUTE, None)
    if on_visit is not None:
        _add_json(scheduler, plugin, "")  # the on-visit dashboard has no prefix
        on_visit.then(lambda: _add_page(scheduler, _prefix(scheduler)))
        return
    prefix = _prefix(scheduler)
    _add_json(scheduler, plugin, prefix)
    _add_page(scheduler, prefix)


def _add_json(scheduler: Any, plugin: Any, prefix: str) -> None:
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

        scheduler.http_application.add_handlers(
            r".*", [(prefix + JSON_ROUTE, LatticeJSON, {"dask_server": scheduler})]
        )
    except Exception:
        logger.warning("emflow: could not add %s", JSON_ROUTE, exc_info=True)


def _add_page(scheduler: Any, prefix: str) -> None:
    try:
        from distributed.dashboard.core import BokehApplication
        from tornado.ioloop import IOLoop

        app = BokehApplication(
            {PAGE: lattice_doc}, scheduler, prefix=prefix or "/",
            template_variables=_dask_navigation(scheduler),
        )  # fmt: skip
        scheduler.http_application.add_application(app)
        app.initialize(IOLoop.current())
    except Exception:  # no bokeh: the JSON route still works
        logger.warning("emflow: could not add the %s dashboard page", PAGE, exc_info=True)


def _dask_navigation(scheduler: Any) -> dict[str, Any]:
    """The Dask dashboard's navigation (its template variables), with an *Emflow* entry added.

    distributed builds the navigation bar of its pages from one memoised dict per
    scheduler whose ``pages`` list every page shares, so adding ``emflow`` there links
    the lattice page from every Dask page (and the lattice page gets the same bar).
    """
    try:
        from distributed.dashboard.scheduler import template_variables

        tv = template_variables(scheduler)
    except Exception:  # another distributed version: the page without the Dask frame
        return {}
    pages = tv.get("pages")
    if isinstance(pages, list) and PAGE.strip("/") not in pages:
        pages.append(PAGE.strip("/"))
    return tv


# --------------------------------------------------------------------------- page data


def _bin_state(codes: str) -> str:
    for c in _PRIORITY:
        if c in codes:
            return c
    return "w"


def _bin_label(labels: list[str] | None, lo: int, hi: int) -> str:
    if not labels or hi >= len(labels):
        return ""
    return labels[lo] if lo == hi else f"{labels[lo]} … {labels[hi]}"


def grid_data(snapshot: dict[str, Any], max_columns: int = MAX_COLUMNS) -> dict[str, list[Any]]:
    """Columns of the grid's rectangles from a snapshot: one rect per unit, or per bin of units."""
    data: dict[str, list[Any]] = {
        k: [] for k in ("x", "y", "w", "color", "state", "units", "label", "detail")
    }
    for run in snapshot["runs"]:
        many = len(snapshot["runs"]) > 1
        for st in run["stages"]:
            cells: str = st.get("cells", "")
            labels = st.get("labels")
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
                data["label"].append(_bin_label(labels, lo, hi))
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
    """Per-stage counts, lost attempts, rate and ETA, then failed units, as an HTML fragment.

    A stage only planned so far shows its unit count as ``≈N``; while the run is paused
    the ETA (which excludes paused time) is marked *paused*.
    """
    states = [s.value for s in UnitState]
    td = "<td style='text-align:right;padding:2px 8px'>"
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
            cells = "".join(f"{td}{c.get(s, 0)}</td>" for s in states)
            total = f"&asymp;{st['total']}" if st.get("planned") else str(st["total"])
            paused = run["paused"] or st["stage"] in run["paused_stages"]
            eta = _fmt_s(st["eta_s"]) + (" (paused)" if paused and st["eta_s"] else "")
            rows.append(
                f"<tr><td style='padding:2px 8px'><b>{html.escape(st['stage'])}</b></td>"
                f"{td}{total}</td>{cells}{td}{st.get('lost', 0)}</td>"
                f"{td}{st['rate_per_s']:.2f}/s</td>{td}{eta}</td></tr>"
            )
        parts.append(
            "<table style='border-collapse:collapse;font-family:sans-serif;font-size:13px'>"
            "<tr><th style='padding:2px 8px'>stage</th><th>units</th>"
            f"{head}<th>lost</th><th>rate</th><th>ETA</th></tr>" + "".join(rows) + "</table>"
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
        HoverTool(
            tooltips=[
                ("stage", "@y"),
                ("unit(s)", "@units"),
                ("", "@label"),
                ("state", "@detail"),
            ]
        )
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
    if extra.get("pages"):  # inside the Dask dashboard's frame (navigation bar)
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        doc.template = env.from_string(_FRAME)
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME

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
