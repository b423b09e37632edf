"""What the benchmark scripts share (benchmarks/report.py), and the scripts as a package: each runs as
``python -m benchmarks.<name>``, says so, and records it; nothing here measures anything."""

import argparse
import importlib
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import report
from course_lib.tooling.figures import parse_figure_line

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "report"))


@pytest.mark.parametrize("value, op, target, verdict", [
    (1.22, "<=", 1.5, "met"), (1.5, "<=", 1.5, "met"), (1.51, "<=", 1.5, "missed"),
    (4.0, ">=", 4, "met"), (-0.07, ">", 0, "missed"), (0.0, "<", 0, "missed"),
])
def test_figure_line(value, op, target, verdict):
    line = report.figure("some_ratio", value, op, target)
    figure = parse_figure_line(line)
    assert (figure.name, figure.op, figure.target, figure.verdict) == ("some_ratio", op, target, verdict)


@pytest.mark.parametrize("interval, op, target, line", [
    # qlora_step's 30 paired rounds: the point 0.996 meets <= 1.0, the interval's upper end does not
    ({"low": 0.973, "high": 1.017}, "<=", 1.0, "FIGURE r_95pct_high: 1.02 (target <= 1.0) missed"),
    ({"low": 0.90, "high": 0.98}, "<", 1.0, "FIGURE r_95pct_high: 0.98 (target < 1.0) met"),
    # a gain whose interval touches zero (recall@10 [+0.000, +0.028]) is not shown to be > 0
    ({"low": 0.0, "high": 0.028}, ">", 0, "FIGURE r_95pct_low: 0 (target > 0) missed"),
    ({"low": -0.04, "high": 0.01}, ">=", -0.05, "FIGURE r_95pct_low: -0.04 (target >= -0.05) met"),
])
def test_interval_figure_holds_the_whole_interval_to_the_target(interval, op, target, line):
    assert report.interval_figure("r", interval, op, target) == line


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("*.json")), ids=lambda p: p.name)
def test_each_interval_line_follows_its_point_estimate(path):
    """An interval's line comes right after its figure's point line, with the same target, and is
    met only where the point is (the point lies inside its interval)."""
    figures = [parse_figure_line(line) for line in json.loads(path.read_text(encoding="utf-8"))["figures"]]
    for before, figure in itertools.pairwise(figures):
        if "_95pct_" in figure.name:
            stem, _, end = figure.name.rpartition("_95pct_")
            assert (before.name, before.op, before.target) == (stem, figure.op, figure.target)
            assert end == ("high" if figure.op in ("<=", "<") else "low")
            assert before.met or not figure.met
            assert (figure.value >= before.value) if end == "high" else (figure.value <= before.value)
    assert not figures or "_95pct_" not in figures[0].name


def test_unknown_comparison_is_refused():
    with pytest.raises(ValueError, match="unknown comparison '=='"):
        report.figure("x", 1.0, "==", 1.0)


def test_timed_is_the_median_after_a_warm_up():
    calls = []
    assert report.timed(lambda: calls.append(1), repeats=3) >= 0
    assert len(calls) == 4


def test_interleaved_rotates_the_order_round_by_round():
    """One warm-up call each, then every callable once a round, each round starting one further on:
    over as many rounds as callables, each has run once in every position."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = report.interleaved(fns, rounds=6)
    assert calls[:3] == list("abc")                                    # the warm-up round
    rounds = ["".join(calls[i:i + 3]) for i in range(3, len(calls), 3)]
    assert rounds == ["abc", "bca", "cab", "abc", "bca", "cab"]
    assert {name: len(t) for name, t in times.items()} == {"a": 6, "b": 6, "c": 6}
    assert all(t >= 0 for seconds in times.values() for t in seconds)


def test_paired_ratio_is_the_median_of_each_round_s_ratio():
    # a round ten times slower on both sides keeps its ratio 1.1; one spoilt round (3.0) is outvoted,
    # where the ratio of the medians or means would move
    times = {"a": [1.1, 11.0, 1.1, 3.0, 1.1], "b": [1.0, 10.0, 1.0, 1.0, 1.0]}
    assert report.paired_ratio(times, "a", "b") == pytest.approx(1.1)
    assert report.paired_ratio(times, "b", "a") == pytest.approx(1 / 1.1)
    with pytest.raises(ValueError):   # rounds that do not pair up are refused, not cut short
        report.paired_ratio({"a": [1.0, 2.0], "b": [1.0]}, "a", "b")


def test_step_seconds_keeps_every_step_of_a_training_run():
    from course_lib.train import History

    history = History(seconds=[3.123456, 1.00004, 0.99996])
    assert report.step_seconds(history) == [3.1235, 1.0, 1.0]   # the warm-up step too, to 0.1 ms


def test_per_step_ratio_pairs_the_steps_of_two_runs_on_the_same_batches():
    """Step i of each run saw the same batch: the ratio is the median of the step-by-step ratios,
    the warm-up step left out (its 10 s would not move a median but is not a step's cost)."""
    slow = {"step_seconds": [10.0, 2.0, 4.4, 2.2, 8.0, 2.0]}
    fast = {"step_seconds": [1.0, 1.0, 2.0, 1.0, 2.0, 1.0]}
    # ratios of steps 1-5: 2.0, 2.2, 2.2, 4.0, 2.0 -> median 2.2; the ratio of the medians would be
    # 2.2 / 1.0 = 2.2 too here, but the long batch (step 2) pairs with its own long batch
    ratio = report.per_step_ratio(slow, fast)
    assert ratio["ratio"] == pytest.approx(2.2) and ratio["rounds"] == 5
    assert ratio["low"] <= 2.2 <= ratio["high"] and ratio["low"] >= 2.0 and ratio["high"] <= 4.0
    assert ratio["verdict"] == "slower"            # the whole interval above 1: the numerator's step
    assert report.per_step_ratio(fast, slow)["ratio"] == pytest.approx(1 / 2.2)
    with pytest.raises(ValueError, match="the same length"):   # runs of different lengths do not pair
        report.per_step_ratio(slow, {"step_seconds": [1.0] * 5})
    with pytest.raises(ValueError, match="at least 3 steps"):
        report.per_step_ratio({"step_seconds": [1.0, 2.0]}, {"step_seconds": [1.0, 1.0]})
    # the FIGURE lines: the point and its interval's end; a run that kept only its median step gets
    # the ratio of the medians and no interval line
    assert report.step_ratio_figures("r", slow, fast, "<=", 2.0) == [
        "FIGURE r: 2.2 (target <= 2.0) missed", f"FIGURE r_95pct_high: {ratio['high']:.3g} (target <= 2.0) missed"]
    assert report.step_ratio_figures("r", {"seconds_per_step": 3.0}, {**fast, "seconds_per_step": 2.0}, ">=", 15) == [
        "FIGURE r: 1.5 (target >= 15) missed"]


@pytest.mark.parametrize("name, pairs", [
    ("qlora_training", lambda r: [("qlora_course_lib_over_bnb_seconds_per_step", r["runs"][1], r["runs"][2])]),
    ("peft_methods", lambda r: [("dora_seconds_per_step_over_lora", *(next(x for x in r["runs"] if x["method"] == m)
                                                                      for m in ("dora", "lora")))]),
    ("lora_training", lambda r: [("minilm_full_over_lora_r8_seconds_per_step", r["minilm"][-1],
                                  next(x for x in r["minilm"] if x["r"] == 8)),
                                 ("smollm2_full_over_lora_seconds_per_step", r["smollm2"][1], r["smollm2"][0])]),
])
def test_training_step_time_figures_are_the_recorded_steps_ratios(name, pairs):
    """The committed training benchmarks' step-time figures come from every step's recorded
    seconds (the runs' own medians agree with them), each with its interval line."""
    result = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    figures = {f.name: f for f in map(parse_figure_line, result["figures"])}
    for figure_name, numerator, denominator in pairs(result):
        for row in (numerator, denominator):
            steps = sorted(row["step_seconds"][1:])
            assert row["seconds_per_step"] == pytest.approx(steps[len(steps) // 2], abs=1e-3)
        ratio = report.per_step_ratio(numerator, denominator)
        end = "high" if figures[figure_name].op in ("<=", "<") else "low"
        assert figures[figure_name].value == float(f"{ratio['ratio']:.3g}")
        assert figures[f"{figure_name}_95pct_{end}"].value == float(f"{ratio[end]:.3g}")


# ---------------------------------------------------------------------------------------------
# The command line and the run's fields
# ---------------------------------------------------------------------------------------------
def test_the_command_spells_every_option():
    args = argparse.Namespace(batch=256, chunk=32, rounds=7, sweep=[16, 64, 256], sweep_chunk=16, lr=0.001,
                              pairs=2048, figures_only=False)
    # the command the committed gradcache.json records, the launcher aside
    assert report.command("gradcache", args) == ("python -m benchmarks.gradcache --batch 256 --chunk 32 --rounds 7 "
                                                 "--sweep 16 64 256 --sweep-chunk 16 --lr 0.001 --pairs 2048")
    flags = argparse.Namespace(cache="/tmp/e.safetensors", fast=True, slow=False, out=None, lr=2e-5)
    assert report.command("x", flags, skip=("cache",)) == "python -m benchmarks.x --fast --lr 2e-05"
    assert report.command("lora_vs_peft") == "python -m benchmarks.lora_vs_peft"


def test_the_parser_is_the_module_s():
    parser = report.argument_parser("probe", "First paragraph\nof two lines.\n\nDetails.")
    assert parser.prog == "python -m benchmarks.probe"
    assert parser.description == "First paragraph\nof two lines."
    assert parser.parse_args(["--figures-only"]).figures_only


def test_the_run_fields():
    run = report.Run("probe", argparse.Namespace(steps=4, figures_only=False))
    fields = run.fields(peft="0.0")
    assert list(fields) == ["command", "date", "seconds", "device", "threads", "machine"]
    assert fields["command"] == "python -m benchmarks.probe --steps 4"
    assert fields["device"] == "cpu" and fields["threads"] >= 1 and fields["seconds"] >= 0
    assert {"cpu_count", "platform", "python", "torch", "cpu_capability", "peft"} <= set(fields["machine"])
    assert fields["machine"]["cpu_model"] == report.cpu_model() and fields["machine"]["cpu_model"].strip()
    assert fields["machine"]["cpu_caches_bytes"] == report.cpu_caches()
    assert fields["machine"]["environment"] == {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    capabilities = {"DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512", "SVE256"}   # torch.backends.cpu's values
    assert fields["machine"]["cpu_capability"] in capabilities
    start, end = fields["machine"]["load_average_1min_at_start_and_end"]
    assert start >= 0 and end >= 0
    plain = report.Run("probe", device=None).fields()
    assert "device" not in plain and "threads" not in plain and "torch" not in plain["machine"]


# ---------------------------------------------------------------------------------------------
# The results JSON
# ---------------------------------------------------------------------------------------------
def test_save_result_adds_the_figures_and_writes_atomically(tmp_path):
    path = tmp_path / "results" / "probe.json"
    lines = report.save_result(path, {"command": "c", "ratio": 0.5},
                               lambda r: [report.figure("ratio", r["ratio"], "<=", 1)])
    assert lines == ["FIGURE ratio: 0.5 (target <= 1) met"]
    assert json.loads(path.read_text()) == {"command": "c", "ratio": 0.5, "figures": lines}
    assert [p.name for p in path.parent.iterdir()] == ["probe.json"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644  # not the temporary file's owner-only 0600


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "probe.json"
    report.write_json(path, {"old": 1})
    with pytest.raises(ValueError):
        report.write_json(path, {"new": float("nan")})  # refused: not JSON
    with pytest.raises(TypeError):
        report.write_json(path, {"new": object()})
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["probe.json"]


def test_recompute_figures_replaces_them_in_place(tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"command": "c", "figures": ["FIGURE r: 9 (target < 1) missed"], "ratio": 0.5}))
    lines = report.recompute_figures(path, lambda r: [report.figure("r", r["ratio"], "<", 1)])
    data = json.loads(path.read_text())
    assert list(data) == ["command", "figures", "figures_recomputed", "ratio"]
    assert data["figures"] == lines == ["FIGURE r: 0.5 (target < 1) met"]
    assert "by --figures-only" in data["figures_recomputed"]


def test_recompute_figures_leaves_unchanged_figures_alone(tmp_path):
    path = tmp_path / "probe.json"
    text = json.dumps({"ratio": 0.5, "figures": ["FIGURE r: 0.5 (target < 1) met"]}, indent=1) + "\n"
    path.write_text(text)
    report.recompute_figures(path, lambda r: [report.figure("r", r["ratio"], "<", 1)])
    assert path.read_text() == text


# ---------------------------------------------------------------------------------------------
# The scripts as a package
# ---------------------------------------------------------------------------------------------
def test_the_scripts():
    assert {"cli_startup", "gradcache", "lora_training", "lora_vs_peft", "model_loading", "mrl_combination",
            "mrl_search", "peft_methods", "qlora_training", "quant_vs_bnb"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_says_how_it_is_run_and_has_its_results(name):
    source = (ROOT / "benchmarks" / f"{name}.py").read_text(encoding="utf-8")
    assert f"python -m benchmarks.{name}" in source
    assert "python benchmarks/" not in source and "from report import" not in source
    result = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text(encoding="utf-8"))
    assert result["command"].split()[:3] == ["python", "-m", f"benchmarks.{name}"]


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("*.json")), ids=lambda p: p.name)
def test_the_committed_figures_are_the_script_s_figures_of_its_measurements(path):
    """The FIGURE lines a committed JSON stores (which the benchmarks page shows) are the ones the
    script's ``figures`` gives from that JSON's measurements today: a target changed in a script
    fails here until ``--figures-only --save`` re-derives the lines (a miss is then stored, not
    hidden behind an older, looser target). ``<name>.<device>.json`` is a run of ``<name>.py`` on
    that device (``quant_vs_bnb.cuda.json``), made with ``--device <device>``."""
    name, _, device = path.stem.partition(".")
    module = importlib.import_module(f"benchmarks.{name}")
    result = json.loads(path.read_text(encoding="utf-8"))
    assert result["command"].split()[:3] == ["python", "-m", f"benchmarks.{name}"]
    if device:
        assert f"--device {device}" in result["command"] and result["device"] == device
    rerun = f"python -m benchmarks.{name}" + (f" --device {device}" if device else "") + " --figures-only --save"
    assert module.figures(result) == result["figures"], f"run: {rerun}"


@pytest.mark.parametrize("name, option", [("gradcache", "--rounds"), ("mrl_combination", "--rounds"),
                                          ("mrl_search", "--repeats"), ("model_loading", "--rounds"),
                                          ("cli_startup", "--repeats")])
def test_a_time_ratio_needs_two_rounds_and_is_refused_before_any_work(name, option, monkeypatch, capsys):
    """``--rounds 1`` would train for half an hour and then fail to bootstrap an interval from one
    pair: the parser refuses it at once, saying what to pass."""
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [name, option, "1"])
    monkeypatch.setattr(module, "Run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exit:
        module.main()
    assert exit.value.code == 2 and f"{option} must be at least 2" in capsys.readouterr().err


def test_the_light_scripts_answer_help_from_the_repository_root():
    """The launcher itself, ``python -m benchmarks.<name>``, in a fresh process (scripts that do not
    import torch before parsing their arguments: well under a second)."""
    for name in ("cli_startup", "model_loading"):
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: python -m benchmarks.{name} ") and "--figures-only" in done.stdout


def test_every_script_answers_help():
    """Every script as ``-m`` runs it (`runpy.run_module` with ``__main__``), in one fresh process
    started at the repository root, so that torch is imported once rather than once per script."""
    driver = textwrap.dedent("""
        import contextlib, io, json, runpy, sys
        out = {}
        for name in sys.argv[1:]:
            sys.argv = [name, "--help"]
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                try:
                    runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
                    code = None
                except SystemExit as exit:
                    code = exit.code
            out[name] = [code, buffer.getvalue()]
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", driver, *SCRIPTS], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    helps = json.loads(done.stdout.splitlines()[-1])
    for name in SCRIPTS:
        code, text = helps[name]
        assert code == 0, (name, text)
        assert text.startswith(f"usage: python -m benchmarks.{name} "), (name, text)
        assert "--figures-only" in text, name


# ---------------------------------------------------------------------------------------------
# A run leaves the committed results alone unless --save
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def committed(tmp_path, monkeypatch):
    """A results/ folder holding one committed JSON, and the runs/ folder beside it."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    (results / "probe.json").write_text('{"command": "committed", "figures": []}\n')
    monkeypatch.setattr(report, "RESULTS_DIR", results)
    monkeypatch.setattr(report, "RUNS_DIR", runs)
    monkeypatch.setattr(report, "_replace_committed", False)
    return results / "probe.json"


def _figures(result):
    return [report.figure("probe_ratio", result["ratio"], ">=", 1.0)]


def test_a_default_run_writes_beside_and_leaves_the_committed_json(committed, capsys):
    before = committed.read_bytes()
    report.argument_parser("probe", "Probe.").parse_args([])
    report.save_result(committed, {"command": "new run", "ratio": 2.0}, _figures)
    assert committed.read_bytes() == before
    written = json.loads((report.RUNS_DIR / "probe.json").read_text())
    assert written["command"] == "new run" and written["figures"] == ["FIGURE probe_ratio: 2 (target >= 1.0) met"]
    assert "the committed" in capsys.readouterr().out


def test_figures_only_writes_beside_too(committed):
    report.argument_parser("probe", "Probe.").parse_args(["--figures-only"])
    committed.write_text('{"command": "committed", "ratio": 0.5, "figures": []}\n')
    before = committed.read_bytes()
    lines = report.recompute_figures(committed, _figures)
    assert lines == ["FIGURE probe_ratio: 0.5 (target >= 1.0) missed"]
    assert committed.read_bytes() == before
    assert json.loads((report.RUNS_DIR / "probe.json").read_text())["figures"] == lines


def test_save_replaces_the_committed_json(committed):
    args = report.argument_parser("probe", "Probe.").parse_args(["--save"])
    assert "--save" not in report.command("probe", args)     # the stored command repeats the run, not the saving
    report.save_result(committed, {"command": "saved run", "ratio": 2.0}, _figures)
    assert json.loads(committed.read_text())["command"] == "saved run"
    assert not (report.RUNS_DIR / "probe.json").exists()


# ---------------------------------------------------------------------------------------------
# Per-item records and the paired comparisons a results JSON keeps
# ---------------------------------------------------------------------------------------------
def test_compare_answers_is_course_lib_stats_on_the_recorded_items():
    from course_lib import stats

    a = report.answer_items(torch.tensor([[3.0, 2], [1.0, 1], [6.0, 3], [2.0, 2]], dtype=torch.float64),
                            [True, False, False, True])
    b = report.answer_items([[1.0, 2], [1.0, 1], [3.0, 3], [1.0, 2]], [True, True, True, True])
    assert a == {"answer_nll": [[3.0, 2], [1.0, 1], [6.0, 3], [2.0, 2]], "correct": [1, 0, 0, 1]}
    c = report.compare_answers("base", a, "tuned", b)
    # hand-worked point values: perplexity exp(12/8) -> exp(6/8), exact match 2/4 -> 4/4
    assert c["perplexity"]["a"] == pytest.approx(math.exp(1.5)) and c["perplexity"]["b"] == pytest.approx(math.exp(0.75))
    assert c["exact_match"]["difference"] == pytest.approx(0.5)
    assert c["exact_match"]["mcnemar_p"] == 0.5                      # 0 against 2 discordant: 2 * (1/2)^2
    direct = stats.paired_bootstrap(a["answer_nll"], b["answer_nll"], stats.corpus_perplexity)
    assert (c["perplexity"]["low"], c["perplexity"]["high"]) == (direct.low, direct.high)
    assert c["perplexity"]["verdict"] == direct.verdict(higher_is_better=False)
    assert c["exact_match"]["verdict"] == "within noise"
    # 4 of 20 answers differ, all for B: a resample misses all four with probability 0.8^20 = 1.2%,
    # so the percentile interval excludes zero, while McNemar's exact p = 2 / 2^4 = 0.125 does not
    few_a = report.answer_items([[1.0, 1]] * 20, [False] * 20)
    few_b = report.answer_items([[1.0, 1]] * 20, [True] * 4 + [False] * 16)
    few = report.compare_answers("a", few_a, "b", few_b)["exact_match"]
    assert few["low"] > 0 and few["mcnemar_p"] == 0.125 and few["verdict"] == "within noise"
    many_a = report.answer_items([[1.0, 1]] * 12, [False] * 12)
    many_b = report.answer_items([[1.0, 1]] * 12, [True] * 6 + [False] * 6)   # 6 against 0: p = 2/64
    assert report.compare_answers("a", many_a, "b", many_b)["exact_match"]["verdict"] == "gain"
    assert report.compare_answers("b", many_b, "a", many_a)["exact_match"]["verdict"] == "loss"
    line = report.paired_line(c, "exact_match")
    # 2 of the 4 answers differ, both for B; a resample of 4 draws none of those two with probability
    # (1/2)^4 = 6.25% (difference 0) and only those two also with 6.25% (difference 1), so the 2.5th
    # and 97.5th percentiles are 0 and 1; a half-width of 0.5 prints to two places
    assert line == "tuned minus base, exact_match: +0.50 [95% CI +0.00, +1.00] (within noise), McNemar p = 0.5"


def test_compare_rankings_recall_and_mrr():
    c = report.compare_rankings("a", [1, 20, 3, 11], "b", [1, 2, 3, 4], k=10)
    assert c["recall@10"]["a"] == 0.5 and c["recall@10"]["b"] == 1.0
    assert c["mrr"]["difference"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4 - 1 - 1 / 20 - 1 / 3 - 1 / 11) / 4)
    assert c["recall@10"]["low"] >= 0 and c["recall@10"]["verdict"] in ("gain", "within noise")


def test_the_hybrid_qlora_model_gets_bitsandbytes_kernel_for_exactly_its_own_weights():
    """quant_vs_bnb's third model (course_lib's, with bitsandbytes' ``dequantize_4bit`` where ours
    is called) pairs each of its 4-bit layers with bitsandbytes' layer of the same name, whose
    kernel must give our layer's weight bit for bit (bitsandbytes quantizes the same float weight
    to the same codes and constants); a pairing that would hand a layer another weight is refused."""
    import bitsandbytes.functional as bnbF
    from torch import nn

    from benchmarks.quant_vs_bnb import _bnb_kernels, bnb_linear
    from course_lib import linear4bit

    torch.manual_seed(0)
    floats = nn.ModuleDict({"q_proj": nn.Linear(128, 64, bias=False), "v_proj": nn.Linear(128, 64, bias=False)})
    ours = nn.ModuleDict({name: linear4bit.Linear4bit.from_linear(layer) for name, layer in floats.items()})
    theirs = nn.ModuleDict({"model": nn.ModuleDict({name: bnb_linear(layer) for name, layer in floats.items()})})
    kernels = _bnb_kernels(ours, theirs)  # bitsandbytes' names end in ours ("model.q_proj" / "q_proj")
    assert set(kernels) == {layer.weight.data_ptr() for layer in ours.values()}
    for layer in ours.values():
        weight, state = kernels[layer.weight.data_ptr()]
        assert torch.equal(bnbF.dequantize_4bit(weight, state), layer.dequantize())
    swapped = nn.ModuleDict({"model": nn.ModuleDict({"q_proj": theirs["model"]["v_proj"],
                                                     "v_proj": theirs["model"]["q_proj"]})})
    with pytest.raises(RuntimeError, match="q_proj: bitsandbytes' layer of that name holds another weight"):
        _bnb_kernels(ours, swapped)


def test_quant_vs_bnb_ratios_and_intervals_are_those_of_its_recorded_rounds():
    """The committed CPU run of quant_vs_bnb keeps every round's times (``seconds``); each recorded
    ratio is the median of those rounds' ratios (`report.paired_ratio`) and its interval the seeded
    bootstrap of `course_lib.stats.median_time_ratio` over them, for the figures and for the gathers;
    and every ratio with an interval has its FIGURE line for it. (The GPU run of 2026-12-04
    predates the recorded rounds.)"""
    from course_lib.stats import median_time_ratio, speedup

    record = json.loads((ROOT / "benchmarks" / "results" / "quant_vs_bnb.json").read_text())
    result = record["results"]["cpu"]
    checked = 0
    for key, interval in result["intervals"].items():
        section = "forward_down_proj" if key.startswith("forward_") else next(
            name for name in result["seconds"] if key.startswith(name + "_"))
        times = result["seconds"][section]
        pairs = [(a, b) for a in times for b in times if a != b
                 and report.paired_ratio(times, a, b) == result["ratios"][key]]
        assert pairs, f"{key}: no pair of {section}'s contenders gives its recorded ratio"
        # a throughput ratio (ours over bitsandbytes) is ours' speed-up, its verdict named for ours
        record_of = speedup if key.endswith("_over_bnb") else median_time_ratio
        assert any(record_of(times[a], times[b]) == interval for a, b in pairs), key
        checked += 1
    assert checked == len(result["ratios"]) == 18
    for gathered in result["gathers"].values():
        times = gathered["seconds"]
        for bnb, ratios in ((k.removesuffix("_dequantize_over_gather"), v) for k, v in gathered.items()
                            if k.endswith("_dequantize_over_gather")):
            for name, value in ratios.items():
                assert value == report.paired_ratio(times, bnb, name)
                assert gathered["intervals"][bnb][name] == speedup(times[bnb], times[name])
    interval_lines = [line for line in record["figures"] if "_95pct_" in line and "qlora_step" not in line]
    assert len(interval_lines) == 15


def test_mrl_search_speedups_and_intervals_are_those_of_its_recorded_rounds():
    """The committed run of mrl_search keeps every paired round of brute force, the two-stage search
    and its first stage, per setting and mode (``rounds``): each speed-up and limit is the median of
    those rounds' ratios, rounded as printed, with the interval and verdict `course_lib.stats.speedup`
    gives over them; each time is its rounds' median, brute force's the median of all its rounds;
    the best settings are the fastest within 1% of brute force's recall; and each of the 8 FIGURE
    lines has its interval line (a result without intervals prints the 8 alone)."""
    import copy
    import statistics

    from benchmarks import mrl_search
    from course_lib.stats import speedup

    record = json.loads((ROOT / "benchmarks" / "results" / "mrl_search.json").read_text())
    synthetic = record["synthetic_timing_only"]
    for setting, suffix in [(s, "") for s in record["two_stage"]] + [(synthetic, "_two_stage")]:
        for mode in ("batched", "per_query"):
            times = setting["rounds"][mode]
            assert len(times["brute_force"]) == len(times["two_stage"]) == len(times["first_stage"]) == record["rounds"]
            for name, other in (("speedup", "two_stage"), ("limit", "first_stage")):
                interval = speedup(times["brute_force"], times[other])
                assert setting["intervals"][f"{name}_{mode}"] == interval
                assert setting[f"{name}_{mode}"] == round(interval["ratio"], 2)
            assert setting[f"seconds_{mode}{suffix}"] == statistics.median(times["two_stage"])
            assert setting[f"seconds_{mode}_first_stage"] == statistics.median(times["first_stage"])
    for mode in ("batched", "per_query"):
        assert record["brute_force"][f"seconds_{mode}"] == statistics.median(
            t for s in record["two_stage"] for t in s["rounds"][mode]["brute_force"])
        good = [s for s in record["two_stage"] if s["recall@10"] >= 0.99 * record["brute_force"]["recall@10"]]
        assert record["best_at_99pct"][mode] == max(good, key=lambda s: s[f"speedup_{mode}"])
    lines = mrl_search.figures(record)
    assert len(lines) == 16 and all("_95pct_low: " in line for line in lines[1::2])
    without = copy.deepcopy(record)
    for setting in without["two_stage"] + [without["synthetic_timing_only"], *without["best_at_99pct"].values()]:
        del setting["intervals"]
    assert mrl_search.figures(without) == lines[0::2]


def test_model_loading_times_the_cached_load_as_a_new_process_would(monkeypatch):
    """A round of model_loading: both loads in one fresh cache, the second starting with no
    checksums remembered (a new process hashes the copy before trusting it, ~0.4 s here, which the
    converting process would skip: its runs before 2026-12-06 12:21 UTC timed the cached load so),
    and the cache setting restored after."""
    from benchmarks import model_loading
    from course_lib import models

    monkeypatch.setenv(models.CACHE_ENV, "/the/learner's/cache")
    monkeypatch.setattr(models, "_HASHED", {})
    seen = []

    def load():   # what a load does to the per-process memo: it hashes the copy's files
        seen.append((os.environ[models.CACHE_ENV], len(models._HASHED)))
        models._HASHED[("model.safetensors", len(seen))] = "its SHA-256"

    from_gguf, cached = model_loading.one_round(load)
    assert from_gguf > 0 and cached > 0
    assert seen[0][0] == seen[1][0] != "/the/learner's/cache" and not Path(seen[0][0]).exists()
    assert [remembered for _, remembered in seen] == [0, 0]
    assert os.environ[models.CACHE_ENV] == "/the/learner's/cache"


def test_model_loading_speedup_is_that_of_its_recorded_rounds():
    from course_lib.stats import speedup

    result = json.loads((ROOT / "benchmarks" / "results" / "model_loading.json").read_text())
    rounds = result["rounds"]
    assert len(rounds["gguf"]) == len(rounds["cached"]) >= 2
    assert result["interval"] == speedup(rounds["gguf"], rounds["cached"])
    assert result["speedup"] == round(result["interval"]["ratio"], 1)


def test_cli_startup_intervals_are_those_of_its_recorded_rounds():
    """The committed cli_startup run's intervals come from its recorded rounds; each holds its
    figure's point (the median, and the difference of the medians), and each figure has its line."""
    from benchmarks import cli_startup

    result = json.loads((ROOT / "benchmarks" / "results" / "cli_startup.json").read_text())
    assert result["intervals"] == cli_startup.intervals(result["all_seconds"])
    median = result["median_seconds"]
    for key, point in (("cli_budget", median["cli_budget"]),
                       ("cli_budget_minus_bare_python", median["cli_budget"] - median["bare_python"])):
        assert result["intervals"][key]["low"] <= point <= result["intervals"][key]["high"]
    assert [line.split(":")[0] for line in cli_startup.figures(result)] == [
        "FIGURE cli_budget_startup_seconds", "FIGURE cli_budget_startup_seconds_95pct_high",
        "FIGURE cli_budget_startup_minus_bare_python_seconds",
        "FIGURE cli_budget_startup_minus_bare_python_seconds_95pct_high"]


def test_every_gather_formulation_looks_up_the_same_values(monkeypatch):
    """quant_vs_bnb's `gathers`: the byte-table look-up in each of PyTorch's gathers, checked at set-up
    to give what ``index_select`` gives (an odd number of codes, so the last byte's pair is half
    padding), a formulation that looks up other values refused; each timed callable leaves torch's
    thread count as it was."""
    import torch.nn.functional as F

    from benchmarks.quant_vs_bnb import gathers
    from course_lib import quant

    state = quant.quantize_blockwise(torch.randn(3, 77, generator=torch.Generator().manual_seed(0)), "nf4", 64, True)
    formulations = gathers(state)
    assert list(formulations) == ["index_select", "index_select_fresh", "index_select_int64", "take", "indexing",
                                  "gather", "embedding"]
    threads = torch.get_num_threads()
    for run in formulations.values():
        run()
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(F, "embedding", lambda index, rows: rows[index.flip(0)])  # the right rows, wrong order
    with pytest.raises(RuntimeError, match="embedding looks up other values than index_select"):
        gathers(state)


def test_compiled_dequantize_gives_our_tensor_bit_for_bit(monkeypatch):
    """quant_vs_bnb's `compiled_dequantize` (the look-up and multiply compiled by ``torch.compile``
    into one loop) gives `quant.dequantize_blockwise`'s tensor bit for bit, for NF4 and FP4, with and
    without double quantization, in float32 and cast to bfloat16; codes with padding and 8-bit codes
    are refused with a pointer to the eager function. `compiled_or_why_not` hands back the reason
    when the compiler fails (recorded instead of times), and refuses a kernel giving other values."""
    from benchmarks import quant_vs_bnb
    from course_lib import quant

    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    for quant_type, double_quant in itertools.product(("nf4", "fp4"), (False, True)):
        state = quant.quantize_blockwise(weight, quant_type, 64, double_quant)
        for dtype in (None, torch.bfloat16):
            got = quant_vs_bnb.compiled_dequantize(state, dtype)
            assert got.dtype == (dtype or torch.float32)
            assert torch.equal(got, quant.dequantize_blockwise(state, dtype))
    for state in (quant.quantize_blockwise(torch.randn(3, 77), "nf4", 64), quant.quantize_blockwise(weight, "int8", 64)):
        with pytest.raises(ValueError, match="use quant.dequantize_blockwise"):
            quant_vs_bnb.compiled_dequantize(state)
    run, why_not = quant_vs_bnb.compiled_or_why_not(state := quant.quantize_blockwise(weight, "nf4", 64))
    assert why_not is None and torch.equal(run(), quant.dequantize_blockwise(state))

    def no_compiler():
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    monkeypatch.setattr(quant_vs_bnb, "_fused_kernel", no_compiler)
    reason = "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    assert quant_vs_bnb.compiled_or_why_not(state) == (None, reason)
    monkeypatch.setattr(quant_vs_bnb, "compiled_dequantize", lambda s: quant.dequantize_blockwise(s).flip(0))
    with pytest.raises(RuntimeError, match="another tensor"):
        quant_vs_bnb.compiled_or_why_not(state)


def test_cpu_caches_reads_sysfs_sizes(tmp_path):
    """`report.cpu_caches` on a hand-made copy of Linux's sysfs cache folder (the layout of
    /sys/devices/system/cpu/cpu0/cache: index<i>/level, type, size): sizes in K, M and plain bytes
    become bytes (48K = 49,152; 480M = 503,316,480), data and instruction caches are told apart,
    an entry missing a file or with an unreadable size is left out, and no folder gives {}."""
    entries = {"index0": ("1", "Data", "48K"), "index1": ("1", "Instruction", "64K"),
               "index2": ("2", "Unified", "2048K"), "index3": ("3", "Unified", "480M"),
               "index4": ("4", "Unified", "12 MB"), "index5": ("2", "Unified", None)}
    for name, (level, kind, size) in entries.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "level").write_text(level + "\n")
        (folder / "type").write_text(kind + "\n")
        if size is not None:
            (folder / "size").write_text(size + "\n")
    assert report.cpu_caches(tmp_path) == {"L1d": 49_152, "L1i": 65_536, "L2": 2_097_152, "L3": 503_316_480}
    assert report.cpu_caches(tmp_path / "absent") == {}


class _TwoLinears(torch.nn.Module):
    """The smallest model with the layer names the MiniLM benchmarks adapt (``query``, ``value``)."""

    def __init__(self):
        super().__init__()
        self.query, self.value, self.key = (torch.nn.Linear(8, 8) for _ in range(3))


def _adapter_weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for name, p in sorted(model.named_parameters()) if "lora_" in name]


def test_benchmarks_start_their_adapters_alike_in_every_run():
    """torch seeds its default generator at random in each process, so an adapter injected without
    a seed starts from other weights in every run (a benchmark's first LoRA model then lands its
    test queries elsewhere from run to run). `report.inject_seeded_lora`, and the model builders of
    the gradcache and mrl_combination scripts that use it, give the same adapters whatever the
    generator's state before; plain `lora.inject_lora` does not (the check could fail)."""
    from benchmarks import gradcache, mrl_combination
    from course_lib import lora

    base = _TwoLinears()
    builders = {
        "inject_seeded_lora": lambda: report.inject_seeded_lora(_TwoLinears(), ["query", "value"], r=2, lora_alpha=4),
        "gradcache.with_lora": lambda: gradcache.with_lora(base),
        "mrl_combination.build": lambda: mrl_combination.build(base, True, 2),
    }
    for name, build in builders.items():
        torch.manual_seed(1)
        first = _adapter_weights(build())
        torch.manual_seed(2)
        torch.randn(100)
        second = _adapter_weights(build())
        assert len(first) == 4 and all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), name
    torch.manual_seed(1)
    plain_first = _adapter_weights(lora.inject_lora(_TwoLinears(), ["query", "value"], r=2, lora_alpha=4))
    torch.manual_seed(2)
    plain_second = _adapter_weights(lora.inject_lora(_TwoLinears(), ["query", "value"], r=2, lora_alpha=4))
    assert not all(torch.equal(a, b) for a, b in zip(plain_first, plain_second, strict=True))


def test_no_benchmark_injects_an_unseeded_adapter_whose_scores_it_reports():
    """Every benchmark that trains or scores an adapter injects it with `report.inject_seeded_lora`.
    Two plain `lora.inject_lora` calls are left: lora_vs_peft's, a timing benchmark whose adapter
    values do not enter its figures, and qlora_training's, whose adapters are then overwritten with
    the peft model's initial ones, which it draws right after seeding (checked in its source)."""
    import inspect

    from benchmarks import qlora_training

    plain = sorted(path.name for path in Path(report.__file__).parent.glob("*.py")
                   if "lora.inject_lora(" in path.read_text(encoding="utf-8") and path.name != "report.py")
    assert plain == ["lora_vs_peft.py", "qlora_training.py"]
    source = inspect.getsource(qlora_training.bnb_peft_qlora)
    assert source.index("train.seed_everything(0)") < source.index("get_peft_model(model")
