"""``emflow run``: run a recipe on a local or HPC/Kubernetes Dask cluster (or serially).

Order matters for safety: the recipe, stack, cluster request and output location
are checked first (:func:`emflow.preflight.preflight`, nothing written); only then
is the run folder made, its ``run.log`` opened, library and worker output routed
to ``libraries.log``, and the run started.

A local cluster starts meanwhile, in a thread (:mod:`emflow.cluster.early`), its workers
forked from a server started first thing, before the recipe is read: it writes
nothing in the run folder or the outputs, and what it prints is held
(:class:`emflow.cli.console.HeldOutput`) until ``libraries.log`` may be written. A run
the checks refuse shuts it down quietly before its one-line error; Ctrl-C while it
starts exits 130 as ever. Other cluster kinds (batch jobs, Kubernetes, an existing
scheduler) start once the checks passed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from emflow.cli.options import (
    ClusterConfigOpt,
    ClusterOpt,
    InsecureOpt,
    MaxWorkersOpt,
    MemoryOpt,
    RecipeArg,
    ThreadsOpt,
    WorkersOpt,
    cluster_request,
)

#: what libraries and local worker processes print, kept in the run folder
LIBRARY_LOG = "libraries.log"
#: at most this long (s) the driver lets the local cluster spawn its workers before its own
#: imports and checks (a config that starts no worker costs this once)
SPAWN_WAIT_S = 0.5
#: the logger of the CLI's own lines (printed by ``say``; run.log through the "emflow" logger)
CLI_LOGGER = "emflow.cli"


class _Terminal(logging.Handler):
    """emflow's own log records on the terminal, one line each: stage lines no bar showed
    (stderr is not a tty), warnings and errors (their tracebacks stay in ``run.log``).
    Skips the ``emflow.cli`` records, which :func:`run`'s ``say`` prints itself."""

    def __init__(self, quiet: bool) -> None:
        super().__init__(logging.WARNING if quiet else logging.INFO)
        self.addFilter(lambda r: not r.name.startswith(CLI_LOGGER))
        self.addFilter(lambda r: not getattr(r, "emflow_shown", False))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().splitlines()[0] if record.getMessage() else ""
            if record.levelno >= logging.WARNING:
                text = f"emflow: {record.levelname.lower()}: {text.removeprefix('emflow: ')}"
            sys.stderr.write(text + "\n")  # the terminal (emflow.cli.console routes fd 2 away)
            sys.stderr.flush()
        except Exception:  # a closed terminal must not end the run
            pass


@contextlib.contextmanager
def _run_logging(run_dir: Path, quiet: bool) -> Iterator[logging.Logger]:
    """Every ``emflow`` record of this run in ``run_dir/run.log`` (:class:`emflow.logs.RunLog`:
    stage lines, warnings, the CLI's own lines, the final error) and on the terminal; yields
    the CLI's logger. The run folder has been claimed: the log is written from the start."""
    from emflow.logs import RunLog

    run_log = RunLog(run_dir).attach()
    run_log.open()
    terminal = _Terminal(quiet)
    emflow_logger = logging.getLogger("emflow")
    emflow_logger.addHandler(terminal)
    try:
        yield logging.getLogger(CLI_LOGGER)
    finally:
        emflow_logger.removeHandler(terminal)
        run_log.detach()


def _wait_for_a_worker(client, cluster: str, log_dir: Path, say) -> None:
    """Block until one worker has joined (HPC jobs may queue), so the plan sees real resources."""
    from emflow.errors import ClusterError

    if client.scheduler_info().get("workers"):
        return
    timeout = 60 if cluster == "local" else 3600
    say(f"waiting for a worker to connect (up to {timeout} s) ...")
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"--cluster {cluster}: no worker connected within {timeout} s; check the job queue "
            f"(e.g. squeue) and the worker logs in {log_dir}"
        ) from None


def run(
    recipe: RecipeArg,
    cluster: ClusterOpt = "local",
    cluster_config: ClusterConfigOpt = None,
    workers: WorkersOpt = None,
    max_workers: MaxWorkersOpt = None,
    threads: ThreadsOpt = None,
    memory: MemoryOpt = None,
    insecure: InsecureOpt = False,
    serial: Annotated[
        bool, typer.Option("--serial", help="no Dask: run every unit here, in order")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="discard earlier output of this recipe")
    ] = False,
    dashboard: Annotated[
        str, typer.Option("--dashboard", help="local dashboard address")
    ] = ":8787",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    alignment: Annotated[
        Path | None,
        typer.Option("--alignment", help="re-export with this alignment.json (no matching)"),
    ] = None,
) -> None:
    """Run a recipe: discover → align → render slabs → write pyramids. Resumes an interrupted run."""
    from emflow.cli import install_signal_handlers, pause_gc, say_error
    from emflow.errors import EmflowError

    pause_gc()  # until the cluster runs (see emflow.cli.pause_gc)
    server = _start_server(cluster, serial)
    try:
        from emflow.recipe import load_recipe

        r = load_recipe(recipe)
        run_dir = r.run_folder
        req = None
        if not serial:
            req = cluster_request(
                r,
                cluster,
                cluster_config,
                workers,
                max_workers,
                threads,
                memory,
                insecure,
                dashboard_address=dashboard,
                secrets_dir=run_dir / "secrets",
            )
        install_signal_handlers()  # importing dask_jobqueue (cluster checks) replaced SIGINT's
        early = _start_early(req, server)
    except BaseException:
        if server is not None:  # a bad recipe or cluster request: the server forks nothing
            server.close()
        raise
    try:
        _checked_run(r, req, early, recipe, serial, restart, quiet, alignment, cluster, run_dir)
    except EmflowError as exc:
        say_error(exc)  # refused by the checks: now, not after the unused cluster's shutdown
        raise
    finally:
        if early is not None:  # a cluster the run never used: the checks refused it, or Ctrl-C
            early.close()


class _Early:
    """A local cluster started while the run is still checked (:class:`~emflow.cluster.early.
    EarlyCluster`), and the library output held meanwhile (:class:`~emflow.cli.console.
    HeldOutput`: the fork server and the workers it forks write on its pipe)."""

    def __init__(self) -> None:
        """Start the fork server on the held output's pipe; fd 2 and ``sys.stderr`` stay the
        terminal's until :meth:`start_cluster` (the recipe is not even read yet)."""
        from emflow.cli.console import HeldOutput
        from emflow.cluster import forkserver

        self.cluster = None
        self._closed = False
        self.output = HeldOutput(routed=False)
        try:
            self.output.spawn(forkserver.start)
        except BaseException:
            self.close()
            raise

    def start_cluster(self, req) -> None:
        """Route the library output to the pipe (Dask is imported there), then start the cluster
        in its thread."""
        from emflow.cluster.early import EarlyCluster

        try:
            self.output.route_now()
            self.cluster = EarlyCluster(req)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Shut down what the run did not use, quietly (its output is dropped), and give the
        terminal back; nothing after a run that used them."""
        from emflow.cluster import forkserver

        if self._closed:
            return
        self._closed = True
        try:
            if self.cluster is not None:
                self.cluster.close()
        finally:
            forkserver.stop()  # the cluster that would have forked from it is gone
            self.output.discard()


def _start_server(cluster: str, serial: bool) -> _Early | None:
    """Start the local cluster's fork server first thing (see :mod:`emflow.cluster.forkserver`)
    when the command asks for a local cluster and this process may use two cores or more: it
    imports Dask on the other core while this one reads the recipe and checks the request
    (~0.1-0.2 s before the cluster's own start; its first worker waited for that import).
    A run refused meanwhile stops it (:meth:`_Early.close`)."""
    if serial or cluster != "local" or _usable_cores() < 2:
        return None
    return _Early()


def _start_early(req, server: _Early | None = None) -> _Early | None:
    """Start a local cluster now (see :class:`_Early`) when this process may use two cores or
    more; other kinds start once checked (a batch scheduler's jobs, a Kubernetes resource or a
    remote scheduler are not touched before). ``server``: what :func:`_start_server` started
    (closed here if the request is not for a local cluster after all).

    On one core nothing overlaps: the cluster's thread only waits for the driver's imports to
    let go of the interpreter (measured: 1.11x the wall time before the first unit, pinned).
    """
    if req is None or req.kind != "local" or _usable_cores() < 2:
        if server is not None:
            server.close()
        return None
    early = server if server is not None else _Early()
    early.start_cluster(req)
    return early


def _usable_cores() -> int:
    import os

    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _checked_run(r, req, early, recipe, serial, restart, quiet, alignment, cluster, run_dir):
    """The checks, then the run (the cluster of ``early`` starts meanwhile)."""
    from emflow.cli import TRACEBACK_LOG, imports_deferring_ctrl_c

    if early is not None:  # the driver's imports below would slow the workers' spawn
        early.cluster.spawned(SPAWN_WAIT_S)
    with imports_deferring_ctrl_c():  # the cluster's thread imports meanwhile
        import emflow.logs  # noqa: F401  (run.log)
        import emflow.plan  # noqa: F401  (the checks use it)
        from emflow.cli.console import libraries_to_log
        from emflow.cli.summary import closing_lines
        from emflow.errors import EmflowError, NoSpaceError, deterministic, no_space
        from emflow.pipeline import claim_run_folder
        from emflow.preflight import preflight

    check = preflight(r, restart=restart, alignment_path=alignment, cluster_request=req)
    # --- from here on, files are written (the checks above refused nothing) ---
    claim_run_folder(r)
    logging.raiseExceptions = False  # a full disk must not turn run.log writes into tracebacks
    with _run_logging(run_dir, quiet) as log:
        TRACEBACK_LOG.append(run_dir / "run.log")

        def say(msg: str) -> None:
            log.info(msg)
            if not quiet:
                typer.echo(msg, err=True)

        say(f"emflow run {recipe} → {r.output_root}")
        for note in check.notes:
            say(note)
        t0 = time.perf_counter()
        progress = None if not quiet else False
        held = early.output if early is not None else None
        try:
            with libraries_to_log(run_dir / LIBRARY_LOG, say, held=held):
                result = _execute(
                    r, req, check, serial, restart, progress, say, alignment, cluster, run_dir,
                    early,
                )  # fmt: skip
        except EmflowError as exc:
            log.info(f"error (exit {exc.exit_code}): {exc}")
            raise
        except KeyboardInterrupt:
            log.info("interrupted; run the same command to resume")
            raise
        except OSError as exc:  # the driver's own writes (journal, markers): full disk, permissions
            err = deterministic(exc)
            if err is None:
                raise
            if isinstance(err, NoSpaceError) and err.path is None:
                err = no_space(f"under {r.output_root}")
            log.info(f"error (exit {err.exit_code}): {err}")
            raise err from exc
        secs = time.perf_counter() - t0
        say(
            f"done in {secs:.1f} s: {result.bytes_in / 1e6:.3g} MB of slices at "
            f"{result.bytes_in / 1e6 / secs:.3g} MB/s"  # 3 digits: a demo is 0.0441 MB/s, not 0.0
        )
        for line in closing_lines(r, result):
            log.info(line)
            typer.echo(line)


def _execute(r, req, check, serial, restart, progress, say, alignment, cluster, run_dir, early):
    from emflow.cli import install_signal_handlers, resume_gc
    from emflow.pipeline import run as run_pipeline

    kw = dict(restart=restart, progress=progress, log=say, alignment_path=alignment, checked=check)
    if serial:
        resume_gc()
        return run_pipeline(r, client=None, **kw)
    from emflow import cluster as clusters

    opened = early.cluster.client() if early is not None else clusters.open_client(req)
    with opened as client:
        resume_gc()  # the start is over (emflow.cli.pause_gc)
        install_signal_handlers()
        say(f"dashboard: {client.dashboard_link}")
        try:
            from emflow.dashboard import dashboard_url

            say(f"lattice:   {dashboard_url(client)}")
        except Exception:  # dashboard page is optional (no bokeh route on a foreign scheduler)
            pass
        address = client.scheduler.address if client.scheduler else cluster
        try:
            _wait_for_a_worker(client, cluster, run_dir / "worker-logs", say)
            return run_pipeline(r, client=client, **kw)
        except Exception as exc:
            if _scheduler_lost(client, exc):
                from emflow.errors import SchedulerLost

                raise SchedulerLost(
                    f"lost the Dask scheduler at {address} mid-run ({type(exc).__name__}); "
                    "finished units are kept: run the same command again to resume (start a "
                    "new scheduler first if it was yours)"
                ) from exc
            raise


def _scheduler_lost(client, exc: BaseException) -> bool:
    """True when ``exc`` comes from the scheduler connection going away, not from the run."""
    from distributed.comm.core import CommClosedError

    from emflow.errors import EmflowError

    if isinstance(exc, EmflowError):
        return False
    return isinstance(exc, CommClosedError) or client.status not in ("running", "newly-created")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
