"""The cluster files are valid, run our entrypoint with options it accepts, ask for GPUs,
and hold no credentials."""

from __future__ import annotations

import shlex

import yaml

from raycaption.cli import build_parser
from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**load("runtime_env.yaml"))
    assert env["working_dir"] == "."
    assert not any("SECRET" in k or "KEY_ID" in k for k in env["env_vars"])


def test_rayjob_runs_the_caption_entrypoint_on_gpu_workers():
    job = load("rayjob.yaml")
    assert job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/app/jobs/caption.py"]
    args = build_parser().parse_args(["caption", *argv[2:]])  # exits on a bad option
    assert args.input.startswith("s3://") and args.model
    spec = job["spec"]["rayClusterSpec"]
    gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    for container in [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]
    ]:
        assert "env" not in container, "credentials must come from a Secret, not inline env"
        assert container["envFrom"][0]["secretRef"]["name"]


def test_cluster_launcher_has_autoscaling_gpu_workers():
    cfg = load("gpu-cluster.yaml")
    node_types = cfg["available_node_types"]
    assert node_types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    gpu = node_types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] > gpu["min_workers"]
    text = (CLUSTER / "gpu-cluster.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text
