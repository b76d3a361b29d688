"""The Dask dashboard of emflow's local cluster, loaded on its first visit instead of at start.

The dashboard is a Bokeh application; importing Bokeh and building the dashboard's pages
costs the driver about 0.6 CPU-s (measured on the 32 x 256² PNG run: 2.63 -> 1.98 CPU-s per
run without it), and the driver is one process: its main thread, the in-process scheduler
and the cluster's start share one interpreter lock. So :func:`serve_on_visit` starts nothing:
it puts a catch-all page on the scheduler's HTTP server (the port of ``client.dashboard_link``,
which works from the start). The first request for a dashboard page imports Bokeh in a
thread (the scheduler keeps running), connects the dashboard as Dask does it, removes the
catch-all and redirects the browser to the page it asked for, now served by Dask. A run
nobody watches never loads Bokeh.

Code that adds its own Bokeh page to this scheduler (:func:`emflow.dashboard.install`) asks
:attr:`ATTRIBUTE` on the scheduler for the loader and hands it a callback (:meth:`OnVisit.then`)
that runs on the scheduler's event loop once the dashboard is connected.

Dask internals this relies on (distributed 2026.8): the scheduler's ``http_application`` is a
``distributed.http.routing.RoutingApplication`` that tries its own routes, then each
application in its ``applications`` list in order; ``distributed.dashboard.scheduler.connect(
application, http_server, scheduler, prefix)`` adds the dashboard, as ``Scheduler.__init__``
does when it has one.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: the scheduler attribute that holds its :class:`OnVisit` loader while one exists
ATTRIBUTE = "emflow_dashboard_on_visit"
#: what connects the Bokeh dashboard to a scheduler's HTTP server (imports Bokeh)
DASHBOARD_MODULE = "distributed.dashboard.scheduler"


class OnVisit:
    """Loads and connects the Dask dashboard of ``scheduler`` when a page is first asked for.

    Create it on the scheduler's event loop; its methods run there too.
    """

    def __init__(self, scheduler: Any) -> None:
        from tornado import web

        self.scheduler = scheduler
        self.loaded = False  # the dashboard is connected
        self.failed: BaseException | None = None  # no Bokeh: Dask's plain routes only
        self._then: list[Callable[[], object]] = []
        self._loading: asyncio.Future[None] | None = None
        self.app = web.Application([(r"/.*", _first_visit_handler(), {"loader": self})])
        scheduler.http_application.add_application(self.app)  # after Dask's own applications
        setattr(scheduler, ATTRIBUTE, self)

    def then(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` (on the scheduler's loop) once the dashboard is connected; now if it
        is; never if it cannot load (no Bokeh)."""
        if self.loaded:
            callback()
        elif self.failed is None:
            self._then.append(callback)

    async def load(self) -> None:
        """Import and connect the dashboard (once; later callers wait for the first)."""
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
        await asyncio.shield(self._loading)

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:  # in a thread: the scheduler's loop goes on meanwhile
            module = await loop.run_in_executor(None, importlib.import_module, DASHBOARD_MODULE)
        except ImportError as exc:
            self.failed = exc
            self._then.clear()
            logger.info("no Bokeh: the Dask dashboard has its plain routes only (%s)", exc)
            return
        finally:
            apps = self.scheduler.http_application.applications
            if self.app in apps:  # the catch-all would hide the dashboard's pages
                apps.remove(self.app)
        module.connect(
            self.scheduler.http_application, self.scheduler.http_server, self.scheduler, prefix="/"
        )
        self.loaded = True
        callbacks, self._then = self._then, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one page failing does not hide the others
                logger.warning("emflow: a dashboard page could not be added", exc_info=True)


def _first_visit_handler() -> type:
    """The catch-all page's handler class (tornado is imported with Dask, not here)."""
    from tornado import web

    class FirstVisit(web.RequestHandler):
        """Any page the scheduler's other routes do not serve: load the dashboard, then send
        the browser to the same address again (now Dask's page, or its "not found")."""

        def initialize(self, loader: OnVisit) -> None:
            self.loader = loader

        async def get(self, *args: Any) -> None:
            await self.loader.load()
            if self.loader.failed is not None:
                raise web.HTTPError(404)
            self.redirect(self.request.uri or "/")

    return FirstVisit


def serve_on_visit(cluster: Any) -> OnVisit:
    """Give a started ``LocalCluster`` whose scheduler has no dashboard yet (``dashboard=False``)
    the on-visit loader; returns it."""

    async def install(scheduler: Any) -> OnVisit:  # on the scheduler's loop
        return OnVisit(scheduler)

    return cluster.sync(install, cluster.scheduler)
