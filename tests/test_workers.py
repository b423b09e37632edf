"""The cores shared out among pytest-xdist workers (tests/conftest.py, `worker_threads`)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import SLOWEST_FILES, worker_threads


@pytest.mark.parametrize("cores,workers,expected", [(2, 2, 1), (16, 2, 8), (3, 2, 1), (1, 2, 1), (8, 4, 2)])
def test_each_worker_gets_its_share_of_the_cores(monkeypatch, cores, workers, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(workers))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert worker_threads() == expected


def test_no_share_outside_xdist_or_when_the_environment_sets_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert worker_threads() is None                      # one pytest process: PyTorch's own default
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "1")
    assert worker_threads() is None
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads() is None                      # the environment wins


def test_this_worker_runs_with_the_threads_it_hands_on():
    """In a worker (make test: `-n 2`), PyTorch here and the processes a test starts use the same count."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        pytest.skip("runs only in a pytest-xdist worker (make test runs two)")
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])


def test_make_test_runs_every_chapter_once_in_the_planned_order():
    """The Makefile's CHAPTER_ORDER names each chapter exactly once, so the planned balance of the
    two workers covers them all; `make -n test` hands pytest exactly that order."""
    root = Path(__file__).resolve().parents[1]
    order = re.search(r"^CHAPTER_ORDER := (.+)$", (root / "Makefile").read_text(), re.MULTILINE).group(1).split()
    chapters = sorted(p.name[:2] for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(order) == chapters, "list every chapter once in the Makefile's CHAPTER_ORDER"
    if shutil.which("make") is None:
        pytest.skip("no make here to dry-run `make test` (the order itself was checked above)")
    dry = subprocess.run(["make", "-n", "test"], cwd=root, capture_output=True, text=True, check=True).stdout
    planned = re.findall(r"notebooks/(\d\d)_\w+\.ipynb", dry[dry.index("--nbval "):])   # the chapters' line
    assert planned == order


def test_the_slowest_test_files_are_handed_out_first(request):
    """tests/conftest.py puts the files of SLOWEST_FILES first in the collection, in that order,
    and make test's unit-test run keeps the collection's order (--no-loadscope-reorder)."""
    root = Path(__file__).resolve().parents[1]
    assert all((root / "tests" / name).is_file() for name in SLOWEST_FILES), "SLOWEST_FILES names a missing file"
    files = list(dict.fromkeys(item.path.name for item in request.session.items))
    present = [name for name in SLOWEST_FILES if name in files]
    assert files[: len(present)] == present
    if shutil.which("make") is None:
        pytest.skip("no make here to dry-run `make test` (the collection order itself was checked above)")
    dry = subprocess.run(["make", "-n", "test"], cwd=root, capture_output=True, text=True, check=True).stdout
    unit = next(line for line in dry.splitlines() if "pytest tests " in line)
    assert "--dist loadfile" in unit and "--no-loadscope-reorder" in unit
