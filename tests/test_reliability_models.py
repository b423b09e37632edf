"""The SmolLM2 cache survives an interrupted conversion, two first loads at once, and damage.

Every test points ``$COURSE_LIB_CACHE`` at its own temporary folder, never the user's cache. The
GGUF is converted for real once (the module's ``converted`` fixture, ~30 s); the tests that need
a second conversion use a stand-in that copies that checkpoint's files, which is what the
conversion would have written.
"""

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from course_lib import models

NAME = "smollm2-135m-instruct"
STAMP = "course_lib_source.json"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One real conversion of the installed GGUF, in a private cache the tests only copy from."""
    cache = tmp_path_factory.mktemp("converted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(models.CACHE_ENV, str(cache))
        return models.smollm2_checkpoint()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    return tmp_path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftover_folders(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name != NAME)


def conversion_stand_in(converted: Path, calls: list):
    """What the 30 s conversion writes into its folder, copied from the real conversion's output."""
    def convert(gguf, out):
        calls.append(Path(out))
        for file in converted.iterdir():
            if file.name != STAMP:
                shutil.copyfile(file, Path(out) / file.name)
    return convert


# ---------------------------------------------------------------------------------------------
# Issue 21 (3): an interrupted conversion, and two first loads at once
# ---------------------------------------------------------------------------------------------
def test_an_interrupted_conversion_leaves_no_temporary_folder(cache, monkeypatch):
    """Ctrl-C while the ~540 MB weights are written: neither a temporary folder nor a
    half-written checkpoint stays in the cache. (Reading the GGUF is replaced by a tiny model:
    what matters here is the interrupted write.)"""
    import safetensors.torch
    import transformers

    tiny = models.tiny_llama()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_checkpoint()
    assert leftover_folders(cache) == [] and not (cache / NAME).exists()


def test_two_first_loads_at_once_both_succeed(cache, converted, monkeypatch):
    """Two first loads start together; if both publish a checkpoint, they do so at the same
    moment (a barrier on the final rename). Both get a whole, verified checkpoint."""
    calls = []
    monkeypatch.setattr(models, "_convert_smollm2", conversion_stand_in(converted, calls), raising=False)
    publish = threading.Barrier(2, timeout=3)

    def together(move):
        def patched(src, dst, *args, **kwargs):
            if Path(dst).name == NAME:   # publishing the checkpoint
                try:
                    publish.wait()
                except threading.BrokenBarrierError:
                    pass                 # only one load published: nothing to race with
            return move(src, dst, *args, **kwargs)
        return patched

    monkeypatch.setattr(os, "rename", together(os.rename))
    monkeypatch.setattr(os, "replace", together(os.replace))
    start, results, errors = threading.Barrier(2), [], []

    def first_load():
        start.wait()
        try:
            results.append(models.smollm2_checkpoint())
        except BaseException as error:  # noqa: BLE001 - the test reports any failure
            errors.append(error)

    threads = [threading.Thread(target=first_load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert results == [cache / NAME] * 2
    assert len(calls) == 1   # the second load waited for the first and used its checkpoint
    assert leftover_folders(cache) == []
    assert models.smollm2_checkpoint() == cache / NAME and len(calls) == 1   # whole: not converted again


def test_the_lock_lets_one_holder_in_at_a_time(tmp_path):
    """`exclusive_lock` (fcntl.flock on a lock file): threads with their own handles exclude each other."""
    import time

    from course_lib.atomic_files import exclusive_lock

    inside, overlaps = [], []

    def hold():
        with exclusive_lock(tmp_path / "cache.lock"):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert overlaps == [1, 1, 1, 1]


def test_leftovers_of_killed_conversions_are_removed_by_the_next_one(cache, converted, monkeypatch):
    """A conversion killed outright (no ``finally`` runs) leaves its folder; the next conversion,
    which holds the cache's lock, removes it (older course_lib versions named them .smollm2-*)."""
    for name in (f".{NAME}.x1y2.partial", ".smollm2-abc123"):
        (cache / name).mkdir()
        (cache / name / "model.safetensors").write_bytes(b"half")
    calls = []
    monkeypatch.setattr(models, "_convert_smollm2", conversion_stand_in(converted, calls), raising=False)
    assert models.smollm2_checkpoint() == cache / NAME
    assert leftover_folders(cache) == [] and len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Issue 21 (10): a damaged copy is detected (size and SHA-256 recorded at conversion) and rebuilt
# ---------------------------------------------------------------------------------------------
def test_the_stamp_records_each_files_size_and_sha256(converted):
    stamp = json.loads((converted / STAMP).read_text())
    files = {p.name for p in converted.iterdir()} - {STAMP}
    assert set(stamp["files"]) == files and "model.safetensors" in files
    for name, (size, digest) in stamp["files"].items():
        assert (converted / name).stat().st_size == size and sha256(converted / name) == digest


@pytest.mark.parametrize("damage, problem", [
    ("truncated", r"model\.safetensors has \d+ bytes, not the \d+ recorded"),
    ("overwritten", r"model\.safetensors does not match its recorded SHA-256"),
    ("deleted", r"tokenizer\.json is missing"),
    ("old stamp", r"older course_lib, which recorded no checksums")], ids=["truncated", "overwritten", "deleted", "old-stamp"])
def test_a_damaged_copy_is_detected_and_rebuilt(cache, converted, monkeypatch, damage, problem):
    """Damage after a good load in the same process: a truncated ``model.safetensors`` (once a bare
    SafetensorError), bytes overwritten in its middle (once NaN parameters, silently), a missing
    file, or a stamp without checksums (an older course_lib). The next load says so in one line,
    converts again and loads finite weights."""
    path = cache / NAME
    shutil.copytree(converted, path)
    assert models.smollm2_checkpoint() == path   # whole: verified, and that result cached
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncated":
        os.truncate(weights, size // 2)
    elif damage == "overwritten":
        with open(weights, "r+b") as file:
            file.seek(size // 2)
            file.write(b"\xff" * 4096)   # 0xFFFFFFFF is a float32 NaN
    elif damage == "deleted":
        (path / "tokenizer.json").unlink()
    else:
        stamp = json.loads((path / STAMP).read_text())
        old = {"gguf_file": stamp["gguf_file"], "gguf_bytes": stamp["gguf_bytes"]}   # what it used to record
        (path / STAMP).write_text(json.dumps(old))
    calls = []
    monkeypatch.setattr(models, "_convert_smollm2", conversion_stand_in(converted, calls), raising=False)
    loads_the_model = damage in ("truncated", "overwritten")   # the two that broke load_smollm2
    message = rf"cannot be used \(.*{problem}.*\): converting it again"
    with pytest.warns(RuntimeWarning, match=message) as caught:
        model = models.load_smollm2("cpu")[0] if loads_the_model else models.smollm2_checkpoint()
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert len(calls) == 1 and weights.stat().st_size == (converted / "model.safetensors").stat().st_size
    if loads_the_model:
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert leftover_folders(cache) == []


def test_a_whole_copy_is_hashed_once_per_process(cache, converted, monkeypatch):
    """Verifying costs a SHA-256 of ~540 MB (about a second): done once per process and file
    version, so later loads are instant; no conversion happens for a whole copy."""
    shutil.copytree(converted, cache / NAME)
    calls = []
    monkeypatch.setattr(models, "_convert_smollm2", conversion_stand_in(converted, calls), raising=False)
    assert models.smollm2_checkpoint() == cache / NAME
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    assert models.smollm2_checkpoint() == cache / NAME
    assert hashed == [] and calls == []
