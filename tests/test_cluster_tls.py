"""TLS without SLURM: an existing ``tls://`` scheduler reached with ``--cluster tls://...``.

A scheduler with temporary certificates runs in this process; only clients that
present certificates signed by its CA get in. (The SLURM tests check the same for
worker jobs.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import LocalCluster
from distributed.security import Security

from emflow.cluster import ClusterRequest, open_client
from emflow.errors import ClusterError

pytestmark = pytest.mark.integration


def _write_certs(security: Security, directory: Path) -> dict[str, str]:
    """PEM files for a client of ``security`` (temporary() keeps them in memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "tls_ca_file": security.tls_ca_file,
        "tls_client_cert": security.tls_client_cert,
        "tls_client_key": security.tls_client_key,
    }
    out = {}
    for key, pem in paths.items():
        path = directory / f"{key}.pem"
        path.write_text(pem)
        path.chmod(0o600)
        out[key] = str(path)
    return out


@pytest.fixture(scope="module")
def tls_scheduler() -> Iterator[tuple[str, Security]]:
    security = Security.temporary()
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        security=security,
        dashboard_address=":0",
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        yield cluster.scheduler_address, security


def _site(tmp_path: Path, certs: dict[str, str] | None) -> Path:
    site = tmp_path / "site.yaml"
    lines = ["timeout: 3s"]
    if certs:
        lines.append("security:")
        lines += [f"  {k}: {v}" for k, v in certs.items()]
    site.write_text("\n".join(lines) + "\n")
    return site


def test_client_with_the_certificates_connects(
    tls_scheduler: tuple[str, Security], tmp_path: Path
) -> None:
    address, security = tls_scheduler
    site = _site(tmp_path, _write_certs(security, tmp_path / "certs"))
    with open_client(ClusterRequest(address, config_path=site)) as client:
        assert client.submit(sum, [1, 2, 3]).result() == 6


def test_client_without_certificates_is_refused(
    tls_scheduler: tuple[str, Security], tmp_path: Path
) -> None:
    address, _ = tls_scheduler
    with pytest.raises(ClusterError, match="needs certificates"):
        with open_client(ClusterRequest(address, config_path=_site(tmp_path, None))):
            pass


def test_client_with_another_ca_is_refused(
    tls_scheduler: tuple[str, Security], tmp_path: Path
) -> None:
    address, _ = tls_scheduler
    site = _site(tmp_path, _write_certs(Security.temporary(), tmp_path / "other"))
    with pytest.raises(ClusterError, match="cannot reach the scheduler"):
        with open_client(ClusterRequest(address, config_path=site)):
            pass


def test_plain_tcp_to_the_tls_port_is_refused(
    tls_scheduler: tuple[str, Security], tmp_path: Path
) -> None:
    address, _ = tls_scheduler
    tcp = address.replace("tls://", "tcp://")
    with pytest.raises(ClusterError, match="cannot reach the scheduler"):
        with open_client(ClusterRequest(tcp, config_path=_site(tmp_path, None))):
            pass


def test_bad_security_key_names_the_option(
    tls_scheduler: tuple[str, Security], tmp_path: Path
) -> None:
    address, _ = tls_scheduler
    site = tmp_path / "site.yaml"
    site.write_text("security:\n  tls_ca: /x.pem\n")
    with pytest.raises(ClusterError, match="'security' has a bad key"):
        with open_client(ClusterRequest(address, config_path=site)):
            pass
