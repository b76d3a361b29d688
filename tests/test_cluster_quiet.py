"""The clusters emflow starts sample and tick less often in their event loops
(emflow.cluster.quiet): a 100 ms worker profile sample instead of 10 ms and a 1 s tick instead of 20 ms, in the
scheduler, the nannies and the workers, unless the user's Dask config set them: then theirs.
"""

from __future__ import annotations

import sys

import pytest

from tests import clirun

pytestmark = pytest.mark.integration

CODE = """
from emflow.cluster import ClusterRequest, open_client

def seen(dask_worker):
    pc = dask_worker.periodic_callbacks
    return float(pc["tick"].callback_time), float(pc["profile"].callback_time)

request = ClusterRequest("local", workers=2, threads_per_worker=1, dashboard_address=":0")
with open_client(request) as client:
    client.wait_for_workers(2, timeout=60)
    workers = sorted(set(client.run(seen).values()))
    scheduler = client.run_on_scheduler(
        lambda dask_scheduler: float(dask_scheduler.periodic_callbacks["tick"].callback_time)
    )
print(workers, scheduler)
"""


def test_workers_and_scheduler_tick_and_sample_less_unless_the_user_said_otherwise(tmp_path):
    said = {}
    for case, env in (
        ("emflow", {}),
        ("user", {"DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "50ms"}),
    ):
        done = clirun.run([sys.executable, "-c", CODE], tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        said[case] = done.stdout.strip()
    assert said["emflow"] == "[(1000.0, 100.0)] 1000.0"
    assert said["user"] == "[(50.0, 100.0)] 50.0"  # the user's tick; emflow's profile sample


def test_batch_and_kubernetes_workers_get_them_in_their_environment_unless_set():
    from emflow.cluster import quiet

    chosen = quiet.settings()
    assert chosen == quiet.SETTINGS
    assert quiet.env_vars(chosen) == {
        "DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL": "100ms",
        "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
    }
