"""Bad configuration fails through the real CLI with exit code 2 and a message naming the
problem, before Ray starts or any model weights load."""

from __future__ import annotations

import pytest

from raycaption.cli import EXIT_CONFIG, main


@pytest.fixture
def images(tmp_path):
    from tests.helpers.bad_images import make_image_cases

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(make_image_cases()["ok_rgb_jpeg"][0])
    return folder


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_fails_fast(capsys, expected: str, *args: str) -> str:
    import ray

    code, text = run_cli(capsys, *args)
    assert code == EXIT_CONFIG, text
    assert expected in text
    assert not ray.is_initialized(), "Ray was started for a config error"
    return text


def test_invalid_options_are_all_named(capsys, images, tmp_path, tiny_models):
    text = assert_fails_fast(
        capsys,
        "--batch-size must be >= 1",
        "caption",
        "--input", str(images),
        "--output", str(tmp_path / "out"),
        "--model", str(tiny_models["git"]),
        "--batch-size", "0",
        "--concurrency", "3,1",
    )  # fmt: skip
    assert "--concurrency must be N or MIN,MAX" in text


def test_unreadable_local_input(capsys, tmp_path, tiny_models):
    assert_fails_fast(
        capsys,
        "does not exist",
        "caption",
        "--input", str(tmp_path / "nope"),
        "--output", str(tmp_path / "out"),
        "--model", str(tiny_models["git"]),
    )  # fmt: skip


def test_unreachable_s3_bucket(capsys, s3, tmp_path, tiny_models):
    assert_fails_fast(
        capsys,
        "s3://no-such-bucket-here/images",
        "caption",
        "--input", "s3://no-such-bucket-here/images",
        "--output", str(tmp_path / "out"),
        "--model", str(tiny_models["git"]),
    )  # fmt: skip


def test_unknown_model(capsys, images, tmp_path):
    assert_fails_fast(
        capsys,
        "cannot load model config for 'nobody/unknown-captioner'",
        "caption",
        "--input", str(images),
        "--output", str(tmp_path / "out"),
        "--model", "nobody/unknown-captioner",
    )  # fmt: skip


def test_prompt_needs_its_columns(capsys, images, tmp_path, tiny_models):
    assert_fails_fast(
        capsys,
        "--prompt uses ['title']",
        "caption",
        "--input", str(images),
        "--output", str(tmp_path / "out"),
        "--model", str(tiny_models["blip-2"]),
        "--prompt", "Question: what is the {title}? Answer:",
    )  # fmt: skip


def test_credentials_as_options_are_refused_and_not_echoed(capsys, images, tmp_path, tiny_models):
    text = assert_fails_fast(
        capsys,
        "look like credentials",
        "caption",
        "--input", str(images),
        "--output", str(tmp_path / "out"),
        "--model", str(tiny_models["git"]),
        "--storage-option", "s3.secret=hunter2-very-secret",
    )  # fmt: skip
    assert "hunter2-very-secret" not in text


def test_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["caption", "--input", "x", "--output", "y", "--model", "z", "--dtype", "int3"])
    assert exc.value.code == EXIT_CONFIG
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    text = capsys.readouterr().out
    for needle in ("--input", "manifest", "--concurrency", "MIN,MAX", "credentials", "--prompt"):
        assert needle in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Exit codes: 0 success, 1 the run failed, 2 bad configuration" in capsys.readouterr().out


def test_search_needs_exactly_one_of_query_and_image(capsys, tmp_path):
    assert_fails_fast(capsys, "either a text query or --image", "search", "--index", str(tmp_path))
    assert_fails_fast(
        capsys, "not both", "search", "--index", str(tmp_path), "q", "--image", "x.jpg"
    )
    assert_fails_fast(capsys, "has no captions/ table", "search", "--index", str(tmp_path), "q")
