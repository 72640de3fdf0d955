"""Fine-tuning through Ray Train on a local 2-CPU Ray instance: it learns, it survives a
worker death, it writes checkpoints and exports to S3 (moto over HTTP), BLIP trains with two
DDP workers, and every exported folder loads in `raycaption caption`."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest

from raycaption.cli import bundled, main
from raycaption.config import FinetuneConfig, PairsConfig
from raycaption.demo_model import write_training_pairs, write_untrained_model
from raycaption.train.run import FAULTS_ENV, run_finetune

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_session(s3):
    """A local Ray instance started after the S3 fixture, so workers inherit its settings."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The demo architecture, untrained, and 1,500 synthetic pairs (64 px JPEG bytes)."""
    root = tmp_path_factory.mktemp("synthetic")
    base = write_untrained_model(root / "base")
    pairs = write_training_pairs(root / "pairs.parquet", 1500, seed=1, size=64)
    return base, pairs


def caption_run(tmp_path, model: str, name: str, *extra: str) -> list[dict]:
    out = tmp_path / name
    code = main(
        [
            "caption", "--input", str(bundled("samples")), "--output", str(out),
            "--model", model, "--no-tags", "--no-embeddings", "--max-new-tokens", "12", *extra,
        ]
    )  # fmt: skip
    assert code == 0
    rows = pq.read_table(out / "captions").to_pylist()
    assert len(rows) == 12 and pq.read_table(out / "errors").num_rows == 0
    return rows


def test_finetuning_learns_the_synthetic_task(ray_session, synthetic, tmp_path, capsys):
    """Held-out WER falls from about 1 to below 0.2 in 120 CPU steps; the export captions in
    the caption job, and `evaluate` reproduces the caption job's captions and the card."""
    base, pairs = synthetic
    out = tmp_path / "model"
    code = main(
        [
            "finetune", "--train", str(pairs), "--output", str(out), "--model", str(base),
            "--steps", "120", "--batch-size", "32", "--grad-accum", "1", "--lr", "1e-3",
            "--weight-decay", "0.01", "--schedule", "cosine", "--eval-every", "60",
            "--eval-max-images", "150", "--max-new-tokens", "12", "--no-use-gpu",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    card = json.loads((out / "eval.json").read_text())
    history = card["training"]["history"]
    assert [h["step"] for h in history] == [0, 60, 120]
    before, after = history[0]["wer"], card["metrics"]["wer"]
    assert before > 0.6, history[0]  # the untrained model's captions are mostly wrong
    assert after < 0.2, card["metrics"]
    assert card["metrics"]["cider"] > history[0]["cider"] + 2
    assert card["data"]["evaluated_images"] == card["data"]["test_images"] == 150
    assert card["data"]["fingerprint"].startswith("sha256:")
    assert card["metric_libraries"]["cider"].startswith("pycocoevalcap")
    assert card["training"]["config"]["lr"] == 1e-3
    assert card["training"]["starts"] == [0]
    assert f"wer {after:.4g}" in printed
    assert "| wer |" in (out / "EVAL.md").read_text()
    lines = (out / "eval_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 150 and set(json.loads(lines[0])) == {"image", "references", "prediction"}

    # The exported folder is a plain save_pretrained folder: the caption job takes it as is.
    rows = caption_run(tmp_path, str(out), "captions")
    words = {"a", "an", "on", "background"}
    assert all(words & set(r["caption"].split()) for r in rows)

    # `evaluate` captions exactly as the caption job does (same code path), and scores it.
    code = main(
        [
            "evaluate", "--model", str(out), "--pairs", str(bundled("samples")),
            "--max-new-tokens", "12", "--output", str(tmp_path / "card"),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "all pairs (12 images, 0 skipped): wer" in printed
    evaluated = [
        json.loads(line)
        for line in (tmp_path / "card" / "eval_predictions.jsonl").read_text().splitlines()
    ]
    by_image = {r["source_uri"]: r["caption"] for r in rows}
    agree = sum(by_image[e["image"]] == e["prediction"] for e in evaluated)
    assert agree >= 11, (evaluated, by_image)
    assert json.loads((tmp_path / "card" / "eval.json").read_text())["training"] is None


def test_worker_death_resumes_from_the_last_checkpoint_on_s3(
    ray_session, s3, synthetic, tiny_models, tmp_path, monkeypatch
):
    """A worker process dies at step 6; Ray Train restarts the group from the step-4
    checkpoint (on S3), not from step 0. The export on S3 loads in the caption job."""
    fs = s3.fs()
    root = f"{s3.bucket}/finetune"
    small = write_training_pairs(tmp_path / "small.parquet", 48, seed=2, size=32)
    fs.put(str(small), f"{root}/pairs/train.parquet")
    marker = tmp_path / "worker-died"
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"exit_at_step": 6, "marker": str(marker)}))
    cfg = FinetuneConfig(
        pairs=PairsConfig(uri=f"s3://{root}/pairs/", test_fraction=0.25),
        output=f"s3://{root}/models/tiny-git",
        model=str(tiny_models["git"]),
        steps=10,
        eval_every=4,
        batch_size=4,
        grad_accum=2,
        lr=1e-3,
        max_failures=2,
        max_new_tokens=5,
        eval_max_images=8,
        use_gpu=False,
    )
    result = run_finetune(cfg)
    assert marker.exists(), "the fault was not injected"
    assert result.starts == [0, 4], result.starts  # resumed at the checkpoint, not at 0
    history = result.card["training"]["history"]
    assert [h["step"] for h in history] == [0, 4, 8, 10]
    assert result.run_name == "tiny-git"
    runs = f"{root}/models/_finetune_runs/tiny-git"
    kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(runs) if "checkpoint_step_" in p)
    assert kept and set(kept) <= {f"checkpoint_step_{s:07d}" for s in (4, 8, 10)}
    card_text = fs.cat(f"{root}/models/tiny-git/eval.json").decode()
    assert "testing-secret-value" not in card_text
    assert json.loads(card_text)["data"]["skipped"] == {}
    assert fs.exists(f"{root}/models/tiny-git/model.safetensors")
    assert fs.exists(f"{root}/models/tiny-git/preprocessor_config.json") or fs.exists(
        f"{root}/models/tiny-git/processor_config.json"
    )
    caption_run(tmp_path, f"s3://{root}/models/tiny-git", "captions-s3")


def test_blip_with_two_ddp_workers(ray_session, synthetic, tiny_models, tmp_path):
    """BLIP trains data-parallel on two workers, and its export captions in the caption job."""
    small = write_training_pairs(tmp_path / "small.parquet", 32, seed=3, size=32)
    out = tmp_path / "blip"
    result = run_finetune(
        FinetuneConfig(
            pairs=PairsConfig(uri=str(small), test_fraction=0.25),
            output=str(out),
            model=str(tiny_models["blip"]),
            steps=4,
            eval_every=2,
            batch_size=4,
            grad_accum=1,
            lr=1e-3,
            max_new_tokens=5,
            num_workers=2,
            use_gpu=False,
        )
    )
    card = json.loads((out / "eval.json").read_text())
    assert card["training"]["family"] == "blip" and card["training"]["num_workers"] == 2
    assert card["training"]["effective_batch_size"] == 8
    assert [h["step"] for h in card["training"]["history"]] == [0, 2, 4]
    assert result.best_step in (2, 4)
    caption_run(tmp_path, str(out), "captions-blip")
