"""The real submission path: `ray start --head` with token authentication, then
`ray job submit --working-dir . -- python jobs/caption.py …`, as the README says."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, free_port
from tests.helpers.bad_images import make_image_cases

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A Ray head started like a user starts one, token authentication on."""
    root = tmp_path_factory.mktemp("rayhead")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        # The job's `python` must be this environment's interpreter, activated or not.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    dashboard = free_port()
    subprocess.run(
        [
            RAY, "start", "--head",
            f"--port={free_port()}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            f"--temp-dir={Path('/tmp') / ('rc-' + secrets.token_hex(3))}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )  # fmt: skip
    yield f"http://127.0.0.1:{dashboard}", env
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_job_submit_with_token_auth(head_node, tiny_models, tmp_path):
    address, env = head_node
    images = tmp_path / "images"
    images.mkdir()
    cases = make_image_cases()
    for name in ("ok_rgb_jpeg", "ok_png", "garbage"):
        data = cases[name][0]
        (images / f"{name}.{'png' if name == 'ok_png' else 'jpg'}").write_bytes(data)
    out = tmp_path / "out"

    proc = submit(
        address,
        env,
        "python", "jobs/caption.py",
        "--input", str(images),
        "--output", str(out),
        "--model", str(tiny_models["git"]),
        "--max-new-tokens", "5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 captioned, 1 errors of 3 inputs" in proc.stdout
    assert pq.read_table(out / "captions").num_rows == 2
    errors = pq.read_table(out / "errors").to_pylist()
    assert [e["error_code"] for e in errors] == ["unrecognized_format"]
    # The token never shows up in what the job printed.
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
    assert token not in proc.stdout + proc.stderr


def test_job_submit_without_token_is_refused(head_node, tmp_path):
    address, env = head_node
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    no_token["RAY_AUTH_MODE"] = "disabled"
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    proc = submit(address, no_token, "python", "-c", "print('should not run')")
    assert proc.returncode != 0
    assert "Authentication required" in proc.stdout + proc.stderr
    assert "should not run" not in proc.stdout


def test_job_with_bad_config_fails_fast_with_exit_code(head_node, tmp_path):
    address, env = head_node
    proc = submit(
        address,
        env,
        "python", "jobs/caption.py",
        "--input", str(tmp_path / "does-not-exist"),
        "--output", str(tmp_path / "out"),
        "--model", "microsoft/git-base-coco",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "does not exist" in proc.stdout + proc.stderr


@pytest.mark.fault
def test_ray_job_stop_keeps_committed_rows_and_the_next_submission_resumes(
    head_node, tiny_models, tmp_path
):
    import json
    import time
    from collections import Counter

    address, env = head_node
    images = tmp_path / "images"
    images.mkdir()
    data = make_image_cases()["ok_rgb_jpeg"][0]
    for i in range(40):  # same pixels, distinct objects: 40 distinct ids
        (images / f"img{i:03d}.jpg").write_bytes(data)
    out = tmp_path / "out"
    args = [
        "python", "jobs/caption.py",
        "--input", str(images), "--output", str(out), "--model", str(tiny_models["git"]),
        "--max-new-tokens", "4", "--no-embeddings", "--no-tags", "--batch-size", "2",
        "--decode-batch-size", "4", "--rows-per-file", "4", "--commit-every", "0",
    ]  # fmt: skip
    slow = {"RAYCAPTION_FAULTS": "caption_delay:1000", "RAYCAPTION_FAULT_DIR": str(tmp_path / "f")}
    job_id = f"stop-test-{os.getpid()}"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--no-wait",
         "--submission-id", job_id, "--runtime-env-json", json.dumps({"env_vars": slow}),
         "--", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (out / "_commits").exists() and len(list((out / "_commits").glob("*.json"))) >= 2:
            break
        time.sleep(0.3)
    stop = subprocess.run(
        [RAY, "job", "stop", "--address", address, job_id],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stop.returncode == 0, stop.stderr[-2000:]
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, job_id],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "was stopped" in status.stdout + status.stderr
    committed = pq.read_table(out / "captions").column("image_id").to_pylist()
    assert 0 < len(committed) < 40 and len(set(committed)) == len(committed)
    assert not (out / "_SUCCESS").exists()

    again = submit(address, env, *args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["already_done"] == len(committed)
    assert summary["processed"] == 40 - len(committed)
    counts = Counter(pq.read_table(out / "captions").column("image_id").to_pylist())
    assert len(counts) == 40 and set(counts.values()) == {1}
    assert (out / "_SUCCESS").exists()
