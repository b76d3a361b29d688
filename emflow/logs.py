"""emflow's messages go through Python's :mod:`logging`, under the logger ``"emflow"``.

* :func:`use_default_handler` (called by :func:`emflow.run` and the other notebook
  functions) gives the ``"emflow"`` logger level INFO and one console handler writing
  ``emflow: <message>`` to ``sys.stderr`` -- unless logging is configured already (a handler
  on ``"emflow"`` or on the root logger), in which case emflow's records just propagate.
  Silence it with ``logging.getLogger("emflow").setLevel(logging.WARNING)``.
* :class:`RunLog` writes every emflow record of one run to ``run_dir/run.log``, whatever
  the entry point (``emflow run`` or ``emflow.run()``). It buffers records until the run
  folder has been claimed (nothing is written before the run's checks passed), then
  appends them and every later one.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

LOGGER = "emflow"
RUN_LOG = "run.log"
FORMAT = "%(asctime)s %(message)s"


class ConsoleHandler(logging.StreamHandler):
    """``emflow: message`` on the *current* ``sys.stderr`` (Jupyter and the CLI replace it);
    in Jupyter, information goes to ``sys.stdout`` (plain text under the cell) and only
    warnings and errors to stderr.

    Skips the stage-end lines a progress bar already showed (``emflow_shown``).
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("emflow: %(message)s"))
        self.addFilter(lambda r: not getattr(r, "emflow_shown", False))

    def emit(self, record: logging.LogRecord) -> None:
        from emflow.progress import in_jupyter

        quiet = record.levelno < logging.WARNING and in_jupyter()
        self.stream = sys.stdout if quiet else sys.stderr
        super().emit(record)


def use_default_handler() -> logging.Logger:
    """Make ``emflow`` say what it does (INFO to stderr) unless the user configured logging."""
    log = logging.getLogger(LOGGER)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if any(isinstance(h, ConsoleHandler) for h in log.handlers):
        return log
    configured = [h for h in log.handlers if not isinstance(h, RunLog)]
    if not configured and not logging.getLogger().handlers:
        log.addHandler(ConsoleHandler())
    return log


class RunLog(logging.Handler):
    """All ``emflow`` records of one run, appended to ``run_dir/run.log``.

    Attached with :meth:`attach` at the start of a run: records are held in memory until
    :meth:`open` (called once the run folder is claimed), then written; :meth:`detach` at
    the end. A record is written once even if the CLI also logs to the same file.
    """

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(logging.INFO)
        self.path = Path(run_dir) / RUN_LOG
        self.setFormatter(logging.Formatter(FORMAT))
        self._held: list[logging.LogRecord] | None = []
        self._file = None
        self._saved_level: int | None = None
        self._lock2 = threading.Lock()

    def attach(self) -> RunLog:
        log = logging.getLogger(LOGGER)
        if log.level == logging.NOTSET:  # a level the user set stays (run.log follows it)
            self._saved_level = log.level
            log.setLevel(logging.INFO)
        log.addHandler(self)
        return self

    def open(self) -> None:
        """Start writing (the run folder exists and is the run's): held records first."""
        with self._lock2:
            if self._file is not None or self._held is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", errors="replace")
            held, self._held = self._held or [], None
            for record in held:
                self._write(record)

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            if self._file is None:
                if self._held is not None and len(self._held) < 10_000:
                    self._held.append(record)
                return
            self._write(record)

    def _write(self, record: logging.LogRecord) -> None:
        try:
            assert self._file is not None
            self._file.write(self.format(record) + "\n")
            self._file.flush()
        except (OSError, ValueError):  # a full disk must not end the run from the log
            pass

    def detach(self) -> None:
        log = logging.getLogger(LOGGER)
        log.removeHandler(self)
        if self._saved_level is not None:
            log.setLevel(self._saved_level)
        with self._lock2:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._held = None

    def __enter__(self) -> RunLog:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()
