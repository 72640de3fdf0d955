"""Object storage helpers (raycaption.storage): config resolution, redaction, reads, listing."""

from __future__ import annotations

import errno
import re
import types

import pytest

from raycaption import storage
from raycaption.config import StorageConfig
from raycaption.errors import ConfigError, RecordError

AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture
def clean_env(monkeypatch):
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def sleeps(monkeypatch):
    """Record read_bytes' backoff sleeps instead of sleeping (patches storage's `time` only)."""
    delays: list[float] = []
    monkeypatch.setattr(storage, "time", types.SimpleNamespace(sleep=delays.append))
    return delays


@pytest.fixture
def s3cfg(s3) -> StorageConfig:
    return storage.resolve_storage(StorageConfig())


# -- resolve_storage -------------------------------------------------------------------------


def test_resolve_nothing_set(clean_env):
    cfg = storage.resolve_storage(StorageConfig())
    assert cfg.endpoint_url is None
    assert cfg.region is None
    assert cfg.options == {}


def test_resolve_prefers_s3_specific_endpoint(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert storage.resolve_storage(StorageConfig()).endpoint_url == "http://s3-only:9000"


def test_resolve_falls_back_to_generic_endpoint(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "https://generic.example.com")
    assert storage.resolve_storage(StorageConfig()).endpoint_url == "https://generic.example.com"


def test_resolve_region_prefers_aws_region(clean_env):
    clean_env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert storage.resolve_storage(StorageConfig()).region == "us-east-1"
    clean_env.setenv("AWS_REGION", "eu-central-1")
    assert storage.resolve_storage(StorageConfig()).region == "eu-central-1"


def test_resolve_explicit_config_wins_over_env(clean_env):
    for name in AWS_VARS:
        clean_env.setenv(name, "http://from-env:1" if "ENDPOINT" in name else "env-region")
    options = {"s3": {"anon": False, "config_kwargs": {"max_pool_connections": 50}}}
    cfg = storage.resolve_storage(
        StorageConfig(endpoint_url="https://explicit:8443", region="ap-south-1", options=options)
    )
    assert cfg.endpoint_url == "https://explicit:8443"
    assert cfg.region == "ap-south-1"
    assert cfg.options == options


def test_resolve_returns_a_new_config(clean_env):
    clean_env.setenv("AWS_REGION", "eu-west-3")
    original = StorageConfig()
    resolved = storage.resolve_storage(original)
    assert resolved.region == "eu-west-3"
    assert original.region is None


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"s3": {"key": "AKIAEXAMPLESECRET0001"}}, "key"),
        ({"s3": {"secret": "AKIAEXAMPLESECRET0001"}}, "secret"),
        ({"s3": {"Token": "AKIAEXAMPLESECRET0001"}}, "Token"),
        ({"s3": {"client_kwargs": {"aws_secret_access_key": "AKIAEXAMPLESECRET0001"}}}, None),
        ({"s3": {"a": {"b": {"c": {"AWS_SESSION_TOKEN": "AKIAEXAMPLESECRET0001"}}}}}, None),
        ({"s3": {"chain": [{"password": "AKIAEXAMPLESECRET0001"}]}}, "password"),
        ({"abfs": {"account_key": "AKIAEXAMPLESECRET0001"}}, "account_key"),
        ({"gcs": {"anon": True}, "s3": {"sas_token": "AKIAEXAMPLESECRET0001"}}, "sas_token"),
    ],
)
def test_resolve_refuses_secret_options_without_echoing_them(clean_env, options, name):
    with pytest.raises(ConfigError, match="look like credentials") as info:
        storage.resolve_storage(StorageConfig(options=options))
    message = str(info.value)
    assert "AKIAEXAMPLESECRET0001" not in message
    if name is None:
        # The nested key is still named (as it was spelled).
        assert re.search(r"aws_secret_access_key|AWS_SESSION_TOKEN", message)
    else:
        assert repr(name) in message


def test_resolve_allows_non_secret_options(clean_env):
    options = {"s3": {"anon": True, "client_kwargs": {"verify": False}, "keyfile_dir": "x"}}
    assert storage.resolve_storage(StorageConfig(options=options)).options == options


@pytest.mark.parametrize("endpoint", ["ftp://minio:9000", "minio:9000", "s3://bucket"])
def test_resolve_rejects_non_http_endpoint(clean_env, endpoint):
    with pytest.raises(ConfigError, match="http"):
        storage.resolve_storage(StorageConfig(endpoint_url=endpoint))


def test_resolve_rejects_non_http_endpoint_from_env(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "tcp://minio:9000")
    with pytest.raises(ConfigError, match="tcp://minio:9000"):
        storage.resolve_storage(StorageConfig())


def test_storage_options_carry_endpoint_and_region():
    cfg = StorageConfig(
        endpoint_url="http://e:1",
        region="r1",
        options={"s3": {"anon": True, "client_kwargs": {"verify": False}}},
    )
    assert storage.storage_options("s3://b/k", cfg) == {
        "anon": True,
        "client_kwargs": {"verify": False, "endpoint_url": "http://e:1", "region_name": "r1"},
    }
    assert storage.storage_options("/local/x", cfg) == {}
    # The config's own dicts are not modified.
    assert cfg.options == {"s3": {"anon": True, "client_kwargs": {"verify": False}}}


# -- redaction and ids -----------------------------------------------------------------------

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/photos/cat%201.jpg?versionId=42"
    "&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1"
    "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=SESSIONTOKENVALUE&X-Amz-Signature=abcdef0123456789"
)


def test_redact_presigned_url_keeps_path_and_other_params():
    out = storage.redact(PRESIGNED)
    for secret in ("AKIAEXAMPLE", "SESSIONTOKENVALUE", "abcdef0123456789"):
        assert secret not in out
    assert "X-Amz-Signature" not in out
    assert "X-Amz-Credential" not in out
    assert "X-Amz-Security-Token" not in out
    assert out.startswith("https://bucket.s3.amazonaws.com/photos/cat%201.jpg?")
    assert "versionId=42" in out
    assert "X-Amz-Expires=3600" in out
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out


def test_redact_strips_user_info_and_keeps_port():
    out = storage.redact("https://alice:s3cr3t@files.example.com:8443/a/b.png?size=large#frag")
    assert out == "https://files.example.com:8443/a/b.png?size=large#frag"


def test_redact_azure_sas_signature():
    out = storage.redact("https://acct.blob.core.windows.net/c/x.jpg?sv=2022&sp=r&sig=SIGVALUE&a=1")
    assert "SIGVALUE" not in out
    assert out == "https://acct.blob.core.windows.net/c/x.jpg?a=1"


@pytest.mark.parametrize(
    "url",
    [
        "/data/images/a b.jpg",
        "relative/dir/x.png",
        "file:///data/x.jpg?sig=not-a-url-param",
        "s3://bucket/prefix/key.jpg",
        "https://example.com/plain.jpg",
    ],
)
def test_redact_leaves_local_paths_and_clean_urls_alone(url):
    assert storage.redact(url) == url


def test_redact_ipv6_host_keeps_brackets():
    assert (
        storage.redact("http://[::1]:9000/b/k.jpg?X-Amz-Signature=zz")
        == "http://[::1]:9000/b/k.jpg"
    )


def test_redact_malformed_port_does_not_raise_and_hides_secrets():
    out = storage.redact("http://u:pw@host:abc/x.jpg?X-Amz-Signature=SIGVALUE")
    assert "SIGVALUE" not in out
    assert "pw@" not in out


def test_redact_text_in_error_message():
    message = (
        f"ClientError: 403 Forbidden fetching {PRESIGNED} (retry 2); also https://bob:hunter2@h/x"
    )
    out = storage.redact_text(message)
    for secret in ("AKIAEXAMPLE", "SESSIONTOKENVALUE", "abcdef0123456789", "hunter2", "bob:"):
        assert secret not in out
    assert "ClientError: 403 Forbidden fetching https://bucket.s3.amazonaws.com/photos/" in out
    assert "X-Amz-Signature=REDACTED" in out
    assert "X-Amz-Expires=3600" in out
    assert "(retry 2)" in out
    assert "https://h/x" in out


def test_redact_text_leaves_plain_text_alone():
    text = "FileNotFoundError: bucket/key.jpg does not exist; use=this"
    assert storage.redact_text(text) == text


def test_image_id_is_stable_hex_and_distinct():
    a = storage.image_id_for("s3://bucket/a.jpg")
    assert a == storage.image_id_for("s3://bucket/a.jpg")
    assert re.fullmatch(r"[0-9a-f]{32}", a)
    uris = [f"s3://bucket/{i}.jpg" for i in range(500)] + ["/bucket/a.jpg", "s3://bucket/A.jpg"]
    ids = {storage.image_id_for(u) for u in [*uris, "s3://bucket/a.jpg"]}
    assert len(ids) == len(uris) + 1


def test_image_id_ignores_signature_of_presigned_urls():
    other = (
        PRESIGNED.replace("abcdef0123456789", "9999999999999999")
        .replace("SESSIONTOKENVALUE", "OTHERTOKEN")
        .replace("AKIAEXAMPLE", "AKIAOTHER")
    )
    assert other != PRESIGNED
    assert storage.image_id_for(other) == storage.image_id_for(PRESIGNED)
    # A different object (path) or version is a different image.
    assert storage.image_id_for(PRESIGNED.replace("cat%201", "dog")) != storage.image_id_for(
        PRESIGNED
    )
    assert storage.image_id_for(PRESIGNED.replace("versionId=42", "versionId=43")) != (
        storage.image_id_for(PRESIGNED)
    )


@pytest.mark.parametrize(
    ("url", "protocol"),
    [
        ("s3://b/k.jpg", "s3"),
        ("s3a://b/k.jpg", "s3"),
        ("/tmp/x.jpg", "file"),
        ("relative/x.jpg", "file"),
        ("file:///tmp/x.jpg", "file"),
        ("https://h/x.jpg", "https"),
        ("gs://b/k", "gs"),
    ],
)
def test_protocol_of(url, protocol):
    assert storage.protocol_of(url) == protocol


def test_join():
    assert storage.join("s3://b/", "a/", "/c.jpg") == "s3://b/a/c.jpg"
    assert storage.join("/tmp/run", "listing") == "/tmp/run/listing"
    assert storage.join("s3://b/x") == "s3://b/x"


def test_unstrip():
    assert storage.unstrip("file", "tmp/x.jpg") == "/tmp/x.jpg"
    assert storage.unstrip("file", "/tmp/x.jpg") == "/tmp/x.jpg"
    assert storage.unstrip("s3", "bucket/k.jpg") == "s3://bucket/k.jpg"
    assert storage.unstrip("https", "https://h/x.jpg") == "https://h/x.jpg"


def test_filesystem_strips_protocol(tmp_path):
    fs, path = storage.filesystem(f"file://{tmp_path}/x.jpg", StorageConfig())
    assert path == f"{tmp_path}/x.jpg"
    assert storage.protocol_of(f"file://{tmp_path}") == "file"
    assert not fs.exists(path)


# -- read_bytes ------------------------------------------------------------------------------


def test_read_bytes_local(tmp_path):
    f = tmp_path / "img.bin"
    f.write_bytes(b"\x00\x01hello")
    assert storage.read_bytes(str(f), StorageConfig(), 100, None, 3) == b"\x00\x01hello"
    # Exactly max_bytes is allowed.
    assert storage.read_bytes(str(f), StorageConfig(), 7, 7, 1) == b"\x00\x01hello"


def test_read_bytes_missing_local_file(tmp_path, sleeps):
    with pytest.raises(RecordError) as info:
        storage.read_bytes(str(tmp_path / "nope.jpg"), StorageConfig(), 100, None, 3)
    assert info.value.code == "not_found"
    assert sleeps == []  # not retried


def test_read_bytes_directory(tmp_path):
    with pytest.raises(RecordError) as info:
        storage.read_bytes(str(tmp_path), StorageConfig(), 100, None, 3)
    assert info.value.code == "read_failed"


def test_read_bytes_size_hint_over_limit_does_not_open(tmp_path):
    with pytest.raises(RecordError) as info:
        storage.read_bytes(str(tmp_path / "does-not-exist.jpg"), StorageConfig(), 10, 11, 3)
    assert info.value.code == "file_too_large"
    assert "11" in info.value.message


def test_read_bytes_content_over_limit(tmp_path):
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 11)
    with pytest.raises(RecordError) as info:
        storage.read_bytes(str(f), StorageConfig(), 10, None, 3)
    assert info.value.code == "file_too_large"
    # A wrong (too small) size hint does not let a large file through either.
    with pytest.raises(RecordError, match="file_too_large"):
        storage.read_bytes(str(f), StorageConfig(), 10, 5, 3)


def flaky_filesystem(monkeypatch, failures: int, exc_factory):
    """Make the first `failures` calls of storage.filesystem raise; return the call log."""
    real = storage.filesystem
    calls: list[str] = []

    def wrapper(url, cfg):
        calls.append(url)
        if len(calls) <= failures:
            raise exc_factory()
        return real(url, cfg)

    monkeypatch.setattr(storage, "filesystem", wrapper)
    return calls


def reset():
    return ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


def test_read_bytes_s3(s3, s3cfg):
    s3.fs().pipe(f"{s3.bucket}/read/ok.jpg", b"s3 bytes")
    assert storage.read_bytes(f"s3://{s3.bucket}/read/ok.jpg", s3cfg, 100, 8, 3) == b"s3 bytes"


def test_read_bytes_s3_missing_object(s3, s3cfg, sleeps):
    with pytest.raises(RecordError) as info:
        storage.read_bytes(f"s3://{s3.bucket}/read/missing.jpg", s3cfg, 100, None, 3)
    assert info.value.code == "not_found"
    assert sleeps == []


def test_read_bytes_retries_transient_failure(s3, s3cfg, monkeypatch, sleeps):
    s3.fs().pipe(f"{s3.bucket}/read/flaky.jpg", b"eventually")
    calls = flaky_filesystem(monkeypatch, 2, reset)
    url = f"s3://{s3.bucket}/read/flaky.jpg"
    assert storage.read_bytes(url, s3cfg, 100, None, 3) == b"eventually"
    assert calls == [url] * 3
    assert sleeps == [0.2, 0.4]  # exponential backoff


@pytest.mark.parametrize("retries", [1, 2])
def test_read_bytes_gives_up_after_retries(s3, s3cfg, monkeypatch, sleeps, retries):
    s3.fs().pipe(f"{s3.bucket}/read/flaky.jpg", b"eventually")
    calls = flaky_filesystem(monkeypatch, 2, reset)
    with pytest.raises(RecordError) as info:
        storage.read_bytes(f"s3://{s3.bucket}/read/flaky.jpg", s3cfg, 100, None, retries)
    assert info.value.code == "read_failed"
    assert f"after {retries} attempts" in info.value.message
    assert "ConnectionResetError" in info.value.message
    assert len(calls) == retries
    assert len(sleeps) == retries - 1


class HTTPishError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


@pytest.mark.parametrize(
    ("status", "code"), [(404, "not_found"), (403, "permission_denied"), (401, "permission_denied")]
)
def test_read_bytes_http_status_errors_are_not_retried(tmp_path, monkeypatch, sleeps, status, code):
    calls = flaky_filesystem(monkeypatch, 99, lambda: HTTPishError(status))
    with pytest.raises(RecordError) as info:
        storage.read_bytes(str(tmp_path / "x.jpg"), StorageConfig(), 100, None, 3)
    assert info.value.code == code
    assert len(calls) == 1
    assert sleeps == []


def test_read_bytes_other_errors_are_retried(tmp_path, monkeypatch, sleeps):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"ok")
    calls = flaky_filesystem(monkeypatch, 1, lambda: HTTPishError(503))
    assert storage.read_bytes(str(f), StorageConfig(), 100, None, 3) == b"ok"
    assert len(calls) == 2


def test_read_bytes_permission_error(tmp_path, monkeypatch, sleeps):
    calls = flaky_filesystem(monkeypatch, 99, lambda: PermissionError("Access Denied"))
    with pytest.raises(RecordError) as info:
        storage.read_bytes(str(tmp_path / "x.jpg"), StorageConfig(), 100, None, 3)
    assert info.value.code == "permission_denied"
    assert len(calls) == 1


def test_read_bytes_error_message_is_redacted(tmp_path, monkeypatch, sleeps):
    url = "https://h/k.jpg?X-Amz-Security-Token=TOKENVALUE&X-Amz-Signature=SIGVALUE"
    flaky_filesystem(monkeypatch, 99, lambda: OSError(f"GET {url} failed"))
    with pytest.raises(RecordError) as info:
        storage.read_bytes(str(tmp_path / "x.jpg"), StorageConfig(), 100, None, 1)
    assert info.value.code == "read_failed"
    assert "SIGVALUE" not in str(info.value)
    assert "TOKENVALUE" not in str(info.value)
    assert "X-Amz-Signature=REDACTED failed" in info.value.message


# -- check_readable --------------------------------------------------------------------------


def test_check_readable_local(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    storage.check_readable(str(tmp_path), StorageConfig())
    storage.check_readable(str(tmp_path / "a.jpg"), StorageConfig())
    missing = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="does not exist") as info:
        storage.check_readable(missing, StorageConfig())
    assert missing in str(info.value)


def test_check_readable_s3(s3, s3cfg):
    s3.fs().pipe(f"{s3.bucket}/readable/sub/a.jpg", b"x")
    storage.check_readable(f"s3://{s3.bucket}/readable", s3cfg)
    storage.check_readable(f"s3://{s3.bucket}/readable/", s3cfg)
    storage.check_readable(f"s3://{s3.bucket}/readable/sub/a.jpg", s3cfg)
    for missing in (f"s3://{s3.bucket}/no-such-prefix/", "s3://no-such-bucket-raycaption/x/"):
        with pytest.raises(ConfigError) as info:
            storage.check_readable(missing, s3cfg)
        assert missing in str(info.value)


def test_check_readable_backend_failure_is_config_error(monkeypatch):
    def broken(url, cfg):
        raise RuntimeError("endpoint unreachable")

    monkeypatch.setattr(storage, "filesystem", broken)
    url = "https://u:pw@h/x?X-Amz-Signature=SIGVALUE"
    with pytest.raises(ConfigError, match="unreachable: RuntimeError") as info:
        storage.check_readable(url, StorageConfig())
    assert "SIGVALUE" not in str(info.value)
    assert "pw@" not in str(info.value)
    assert "https://h/x" in str(info.value)


# -- iter_files ------------------------------------------------------------------------------


def test_iter_files_s3_pages_recursively(s3, s3cfg):
    n = 1010  # more than one 1,000-key page
    objects = {
        f"{s3.bucket}/many/d{i % 3}/sub{i % 2}/k{i:05d}.jpg": b"x" * (i % 13) for i in range(n)
    }
    objects[f"{s3.bucket}/many-sibling/not-me.jpg"] = b"x"
    objects[f"{s3.bucket}/manyfile.jpg"] = b"x"
    s3.fs().pipe(objects)
    for root in (f"s3://{s3.bucket}/many", f"s3://{s3.bucket}/many/"):
        got = dict(storage.iter_files(root, s3cfg))
        expected = {
            f"s3://{key}": len(data)
            for key, data in objects.items()
            if key.startswith(f"{s3.bucket}/many/")
        }
        assert len(expected) == n
        assert got == expected


def test_iter_files_s3_single_object(s3, s3cfg):
    s3.fs().pipe(f"{s3.bucket}/single/one.jpg", b"12345")
    assert list(storage.iter_files(f"s3://{s3.bucket}/single/one.jpg", s3cfg)) == [
        (f"s3://{s3.bucket}/single/one.jpg", 5)
    ]


def test_iter_files_local_recursive(tmp_path):
    files = {"a.jpg": 1, "b/c.png": 2, "b/d/e.txt": 3, "b/d/f/g.webp": 4}
    for rel, size in files.items():
        p = tmp_path / "root" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * size)
    (tmp_path / "root" / "empty").mkdir()
    (tmp_path / "outside.jpg").write_bytes(b"x")
    got = dict(storage.iter_files(str(tmp_path / "root"), StorageConfig()))
    assert got == {str(tmp_path / "root" / rel): size for rel, size in files.items()}
    # A file URL lists as the one file.
    assert list(storage.iter_files(str(tmp_path / "outside.jpg"), StorageConfig())) == [
        (str(tmp_path / "outside.jpg"), 1)
    ]
