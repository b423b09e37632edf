"""The FIGURE line (course_lib.tooling.figures): written and read in one place, round trips, clear errors."""

import json
from pathlib import Path

import pytest

from course_lib.tooling import figures as fig
from course_lib.tooling.figures import Figure, FigureLineError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


@pytest.mark.parametrize("value, op, target, met", [
    (1.22, "<=", 1.5, True), (1.5, "<=", 1.5, True), (1.51, "<=", 1.5, False),
    (4.0, ">=", 4, True), (-0.07, ">", 0, False), (0.0, "<", 0, False), (0.267, "<", 0.5, True),
    (-0.0257, ">", 0, False), (96.3, ">=", 5, True), (1e-5, "<=", 1e-2, True), (123456.0, ">", 1e5, True),
])
def test_the_line_and_its_verdict(value, op, target, met):
    line = fig.format_figure("some_ratio", value, op, target)
    assert line == f"FIGURE some_ratio: {value:.3g} (target {op} {target}) {'met' if met else 'missed'}"


@pytest.mark.parametrize("value, target, fmt", [
    (0.99123, 1.05, ".3g"), (1.0034, 1.02, ".3f"), (96.31, 5, ".1f"), (11.0, 6.4, ".3g"), (-0.0059, -0.02, ".3g"),
    (3.2e-7, 1e-05, ".3g"), (0.0, 0, ".3g"), (1234567.0, 1.5e6, ".3g"),
])
def test_parsing_round_trips_formatting(value, target, fmt):
    line = fig.format_figure("x_over_y", value, "<=", target, fmt)
    figure = fig.parse_figure_line(line)
    assert figure == Figure("x_over_y", float(f"{value:{fmt}}"), "<=", target, value <= target)
    assert figure.line(fmt) == line  # the numbers come back as they were written
    assert type(figure.target) is type(target)  # 15 stays 15, 1.0 stays 1.0


@pytest.mark.parametrize("line", [
    "FIGURE lora_fwd_bwd_ours_over_peft: 0.991 (target <= 1.05) met",
    "FIGURE naive_full_over_gradcache_activation_peak: 11 (target >= 6.4) met",
    "FIGURE largest_minus_smallest_batch_recall10: -0.0257 (target > 0) missed",
    "FIGURE tiny: 1e-05 (target < 0.01) met",
])
def test_a_line_read_and_written_again_is_the_same_line(line):
    figure = fig.parse_figure_line(line)
    assert figure.line(".3f" if "0.991" in line else ".3g") == line


def test_the_fields_of_a_parsed_line():
    figure = fig.parse_figure_line("  FIGURE smollm2_cached_load_speedup: 96.3 (target >= 5) met\n")
    assert figure == Figure("smollm2_cached_load_speedup", 96.3, ">=", 5, True)
    assert figure.verdict == "met"


@pytest.mark.parametrize("line", [
    "FIGURE x: 1",                                          # no target, no verdict
    "FIGURE x: 1 (target <= 2)",                            # no verdict
    "FIGURE x: 1 (target == 2) met",                        # unknown comparison
    "FIGURE x: fast (target <= 2) met",                     # not a number
    "FIGURE x: nan (target <= 2) met",                      # not a finite number
    "FIGURE x: 1 (target <= 2) passed",                     # verdict neither met nor missed
    "FIGURE two words: 1 (target <= 2) met",                # a name with a space
    "FIGURE x: 1 (target <= 2) met and more",               # trailing text
    "figure x: 1 (target <= 2) met",                        # lower case
])
def test_a_malformed_line_raises_a_clear_error(line):
    with pytest.raises(FigureLineError, match=r"not a FIGURE line: .* \(expected 'FIGURE <name>: <value> "
                                              r"\(target <op> <value>\) met\|missed'\)"):
        fig.parse_figure_line(line)
    assert issubclass(FigureLineError, ValueError)


@pytest.mark.parametrize("args, message", [
    (("x", 1.0, "==", 1.0), "unknown comparison '=='"),
    (("two words", 1.0, "<", 2), "figure name 'two words'"),
    (("x", float("nan"), "<", 2), "the value must be a finite number, not nan"),
    (("x", 1.0, "<", float("inf")), "the target must be a finite number, not inf"),
    (("x", True, "<", 2), "the value must be a finite number"),
])
def test_what_cannot_be_a_figure_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        fig.format_figure(*args)


def test_a_format_that_loses_the_number_is_refused():
    with pytest.raises(FigureLineError):
        fig.format_figure("x", 0.5, "<", 1, ".0%")  # "50%" is not a number the line can carry


def test_parse_figures_picks_the_lines_out_of_a_run():
    output = ("loading the model\n{\n  \"ratio\": 0.99\n}\n"
              "FIGURE a_over_b: 0.991 (target <= 1.05) met\n"
              "results written to benchmarks/results/x.json\n"
              "FIGURE c: 3 (target > 4) missed\n")
    assert fig.parse_figures(output) == [Figure("a_over_b", 0.991, "<=", 1.05, True), Figure("c", 3, ">", 4, False)]
    assert fig.parse_figures("no figures here\n") == []


def test_parse_figures_names_the_malformed_line():
    with pytest.raises(FigureLineError, match=r"line 2: not a FIGURE line: 'FIGURE broken'"):
        fig.parse_figures("FIGURE a: 1 (target < 2) met\nFIGURE broken\n")


def test_the_committed_results_are_there():
    names = {p.stem for p in RESULTS}
    assert {"cli_startup", "lora_vs_peft", "model_loading", "quant_vs_bnb"} <= names


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_every_committed_result_stores_figures_that_parse(path):
    lines = json.loads(path.read_text(encoding="utf-8"))["figures"]
    assert lines, f"{path.name} stores no figures"
    figures = [fig.parse_figure_line(line) for line in lines]
    assert len({f.name for f in figures}) == len(figures)  # one line per figure
