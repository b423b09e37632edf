"""How long the ``course-lib`` command takes to answer: ``course-lib budget`` start to finish.

The console script of this interpreter's environment (``course-lib`` beside ``sys.executable``)
runs ``course-lib budget --model llama-3-8b --method qlora --gpu 24GB`` in a fresh process
``--repeats`` times, and ``python -c pass`` as many times, the interpreter's own start-up, the
floor no command of this Python can go under. After one warm-up call of each (files in the page
cache), the two alternate, in rotating order, so a slow spell of a shared machine hits both. One
more run with ``PYTHONPROFILEIMPORTTIME=1`` records the slowest imports and whether torch is
among them (the budget needs arithmetic, not torch). Each figure has its 95% interval, resampling
whole rounds (`course_lib.stats.paired_bootstrap`, the median as statistic): of the command's
median time, and of its median minus the interpreter's.

Run:  .venv/bin/python -m benchmarks.cli_startup [--repeats 10]   (a few seconds)
Writes benchmarks/runs/cli_startup.json (``--save``: the committed benchmarks/results/cli_startup.json)
and ends with its FIGURE lines; ``--figures-only`` recomputes them from that JSON, measuring nothing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import (
    RESULTS_DIR,
    Run,
    argument_parser,
    figure,
    interval_figure,
    recompute_figures,
    require_paired_rounds,
    save_result,
)
from course_lib.stats import paired_bootstrap

RESULTS = RESULTS_DIR / "cli_startup.json"
BUDGET_ARGS = ["budget", "--model", "llama-3-8b", "--method", "qlora", "--gpu", "24GB"]
SLOWEST = 8  # imports recorded by cumulative time


def console_script() -> Path:
    """``course-lib`` as installed beside this interpreter (``pip install -e .`` puts it there)."""
    path = Path(sys.executable).with_name("course-lib")
    if not path.is_file():
        raise SystemExit(f"no {path}: install the course into this environment (pip install -e .) first")
    return path


def wall_seconds(argv: list[str], env: dict | None = None) -> tuple[float, str]:
    """Seconds from starting ``argv`` to its exit, and its stderr; a failed command is an error."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                          timeout=120, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stderr}")
    return seconds, done.stderr


def interleaved(commands: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each command over ``repeats`` rounds, after one warm-up run each; every
    round runs each command once, the order rotating from round to round."""
    for argv in commands.values():
        wall_seconds(argv)
    names, times = list(commands), {name: [] for name in commands}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(round(wall_seconds(commands[name])[0], 4))
    return times


def slowest_imports(argv: list[str]) -> tuple[dict[str, float], bool]:
    """The top-level imports of one run of ``argv`` that took longest (milliseconds, their own
    imports included) as ``-X importtime`` reports them, and whether torch was imported at all."""
    _, report = wall_seconds(argv, env=os.environ | {"PYTHONPROFILEIMPORTTIME": "1"})
    top, imports_torch = {}, False
    for line in report.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        imports_torch |= name.strip() == "torch"
        if not name.startswith("  "):  # a top-level import, not one made by another module
            top[name.strip()] = round(int(parts[1]) / 1000, 1)
    slowest = dict(sorted(top.items(), key=lambda item: -item[1])[:SLOWEST])
    return slowest, imports_torch


def intervals(times: dict[str, list[float]]) -> dict[str, dict]:
    """95% intervals over the rounds, each resampled whole (`course_lib.stats.paired_bootstrap`,
    seeded, the median as statistic): of the command's median time (``cli_budget``) and of its
    median minus the bare interpreter's (``cli_budget_minus_bare_python``)."""
    cli, bare = np.asarray(times["cli_budget"]), np.asarray(times["bare_python"])
    median = lambda t: np.median(t, axis=-1)
    alone, minus = paired_bootstrap(np.zeros_like(cli), cli, median), paired_bootstrap(bare, cli, median)
    return {"cli_budget": {"low": alone.low, "high": alone.high},
            "cli_budget_minus_bare_python": {"low": minus.low, "high": minus.high}}


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded times alone, each followed by
    its interval's line where the run recorded intervals (the runs from 2026-12-06 12:24 UTC on).

    The second takes the interpreter's own start out: the command's share of the half second.
    """
    median, recorded = result["median_seconds"], result.get("intervals", {})
    lines = []
    for name, key, value, target in [
            ("cli_budget_startup_seconds", "cli_budget", median["cli_budget"], 0.5),
            ("cli_budget_startup_minus_bare_python_seconds", "cli_budget_minus_bare_python",
             median["cli_budget"] - median["bare_python"], 0.45)]:
        lines.append(figure(name, value, "<", target))
        if key in recorded:
            lines.append(interval_figure(name, recorded[key], "<", target))
    return lines


def main() -> None:
    parser = argument_parser("cli_startup", __doc__)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each command")
    args = parser.parse_args()
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    require_paired_rounds(parser, "--repeats", args.repeats)
    run = Run("cli_startup", args, device=None)
    commands = {"cli_budget": [str(console_script()), *BUDGET_ARGS], "bare_python": [sys.executable, "-c", "pass"]}
    times = interleaved(commands, args.repeats)
    imports, imports_torch = slowest_imports(commands["cli_budget"])
    result = {
        **run.fields(load_average_1min=os.getloadavg()[0]),
        "commands": {"cli_budget": " ".join(["course-lib", *BUDGET_ARGS]), "bare_python": "python -c pass"},
        "repeats": args.repeats,
        "order": "one warm-up run each, then rounds in rotating order",
        "median_seconds": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "min_seconds": {name: min(t) for name, t in times.items()},
        "all_seconds": times,
        "intervals": intervals(times),
        "imports_torch": imports_torch,
        "slowest_top_level_imports_ms": imports,
    }
    lines = save_result(RESULTS, result, figures)
    print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
