"""What a run says: progress per stage (bar on a terminal, log lines elsewhere), messages through
logging with a default console handler, a summary at the end, and run.log from every entry point.

The README's ``python -c "import emflow; emflow.run('recipe.yaml')"`` runs in a real subprocess,
once with stderr piped and once on a pseudo-terminal."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

import emflow
from emflow import logs
from emflow import progress as progress_display
from emflow.align.solve import Alignment
from emflow.lattice.execute import Progress
from emflow.reprs import pair_totals
from emflow.testing import synthetic_slices, write_stack
from emflow.testing.misalign import misaligned_slices
from tests import clirun

pytestmark = pytest.mark.integration

RECIPE = """\
source:
  glob: src/*.png
voxel_size_nm: [8, 8, 40]
output_dir: out
outputs:
  - format: precomputed
    name: em
    encoding: jpeg
  - format: omezarr
    name: em.ome.zarr
align: true
"""
STAGES = ("features", "match", "slab")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    write_stack(misaligned_slices(synthetic_slices((8, 256, 256), seed=2), seed=2), root / "src")
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def _python(code: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return clirun.run([sys.executable, "-c", code], cwd, 600, {"EMFLOW_PROGRESS": None}, **kw)


def test_default_run_says_what_it_does_and_sums_up(stack):
    """stderr is a pipe: one log line per stage, then the summary; the same lines in run.log."""
    proc = _python("import emflow; emflow.run('recipe.yaml', restart=True)", stack)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "emflow: discovered slices: 8 (x 256 × y 256 px, uint8)" in err
    for stage in STAGES:
        assert re.search(rf"^emflow: {stage}: (\d+)/\1 units, .*done$", err, re.M), stage
    alignment = Alignment.from_json(stack / "out" / "emflow-run" / "alignment.json")
    t = pair_totals(alignment)
    assert t["matched"] + t["failed"] + t["rejected"] == len(alignment.pairs) == 13
    assert f"pairs: {t['matched']} matched, {t['failed']} failed, {t['rejected']} rejected" in err
    assert re.search(r"^emflow: done in [\d.]+ s: 8 slices", err, re.M)
    assert f"emflow: output em: {stack / 'out' / 'em'} (neuroglancer precomputed" in err
    assert f"emflow: output em.ome.zarr: {stack / 'out' / 'em.ome.zarr'} (OME-Zarr 0.5" in err
    assert proc.stdout == ""
    # run.log: every message, with a time stamp, in order
    log = (stack / "out" / "emflow-run" / "run.log").read_text()
    lines = [ln.split(" ", 2)[2] for ln in log.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", ln)]
    said = [ln.removeprefix("emflow: ") for ln in err.splitlines() if ln.startswith("emflow: ")]
    assert lines == said
    assert lines[0].startswith("discovered") and lines[-1].startswith("run folder:")


def test_terminal_gets_progress_bars(stack):
    """stderr is a terminal: a redrawn bar per stage (units done/total), no stage log lines."""
    main, child = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "import emflow; emflow.run('recipe.yaml', restart=True)"],
            cwd=stack,
            stdout=subprocess.PIPE,
            stderr=child,
            timeout=600,
            env={k: v for k, v in os.environ.items() if k != "EMFLOW_PROGRESS"},
        )
        os.close(child)
        child = -1
        chunks = []
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the other end is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(main)
        if child != -1:
            os.close(child)
    assert proc.returncode == 0
    text = b"".join(chunks).decode(errors="replace")
    for stage in STAGES:
        assert re.search(rf"\r\s*{stage} \[#+\] (\d+)/\1", text), stage
        assert f"emflow: {stage}: " not in text  # the bar showed it
    assert "emflow: done in" in text and "pairs:" in text


def test_logging_configured_by_the_user_is_respected(stack):
    code = (
        "import logging, emflow\n"
        "logging.basicConfig(level=logging.INFO, format='[%(name)s] %(message)s')\n"
        "emflow.run('recipe.yaml', restart=True, progress=False)\n"
    )
    proc = _python(code, stack)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "emflow: " not in proc.stderr  # no second, emflow-made handler
    assert "[emflow.pipeline] done in" in proc.stderr
    assert "[emflow.progress] slab:" in proc.stderr


def test_log_callable_and_api_run_log(stack):
    """``log=`` gets every message; run.log is written by an in-process API run too."""
    said: list[str] = []
    result = emflow.run(stack / "recipe.yaml", restart=True, log=said.append, progress=False)
    assert said[0].startswith("discovered") and any(s.startswith("done in") for s in said)
    assert not any(isinstance(h, logs.ConsoleHandler) for h in logging.getLogger("emflow").handlers)
    text = (result.run_dir / "run.log").read_text()
    for s in said:
        assert s.splitlines()[0] in text
    assert not any(isinstance(h, logs.RunLog) for h in logging.getLogger("emflow").handlers)


def test_cli_run_writes_run_log(stack):
    proc = clirun.emflow("run", "recipe.yaml", "--serial", "--restart", cwd=stack, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (stack / "out" / "emflow-run" / "run.log").read_text()
    assert "discovered slices: 8" in text and "done in" in text
    # emflow's log records too: one line per stage in run.log and (stderr is no tty) once on
    # the terminal; the closing lines (stdout) end run.log
    for stage in ("slab", "finalize"):
        pattern = rf"^{stage}: (\d+)/\1 units, .*done$"
        assert len(re.findall(pattern, proc.stderr, re.M)) == 1, (stage, proc.stderr)
        assert re.search(rf"^\S+ \S+ {stage}: (\d+)/\1 units, .*done$", text, re.M), stage
    assert text.splitlines()[-1].endswith(proc.stdout.splitlines()[-1])
    # the alignment's pair counts (issue 13): run.log's 'pairs:' line says what
    # Alignment.pair_summary() of the run's alignment.json says, kind by kind
    summary = Alignment.from_json(stack / "out" / "emflow-run" / "alignment.json").pair_summary()
    line = next(x for x in text.splitlines() if re.search(r"\bpairs: neighbours ", x))
    names = {"neighbour": "neighbours", "second": "second neighbours", "bridge": "bridges"}
    for kind, c in summary.items():
        found = re.search(
            rf"\b{names[kind]} (\d+)/(\d+) matched \((\d+) failed, (\d+) rejected\)", line
        )
        if not sum(c.values()):
            assert found is None, (kind, line)
            continue
        assert found, (kind, line)
        matched, total, failed, rejected = (int(v) for v in found.groups())
        assert (matched, failed, rejected) == (c["matched"], c["failed"], c["rejected"]), line
        assert total == sum(c.values())
    assert summary["neighbour"]["matched"] == 7, summary  # 8 slices: every neighbour matched


def test_cli_run_logging_keeps_tracebacks_in_run_log(tmp_path, capsys):
    """During ``emflow run`` an emflow warning is one line on the terminal; its traceback and
    the CLI's own lines go to run.log only (and the handlers are gone afterwards)."""
    from emflow.cli.run import _run_logging

    run_dir = tmp_path / "emflow-run"
    run_dir.mkdir()
    before = list(logging.getLogger("emflow").handlers)
    with _run_logging(run_dir, quiet=False) as log:
        log.info("a line the CLI prints itself")
        try:
            raise OSError("lattice plugin gone")
        except OSError:
            logging.getLogger("emflow.lattice.execute").warning(
                "plugin not reachable", exc_info=True
            )
        logging.getLogger("emflow.progress").info("slab: 2/2 units, 1 s, done")
    assert logging.getLogger("emflow").handlers == before
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "emflow: warning: plugin not reachable",
        "slab: 2/2 units, 1 s, done",
    ]
    text = (run_dir / "run.log").read_text()
    for needle in (
        "a line the CLI prints itself",
        "plugin not reachable",
        "Traceback",
        "slab: 2/2",
    ):
        assert needle in text, needle


def test_failed_run_is_in_run_log(stack, tmp_path):
    """A slice damaged inside its compressed data passes the header checks and fails when
    decoded, after the run folder was made: the error ends run.log. (A truncated slice is
    refused by the checks before anything is written: no run folder, no run.log.)"""
    bad = tmp_path / "bad"
    paths = write_stack(synthetic_slices((6, 128, 128), seed=1), bad / "src")
    (bad / "recipe.yaml").write_text(RECIPE.replace("align: true", "align: false"))
    whole = paths[3].read_bytes()
    paths[3].write_bytes(whole[:200])
    with pytest.raises(emflow.SourceError, match=paths[3].name):
        emflow.run(bad / "recipe.yaml", progress=False)
    assert not (bad / "out").exists()
    damaged = bytearray(whole)
    damaged[60:400] = bytes(340)
    paths[3].write_bytes(bytes(damaged))
    with pytest.raises(emflow.SourceError) as err:
        emflow.run(bad / "recipe.yaml", progress=False)
    last = (bad / "out" / "emflow-run" / "run.log").read_text().splitlines()[-1]
    assert "run stopped: SourceError" in last and paths[3].name in last
    assert str(err.value).splitlines()[0] in last


def test_progress_display_choice(monkeypatch):
    monkeypatch.delenv("EMFLOW_PROGRESS", raising=False)
    pipe, tty = io.StringIO(), io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    assert progress_display.choose_style(pipe, None) == "log"
    assert progress_display.choose_style(tty, None) == "text"
    assert progress_display.choose_style(pipe, True) == "text"
    assert progress_display.choose_style(tty, False) == "off"
    monkeypatch.setenv("EMFLOW_PROGRESS", "off")
    assert progress_display.choose_style(tty, None) == "off"
    monkeypatch.setenv("EMFLOW_PROGRESS", "html")
    assert progress_display.choose_style(pipe, None) == "html"


def test_log_lines_while_a_stage_runs_carry_counts_and_eta(monkeypatch, caplog):
    monkeypatch.delenv("EMFLOW_PROGRESS", raising=False)
    monkeypatch.setattr(progress_display, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(progress_display, "REDRAW_S", -1.0)
    caplog.set_level(logging.INFO, logger="emflow")
    p = Progress("slab", 4, stream=io.StringIO())
    for _ in range(4):
        p.advance(1_000_000)
    lines = [r.getMessage() for r in caplog.records if r.name == "emflow.progress"]
    assert [ln.split(",")[0] for ln in lines] == [
        "slab: 1/4 units",
        "slab: 2/4 units",
        "slab: 3/4 units",
        "slab: 4/4 units",
    ]
    assert all("ETA" in ln for ln in lines[:3]) and lines[3].endswith("done")
    assert all("MB/s" in ln for ln in lines)


def test_a_resumed_stage_counts_earlier_units_without_rate_or_pace():
    """Units an earlier run finished count as done, but add no MB/s and no pace to the ETA
    (a resumed features stage said '12/12 units, 0 s, 43.2 MB/s')."""
    p = Progress("features", 10, enabled=False)
    for _ in range(6):
        p.advance(5_000_000, reused=True)
    assert (p.done, p.reused, p.nbytes) == (6, 6, 0)
    assert progress_display.rate_mb_s(p, p.start + 2) is None
    assert progress_display.eta_s(p, p.start + 2) is None  # no unit ran here yet: no pace
    p.advance(1_000_000)
    assert progress_display.eta_s(p, p.start + 2) == pytest.approx(2 / 1 * 3)
    assert progress_display.rate_mb_s(p, p.start + 2) == pytest.approx(0.5)
    assert (
        progress_display.stage_line(p, p.start + 2)
        == "features: 7/10 units, 2 s, 0.5 MB/s, ETA 6 s"
    )


def test_board_html_lists_every_stage():
    board = progress_display.Board()
    a, b = Progress("features", 20, enabled=False), Progress("match", 37, enabled=False)
    a.done, b.done = 20, 11
    board.rows = {"features": (a, a.start + 15), "match": (b, b.start + 4)}
    html = board.html()
    assert html.count("<progress") == 2
    assert "value='20' max='20'" in html and "20/20" in html and "done" in html
    assert "11/37" in html and "ETA 9 s" in html
    assert board.text().splitlines()[1].startswith("match: 11/37 units, 4 s, ETA 9 s")


def test_tqdm_when_asked_for(monkeypatch):
    """``EMFLOW_PROGRESS=tqdm``: tqdm.auto bars (widgets in Jupyter), counting every unit."""
    pytest.importorskip("tqdm")
    monkeypatch.setenv("EMFLOW_PROGRESS", "tqdm")
    stream = io.StringIO()
    p = Progress("match", 5, stream=stream)
    assert isinstance(p._display, progress_display.TqdmBar)
    for _ in range(5):
        p.advance()
    assert p._display.bar.n == 5 and p._display.bar.total == 5
