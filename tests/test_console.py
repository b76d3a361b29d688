"""emflow.cli.console: during a CLI run, library output goes to libraries.log and the few
warnings a user must see become one emflow line each on the terminal."""

from __future__ import annotations

import warnings

from emflow.cli.console import libraries_to_log
from emflow.cluster import ClusterRequest, _warn_insecure


def test_insecure_cluster_warning_reaches_the_terminal_once(tmp_path):
    said: list[str] = []
    log = tmp_path / "libraries.log"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with libraries_to_log(log, said.append):
            _warn_insecure(ClusterRequest("slurm", insecure=True))
            _warn_insecure(ClusterRequest("slurm", insecure=True))
            warnings.warn("some library detail nobody needs", UserWarning, stacklevel=1)
    assert said == [
        "emflow: warning: --insecure: the slurm scheduler accepts unencrypted, "
        "unauthenticated connections from anyone who can reach its port"
    ]
    text = log.read_text()
    assert text.count("--insecure: the slurm scheduler") == 2  # the log keeps every one
    assert "some library detail nobody needs" in text


def test_busy_dashboard_port_becomes_one_line(tmp_path):
    said: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with libraries_to_log(tmp_path / "libraries.log", said.append):
            warnings.warn(
                "Port 8787 is already in use.\nPerhaps you already have a cluster running?",
                UserWarning,
                stacklevel=1,
            )
    assert said == [
        "dashboard port 8787 is in use (another Dask?); a free port is used instead "
        "(its link follows)"
    ]
