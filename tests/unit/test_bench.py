"""The benchmark's own parts: full-size architectures match the published models, and results
land in the right table of RESULTS.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import archs  # noqa: E402
import bench_caption  # noqa: E402


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_full_size_architectures_have_the_published_parameter_counts(arch):
    count = archs.param_count(arch)  # on the meta device: no weights allocated
    assert abs(count / archs.PUBLISHED_PARAMS[arch] - 1) < 0.001, count


def test_results_are_appended_to_their_own_table(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nIntro.\n")
    bench_caption.record("decode", ["d1", "m", "4 MP", "1", "2", "2.00", "cmd"], path)
    bench_caption.record("scale", ["s1", "m", "x", "1", "1", "1", "1", "cmd"], path)
    bench_caption.record("decode", ["d2", "m", "4 MP", "1", "2", "2.00", "cmd"], path)
    lines = path.read_text().splitlines()
    decode = lines.index("<!-- table:decode -->")
    scale = lines.index("<!-- table:scale -->")
    assert decode < scale
    rows = [line for line in lines[decode:scale] if line.startswith(("| d1", "| d2"))]
    assert [r.split(" | ")[0] for r in rows] == ["| d1", "| d2"]  # in order, in their table
    assert lines[decode + 3] == rows[0]  # right under the header and its rule
    assert lines[decode + 1].startswith("| date | machine | JPEG |")
    assert "Intro." in lines


def test_cpu_stages_do_not_import_torch():
    # Read and decode tasks import raycaption.stages; paying for torch there would cost each
    # new worker process seconds (bench/RESULTS.md, start-up).
    code = (
        "import sys, raycaption.stages, raycaption.sink, raycaption.pipeline; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]
