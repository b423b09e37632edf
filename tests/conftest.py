"""Shared fixtures: the real models are loaded once per test session (they are read-only here)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm():
    from course_lib.models import load_minilm

    return load_minilm("cpu")


@pytest.fixture(scope="session")
def smollm2():
    from course_lib.models import load_smollm2

    return load_smollm2("cpu")
