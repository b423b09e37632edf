"""The wheel: a non-editable install (``pip install .``) carries every subpackage and the datasets.

Builds a wheel from a copy of the sources (the checkout itself is left untouched), unpacks it, and
loads the datasets from that copy in a fresh interpreter whose working directory is elsewhere, so
nothing can be found through the checkout. Slow-ish (about 10-30 s: one setuptools build).
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from course_lib import data

ROOT = Path(__file__).resolve().parent.parent


def _listed_packages() -> list[str]:
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists the packages (it has to, to map data/ in): none may be forgotten."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "course_lib").rglob("__init__.py")}
    assert found <= set(_listed_packages()), f"add {sorted(found - set(_listed_packages()))} to pyproject.toml"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp")
    shutil.copytree(ROOT / "course_lib", source / "course_lib", ignore=ignore)
    shutil.copytree(ROOT / "data", source / "data", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("course_lib-*.whl")
    return built


def test_wheel_carries_the_modules_and_the_datasets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ROOT.glob("course_lib/**/*.py"):
        assert path.relative_to(ROOT).as_posix() in names, f"{path.relative_to(ROOT)} is not in the wheel"
    for name in (data.CODE_SEARCH_FILE, data.DISTRACTORS_FILE, data.INSTRUCT_FILE, "README.md"):
        assert f"course_lib/datasets/{name}" in names
        assert zipfile.ZipFile(wheel).read(f"course_lib/datasets/{name}") == (ROOT / "data" / name).read_bytes()


def test_installed_wheel_loads_the_datasets_from_elsewhere(wheel, tmp_path):
    """Unpacked as pip installs it (the wheel is pure Python), imported from a folder away from the
    checkout: `course_lib.data` reads its own package data."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import course_lib.data as d\n"
              "print(d.__file__); print(d.DATA_DIR)\n"
              "print(len(d.load_instruct('test')), len(d.load_code_search('all')), len(d.load_distractors(5)))\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run([sys.executable, "-c", script], check=False, cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    module_file, data_dir, counts = result.stdout.splitlines()
    assert Path(module_file).is_relative_to(site)
    assert Path(data_dir) == site / "course_lib" / "datasets"
    assert counts.split() == [str(len(data.load_instruct("test"))), str(len(data.load_code_search("all"))), "5"]
