"""The committed outputs must reproduce on a learner's CPU, whichever it is.

PyTorch and bitsandbytes pick a code path from the CPU: AVX-512 (with bfloat16 instructions) or
AVX2. On the first, bitsandbytes prints a warning while it is imported and repacks 4-bit weights for
a bfloat16 inference kernel; on the second it does neither. The chapters' outputs were produced on
one kind and are graded on both, so these tests run the chapters' set-up cells (where the imports
happen) on the AVX2 path, whatever CPU runs the tests, and compare with the committed outputs. On a
CPU without AVX-512 they skip, saying why: there the chapters under nbval (make test's second phase)
run every cell on the AVX2 path natively.

`avx2_env` selects the AVX2 path: PyTorch's ``ATEN_CPU_CAPABILITY`` (and the BLAS / oneDNN limits)
and ``tests/avx2_path/sitecustomize.py``, which makes bitsandbytes' native library report no
AVX-512-BF16. The whole suite of chapters can be run that way too (see the README, "Another CPU").
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def avx2_env() -> dict:
    env = dict(os.environ)
    env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests" / "avx2_path"), env.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    return env


def _run(code: str, env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _native_path_is_avx2() -> bool:
    """This process already runs on the AVX2 path: PyTorch's AVX2 kernels, and bitsandbytes seeing no
    AVX-512-BF16 (a CPU without AVX-512, or these tests run under `avx2_env`). Checking the AVX2 path
    in a subprocess then repeats what this process, and make test's chapters under nbval, do natively."""
    import bitsandbytes.functional as bnbF

    return torch.backends.cpu.get_cpu_capability() == "AVX2" and not bnbF.has_avx512bf16()


def _setup_cell(notebook: Path) -> dict:
    cells = json.loads(notebook.read_text())["cells"]
    return next(cell for cell in cells if cell["cell_type"] == "code")


def _without_progress_bars(text: str) -> str:
    """Drops tqdm's progress lines (in a notebook they are widgets, not stderr text)."""
    return "".join(line for line in text.splitlines(keepends=True) if "%|" not in line and line.strip())


def _committed(cell: dict, name: str) -> str:
    return "".join("".join(out["text"]) for out in cell["outputs"]
                   if out["output_type"] == "stream" and out["name"] == name)


def test_the_avx2_path_is_what_the_libraries_see():
    probe = ("import torch, bitsandbytes.functional as F, bitsandbytes.nn as bnn\n"
             "print(torch.backends.cpu.get_cpu_capability(), F.has_avx512bf16(),"
             " bnn.Linear4bit(8, 8).support_avx512bf16_for_cpu)")
    result = _run(probe, avx2_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["AVX2", "False", "False"]
    assert "gemm_4bit_forward" not in result.stderr  # the AVX-512-BF16-only warning


# The libraries the set-up cells import that take seconds to import (torch 3 s, bitsandbytes 10 s, peft
# and sentence-transformers with them 16 s and 20 s): imported once, before the cells' processes fork.
PRELOADED = ["torch", "transformers", "peft", "bitsandbytes", "sentence_transformers", "matplotlib.pyplot"]


@pytest.fixture(scope="module")
def setup_cells_on_avx2(tmp_path_factory):
    """``run_all()``: every chapter's set-up cell run on the AVX2 path, each in a fresh process, once
    for the tests below (at the first call): ``{"imports_printed": ..., "runs": {chapter: {"returncode",
    "stdout", "stderr"}}}``.

    The processes are forked by tests/forked_cells.py from one that imported PRELOADED (what the
    cells import that takes time) on the AVX2 path first: on an idle AMD EPYC the nine checks took
    31 s of worker time this way, 104 s with a new interpreter for each cell. What those imports
    printed comes back as ``imports_printed``: when it is empty, each cell prints in its process what
    it prints in a new interpreter. A temporary folder a cell makes (chapter 06's, removed by its
    last cell) goes into a pytest temporary directory."""
    runs = {}

    def run_all() -> dict:
        if not runs:
            work = tmp_path_factory.mktemp("avx2-cells")
            cells = []
            for notebook in CHAPTERS:
                (work / notebook.stem).mkdir()
                cells.append({"name": notebook.stem, "code": "".join(_setup_cell(notebook)["source"]),
                              "cwd": str(notebook.parent), "tmpdir": str(work / notebook.stem)})
            (work / "jobs.json").write_text(json.dumps({"preload": PRELOADED, "cells": cells}))
            result = subprocess.run([sys.executable, str(ROOT / "tests" / "forked_cells.py"), str(work / "jobs.json"),
                                     str(work / "results.json")], check=False, env=avx2_env(), cwd=ROOT,
                                    capture_output=True, text=True, timeout=1200)
            assert result.returncode == 0, result.stderr[-2000:]
            runs.update(json.loads((work / "results.json").read_text()))
        return runs
    return run_all


def test_a_forked_cell_prints_what_a_new_interpreter_prints(tmp_path):
    """tests/forked_cells.py against ``python -c`` on the same code, in the same folder, with the same
    TMPDIR: the same stdout, stderr (the last line of a traceback) and exit status. And the condition
    it reports: a preloaded module that prints on import prints in ``imports_printed``, not in a cell
    that imports it again, where a new interpreter prints it."""
    (tmp_path / "noisy.py").write_text('print("imported noisy")\n')
    (tmp_path / "cwd").mkdir()
    (tmp_path / "tmp").mkdir()
    cells = {
        "prints": 'import sys\nprint("to stdout")\nprint("to stderr", file=sys.stderr)\nprint(sys.argv)',
        "fails": 'print("before")\nraise ValueError("a cell that fails")',
        "exits": 'import sys\nprint("unflushed", end="")\nsys.exit(3)',
        "folders": 'import os, tempfile\nprint(os.path.basename(os.getcwd()), os.path.basename(tempfile.gettempdir()))',
        "reimports": 'import noisy',
    }
    jobs = {"preload": ["json", "noisy"],
            "cells": [{"name": name, "code": code, "cwd": str(tmp_path / "cwd"), "tmpdir": str(tmp_path / "tmp")}
                      for name, code in cells.items()]}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TMPDIR": str(tmp_path / "tmp")}   # the cells' TMPDIR
    runner = subprocess.run([sys.executable, str(ROOT / "tests" / "forked_cells.py"), str(tmp_path / "jobs.json"),
                             str(tmp_path / "results.json")], check=False, env={**env, "TMPDIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert runner.returncode == 0, runner.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["imports_printed"] == "imported noisy\n"
    for name, code in cells.items():
        forked, new = results["runs"][name], _run(code, env, cwd=tmp_path / "cwd")
        assert forked["returncode"] == new.returncode, name
        assert forked["stderr"].splitlines()[-1:] == new.stderr.splitlines()[-1:], name
        if name == "reimports":
            assert (forked["stdout"], new.stdout) == ("", "imported noisy\n")
        else:
            assert forked["stdout"] == new.stdout, name
    assert results["runs"]["prints"]["stderr"] == "to stderr\n"
    assert [results["runs"][name]["returncode"] for name in ("fails", "exits")] == [1, 3]
    assert results["runs"]["folders"]["stdout"] == "cwd tmp\n"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_setup_cell_prints_the_committed_output_on_an_avx2_cpu(notebook, setup_cells_on_avx2):
    """Each chapter's first code cell (its imports: transformers, peft, bitsandbytes, ...) prints on
    the AVX2 path exactly what its committed output holds (stdout and stderr)."""
    if _native_path_is_avx2():
        pytest.skip("this CPU runs the AVX2 path natively: make test's chapters under nbval run each set-up "
                    "cell on it, in the chapter's own kernel, and compare it with the committed output")
    cell = _setup_cell(notebook)
    assert "import" in "".join(cell["source"])
    runs = setup_cells_on_avx2()
    assert runs["imports_printed"] == "", (
        "importing the libraries printed this on the AVX2 path, before any set-up cell ran (each cell's "
        "process starts after those imports, so its output below would lack it):\n" + runs["imports_printed"][-2000:])
    result = runs["runs"][notebook.stem]
    assert result["returncode"] == 0, result["stderr"][-2000:]
    assert _without_progress_bars(result["stderr"]) == _committed(cell, "stderr")
    assert result["stdout"] == _committed(cell, "stdout")


def test_a_cpu_dependent_warning_in_a_committed_output_is_caught(tmp_path, setup_cells_on_avx2):
    """The check above fails where it should: a set-up cell whose committed output carries the
    warning that only an AVX-512-BF16 CPU prints (the defect this file guards against). The cell's
    run on the AVX2 path is the one the check above made for that chapter."""
    warning = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
               "Please make sure you already `pip install kernels` and the kernels >= 0.11.1\n")
    notebook = json.loads(CHAPTERS[-1].read_text())
    cell = next(c for c in notebook["cells"] if c["cell_type"] == "code")
    cell["outputs"] = [{"output_type": "stream", "name": "stderr", "text": [warning]}]
    path = tmp_path / CHAPTERS[-1].name
    path.write_text(json.dumps(notebook))
    result = setup_cells_on_avx2()["runs"][CHAPTERS[-1].stem]
    assert result["returncode"] == 0
    assert _without_progress_bars(result["stderr"]) != _committed(_setup_cell(path), "stderr")


_FOUR_BIT_LOGITS = """
import sys
import torch
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig
from course_lib import models

config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
model, tokenizer = models.load_smollm2("cpu", quantization_config=config)
batch = tokenizer(["def add(a, b): return a + b", "The capital of France is"], return_tensors="pt", padding=True)
with torch.no_grad():
    save_file({"logits": model(**batch).logits.contiguous()}, sys.argv[1])
"""


def test_4bit_inference_takes_the_same_path_on_every_cpu(tmp_path):
    """A 4-bit SmolLM2 from `load_smollm2` gives, in eval mode without gradients (where bitsandbytes
    would repack its weights for a bfloat16 kernel on an AVX-512-BF16 CPU), exactly the logits of
    its training path; and the same logits, to float32 rounding, on the AVX2 path (computed in a
    subprocess unless this process is on it already)."""
    import bitsandbytes.functional as bnbF
    from safetensors.torch import load_file

    avx2, already_avx2 = tmp_path / "avx2.safetensors", _native_path_is_avx2()
    if not already_avx2:
        result = subprocess.run([sys.executable, "-c", _FOUR_BIT_LOGITS, str(avx2)], check=False, env=avx2_env(),
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]

    from transformers import BitsAndBytesConfig

    from course_lib import models

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model, tokenizer = models.load_smollm2("cpu", quantization_config=config)
    batch = tokenizer(["def add(a, b): return a + b", "The capital of France is"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        inference = model(**batch).logits
        training_path = model.train()(**batch).logits
    assert torch.equal(inference, training_path)
    if not already_avx2:
        # float32 sums in another order through 30 layers: on an Intel Xeon with AVX-512 and AMX up to
        # 2.7e-4 on logits up to 37 in size (1e-4 was enough on AMD EPYC); bfloat16 weights (below) move
        # them by whole units (4.4 there)
        torch.testing.assert_close(inference, load_file(avx2)["logits"], rtol=1e-4, atol=1e-3)
    if bnbF.has_avx512bf16():  # what the setting prevents, on a CPU that has the other path
        assert models.use_one_cpu_path(model) == 30 * 7
        for layer in model.modules():
            if hasattr(layer, "support_avx512bf16_for_cpu"):
                layer.support_avx512bf16_for_cpu = True
        with torch.no_grad():
            repacked = model.eval()(**batch).logits
        assert (repacked - inference).abs().max() > 1e-2    # far beyond the AVX2 path's tolerance above
