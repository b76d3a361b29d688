"""The ``emflow`` command: one small module per command, registered here.

Every command keeps the exit codes of :mod:`emflow.errors` (0 done, 1 internal
error, 2 bad input or refused, 3 incomplete but resumable, 130 interrupted): an
:class:`~emflow.errors.EmflowError` is printed as one line on stderr, never a
traceback; an unexpected exception (a bug) prints one line and keeps its
traceback in the run's ``run.log`` (or a file in the temporary directory).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import typer

from emflow.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    INTERRUPTED_MESSAGE,
    EmflowError,
    deterministic,
)

app = typer.Typer(
    name="emflow",
    help="Align and ingest EM slice stacks into multiscale neuroglancer precomputed and OME-Zarr "
    "volumes. Exit codes: 0 done, 1 internal error, 2 bad input or refused, 3 incomplete but "
    "resumable, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = ("run", "validate", "plan", "demo", "serve", "status")
for _name in COMMAND_MODULES:
    importlib.import_module(f"emflow.cli.{_name}").register(app)

#: set by a command once its run folder has a log: where an internal error's traceback goes
TRACEBACK_LOG: list[Path] = []
_SIGNALLED: list[int] = []
_STATE = {"depth": 0, "reported": False, "command": False, "deferred": False}  # main() nests for `emflow demo`


def _on_signal(signum: int, frame: object) -> None:
    _SIGNALLED.append(signum)
    if _STATE.get("deferred"):
        return  # raised when the deferring block ends (imports_deferring_ctrl_c)
    raise KeyboardInterrupt


@contextlib.contextmanager
def imports_deferring_ctrl_c() -> Iterator[None]:
    """Ctrl-C or SIGTERM while this block imports is raised when it ends, not inside it.

    A KeyboardInterrupt that cuts an import short can leave that module's import lock held;
    another thread importing the same module then waits forever (seen while the local cluster
    started in its thread and imported Bokeh, emflow.cluster.early). Signals that arrive
    meanwhile are still recorded (the exit code and message are those of the signal).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = len(_SIGNALLED)
    _STATE["deferred"] = True
    try:
        yield
    finally:
        _STATE["deferred"] = False
    if len(_SIGNALLED) > before:
        raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """Ctrl-C (SIGINT) and SIGTERM end the command with exit 130 / 143 and a one-line message.

    Call again after importing dask_jobqueue, which replaces the SIGINT handler with
    ``sys.exit()`` (that would exit 0, as if the run had succeeded).
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread (e.g. called from a notebook's worker thread)
            return


def _interrupted() -> int:
    sig = _SIGNALLED[-1] if _SIGNALLED else signal.SIGINT
    what = "terminated" if sig == signal.SIGTERM else "interrupted"
    if not _STATE["reported"]:
        _STATE["reported"] = True
        print(f"emflow: {INTERRUPTED_MESSAGE.replace('interrupted', what)}", file=sys.stderr)
    return EXIT_INTERRUPTED if sig != signal.SIGTERM else 128 + int(signal.SIGTERM)


def _keep_traceback(exc: BaseException, what: str, spare: bool = False) -> Path | None:
    """Append ``exc``'s traceback to the run's log (``spare``: else a file in the temporary
    directory); where it went, or None."""
    text = "".join(traceback.format_exception(exc))
    where = TRACEBACK_LOG[-1] if TRACEBACK_LOG else None
    try:
        if where is None:
            if not spare:
                return None
            where = Path(tempfile.gettempdir()) / f"emflow-traceback-{os.getpid()}.txt"
            where.write_text(text)
        else:
            with open(where, "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n{text}")
    except OSError:
        return None
    return where


def _internal_error(exc: BaseException) -> int:
    where = _keep_traceback(exc, "internal error", spare=True)
    first = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    kept = f"; traceback in {where}" if where else ""
    print(f"emflow: internal error (a bug, please report it): {first}{kept}", file=sys.stderr)
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app; every outcome becomes one of the documented exit codes.

    Called without ``argv`` as the process's own command (the ``emflow`` script, ``python -m
    emflow``), it also keeps the process's fixed costs low: worker processes it spawns skip
    the console script, and the process ends without a garbage-collection pass over every
    object its imports made (:func:`_command_process`).
    """
    command = argv is None and _STATE["depth"] == 0
    if _STATE["depth"] == 0:
        _SIGNALLED.clear()
        _STATE["reported"] = False
        _STATE["command"] = command
    if command:
        _command_process()
        gc.freeze()  # the CLI's imports: later collections skip them (see emflow.__main__)
        gc.enable()
    install_signal_handlers()
    _STATE["depth"] += 1
    try:
        return _main(argv)
    finally:
        _STATE["depth"] -= 1
        if command:  # the process exits next: its objects need no collection any more
            gc.freeze()
            gc.enable()  # if a command ended before its start was over (pause_gc)


def pause_gc() -> None:
    """No garbage collection while the ``emflow`` command starts (imports, cluster start): it
    makes about a million long-lived objects and almost no garbage, and Python's collector
    walked them all in its full passes (0.2-0.3 CPU-s). Only in the command's own process."""
    if _STATE.get("command"):
        gc.disable()


def resume_gc() -> None:
    """The start is over: freeze what it made (later collections skip it), collect again."""
    if _STATE.get("command") and not gc.isenabled():
        gc.freeze()
        gc.enable()


def _command_process() -> None:
    """Local Dask workers are spawned processes (multiprocessing "spawn"), which first run the
    parent's ``__main__`` again, as ``__mp_main__``; for the ``emflow`` console script that
    means importing this CLI (typer, every command) in each worker, for nothing. Naming the
    script's module ``emflow.__main__`` makes them skip it, as for ``python -m emflow``."""
    script = sys.modules.get("__main__")
    if script is None or getattr(script, "__spec__", None) is not None:
        return  # python -m emflow (already skipped), or an interpreter without a script
    if getattr(script, "main", None) is not main:  # not the console script's two lines
        return
    import importlib.machinery

    script.__spec__ = importlib.machinery.ModuleSpec("emflow.__main__", None)


def _main(argv: list[str] | None) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)  # typer turns Ctrl-C into a return of 130
    except EmflowError as exc:
        say_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as exc:  # typer/click exit paths; dask_jobqueue's SIGINT handler
        if _SIGNALLED:
            return _interrupted()
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        if _SIGNALLED:  # what failed after a Ctrl-C failed because of it (a worker process that
            _keep_traceback(exc, "error after an interrupt")  # got it while it started, an
            return _interrupted()  # import it cut short); its traceback stays in the run's log
        if isinstance(exc, _usage_errors()):  # bad option or value: click prints usage + one line
            exc.show()
            return int(getattr(exc, "exit_code", 2) or 2)
        if isinstance(exc, _aborts()):  # click turns Ctrl-C into Abort
            return _interrupted()
        if type(exc).__name__ == "Exit" and hasattr(exc, "exit_code"):  # typer.Exit(code)
            return int(exc.exit_code)
        known = deterministic(exc)  # no space, permission denied: one line, not a traceback
        if known is not None:
            print(f"emflow: error: {known}", file=sys.stderr)
            return known.exit_code
        return _internal_error(exc)
    if _SIGNALLED or rc == EXIT_INTERRUPTED:
        return _interrupted()
    return rc if isinstance(rc, int) else 0


def say_error(exc: EmflowError) -> None:
    """The error's one line on stderr, once (a command may say it before it has cleaned up)."""
    if not getattr(exc, "emflow_said", False):
        print(f"emflow: error: {exc}", file=sys.stderr, flush=True)
        exc.emflow_said = True  # type: ignore[attr-defined]


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Usage-error classes of the click that typer uses (vendored in newer typer, else click)."""
    kinds: list[type[BaseException]] = []
    if hasattr(typer, "TyperException"):
        kinds.append(typer.TyperException)
    try:
        import click

        kinds.append(click.exceptions.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _aborts() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [typer.Abort]
    try:
        import click

        kinds.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(kinds)


if __name__ == "__main__":
    sys.exit(main())
