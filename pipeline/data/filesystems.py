"""One way to reach any storage: fsspec URIs plus non-secret ``storage_options``."""

from __future__ import annotations

import fsspec

from pipeline.errors import StorageError

# Keys that would put a credential into a config file; credentials come from the
# environment (AWS_*, IRSA, k8s secrets) only.
SECRET_OPTION_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "secret_key",
        "account_key",
        "sas_token",
        "client_secret",
        "credentials",
    }
)


SECRET_WORDS = ("secret", "password", "token", "credential")  # any key holding one of these is secret too


def is_secret_name(name: object) -> bool:
    """The one test of whether a setting's name marks a credential (refused in configs, never shown)."""
    low = str(name).lower()
    return low in SECRET_OPTION_KEYS or any(w in low for w in SECRET_WORDS)


def secret_keys_in(options: dict | None) -> list[str]:
    """Names of credential-looking keys in ``storage_options`` (searched recursively)."""
    found: list[str] = []

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            name = f"{prefix}{k}"
            if is_secret_name(k):
                found.append(name)
            if isinstance(v, dict):
                walk(v, name + ".")

    walk(options or {}, "")
    return found


def is_remote(uri: str) -> bool:
    """True for URIs that need fsspec (s3://, gs://, …); local paths and file:// are not."""
    proto = uri.split("://", 1)[0] if "://" in uri else ""
    return proto not in ("", "file", "local")


def url_to_fs(uri: str, storage_options: dict | None = None):
    """(filesystem, path) for a URI; a bad protocol or a missing driver is a clear error."""
    options = dict(storage_options or {})
    if uri.startswith(("s3://", "s3a://")):
        # botocore's own retries for throttling and 5xx, on top of ours for whole operations
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 10, "mode": "standard"})
        options["config_kwargs"] = config
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {uri!r}: {exc}") from None


def explain_storage_error(uri: str, exc: BaseException) -> StorageError:
    """Turn an fsspec/botocore failure into one line naming the URI and the likely fix."""
    name = type(exc).__name__
    text = str(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        hint = "no credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a service account (IRSA) in the environment"
    elif isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        hint = "access denied: check the credentials in the environment and the bucket policy"
    elif isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
        hint = "not found: check the bucket and prefix, and storage_options.endpoint_url for S3-compatible stores"
    elif "Could not connect" in text or "EndpointConnectionError" in name:
        hint = "cannot reach the endpoint: check storage_options.endpoint_url and the network"
    else:
        hint = f"{name}"
    return StorageError(f"{uri}: {hint}")


# ---- transient faults ---------------------------------------------------------------

TRANSIENT_MARKERS = ("SlowDown", "ServiceUnavailable", "503", "500", "502", "504", "InternalError",
                     "RequestTimeout", "Throttl", "Connection reset", "ConnectionReset", "timed out",
                     "Timeout", "Server disconnected", "ClientPayloadError", "ServerDisconnected",
                     "IncompleteRead", "Broken pipe", "EndpointConnectionError", "Could not connect",
                     "ConditionalRequestConflict")  # S3: two conditional writes raced; retry and lose cleanly


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, 5xx, resets and timeouts; never not-found or access denied."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(m in text for m in TRANSIENT_MARKERS)


def with_retries(fn, *args, attempts: int = 8, base_delay: float = 0.2, what: str = "", **kwargs):
    """Call fn, retrying transient storage faults with exponential backoff and jitter."""
    import random
    import time

    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            time.sleep(min(10.0, base_delay * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def put_bytes(fs, path: str, data: bytes) -> None:
    """Write an object so it appears complete or not at all (local: temp file + rename)."""
    if is_local(fs):
        import os
        import uuid

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:  # one PUT: object stores make it visible only when complete
        with_retries(fs.pipe_file, path, data, what=path)


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Write an object only if no object has that name; False if one has. Of two writers racing
    for one name exactly one gets True (local: link(2) of a complete temp file, which fails on an
    existing name; object stores: a PUT with ``If-None-Match: *``, through fsspec's ``mode="create"``).

    A retried PUT whose first try did land also answers False: callers that must know tell their
    own object by its content.
    """
    if is_local(fs):
        import os
        import uuid

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    try:
        with_retries(fs.pipe_file, path, data, mode="create", what=path)
        return True
    except FileExistsError:
        return False
    except TypeError:  # a filesystem whose pipe_file has no ``mode``
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        raise StorageError(f"{protocol}:// has no exclusive create in this fsspec driver; latentshift needs it "
                           "for shard claims (local paths and s3:// have it)") from None


def get_bytes(fs, path: str) -> bytes:
    return with_retries(fs.cat_file, path, what=path)


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
