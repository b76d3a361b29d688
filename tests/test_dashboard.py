"""The /emflow dashboard page and /emflow/lattice.json of a live run on a real LocalCluster,
checked against the scheduler's lattice; a headless-Chromium screenshot of the page."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from emflow import lattice as lat
from emflow.dashboard import COLORS, dashboard_url, grid_data
from emflow.lattice.execute import Unit, check_complete, run_stage

RUN = "dashdemo"


def demo_unit(i: int, delay: float, bad: tuple[int, ...]) -> dict:
    time.sleep(delay)
    if i in bad:
        raise RuntimeError(f"unit {i}: no overlap with its neighbour (0 RANSAC inliers)")
    return {"i": i}


def _stop_background_run(client, thread: threading.Thread) -> None:
    """Cancel the demo run and wait for its driver thread, so a failed check leaves nothing behind."""
    if thread.is_alive():
        try:
            client.sync(client.scheduler.emflow_cancel, run_id=RUN)
        except Exception:  # the scheduler may already be gone
            pass
        thread.join(60)


def _snap(client) -> dict:
    return client.sync(client.scheduler.emflow_lattice, run_id=RUN)


def _stable(run: dict) -> dict:
    """A run's snapshot without the fields that change with the clock."""
    return {
        **run,
        "stages": [
            {k: v for k, v in st.items() if k not in ("elapsed_s", "rate_per_s", "eta_s")}
            for st in run["stages"]
        ],
    }


def test_dashboard_url_from_dashboard_link():
    class C:
        dashboard_link = "http://10.1.2.3:8787/status"

    assert dashboard_url(C()) == "http://10.1.2.3:8787/emflow"
    C.dashboard_link = "https://jupyter.example.org/user/ann/proxy/8787/status"
    assert dashboard_url(C()) == "https://jupyter.example.org/user/ann/proxy/8787/emflow"


def test_grid_bins_large_stages_by_most_urgent_state():
    snap = {
        "runs": [
            {"run_id": "r", "stages": [{"stage": "slab", "cells": "d" * 999 + "f" + "w" * 1000}]}
        ]
    }
    g = grid_data(snap, max_columns=400)
    assert len(g["x"]) == 400 and set(g["y"]) == {"slab"}
    assert g["state"][199] == "failed" and g["units"][199] == "995-999"
    assert Counter(g["state"]) == {"done": 199, "failed": 1, "waiting": 200}


# ---------------------------------------------------------------------------- headless Chromium


async def _cdp_screenshot(ws_url: str, url: str, out: Path, ready_js: str, timeout: float) -> bool:
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(ws_url, max_message_size=1 << 28)
    counter = 0

    async def call(method: str, **params):
        nonlocal counter
        counter += 1
        mine = counter
        await conn.write_message(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = json.loads(await conn.read_message())
            if msg.get("id") == mine:
                return msg.get("result", {})

    await call("Page.enable")
    await call("Page.navigate", url=url)
    deadline, ready = time.time() + timeout, False
    while not ready and time.time() < deadline:
        r = await call("Runtime.evaluate", expression=ready_js, returnByValue=True)
        ready = bool(r.get("result", {}).get("value"))
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.0)  # let the first periodic update paint
    shot = await call("Page.captureScreenshot", format="png")
    out.write_bytes(base64.b64decode(shot["data"]))
    conn.close()
    return ready


def screenshot(url: str, out: Path, *, size=(1280, 720), timeout: float = 30) -> bool:
    """Render ``url`` in headless Chromium (DevTools protocol) once Bokeh drew it; save a PNG."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    user_dir = tempfile.mkdtemp(prefix="emflow-chromium-")
    proc = subprocess.Popen(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={user_dir}",
            f"--window-size={size[0]},{size[1]}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(user_dir) / "DevToolsActivePort"
        t0 = time.time()
        # Chromium creates the file before it writes the port into it: wait for the content
        while time.time() - t0 < timeout:
            text = port_file.read_text() if port_file.exists() else ""
            if text.split():
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"chromium did not report its DevTools port within {timeout} s")
        port = int(text.split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
        page = next(t for t in targets if t["type"] == "page")
        ready_js = (
            "typeof Bokeh !== 'undefined' && Bokeh.documents.length > 0 && "
            "Bokeh.documents[0].roots().length > 0"
        )
        return asyncio.run(
            _cdp_screenshot(page["webSocketDebuggerUrl"], url, out, ready_js, timeout)
        )
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(user_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- live run


@pytest.mark.integration
def test_live_page_and_json_match_the_lattice(tmp_path):
    """A resumed run with skipped, done, running, waiting, failed and orphaned units: the JSON
    endpoint equals the scheduler's lattice, the Bokeh page's grid and table show the same
    counts, and a screenshot of the page is saved."""
    from bokeh.client import pull_session
    from distributed import Client, LocalCluster

    run_dir = tmp_path / "emflow-run"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        lat.open_run(run_dir, "fp", restart=False)
        features = [Unit(i, demo_unit, (i, 0.0, (25,))) for i in range(40)]
        run_stage(
            "features", features[:20], client=client, run_id=RUN, run_dir=run_dir
        )  # earlier run
        lat.open_run(run_dir, "fp", restart=False)  # resume: 0..19 are skipped
        run_stage(
            "features",
            features,
            client=client,
            run_id=RUN,
            run_dir=run_dir,
            retries=1,
            keep_going=True,
        )
        match = [
            Unit(i, demo_unit, (i, 1.0, (5,)), needs=(("features", i), ("features", i + 1)))
            for i in range(39)
        ]
        box: dict = {}

        def bg() -> None:
            box["res"] = run_stage(
                "match",
                match,
                client=client,
                run_id=RUN,
                run_dir=run_dir,
                retries=0,  # a failed match unit is final at once (a retry could meet the pause)
                keep_going=True,
            )

        t = threading.Thread(target=bg, daemon=True)
        t.start()
        try:
            deadline = time.time() + 90

            def match_stage() -> dict | None:
                stages = {st["stage"]: st for st in _snap(client)["runs"][0]["stages"]}
                return stages.get("match")

            while time.time() < deadline:
                m = match_stage()
                if (
                    m
                    and m["counts"]["done"] >= 8
                    and m["counts"]["failed"]
                    and m["counts"]["running"]
                ):
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"the match stage never reached the mid-run state: {match_stage()}")
            # freeze the lattice at once (a screenshot on a loaded machine can take longer than
            # the units left): pause, and let the running units finish
            client.sync(client.scheduler.emflow_pause, run_id=RUN)
            url = dashboard_url(client)
            shot = tmp_path / "dashboard.png"
            assert screenshot(url, shot), "the Bokeh page did not render"
            assert shot.stat().st_size > 10_000
            print(f"dashboard screenshot: {shot}")
            for _ in range(2):
                while match_stage()["counts"]["running"] and time.time() < deadline:
                    time.sleep(0.05)
                time.sleep(0.6)
            lattice = _snap(client)
            with urllib.request.urlopen(url + "/lattice.json") as r:
                assert r.headers["Content-Type"] == "application/json"
                served = json.loads(r.read())
            for a, b in zip(served["runs"], lattice["runs"], strict=True):
                assert json.dumps(_stable(a), sort_keys=True) == json.dumps(
                    _stable(b), sort_keys=True
                )
            (run,) = lattice["runs"]
            assert run["paused"] is True
            stages = {st["stage"]: st for st in run["stages"]}
            assert stages["features"]["counts"] == {
                "waiting": 0,
                "queued": 0,
                "running": 0,
                "done": 19,
                "redone": 0,
                "failed": 1,
                "skipped": 20,
                "orphaned": 0,
            }
            m = stages["match"]["counts"]
            assert (
                m["orphaned"] == 2 and m["failed"] == 1 and m["waiting"] > 0 and m["running"] == 0
            )
            assert stages["match"]["cells"][24:26] == "oo"
            assert "0 RANSAC inliers" in stages["match"]["failed"][0]["error"]

            # the page as Bokeh serves it to a browser
            with urllib.request.urlopen(url) as r:
                page = r.read()
                assert r.status == 200 and b'document.title = "emflow: lattice"' in page
                assert b'href="emflow"' in page  # the Dask navigation bar, with its emflow entry
            time.sleep(1.2)  # one periodic refresh after the pause
            with pull_session(url=url) as session:
                models = list(session.document.models)
            source = next(mdl for mdl in models if "state" in getattr(mdl, "data", {}))
            table = next(
                mdl for mdl in models if type(mdl).__name__ == "Div" and "<table" in mdl.text
            )
            per_stage = Counter(zip(source.data["y"], source.data["state"], strict=True))
            for name, st in stages.items():
                for state, n in st["counts"].items():
                    assert per_stage.get((name, state), 0) == n, (name, state)
                row = f"<b>{name}</b></td><td style='text-align:right;padding:2px 8px'>{st['total']}</td>"
                assert row in table.text
            assert (
                "PAUSED" in table.text and "match[5]" in table.text and "features[25]" in table.text
            )

            client.sync(client.scheduler.emflow_resume, run_id=RUN)
            t.join(120)
            assert not t.is_alive()
        finally:
            _stop_background_run(client, t)
        final = {st["stage"]: st["counts"] for st in _snap(client)["runs"][0]["stages"]}
    assert final["match"] == {
        "waiting": 0,
        "queued": 0,
        "running": 0,
        "done": 36,
        "redone": 0,
        "failed": 1,
        "skipped": 0,
        "orphaned": 2,
    }
    assert sorted(box["res"]) == [i for i in range(39) if i not in (5, 24, 25)]
    with pytest.raises(lat.IncompleteRun) as e:
        check_complete(RUN, run_dir)
    assert {(f["stage"], f["index"]) for f in e.value.failed} == {
        ("features", 25),
        ("match", 5),
        ("match", 24),
        ("match", 25),
    }


@pytest.mark.integration
def test_scheduler_preload_installs_plugin_and_page():
    """A scheduler started with the preload (as in a Kubernetes scheduler pod) serves the page
    and the JSON before any emflow run; registering the plugin again is a no-op."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            dashboard_address=":0",
            scheduler_kwargs={"preload": ["emflow.dask_preload"]},
        ) as lc,
        Client(lc) as client,
    ):
        plugin = lc.scheduler.plugins[lat.PLUGIN_NAME]
        url = dashboard_url(client)
        with urllib.request.urlopen(url + "/lattice.json") as r:
            assert json.loads(r.read())["runs"] == []
        with urllib.request.urlopen(url) as r:
            assert r.status == 200
        lat.ensure_plugin(client)
        assert lc.scheduler.plugins[lat.PLUGIN_NAME] is plugin
        res = run_stage(
            "stats",
            [Unit(i, demo_unit, (i, 0.0, ())) for i in range(3)],
            client=client,
            run_id="pre",
        )
        assert res == {i: {"i": i} for i in range(3)}
        assert plugin.snapshot("pre")["runs"][0]["stages"][0]["cells"] == "ddd"


def flaky_once(marks: str, i: int, delay: float) -> dict:
    """Fail the first attempt of the unit (a transient error), then succeed."""
    flag = Path(marks) / f"{i}.tried"
    if not flag.exists():
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.touch()
        raise OSError(f"unit {i}: transient read error (stale NFS handle)")
    time.sleep(delay)
    return {"i": i}


def _pixels(png: Path, hex_color: str) -> int:
    import cv2
    import numpy as np

    img = cv2.imread(str(png), cv2.IMREAD_COLOR)
    bgr = [int(hex_color[k : k + 2], 16) for k in (5, 3, 1)]
    return int(np.all(img == np.array(bgr, dtype=img.dtype), axis=2).sum())


@pytest.mark.integration
def test_screenshot_mid_run_shows_every_state_and_the_whole_plan(tmp_path):
    """A run of the pipeline's stage plan (64-slice recipe) through the real lattice on a
    LocalCluster (worker-saturation inf: the scheduler hands the worker every released unit),
    caught mid-run: features done (two redone after a transient failure), match done,
    running, queued on the worker and waiting, later stages planned with their slab z
    ranges. The page rendered by headless Chromium shows those cells (their colours fill
    cell-sized areas, more than the legend's squares), and its table the planned totals; the
    Dask dashboard's own pages link to it."""
    import dask
    from bokeh.client import pull_session
    from distributed import Client, LocalCluster

    from emflow import recipe_from_dict
    from emflow.discover import SliceCatalog, SliceRef
    from emflow.lattice.execute import declare_plan
    from emflow.pipeline import plan_output, planned_stages

    recipe = recipe_from_dict(
        {
            "source": {"pattern": str(tmp_path / "img%03d.png"), "z_start": 0, "z_stop": 64},
            "voxel_size_nm": [8, 8, 8],
            "output_dir": str(tmp_path / "out"),
            "outputs": [
                {"format": "precomputed", "name": "em", "chunk_size_xyz": [64, 64, 16]},
                {"format": "omezarr", "chunk_size_xyz": [64, 64, 16]},
            ],
            "align": {"enabled": True},
            "run": {"slab_depth": 16},
        }
    )
    catalog = SliceCatalog(
        tuple(SliceRef(z, z, str(tmp_path / f"img{z:03d}.png")) for z in range(64)),
        (2048, 2048),
        "uint8",
        (),
    )
    plan = plan_output(recipe, 64, (2048, 2048), "uint8")
    stages = planned_stages(recipe, catalog, plan, stats=False, aligning=True)
    run_id, run_dir = "mid-run", tmp_path / "emflow-run"
    with (
        dask.config.set({"distributed.scheduler.worker-saturation": float("inf")}),
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        lat.open_run(run_dir, "fp", restart=False)
        declare_plan(stages, client=client, run_id=run_id, run_dir=run_dir)
        feats = [
            Unit(i, flaky_once if i in (5, 9) else demo_unit,
                 (str(tmp_path / "marks"), i, 0.0) if i in (5, 9) else (i, 0.0, ()))
            for i in range(64)
        ]  # fmt: skip
        run_stage("features", feats, client=client, run_id=run_id, run_dir=run_dir, retries=1)
        match = [Unit(i, demo_unit, (i, 0.05 if i < 40 else 30.0, ())) for i in range(63)]

        def background_match() -> None:
            try:
                run_stage("match", match, client=client, run_id=run_id, run_dir=run_dir, window=6)
            except Exception:  # cancelled after the screenshot; its cluster then closes under it
                pass  # (its units of 30 s are not waited for: the test checks the lattice, not it)

        t = threading.Thread(target=background_match, daemon=True)
        t.start()

        def match_counts() -> dict:
            st = {
                s["stage"]: s
                for s in client.sync(client.scheduler.emflow_lattice, run_id=run_id)["runs"][0][
                    "stages"
                ]
            }
            return st["match"]["counts"]

        deadline = time.time() + 120
        while time.time() < deadline:
            c = match_counts()
            if c["running"] == 2 and c["queued"] >= 3 and c["done"] >= 40:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the run never reached the mid-run state: {match_counts()}")
        url = dashboard_url(client)
        shot = tmp_path / "lattice-page.png"
        assert screenshot(url, shot, size=(1280, 800)), "the Bokeh page did not render"
        print(f"lattice page screenshot: {shot}")
        snap = client.sync(client.scheduler.emflow_lattice, run_id=run_id)["runs"][0]
        with pull_session(url=url) as session:
            models = list(session.document.models)
        with urllib.request.urlopen(url.replace("/emflow", "/status")) as r:
            status_page = r.read()
        cancelled = client.sync(client.scheduler.emflow_cancel, run_id=run_id)
        assert cancelled["cancelled"]
    states = {s["stage"]: s for s in snap["stages"]}
    pyramid = [name for name, _n, _mem in plan.stages()]
    assert list(states) == ["features", "match", "match2", "solve", "qc", *pyramid, "finalize"]
    assert (
        states["features"]["counts"]["redone"] == 2 and states["features"]["counts"]["done"] == 62
    )
    m = states["match"]["counts"]
    assert m["running"] == 2 and m["queued"] >= 3 and m["waiting"] > 0 and m["done"] >= 40
    z0, z1 = plan.passes[0].box(1)[:2]
    assert states["slab"]["planned"] and states["slab"]["labels"][1].startswith(f"z {z0}-{z1 - 1}")
    legend_only = _pixels(shot, COLORS["failed"])  # no failed cell: its legend marks only
    for state in ("waiting", "queued", "running", "done", "redone"):
        assert _pixels(shot, COLORS[state]) > legend_only + 150, f"no {state} cell in the shot"
    table = next(mdl for mdl in models if type(mdl).__name__ == "Div" and "<table" in mdl.text)
    assert f"&asymp;{plan.passes[0].n_units}</td>" in table.text  # the slabs, planned
    source = next(mdl for mdl in models if "label" in getattr(mdl, "data", {}))
    assert states["slab"]["labels"][-1] in source.data["label"]
    assert b'href="emflow"' in status_page  # the Dask dashboard links the lattice page
