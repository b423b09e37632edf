"""Shared fixtures: the real models are loaded once per test session (they are read-only here)."""

import inspect
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def worker_threads() -> int | None:
    """Threads per pytest-xdist worker: the cores shared out among the workers (``make test`` runs
    2 workers: on 2 cores, 1 thread each), or None outside xdist or when OMP_NUM_THREADS is set.

    Each worker's PyTorch would otherwise start one thread per core. With OpenMP's default
    spinning wait (a plain ``pytest tests -n 2``; the Makefile sets OMP_WAIT_POLICY=PASSIVE), two
    workers' thread teams on 2 cores then wait on each other at every parallel region, and tests
    made of many small operations run several times slower: GradCache with chunks of 1 took 14 s
    alone and 94 s beside the other worker; the whole unit phase 720 s, against 461 s with one
    thread per worker (with PASSIVE: 370 s and 361 s). Processes the tests start (kernels,
    launched ranks) inherit the setting.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # macOS: no affinity
    return max(1, cores // workers)


if (_threads := worker_threads()) is not None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.fixture(scope="session")
def minilm():
    from course_lib.models import load_minilm

    return load_minilm("cpu")


@pytest.fixture(scope="session")
def smollm2():
    from course_lib.models import load_smollm2

    return load_smollm2("cpu")


# The cross-checks: tests that compare course_lib with a production library. They are found by
# what their code calls, so a new cross-check is marked without anyone remembering to; `make
# test-latest` runs just these (`pytest -m crosscheck`) against the newest releases.
REFERENCE_LIBRARIES = re.compile(
    r"\b(peft|PeftModel|get_peft_model|LoraConfig|bnb|bnbF|bitsandbytes|sentence_transformers|SentenceTransformer"
    r"|ST_|st_loss|onnxruntime|ort|InferenceSession|gguf|GGUFReader)\b")


def pytest_configure(config):
    config.addinivalue_line("markers", "crosscheck: compares course_lib with a production library "
                                       "(peft, bitsandbytes, sentence-transformers, onnxruntime, gguf)")


def calls_reference_library(function) -> bool:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return bool(REFERENCE_LIBRARIES.search(source))


# The test files handed to make test's two workers first: the slowest (make test's "seconds per
# file"), so that one worker does not run a long file alone at the end. make test passes
# --no-loadscope-reorder, which keeps this order (the other files follow in collection order);
# xdist's own order hands out the files with the most tests first, and the longest can start last.
# With the per-file times of the clean-clone run of f2783b3 on the AMD EPYC (543 s in all), the
# later worker ends after 272 s in this order, 281 s in xdist's, 271 s if split perfectly.
SLOWEST_FILES = ("test_export.py", "test_site_browser.py", "test_distributed.py", "test_budget.py",
                 "test_models.py", "test_reliability_models.py", "test_data.py", "test_cpu_paths.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and calls_reference_library(function):
            item.add_marker(pytest.mark.crosscheck)
    first = {name: rank for rank, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))   # stable: the others keep their order


# ---------------------------------------------------------------------------------------------
# The course-lib command, called in-process (tests/test_budget_gpus.py, tests/test_reliability_cli.py)
# ---------------------------------------------------------------------------------------------
def run(capsys, *argv):
    """``course-lib ARGV...`` in this process: ``(exit status, stdout, stderr)``."""
    from course_lib.cli import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, out, err, *words):
    """The command failed as a user should see it: status 2, nothing on stdout, one line on
    stderr starting ``course-lib: error:``, no traceback, naming each of ``words``."""
    assert status == 2 and out == "", (status, out)
    assert err.count("\n") == 1 and err.startswith("course-lib: error: "), err
    assert "internal error" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def st_preprocess(model, texts):
    """sentence-transformers' tokenization: ``preprocess`` (``tokenize`` before 6.0, deprecated since)."""
    return (model.preprocess if hasattr(model, "preprocess") else model.tokenize)(texts)
