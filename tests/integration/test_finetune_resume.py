"""A driver crash: `raycaption finetune` is SIGKILLed after its first checkpoint, and the same
run is resubmitted with `ray job submit -- python jobs/finetune.py`, the README's way. The
second driver finds the run by name in the storage path and resumes from the checkpoint."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raycaption.demo_model import write_training_pairs
from raycaption.train.run import FAULTS_ENV
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` with token authentication (Ray 2.60's default), 2 CPUs."""
    root = tmp_path_factory.mktemp("ftresume")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop(FAULTS_ENV, None)
    port, dashboard = free_port(), free_port()
    subprocess.run(
        [
            str(BIN / "ray"), "start", "--head", f"--port={port}",
            f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
            f"--temp-dir={Path('/tmp') / ('rf-' + secrets.token_hex(3))}",
            "--disable-usage-stats",
        ],
        env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_driver_crash_then_resubmission_resumes(ray_head, tiny_models, tmp_path):
    gcs, dashboard, env = ray_head
    pairs = write_training_pairs(tmp_path / "pairs.parquet", 40, seed=4, size=32)
    runs = tmp_path / "runs"
    args = [
        "--train", str(pairs), "--output", str(tmp_path / "model"),
        "--model", str(tiny_models["git"]), "--storage-path", str(runs), "--run-name", "crash",
        "--steps", "12", "--eval-every", "3", "--batch-size", "4", "--grad-accum", "1",
        "--lr", "1e-3", "--max-new-tokens", "5", "--eval-max-images", "4", "--no-use-gpu",
    ]  # fmt: skip
    # Slow steps (0.5 s each) so the driver is killed mid-run, after its first checkpoint.
    slow = {**env, FAULTS_ENV: json.dumps({"step_sleep": 0.5})}
    driver = subprocess.Popen(
        [str(BIN / "raycaption"), "finetune", "--ray-address", gcs, *args],
        env=slow,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    snapshot = runs / "crash" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    try:
        while not (snapshot.exists() and "checkpoint_step_" in snapshot.read_text()):
            assert driver.poll() is None, "the first driver ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    assert not (tmp_path / "model" / "eval.json").exists()

    for _ in range(4):
        proc = subprocess.run(
            [
                str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", ".",
                "--", "python", "jobs/finetune.py", *args,
            ],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        # The head's job agent can still be starting on a loaded machine; Ray asks to retry.
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(10)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    card = json.loads((tmp_path / "model" / "eval.json").read_text())
    starts = card["training"]["starts"]
    assert len(starts) == 2 and starts[0] == 0, starts
    assert starts[1] in (3, 6, 9), starts  # resumed from a checkpoint step, not from 0
    assert f"resumed at step {starts[1]}" in proc.stdout
    steps = [h["step"] for h in card["training"]["history"]]
    assert steps == [0, *range(3, 13, 3)], steps
    assert Path(env["RAY_AUTH_TOKEN_PATH"]).read_text() not in proc.stdout + proc.stderr
