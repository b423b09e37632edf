"""The ``course-lib`` command: tables, JSON, the planner, and one-line errors with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib import budget
from course_lib.cli import main


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_budget_prints_the_breakdown_as_a_table(capsys):
    status, out, err = run(capsys, "budget", "--model", "llama-3-8b", "--method", "qlora", "--gpu", "24GB",
                           "--seq", "2048", "--batch", "4")
    assert err == ""
    for line in ("weights", "LoRA parameters", "gradients", "optimizer state", "activations", "total", "peak"):
        assert line in out
    expected = budget.estimate("llama-3-8b", "qlora", seq_len=2048, batch_size=4)
    assert budget.format_bytes(expected.weights) in out
    assert status == (0 if expected.peak <= 24 * budget.GiB else 1)
    assert ("fits in 24 GiB" in out) == (status == 0)


def test_budget_json_has_the_same_numbers_in_bytes(capsys):
    status, out, _ = run(capsys, "budget", "--model", "smollm2-135m", "--method", "lora", "--r", "16",
                         "--target-modules", "q_proj,v_proj", "--checkpointing", "--json")
    data = json.loads(out)
    expected = budget.estimate("smollm2-135m", "lora", r=16, target_modules=["q_proj", "v_proj"],
                               gradient_checkpointing=True)
    assert status == 0
    assert data["total"] == expected.total and data["weights"] == expected.weights
    assert data["settings"]["r"] == 16 and data["settings"]["gradient_checkpointing"] is True


def test_a_step_that_does_not_fit_exits_1(capsys):
    status, out, _ = run(capsys, "budget", "--model", "llama-2-70b", "--method", "full", "--gpu", "24GB")
    assert status == 1 and "does not fit" in out


def test_plan_flag_and_plan_command_agree(capsys):
    status1, out1, _ = run(capsys, "budget", "--model", "llama-3-8b", "--gpu", "24GB", "--plan")
    status2, out2, _ = run(capsys, "plan", "--model", "llama-3-8b", "--gpu", "24GB")
    assert status1 == status2 == 0 and out1 == out2
    assert "plan:" in out1 and "seed 000" in out1


@pytest.mark.parametrize("argv, words", [
    (["--model", "minilm", "--gpu", "24GB"], "plan: full, batch 64 x 512 tokens, the whole batch at once"),
    (["--model", "minilm", "--gpu", "10GB"], "GradCache chunks of 32"),
    (["--model", "llama-3-8b", "--gpu", "12GB", "--seq", "2048"], "(nf4, double quantization)"),
])
def test_plan_summaries(capsys, argv, words):
    status, out, err = run(capsys, "plan", *argv)
    assert status == 0 and err == "" and words in out


def test_plan_json_when_nothing_fits(capsys):
    status, out, _ = run(capsys, "plan", "--model", "llama-2-70b", "--gpu", "24GB", "--json")
    data = json.loads(out)
    assert status == 1 and data["fits"] is False and "4-bit weights alone" in data["reason"]


def test_models_lists_every_config(capsys):
    status, out, _ = run(capsys, "models")
    assert status == 0 and all(name in out for name in budget.MODELS)


@pytest.mark.parametrize("argv, words", [
    (["budget", "--model", "llama-9b"], "known models: llama-7b"),
    (["budget", "--model", "llama-7b", "--gpu", "0GB"], "memory must be positive"),
    (["budget", "--model", "llama-7b", "--gpu", "lots"], "cannot read 'lots'"),
    (["budget", "--model", "llama-7b", "--batch", "0"], "batch_size must be a positive integer"),
    (["budget", "--model", "llama-7b", "--seq", "-5"], "seq_len must be a positive integer"),
    (["budget", "--model", "llama-7b", "--method", "full", "--r", "8"], "do not apply to full fine-tuning"),
    (["budget", "--model", "llama-7b", "--method", "lora", "--double-quant"], "use method='qlora'"),
    (["budget", "--model", "llama-7b", "--target-modules", "query"], "match no linear layer"),
    (["budget", "--model", "minilm", "--seq", "1024"], "512 learned positions"),
    (["budget", "--model", "llama-7b", "--method", "dora"], "invalid choice"),
    (["plan", "--model", "llama-7b"], "add --gpu"),
    (["budget"], "required: --model"),
])
def test_bad_input_is_one_line_on_stderr_with_status_2(capsys, argv, words):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("course-lib: error: ") and words in err, err


def test_the_console_script_is_installed_and_runs():
    script = Path(sys.executable).with_name("course-lib")
    assert script.exists(), "run: .venv/bin/python -m pip install --no-deps -e ."
    done = subprocess.run([str(script), "budget", "--model", "smollm2-135m", "--json"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["settings"]["model"] == "smollm2-135m"
    bad = subprocess.run([str(script), "budget", "--model", "nope"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_budget_command_imports_no_heavy_library():
    """``course-lib budget`` starts at once: it imports neither torch, transformers, nbformat nor numpy
    (a deterministic stand-in for its start-up time, which a loaded machine would make flaky)."""
    code = ("import sys, contextlib, io\n"
            "import course_lib.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    status = course_lib.cli.main(['budget', '--model', 'llama-3-8b', '--method', 'qlora', '--gpu', '24GB'])\n"
            "assert status == 0, status\n"
            "print(sorted(m for m in ('torch', 'transformers', 'nbformat', 'numpy') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
