"""Shared fixtures: tiny real models, an S3 endpoint over HTTP, a local Ray cluster."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

# No network at test time: models come from local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """family -> folder written by save_pretrained (model + processor)."""
    from tests.helpers.tiny_models import (
        build_tiny_blip,
        build_tiny_blip2,
        build_tiny_clip,
        build_tiny_git,
    )

    root = tmp_path_factory.mktemp("models")
    return {
        "git": build_tiny_git(root / "git"),
        "blip": build_tiny_blip(root / "blip"),
        "blip-2": build_tiny_blip2(root / "blip2"),
        "clip": build_tiny_clip(root / "clip"),
    }


@dataclass
class S3Endpoint:
    url: str
    bucket: str

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.url}, skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3() -> S3Endpoint:
    """moto's S3 server on 127.0.0.1 over real HTTP. Credentials and endpoint go into the
    environment, as a cluster would have them, so Ray workers started later inherit them."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
        }
    )
    endpoint = S3Endpoint(url=url, bucket="raycaption-test")
    endpoint.fs().mkdir(endpoint.bucket)
    yield endpoint
    server.stop()
