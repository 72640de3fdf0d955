"""Configuration validation and helpers (raycaption.config)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import types

import pytest

from raycaption import config
from raycaption.config import (
    CaptionConfig,
    ComputeConfig,
    InputConfig,
    ModelConfig,
    StorageConfig,
    new_run_id,
    parse_concurrency,
    prompt_fields,
)
from raycaption.errors import ConfigError


def valid(**changes) -> CaptionConfig:
    """A valid config; ``changes`` maps "section.field" (or a top-level field) to a value."""
    cfg = CaptionConfig(
        input=InputConfig(uri="s3://bucket/images/"),
        output="s3://bucket/captions/",
        model=ModelConfig(name="microsoft/git-base-coco"),
    )
    for key, value in changes.items():
        if "." in key:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        else:
            setattr(cfg, key, value)
    return cfg


def problems(cfg: CaptionConfig) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    return str(info.value)


def test_valid_config_passes_and_returns_itself():
    cfg = valid()
    assert cfg.validate() is cfg


def test_valid_config_with_every_option_set_passes():
    cfg = valid(
        **{
            "model.dtype": "bfloat16",
            "model.max_new_tokens": 5,
            "model.min_new_tokens": 5,
            "model.num_beams": 3,
            "model.prompt": "a photo of {label} by {author:>10}, literal {{braces}}",
            "compute.concurrency": (2, 8),
            "compute.num_gpus": 0.25,
            "compute.batch_size": 1,
            "input.limit": 1,
            "input.extensions": ("jpg",),
        }
    )
    assert cfg.validate() is cfg


@pytest.mark.parametrize("num_gpus", [0, 0.5, 1, 2.0, 4])
def test_valid_num_gpus(num_gpus):
    assert valid(**{"compute.num_gpus": num_gpus}).validate().compute.num_gpus == num_gpus


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"input.uri": ""}, "--input"),
        ({"output": ""}, "--output"),
        ({"model.name": ""}, "--model"),
        ({"output": "s3://bucket/images"}, "--output"),
        ({"output": "s3://bucket/images/"}, "--output"),
        ({"model.dtype": "int8"}, "--dtype"),
        ({"model.max_new_tokens": 0}, "--max-new-tokens"),
        ({"model.min_new_tokens": 31}, "--min-new-tokens"),
        ({"model.min_new_tokens": -1}, "--min-new-tokens"),
        ({"model.num_beams": 0}, "--num-beams"),
        ({"compute.batch_size": 0}, "--batch-size"),
        ({"compute.decode_batch_size": 0}, "--decode-batch-size"),
        ({"compute.concurrency": (3, 1)}, "--concurrency"),
        ({"compute.concurrency": (0, 0)}, "--concurrency"),
        ({"compute.num_gpus": -1}, "--num-gpus"),
        ({"compute.num_gpus": 1.5}, "--num-gpus"),
        ({"compute.num_cpus": -0.5}, "--num-cpus"),
        ({"compute.max_image_bytes": 0}, "--max-image-bytes"),
        ({"compute.max_image_pixels": 0}, "--max-image-pixels"),
        ({"compute.listing_shard_rows": 0}, "listing_shard_rows"),
        ({"compute.read_retries": 0}, "--read-retries"),
        ({"input.limit": 0}, "--limit"),
        ({"input.extensions": ()}, "--extensions"),
        ({"model.prompt": "{"}, "--prompt"),
        ({"model.prompt": "a photo of }"}, "--prompt"),
        ({"model.prompt": "a photo of {a.b}"}, "--prompt"),
        ({"model.prompt": "a photo of {0}"}, "--prompt"),
        ({"model.prompt": "a photo of {label[0]}"}, "--prompt"),
        ({"model.prompt": "a photo of {}"}, "--prompt"),
    ],
)
def test_invalid_option_is_named(changes, option):
    message = problems(valid(**changes))
    assert option in message
    # Exactly one problem is listed for one bad option.
    assert message.count("\n  - ") == 1, message


def test_missing_required_options_are_all_reported():
    message = problems(CaptionConfig())
    for option in ("--input", "--output", "--model"):
        assert f"{option} is required" in message


def test_bad_values_are_quoted_in_the_message():
    assert "'int8'" in problems(valid(**{"model.dtype": "int8"}))
    assert "3,1" in problems(valid(**{"compute.concurrency": (3, 1)}))


def test_several_problems_reported_in_one_error():
    cfg = valid(
        **{
            "model.dtype": "fp8",
            "model.num_beams": 0,
            "compute.batch_size": 0,
            "compute.concurrency": (0, 0),
            "input.limit": 0,
            "model.prompt": "{",
        }
    )
    message = problems(cfg)
    for option in ("--dtype", "--num-beams", "--batch-size", "--concurrency", "--limit"):
        assert option in message
    assert "--prompt" in message
    assert message.startswith("invalid configuration:")
    assert message.count("\n  - ") == 6


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        valid(**{"model.num_beams": 0}).validate()


def test_prompt_fields():
    assert prompt_fields("a {x} and {y!r} and {z:>4} {{not}}") == ["x", "y", "z"]
    assert prompt_fields("no fields") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4", (4, 4)), ("1,8", (1, 8)), ("2, 3", (2, 3)), (" 5 ", (5, 5))],
)
def test_parse_concurrency(text, expected):
    assert parse_concurrency(text) == expected


@pytest.mark.parametrize("text", ["a", "1,2,3", "", "1,", "1.5", "x,2"])
def test_parse_concurrency_rejects(text):
    with pytest.raises(ConfigError, match="--concurrency") as info:
        parse_concurrency(text)
    assert repr(text) in str(info.value)


def test_generation_kwargs_defaults():
    assert ModelConfig(name="m").generation_kwargs() == {"max_new_tokens": 30, "num_beams": 1}


def test_generation_kwargs_merges_min_new_tokens_and_generate_kwargs():
    model = ModelConfig(
        name="m",
        max_new_tokens=12,
        min_new_tokens=4,
        num_beams=2,
        generate_kwargs={"repetition_penalty": 1.3, "do_sample": False},
    )
    assert model.generation_kwargs() == {
        "max_new_tokens": 12,
        "num_beams": 2,
        "min_new_tokens": 4,
        "repetition_penalty": 1.3,
        "do_sample": False,
    }


def test_generation_kwargs_explicit_generate_kwargs_win():
    model = ModelConfig(name="m", max_new_tokens=12, generate_kwargs={"max_new_tokens": 99})
    assert model.generation_kwargs()["max_new_tokens"] == 99
    # The config itself is not modified.
    assert model.max_new_tokens == 12
    assert model.generate_kwargs == {"max_new_tokens": 99}


def test_generation_kwargs_min_new_tokens_zero_is_kept():
    assert ModelConfig(name="m", min_new_tokens=0).generation_kwargs()["min_new_tokens"] == 0


def test_to_dict_is_json_serialisable_and_complete():
    cfg = valid(
        **{
            "model.generate_kwargs": {"length_penalty": 0.5},
            "compute.concurrency": (1, 4),
            "storage": StorageConfig(endpoint_url="http://127.0.0.1:9000", region="eu-west-1"),
        }
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    assert set(data) == {f.name for f in dataclasses.fields(CaptionConfig)}
    assert data["input"]["uri"] == "s3://bucket/images/"
    assert data["output"] == "s3://bucket/captions/"
    assert data["model"]["name"] == "microsoft/git-base-coco"
    assert data["model"]["generate_kwargs"] == {"length_penalty": 0.5}
    assert data["compute"]["concurrency"] == [1, 4]
    assert data["input"]["extensions"] == list(config.DEFAULT_EXTENSIONS)
    assert data["storage"] == {
        "endpoint_url": "http://127.0.0.1:9000",
        "region": "eu-west-1",
        "options": {},
    }
    assert data["run_id"] == cfg.run_id


def test_default_configs_do_not_share_mutable_state():
    a, b = CaptionConfig(), CaptionConfig()
    a.model.generate_kwargs["x"] = 1
    a.storage.options["s3"] = {"anon": True}
    assert b.model.generate_kwargs == {}
    assert b.storage.options == {}
    assert ComputeConfig().concurrency == (1, 1)


RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


def test_run_ids_are_unique_and_well_formed():
    ids = [new_run_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(RUN_ID.match(i) for i in ids), ids[:3]
    stamp = dt.datetime.strptime(ids[0][:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - stamp).total_seconds()) < 60


def test_each_config_gets_its_own_run_id():
    assert CaptionConfig().run_id != CaptionConfig().run_id


def test_run_ids_sort_by_time(monkeypatch):
    utc = dt.timezone.utc
    times = [
        dt.datetime(2024, 9, 30, 23, 59, 59, tzinfo=utc),
        dt.datetime(2024, 10, 1, 0, 0, 0, tzinfo=utc),
        dt.datetime(2024, 10, 1, 0, 0, 9, tzinfo=utc),
        dt.datetime(2024, 10, 1, 0, 0, 10, tzinfo=utc),
        dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=utc),
    ]
    clock = iter(times)

    class FakeDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return next(clock).astimezone(tz)

    monkeypatch.setattr(config, "dt", types.SimpleNamespace(datetime=FakeDatetime, timezone=utc))
    ids = [new_run_id() for _ in times]
    # Generate in time order; sorting the ids (any suffix) gives back the same order.
    assert sorted(reversed(ids)) == ids
    assert ids[0].startswith("20240930T235959Z-")
    assert ids[-1].startswith("20250102T030405Z-")


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"backfill.force": True, "backfill.retry_failed": True}, "--force and --retry-failed"),
        ({"backfill.max_error_rate": 1.5}, "--max-error-rate"),
        ({"backfill.image_id": "path"}, "--image-id"),
        ({"backfill.since": "2026-11-22", "backfill.until": "2026-11-01"}, "--since"),
        ({"backfill.partitions": ("a",), "backfill.since": "b"}, "--partitions"),
        ({"backfill.partition_key": "dt/x"}, "--partition-key"),
        ({"backfill.commit_every_s": -1}, "--commit-every"),
        ({"compute.rows_per_file": 0}, "--rows-per-file"),
        ({"backfill.replay": "r1", "backfill.since": "a"}, "--replay"),
    ],
)
def test_bad_backfill_options_are_named(changes, option):
    assert option in problems(valid(**changes))


def test_partition_selection_needs_a_prefix_not_a_manifest():
    cfg = valid(**{"input.uri": "s3://bucket/list.parquet", "backfill.since": "2026-11-01"})
    assert "not a manifest" in problems(cfg)
