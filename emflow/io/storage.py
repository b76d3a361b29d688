"""Object-store settings and credentials: how s3://, gs:// and http(s):// URLs become kvstores.

Credentials come the way each ecosystem provides them and never pass through emflow:

* **S3** (AWS, MinIO, Ceph): ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, or a named profile of ``~/.aws/credentials`` (``AWS_PROFILE``,
  ``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``), or the instance / web-identity
  chain; ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION`` name an S3-compatible endpoint and its region. tensorstore honours
  only the key variables, so emflow maps the others into the kvstore spec.
* **GCS**: ``GOOGLE_APPLICATION_CREDENTIALS`` or gcloud's application-default credentials
  (tensorstore reads them); ``TENSORSTORE_GCS_HTTP_URL`` points at a GCS-compatible server.
* anonymous access for public buckets (``storage.anonymous``).

A recipe names credentials **by reference only** (:class:`StorageSettings`: endpoint,
profile name, region, anonymous). Each process decides its credential *type* from its own
environment when it builds a spec, so a worker pod uses the secret mounted into it; specs,
task graphs, run folders and job scripts hold no key. Requests retry with a bounded backoff
(:data:`DEFAULT_RETRIES` attempts) and stalled transfers time out, so an unreachable store
fails a run in seconds, not after tensorstore's 15 minutes.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

#: attempts per request before a store counts as unreachable (tensorstore's default is 32, ~15 min)
DEFAULT_RETRIES = 6
#: a transfer that moves less than 1 byte/s for this long is aborted (tensorstore has no default)
STALL_TIMEOUT_S = 60
#: seconds to establish a connection
CONNECT_TIMEOUT_S = 20

#: environment variables that make tensorstore/curl print credentials (request headers)
LEAKY_ENV = ("TENSORSTORE_CURL_VERBOSE", "TENSORSTORE_VERBOSE_LOGGING")
_LEAKY_LOGGING = re.compile(r"(^|,)\s*(curl|all)\s*(=|,|$)")

#: variables whose values are secrets: never written or printed (messages are scrubbed of them)
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
)


@dataclass(frozen=True)
class StoreSettings:
    """How to reach one object store (no secrets): endpoint, region, AWS profile, anonymous."""

    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    anonymous: bool = False

    def merged(self, other: StoreSettings) -> StoreSettings:
        """These settings with ``other``'s non-default values on top."""
        return replace(
            self,
            endpoint=other.endpoint or self.endpoint,
            region=other.region or self.region,
            profile=other.profile or self.profile,
            anonymous=other.anonymous or self.anonymous,
        )


@dataclass(frozen=True)
class StorageSettings:
    """Object-store settings of a run: defaults, per-bucket overrides and request retries.

    Resolved in the driver (recipe first, then the driver's environment) and shipped to
    workers as they are: nothing here is a secret.
    """

    default: StoreSettings = field(default_factory=StoreSettings)
    buckets: dict[str, StoreSettings] = field(default_factory=dict)
    retries: int = DEFAULT_RETRIES

    def for_bucket(self, bucket: str) -> StoreSettings:
        over = self.buckets.get(bucket)
        return self.default if over is None else self.default.merged(over)

    def to_json(self) -> dict[str, Any]:
        return {
            "default": asdict(self.default),
            "buckets": {b: asdict(s) for b, s in sorted(self.buckets.items())},
            "retries": self.retries,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StorageSettings:
        return cls(
            StoreSettings(**(data.get("default") or {})),
            {b: StoreSettings(**s) for b, s in (data.get("buckets") or {}).items()},
            int(data.get("retries", DEFAULT_RETRIES)),
        )


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def resolve(
    *,
    endpoint: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    anonymous: bool = False,
    buckets: dict[str, dict[str, Any]] | None = None,
    retries: int | None = None,
) -> StorageSettings:
    """Settings from a recipe's ``storage`` section, completed from this process's environment.

    The endpoint is the recipe's, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; the
    region the recipe's, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; the profile the
    recipe's, else ``AWS_PROFILE``; attempts per request the recipe's, else
    ``EMFLOW_STORE_RETRIES``, else :data:`DEFAULT_RETRIES`.
    """
    default = StoreSettings(
        endpoint=_clean_endpoint(
            endpoint or _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL")
        ),
        region=region or _env("AWS_REGION") or _env("AWS_DEFAULT_REGION"),
        profile=profile or _env("AWS_PROFILE"),
        anonymous=bool(anonymous),
    )
    per = {
        b: StoreSettings(
            endpoint=_clean_endpoint(s.get("endpoint")),
            region=s.get("region"),
            profile=s.get("profile"),
            anonymous=bool(s.get("anonymous", False)),
        )
        for b, s in (buckets or {}).items()
    }
    if retries is None:
        retries = _retries_from_env()
    return StorageSettings(default, per, int(retries))


def _retries_from_env() -> int:
    """``EMFLOW_STORE_RETRIES`` (attempts per request), else :data:`DEFAULT_RETRIES`."""
    text = _env("EMFLOW_STORE_RETRIES")
    try:
        return max(1, int(text)) if text else DEFAULT_RETRIES
    except ValueError:
        return DEFAULT_RETRIES


def _clean_endpoint(url: str | None) -> str | None:
    # a trailing "/" makes tensorstore sign "//bucket/key" (SignatureDoesNotMatch)
    return url.strip().rstrip("/") if url and url.strip() else None


# ---------------------------------------------------------------------------------------
# the settings of this process
# ---------------------------------------------------------------------------------------
_CURRENT: StorageSettings | None = None


def configure(settings: StorageSettings) -> None:
    """Use ``settings`` for every location this process opens from now on (driver and workers).

    Also bounds how long a stalled or unreachable store can hold a request (curl timeouts,
    read by tensorstore from the environment) unless the user set them.
    """
    global _CURRENT
    _CURRENT = settings
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(STALL_TIMEOUT_S))
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
    os.environ.setdefault("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", str(CONNECT_TIMEOUT_S))


def current() -> StorageSettings:
    """The settings :func:`configure` set, else those of the environment alone."""
    return _CURRENT if _CURRENT is not None else resolve()


def leaky_environment() -> str | None:
    """The variable that would make tensorstore print credentials, or None."""
    if _env("TENSORSTORE_CURL_VERBOSE") not in (None, "0"):
        return "TENSORSTORE_CURL_VERBOSE"
    logging_flags = _env("TENSORSTORE_VERBOSE_LOGGING") or ""
    if _LEAKY_LOGGING.search(logging_flags):
        return "TENSORSTORE_VERBOSE_LOGGING"
    return None


def scrub(text: str) -> str:
    """``text`` without the values of this process's secret variables and HTTP response bodies."""
    text = re.sub(r"\s*\[http_response_body='.*?'\](?=\s*\[|\s*$)", "", text, flags=re.S)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "****")
    return text


# ---------------------------------------------------------------------------------------
# kvstore specs
# ---------------------------------------------------------------------------------------
def _retries(n: int) -> dict[str, Any]:
    return {"max_retries": max(1, n), "initial_delay": "0.5s", "max_delay": "8s"}


def aws_credentials(store: StoreSettings) -> dict[str, Any]:
    """The tensorstore ``aws_credentials`` resource for this process (a type, never a key).

    A named profile → the default chain with that profile (tensorstore ignores AWS_PROFILE);
    keys in this process's environment → ``environment``; ``anonymous`` → unsigned requests;
    else the default chain (profile ``default``, then instance or web-identity credentials).
    """
    if store.anonymous:
        return {"type": "anonymous"}
    if store.profile:
        return {"type": "default", "profile": store.profile}
    if _env("AWS_ACCESS_KEY_ID"):
        return {"type": "environment"}
    return {"type": "default", "profile": "default"}


def s3_kvstore(bucket: str, path: str, settings: StorageSettings | None = None) -> dict[str, Any]:
    """The kvstore spec of ``s3://bucket/path`` (path: a key prefix ending in '/' or empty)."""
    settings = settings or current()
    store = settings.for_bucket(bucket)
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path}
    region = store.region
    if store.endpoint:
        spec["endpoint"] = store.endpoint
        region = region or "us-east-1"  # S3-compatible stores accept any; signing needs one
    if region:
        spec["aws_region"] = region  # else tensorstore asks the bucket (an unsigned HEAD)
    spec["context"] = {
        "aws_credentials": aws_credentials(store),
        "s3_request_retries": _retries(settings.retries),
    }
    return spec


def gcs_kvstore(bucket: str, path: str, settings: StorageSettings | None = None) -> dict[str, Any]:
    """The kvstore spec of ``gs://bucket/path``."""
    settings = settings or current()
    return {
        "driver": "gcs",
        "bucket": bucket,
        "path": path,
        "context": {"gcs_request_retries": _retries(settings.retries)},
    }


def http_kvstore(base_url: str, path: str, settings: StorageSettings | None = None) -> dict:
    """The kvstore spec of ``base_url`` + ``path`` (read-only)."""
    settings = settings or current()
    return {
        "driver": "http",
        "base_url": base_url,
        "path": path,
        "context": {"http_request_retries": _retries(settings.retries)},
    }


def endpoint_of(scheme: str, bucket: str, settings: StorageSettings | None = None) -> str:
    """Where requests for a bucket go, for messages (no credentials in it)."""
    settings = settings or current()
    if scheme == "s3":
        store = settings.for_bucket(bucket)
        return store.endpoint or f"https://{bucket}.s3.amazonaws.com"
    if scheme == "gs":
        return _env("TENSORSTORE_GCS_HTTP_URL") or "https://storage.googleapis.com"
    return bucket
