"""Kubernetes that can run: an image with emflow in it, credentials only from a Secret.

The spec names an image the user builds from the repository's Dockerfile (an image known
to lack emflow is refused), pods get object-store credentials through ``pod.envFrom``
(a Secret), and credentials written into ``env`` are refused. No Docker daemon or
registry is reachable here, so the image build is checked through what it installs:
the build context the Dockerfile copies (``.dockerignore``) builds an emflow wheel that
holds the modules the image's own import check and the pods need.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("dask_kubernetes")

from emflow.cluster import ClusterRequest, kubernetes_spec  # noqa: E402
from emflow.errors import ClusterError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _request(tmp_path: Path, text: str) -> ClusterRequest:
    site = tmp_path / "k8s.yaml"
    site.write_text(text)
    return ClusterRequest("kubernetes", config_path=site)


def test_pods_get_credentials_from_a_secret_and_validate(tmp_path: Path) -> None:
    spec = kubernetes_spec(
        _request(
            tmp_path,
            "image: registry.example.org/lab/emflow:0.1.0\n"
            "env: {AWS_ENDPOINT_URL: 'http://minio.storage:9000', AWS_REGION: us-east-1}\n"
            "pod:\n  envFrom: [{secretRef: {name: emflow-s3}}]\n",
        )
    )
    for part in ("scheduler", "worker"):
        pod = spec["spec"][part]["spec"]
        c = pod["containers"][0]
        assert c["image"] == "registry.example.org/lab/emflow:0.1.0"
        assert c["envFrom"] == [{"secretRef": {"name": "emflow-s3"}}]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"  # by reference: fine
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": part}, "spec": pod},
            "1.30",
            strict=True,
        )


def test_default_image_is_an_emflow_image(tmp_path: Path) -> None:
    spec = kubernetes_spec(ClusterRequest("kubernetes"))
    image = spec["spec"]["worker"]["spec"]["containers"][0]["image"]
    assert image.split(":")[0] == "emflow"
    # the shipped example config names the same image as the Dockerfile's build line
    shipped = (ROOT / "cluster_configs" / "kubernetes.yaml").read_text()
    assert re.search(rf"^image: {re.escape(image)}\b", shipped, re.M)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("image: ghcr.io/dask/dask:latest\n", "has no emflow in it"),
        ("image: daskdev/dask:2024.1.0\n", "docker build -t REGISTRY/emflow:TAG"),
        (
            "image: emflow:1\nenv: {AWS_SECRET_ACCESS_KEY: s3cr3t}\n",
            "put it in a Kubernetes Secret and reference it with pod.envFrom",
        ),
        ("image: emflow:1\nenv: {MY_DB_SECRET: x}\n", "env MY_DB_SECRET would write a credential"),
    ],
)
def test_unusable_image_or_credentials_in_env_are_refused(
    tmp_path: Path, text: str, fragment: str
) -> None:
    with pytest.raises(ClusterError) as err:
        kubernetes_spec(_request(tmp_path, text))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert "s3cr3t" not in str(err.value)


def _context_files() -> list[Path]:
    """The files ``docker build .`` sends, per .dockerignore ('*' then '!' exceptions)."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    out = []
    for p in ROOT.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(ROOT).as_posix()
        keep = True
        for rule in rules:
            neg = rule.startswith("!")
            pat = rule[1:] if neg else rule
            pat = pat.rstrip("/")
            hit = (
                fnmatch.fnmatch(rel, pat)
                or rel.startswith(pat + "/")
                or fnmatch.fnmatch(rel, pat.replace("**/", "*/"))
                or (pat.startswith("**/") and f"/{pat[3:]}/" in f"/{rel}")
            )
            if hit:
                keep = neg
        if keep:
            out.append(p)
    return out


def test_dockerfile_context_builds_an_installable_emflow(tmp_path: Path) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'pip install ".[kubernetes]"' in dockerfile
    check = re.search(r'python -c "([^"]+)"', dockerfile).group(1)  # the image's import check
    ctx = tmp_path / "ctx"
    files = _context_files()
    assert {p.relative_to(ROOT).as_posix() for p in files} >= {"pyproject.toml", "README.md"}
    assert not any(p.relative_to(ROOT).parts[0] in ("tests", ".git") for p in files)
    for p in files:
        dest = ctx / p.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
    # the image's `pip install .` builds from exactly these files (an sdist needs no network)
    code = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")],
        cwd=ctx, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("emflow-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        meta = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO")))
        meta = meta.read().decode()
    for module in re.findall(r"import ([\w., ]+)", check)[0].split(","):
        module = module.strip()
        if module.startswith("emflow"):
            assert module.replace(".", "/") + ".py" in names, module
    assert "emflow/io/storage.py" in names and "emflow/dask_preload.py" in names
    assert "Provides-Extra: kubernetes" in meta
