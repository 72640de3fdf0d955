"""`raycaption finetune` / `evaluate` options: every problem named at once, exit code 2
before Ray starts, every option documented, resumes refused when data or settings change."""

from __future__ import annotations

import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycaption.cli import EXIT_CONFIG, build_parser, main
from raycaption.config import EvalConfig, FinetuneConfig, PairsConfig, StorageConfig
from raycaption.errors import ConfigError
from raycaption.train.run import (
    RUN_RECORD,
    _check_run_record,
    default_run_name,
    default_storage_path,
)


@pytest.fixture
def pairs(tmp_path):
    from tests.helpers.bad_images import make_image_cases

    data = make_image_cases()["ok_rgb_jpeg"][0]
    table = pa.table({"image": [data] * 1 + [data[:-1] + b"\0"], "caption": ["a", "b"]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    return tmp_path / "pairs.parquet"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    import ray

    code = main(list(args))
    captured = capsys.readouterr()
    assert not ray.is_initialized(), "Ray was started for a config error"
    return code, captured.out + captured.err


def test_config_names_every_problem_at_once():
    cfg = FinetuneConfig(
        pairs=PairsConfig(uri="", test_fraction=1.5, limit=0),
        output="",
        batch_size=0,
        lr=-1,
        schedule="sometimes",
        precision="fp16",
        use_gpu=False,
        metric="accuracy",
        run_name="../escape",
        warmup_ratio=1.0,
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    for expected in (
        "--train is required",
        "--output is required",
        "--test-fraction",
        "--limit must be >= 1",
        "--batch-size must be >= 1",
        "--lr must be > 0",
        "--schedule must be one of linear, cosine, constant",
        "--precision fp16/bf16 needs GPUs",
        "--metric must be one of wer, cer, bleu, rouge_l, cider, loss",
        "--run-name may hold",
        "--warmup-ratio",
    ):
        assert expected in text
    assert FinetuneConfig(pairs=PairsConfig(uri="p"), output="o").validate().metric_mode == "min"
    assert FinetuneConfig(metric="cider").metric_mode == "max"
    assert FinetuneConfig(metric="loss").metric_key == "eval_loss"  # what the loop reports
    assert FinetuneConfig(metric="bleu").metric_key == "bleu"
    with pytest.raises(ConfigError, match="--split must be one of all, test, train"):
        EvalConfig(pairs=PairsConfig(uri="p"), model="m", split="dev").validate()


def test_cli_bad_options_exit_2(capsys, pairs, tmp_path):
    code, text = run_cli(
        capsys,
        "finetune", "--train", str(pairs), "--output", str(tmp_path / "out"),
        "--batch-size", "0", "--num-workers", "0", "--metric", "wer",
    )  # fmt: skip
    assert code == EXIT_CONFIG
    assert "--batch-size must be >= 1" in text and "--num-workers must be >= 1" in text


def test_cli_refuses_blip2_and_missing_pairs_before_ray(capsys, pairs, tmp_path, tiny_models):
    code, text = run_cli(
        capsys,
        "finetune", "--train", str(pairs), "--output", str(tmp_path / "out"),
        "--model", str(tiny_models["blip-2"]),
    )  # fmt: skip
    assert code == EXIT_CONFIG and "fine-tuning supports GIT and BLIP models" in text
    code, text = run_cli(
        capsys,
        "finetune", "--train", str(tmp_path / "nope"), "--output", str(tmp_path / "out"),
        "--model", str(tiny_models["git"]),
    )  # fmt: skip
    assert code == EXIT_CONFIG and "do not exist" in text
    code, text = run_cli(
        capsys, "evaluate", "--pairs", str(pairs), "--model", str(tmp_path / "no-model")
    )
    assert code == EXIT_CONFIG and "neither an existing folder nor a hub id" in text


def test_cli_refuses_an_output_folder_that_is_not_an_export(capsys, pairs, tmp_path, tiny_models):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, text = run_cli(
        capsys,
        "finetune", "--train", str(pairs), "--output", str(out),
        "--model", str(tiny_models["git"]),
    )  # fmt: skip
    assert code == EXIT_CONFIG and "not empty and holds no eval.json" in text
    assert (out / "notes.txt").read_text() == "keep me"


def test_one_image_is_not_enough(capsys, tmp_path, tiny_models):
    pq.write_table(pa.table({"image": [b"x"], "caption": ["a"]}), tmp_path / "one.parquet")
    code, text = run_cli(
        capsys,
        "finetune", "--train", str(tmp_path / "one.parquet"), "--output", str(tmp_path / "o"),
        "--model", str(tiny_models["git"]),
    )  # fmt: skip
    assert code == EXIT_CONFIG and "needs at least 2" in text


def test_every_option_has_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("finetune", "evaluate"):
        for action in sub.choices[name]._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
        assert sub.choices[name].description


def test_run_defaults_follow_the_output_folder(tmp_path):
    assert default_run_name("s3://bucket/models/my-git/") == "my-git"
    assert default_run_name("/data/models/My Model (v2)") == "My-Model-v2-"
    assert default_storage_path("s3://bucket/models/my-git") == "s3://bucket/models/_finetune_runs"
    assert default_storage_path(str(tmp_path / "m")) == str(tmp_path / "_finetune_runs")


def test_a_rerun_with_other_data_or_settings_is_refused(tmp_path):
    cfg = FinetuneConfig(storage=StorageConfig())
    record = {"fingerprint": "sha256:aa", "total_steps": 10, "lr": 5e-5}
    _check_run_record(str(tmp_path), "run1", record, cfg)  # first run: written
    saved = json.loads((tmp_path / "run1" / RUN_RECORD).read_text())
    assert saved == record
    _check_run_record(str(tmp_path), "run1", dict(record), cfg)  # same: resumes
    with pytest.raises(ConfigError, match=r"fingerprint: 'sha256:aa' -> 'sha256:bb'.*--run-name"):
        _check_run_record(str(tmp_path), "run1", {**record, "fingerprint": "sha256:bb"}, cfg)
