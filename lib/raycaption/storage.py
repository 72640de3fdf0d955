"""Object storage through fsspec: the only module that knows about URLs and protocols.

Credentials are never passed as options: every process (driver, Ray workers) finds them in
its own environment, so they cannot leak into configs, summaries, logs or command lines.
Non-secret settings (endpoint, region) are resolved once on the driver and shipped to the
workers inside the config.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem, sync

from raycaption.config import StorageConfig
from raycaption.errors import ConfigError, RecordError

logger = logging.getLogger(__name__)

# Option names that hold secrets; refused so they never reach a summary or a log.
SECRET_OPTION_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "access_key",
        "secret_key",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "client_secret",
        "account_key",
        "sas_token",
    }
)
# Query parameters of signed URLs; removed from anything written or logged.
SECRET_QUERY_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "sig",
        "token",
        "access_token",
        "awsaccesskeyid",
        "se",
        "sp",
        "sv",
    }
)


def resolve_storage(cfg: StorageConfig) -> StorageConfig:
    """Fill endpoint and region from the standard AWS variables, on the driver, so the
    workers get the same values; refuse secret-bearing options."""
    for proto, opts in cfg.options.items():
        leaked = sorted(_secret_keys(opts))
        if leaked:
            raise ConfigError(
                f"storage option(s) {leaked} for {proto!r} look like credentials; pass "
                "credentials through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, an instance role), never as options"
            )
    endpoint = (
        cfg.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint and not urllib.parse.urlparse(endpoint).scheme.startswith("http"):
        raise ConfigError(f"S3 endpoint must be an http(s) URL, got {redact(endpoint)!r}")
    return StorageConfig(endpoint_url=endpoint, region=region, options=cfg.options)


def _secret_keys(opts: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(opts, dict):
        for k, v in opts.items():
            if str(k).lower() in SECRET_OPTION_NAMES:
                found.add(str(k))
            found |= _secret_keys(v)
    elif isinstance(opts, (list, tuple)):
        for v in opts:
            found |= _secret_keys(v)
    return found


def protocol_of(url: str) -> str:
    """``s3://b/k`` -> ``s3``; a plain path -> ``file``."""
    proto = fsspec.utils.get_protocol(url)
    return "s3" if proto in ("s3", "s3a") else proto


def storage_options(url: str, cfg: StorageConfig) -> dict[str, Any]:
    """fsspec options for one URL's protocol."""
    proto = protocol_of(url)
    opts: dict[str, Any] = dict(cfg.options.get(proto, {}))
    if proto == "s3":
        client_kwargs = dict(opts.get("client_kwargs", {}))
        if cfg.endpoint_url:
            client_kwargs.setdefault("endpoint_url", cfg.endpoint_url)
        if cfg.region:
            client_kwargs.setdefault("region_name", cfg.region)
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
    return opts


def filesystem(url: str, cfg: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the protocol-less path for a URL (instances are cached)."""
    opts = storage_options(url, cfg)
    return _cached_fs(protocol_of(url), json.dumps(opts, sort_keys=True, default=str)), _strip(url)


@functools.lru_cache(maxsize=32)
def _cached_fs(protocol: str, opts_json: str) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(protocol, **json.loads(opts_json))


def _strip(url: str) -> str:
    proto = protocol_of(url)
    cls = fsspec.get_filesystem_class(proto)
    return cls._strip_protocol(url)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk (where ``os`` calls give atomic create and rename)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join URL path parts with ``/`` (works for local paths and every protocol)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def unstrip(protocol: str, path: str) -> str:
    """A protocol-qualified URL for a path the filesystem returned."""
    if protocol == "file":
        return path if path.startswith("/") else "/" + path
    if protocol in ("http", "https"):
        return path
    return f"{protocol}://{path}"


def redact(url: str) -> str:
    """Drop user info and signed-URL query parameters: safe to log and to store."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises on a non-numeric port
    except ValueError:
        return redact_text(url)
    if not parts.scheme or parts.scheme == "file":
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if port:
        netloc = f"{netloc}:{port}"
    query = [
        (k, v)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in SECRET_QUERY_PARAMS
    ]
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(query), parts.fragment)
    )


def image_id_for(uri: str) -> str:
    """Stable id for a source: 32 hex chars of sha256 over the redacted URI."""
    return hashlib.sha256(redact(uri).encode("utf-8")).hexdigest()[:32]


def check_readable(url: str, cfg: StorageConfig) -> None:
    """Fail fast with a clear message when an input cannot be reached."""
    try:
        fs, path = filesystem(url, cfg)
        if not fs.exists(path):
            raise ConfigError(f"input {redact(url)} does not exist")
    except ConfigError:
        raise
    except PermissionError as exc:
        raise ConfigError(
            f"input {redact(url)} is not readable: permission denied ({exc})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any backend failure means "unreachable"
        raise ConfigError(
            f"input {redact(url)} is unreachable: {type(exc).__name__}: {exc}"
        ) from None


def parquet_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Sorted ``.parquet`` files below ``path`` (empty when it does not exist)."""
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet"))


def iter_files(url: str, cfg: StorageConfig) -> Iterator[tuple[str, int | None]]:
    """Yield (url, size) for every file below a prefix, streaming: the listing is never held
    in memory whole (S3 is paged 1,000 keys at a time; other backends walk one folder at a
    time)."""
    fs, path = filesystem(url, cfg)
    proto = protocol_of(url)
    if fs.isfile(path):
        yield unstrip(proto, path), fs.size(path)
        return
    if proto == "s3" and isinstance(fs, AsyncFileSystem):
        yield from _iter_s3(fs, path)
        return
    for dirpath, _dirs, files in fs.walk(path, detail=True):
        for name in sorted(files):
            info = files[name]
            full = info.get("name") or f"{dirpath.rstrip('/')}/{name}"
            yield unstrip(proto, full), info.get("size")


def _iter_s3(fs: AsyncFileSystem, path: str) -> Iterator[tuple[str, int | None]]:
    bucket, key, _ = fs.split_path(path)
    prefix = key.rstrip("/") + "/" if key else ""
    pages = fs._iterdir(bucket, delimiter="", prefix=prefix)
    while True:
        try:
            info = sync(fs.loop, pages.__anext__)
        except StopAsyncIteration:
            return
        if info.get("type") == "directory" or info["name"].endswith("/"):
            continue
        yield f"s3://{info['name']}", info.get("size")


def read_bytes(
    url: str, cfg: StorageConfig, max_bytes: int, size_hint: int | None, retries: int
) -> bytes:
    """Read one object whole. Transient errors are retried with exponential backoff; the
    final failure becomes a RecordError with a read-stage code."""
    if size_hint is not None and size_hint > max_bytes:
        raise RecordError("file_too_large", f"{size_hint} bytes > limit {max_bytes}")
    delay = 0.2
    for attempt in range(1, retries + 1):
        try:
            fs, path = filesystem(url, cfg)
            with fs.open(path, "rb") as f:
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise RecordError("file_too_large", f"more than {max_bytes} bytes")
            return data
        except RecordError:
            raise
        except FileNotFoundError as exc:
            raise RecordError("not_found", _short(exc)) from None
        except PermissionError as exc:
            raise RecordError("permission_denied", _short(exc)) from None
        except IsADirectoryError:
            raise RecordError("read_failed", "is a directory") from None
        except OSError as exc:
            if exc.errno in (errno.ENOENT,):
                raise RecordError("not_found", _short(exc)) from None
            if attempt == retries:
                raise RecordError(
                    "read_failed", f"after {retries} attempts: {_short(exc)}"
                ) from None
        except Exception as exc:  # noqa: BLE001 - one record's boundary
            if _is_http_status(exc, 404):
                raise RecordError("not_found", _short(exc)) from None
            if _is_http_status(exc, 403) or _is_http_status(exc, 401):
                raise RecordError("permission_denied", _short(exc)) from None
            if attempt == retries:
                raise RecordError(
                    "read_failed", f"after {retries} attempts: {_short(exc)}"
                ) from None
        logger.debug("retrying read of %s (attempt %d)", redact(url), attempt)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _is_http_status(exc: BaseException, status: int) -> bool:
    return getattr(exc, "status", None) == status or getattr(exc, "code", None) == status


_SECRET_IN_TEXT = re.compile(
    r"(?i)\b(" + "|".join(re.escape(p) for p in sorted(SECRET_QUERY_PARAMS)) + r")=[^&\s'\"]+"
)
_USERINFO_IN_TEXT = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@")


def redact_text(text: str) -> str:
    """Remove signed-URL parameters and user:password@ from free text (error messages)."""
    text = _SECRET_IN_TEXT.sub(lambda m: f"{m.group(1)}=REDACTED", text)
    return _USERINFO_IN_TEXT.sub(lambda m: m.group(1), text)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = redact_text(f"{type(exc).__name__}: {exc}")
    return text if len(text) <= limit else text[: limit - 3] + "..."
