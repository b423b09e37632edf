"""course_lib.tooling.results finds the committed benchmark results from the root, notebooks/ or a
folder beside it, and says what to do elsewhere."""

import json
from pathlib import Path

import pytest

from course_lib.tooling import results

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("start", [ROOT, ROOT / "notebooks", ROOT / "benchmarks" / "results"])
def test_the_root_is_found_from_inside_the_repository(start):
    assert results.repository_root(start) == ROOT


def test_a_result_is_the_committed_json():
    expected = json.loads((ROOT / "benchmarks" / "results" / "gradcache.json").read_text())
    assert results.benchmark_result("gradcache", start=ROOT / "notebooks") == expected


def test_outside_the_repository_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="open the chapter from the course's folder"):
        results.repository_root(tmp_path)
    with pytest.raises(ValueError, match="by its stem"):
        results.benchmark_result("gradcache.json", start=ROOT)
    with pytest.raises(FileNotFoundError, match="'gradcache'"):
        results.benchmark_result("no_such_benchmark", start=ROOT)
