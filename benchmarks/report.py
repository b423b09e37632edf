"""What every benchmark script shares: its command line, the fields that describe its run, the
results JSON written atomically, the ``FIGURE`` lines it ends with, ``--figures-only``, ``--save``,
the median timing and timing in paired rounds.

Running a benchmark never changes the course by accident: the chapters assert the committed
``benchmarks/results/NAME.json`` exactly, so a run (``--figures-only`` too) writes its JSON to
``benchmarks/runs/NAME.json`` (not committed) and leaves the committed file as it is; only
``--save`` replaces the committed file.

A script uses it in this order::

    parser = report.argument_parser("name", __doc__)      # prog `python -m benchmarks.name`
    args = parser.parse_args()
    if args.figures_only:                                  # nothing measured
        print("\\n".join(report.recompute_figures(RESULTS, figures)))
        return
    run = report.Run("name", args)                         # the command, the start time
    ...                                                    # measure
    result = {**run.fields(), ...}                         # command, date, seconds, device, machine
    lines = report.save_result(RESULTS, result, figures)   # "figures" added, written atomically
    print(...); print("\\n".join(lines))                    # the FIGURE lines come last
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date, datetime, timezone
from pathlib import Path

from course_lib.atomic_files import atomic_output
from course_lib.stats import median_time_ratio
from course_lib.tooling.figures import format_figure

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_DIR = Path(__file__).resolve().parent / "runs"     # a run's own JSON, not committed (.gitignore)
SAVE_HELP = ("replace the committed benchmarks/results JSON (what the chapters and the site read) with this run's; "
             "without --save the run writes benchmarks/runs/ and leaves the committed results as they are")
_replace_committed = False   # set by the parser of the script's command line (--save)
FIGURES_ONLY_HELP = ("measure nothing: read the results JSON this script wrote, recompute its FIGURE lines from "
                     "the recorded measurements, store them there under \"figures\" and print them")


def figure(name: str, value: float, op: str, target: float, fmt: str = ".3g") -> str:
    """``FIGURE <name>: <value> (target <op> <target>) met|missed``: one line a reader can grep
    (`course_lib.tooling.figures.format_figure`)."""
    return format_figure(name, value, op, target, fmt)


def interval_figure(name: str, measured: dict, op: str, target: float, fmt: str = ".3g") -> str:
    """The ``FIGURE`` line of a figure's paired 95% interval, printed after the point estimate's
    line: ``<name>_95pct_high`` for a target ``<=`` or ``<``, ``<name>_95pct_low`` for ``>=`` or
    ``>``, the end of ``measured``'s interval (``{"low": ..., "high": ...}`` as `compare_rankings`,
    `compare_answers` and `course_lib.stats.time_ratio` record it) farthest toward missing the target.

    It is met only when the whole interval meets the target. Where the point estimate meets its
    target and this line misses, the figure is within noise of the target: not shown to meet it.
    """
    end = "high" if op in ("<=", "<") else "low"
    return figure(f"{name}_95pct_{end}", measured[end], op, target, fmt)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def sync(device: str) -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: str = "cpu") -> dict[str, list[float]]:
    """Wall seconds of each callable in ``rounds`` rounds, after one warm-up call each: every round
    calls each callable once, the order rotated by one per round, so each runs in each position
    about equally often and a slow spell of the machine falls on all of a round alike. The times of
    one round are a pair (a set) for `course_lib.stats.time_ratio`."""
    for fn in fns.values():
        fn()
    names, times = list(fns), {name: [] for name in fns}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num] / times[den]``, both measured in the same round: a slow
    spell of a shared machine inflates both sides of a round, or spoils one round, which the median
    ignores."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def step_seconds(history) -> list[float]:
    """Every optimizer step's wall seconds of a training run (`course_lib.train.History`), the
    first (warm-up) step included, rounded to 0.1 ms: what `per_step_ratio` pairs."""
    return [round(s, 4) for s in history.seconds]


def per_step_ratio(numerator: dict, denominator: dict) -> dict:
    """How many times longer a step of the ``numerator`` run took than one of the ``denominator``
    run (each a result row holding ``step_seconds``): the median over steps of the step-by-step
    ratio, with its 95% interval from resampling steps (`course_lib.stats.median_time_ratio`),
    the first step of each left out, as `course_lib.train.History.seconds_per_step` does.

    The runs train on the same batches in the same order (``train.batches(rows, batch, seed=0)``),
    so step i of each saw the same rows: a pair shares its batch, not its moment (the runs follow
    each other, so a slow spell of the machine during one run is not cancelled)."""
    a, b = numerator["step_seconds"][1:], denominator["step_seconds"][1:]
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"runs of {len(a) + 1} and {len(b) + 1} steps: per_step_ratio pairs steps of runs of "
                         "the same length, at least 3 steps each (the first is left out)")
    return median_time_ratio(a, b)


def step_ratio_figures(name: str, numerator: dict, denominator: dict, op: str, target: float) -> list[str]:
    """The FIGURE line of a time-per-step ratio of two training runs (result rows), and its
    interval's line: from every step's recorded seconds where both rows hold them
    (`per_step_ratio`; the training benchmarks' runs from 2026-12-06 13:41 UTC on), else the ratio
    of the two runs' median steps (``seconds_per_step``), which has no interval."""
    if "step_seconds" not in numerator or "step_seconds" not in denominator:
        return [figure(name, numerator["seconds_per_step"] / denominator["seconds_per_step"], op, target)]
    steps = per_step_ratio(numerator, denominator)
    return [figure(name, steps["ratio"], op, target), interval_figure(name, steps, op, target)]


# ---------------------------------------------------------------------------------------------
# The command line and the run's own fields
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Records ``--save`` when the script parses its command line, for `destination`."""

    def parse_known_args(self, args=None, namespace=None):
        global _replace_committed
        parsed, rest = super().parse_known_args(args, namespace)
        _replace_committed = bool(getattr(parsed, "save", False))
        return parsed, rest


def argument_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.<name>``: that as its prog, the docstring's first
    paragraph as its description, and ``--figures-only`` and ``--save`` already added."""
    parser = _Parser(prog=f"python -m benchmarks.{name}", description=doc.split("\n\n")[0])
    parser.add_argument("--figures-only", action="store_true", help=FIGURES_ONLY_HELP)
    parser.add_argument("--save", action="store_true", help=SAVE_HELP)
    return parser


def destination(path: Path) -> Path:
    """Where a results JSON meant for ``path`` is written: a committed one (in ``results/``) goes to
    ``runs/`` unless the command line said ``--save``; any other path is used as it is."""
    path = Path(path)
    if path.resolve().parent == RESULTS_DIR.resolve() and not _replace_committed:
        return RUNS_DIR / path.name
    return path


def require_paired_rounds(parser: argparse.ArgumentParser, option: str, rounds: int) -> None:
    """Refuse ``option`` (``"--rounds"``, ``"--repeats"``) below 2 through ``parser``, before any
    work: an interval needs at least two paired rounds, and a run would otherwise train or time
    for minutes and only then fail."""
    if rounds < 2:
        parser.error(f"{option} must be at least 2 (an interval needs paired rounds), got {rounds}")


def command(name: str, args: argparse.Namespace | None = None, skip: tuple[str, ...] = ()) -> str:
    """``python -m benchmarks.<name>`` with every option of ``args`` spelled out (defaults too),
    so that the command repeats the run even after a default changes; ``--figures-only`` and the
    options in ``skip`` (where files go, caches) are left out."""
    words = [f"python -m benchmarks.{name}"]
    for key, value in vars(args or argparse.Namespace()).items():
        if key in ("figures_only", "save") or key in skip or value is None or value is False:
            continue
        words.append(f"--{key.replace('_', '-')}")
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return " ".join(words)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s first ``model name`` on Linux, else what
    `platform.processor` says, else ``"unknown"``): two machines of one platform string can be
    different CPUs, and their seconds differ by up to twice."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_CACHE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def cpu_caches(root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """The first CPU's caches in bytes, by name (``"L1d"``, ``"L1i"``, ``"L2"``, ``"L3"``), from
    Linux's sysfs (``index*/level``, ``type``, ``size`` such as ``48K``); empty where the system
    does not say. Whether a search's index fits in the last-level cache decides whether it waits on
    memory: the same two-stage search beat brute force several times over on a CPU whose cache did
    not hold the corpus, and hardly on one whose cache did (chapter 04)."""
    caches = {}
    for index in sorted(Path(root).glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        number, unit = size.rstrip("KMG"), size[len(size.rstrip("KMG")):]
        if not number.isdigit() or unit not in _CACHE_UNITS:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        caches[f"L{level}{suffix}"] = int(number) * _CACHE_UNITS[unit]
    return caches


def inject_seeded_lora(model, target_modules, seed: int = 0, **lora_kwargs):
    """`course_lib.lora.inject_lora` with Python's and torch's generators seeded first
    (`course_lib.train.seed_everything`), so the adapters start from the same weights in every run.
    torch seeds its default generator at random in each process, and `train.train` seeds only what
    happens inside its loop: an adapter injected without a seed starts elsewhere in every run, and
    the trained model lands test queries elsewhere with it. Returns ``model``, changed in place."""
    from course_lib import lora, train

    train.seed_everything(seed)
    return lora.inject_lora(model, target_modules, **lora_kwargs)


class Run:
    """One run of a benchmark: its command, when it started, where it ran.

    ``device`` is what the measurements ran on (``"cpu"``, ``"cpu, cuda"``); None for a run that
    does not use torch, whose fields then leave out the device, the threads and torch's version.
    """

    def __init__(self, name: str, args: argparse.Namespace | None = None, *, skip: tuple[str, ...] = (),
                 device: str | None = "cpu"):
        self.command = command(name, args, skip)
        self.device = device
        self.date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.started = time.perf_counter()
        self.load_at_start = os.getloadavg()[0]   # other work on the machine skews timings: recorded

    def seconds(self) -> float:
        """Wall seconds since the run started, to a tenth."""
        return round(time.perf_counter() - self.started, 1)

    def fields(self, **machine) -> dict:
        """The run's fields, first in its results JSON: ``command``, ``date`` (UTC, at the start),
        ``seconds`` (wall time so far), ``device``, ``threads`` (torch's), and ``machine`` (CPU
        count, the CPU's model name and its caches' sizes (`cpu_caches`), platform, the 1-minute
        load average at the start and now, the OpenMP settings of the environment, Python and
        torch versions, the CPU's vector instructions torch uses, then the ``machine`` keywords:
        other libraries' versions)."""
        fields = {"command": self.command, "date": self.date, "seconds": self.seconds()}
        info = {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "cpu_caches_bytes": cpu_caches(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "load_average_1min_at_start_and_end": [round(self.load_at_start, 2), round(os.getloadavg()[0], 2)],
                # OMP_WAIT_POLICY moves timings (PASSIVE: idle threads sleep); unset is recorded as None
                "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}}
        if self.device is not None:
            import torch

            fields |= {"device": self.device, "threads": torch.get_num_threads()}
            info["torch"] = torch.__version__
            info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # AVX2 or AVX512: ratios differ
        return fields | {"machine": info | machine}


# ---------------------------------------------------------------------------------------------
# The results JSON
# ---------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict, indent: int = 2) -> None:
    """``data`` as JSON at ``path``, atomically (`course_lib.atomic_files.atomic_output`): written to
    a temporary file in the same folder, then moved over ``path``, so that a failed run leaves the
    old file whole; readable by all, as the rest of the repository (rw-r--r--)."""
    text = json.dumps(data, indent=indent, allow_nan=False) + "\n"  # refused before anything is written
    with atomic_output(path, overwrite=True) as temporary:
        temporary.write_text(text, encoding="utf-8")


def save_result(path: Path, result: dict, figures: Callable[[dict], list[str]], indent: int = 2) -> list[str]:
    """``result`` with ``"figures"`` (``figures(result)``, the script's FIGURE lines) added, written
    to ``path`` (`write_json`); returns the lines, for the script to print last."""
    result["figures"] = figures(result)
    _write_and_say(path, result, indent)
    return result["figures"]


def _write_and_say(path: Path, data: dict, indent: int) -> None:
    target = destination(path)
    write_json(target, data, indent)
    if target != Path(path):
        print(f"results written to {_shown(target)}; the committed {_shown(path)} is unchanged (--save replaces it)")


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(RESULTS_DIR.resolve().parents[1]))
    except ValueError:
        return str(path)


def recompute_figures(path: Path, figures: Callable[[dict], list[str]], indent: int = 2) -> list[str]:
    """``--figures-only``: ``figures(result)`` of the JSON at ``path``, stored back into it (into
    its copy in ``runs/`` unless ``--save``: see `destination`).

    The lines go under ``"figures"`` (in its place if the file has one, else at the end), followed
    by ``"figures_recomputed"``, which says when and how; every other key keeps its value and its
    place. Lines equal to the stored ones leave the file as it is. Returns the lines, for the
    script to print last.
    """
    result = json.loads(Path(path).read_text(encoding="utf-8"))
    lines = figures(result)
    if result.get("figures") == lines:
        return lines
    note = f"{date.today()} by --figures-only from this file's measurements"
    result.pop("figures_recomputed", None)
    if "figures" not in result:
        result["figures"] = None
    updated = {}
    for key, value in result.items():
        if key == "figures":
            updated |= {"figures": lines, "figures_recomputed": note}
        else:
            updated[key] = value
    _write_and_say(path, updated, indent)
    return lines


# ---------------------------------------------------------------------------------------------
# Per-item scores and paired comparisons, recorded so a chapter prints each difference with its
# interval (course_lib.stats) without re-running anything
# ---------------------------------------------------------------------------------------------
def answer_items(answer_nll, correct) -> dict:
    """One model's per-test-instruction record: ``answer_nll`` rows ``[nll, tokens]``
    (`instruct.answer_nll`, nll to 1e-6) and ``correct`` as 0/1 (`instruct.exact_matches`)."""
    rows = answer_nll.tolist() if hasattr(answer_nll, "tolist") else list(answer_nll)
    return {"answer_nll": [[round(float(nll), 6), int(tokens)] for nll, tokens in rows],
            "correct": [int(bool(c)) for c in correct]}


def _interval(d, higher_is_better: bool) -> dict:
    return {"a": d.a, "b": d.b, "difference": d.difference, "low": d.low, "high": d.high,
            "verdict": d.verdict(higher_is_better=higher_is_better)}


def compare_answers(a_name: str, a: dict, b_name: str, b: dict) -> dict:
    """B minus A on the same test instructions (records of `answer_items`): answer perplexity and
    exact match, each with its seeded 95% paired bootstrap interval, and McNemar's exact p-value on
    the right/wrong answers. The perplexity's verdict is the interval's; exact match's is McNemar's
    (gain or loss at p < 0.05, else within noise), the exact test for paired right/wrong data."""
    from course_lib import stats

    perplexity = stats.paired_bootstrap(a["answer_nll"], b["answer_nll"], stats.corpus_perplexity)
    exact = _interval(stats.paired_bootstrap(a["correct"], b["correct"]), higher_is_better=True)
    p_value = stats.mcnemar(a["correct"], b["correct"]).p_value
    # right/wrong answers: the verdict is the exact test's (p < 0.05); with few answers that differ,
    # the percentile interval can exclude zero where McNemar's exact p does not reach 0.05
    exact["verdict"] = "within noise" if p_value >= 0.05 else ("gain" if exact["difference"] > 0 else "loss")
    return {"a": a_name, "b": b_name, "perplexity": _interval(perplexity, higher_is_better=False),
            "exact_match": exact | {"mcnemar_p": p_value}}


def compare_rankings(a_name: str, a_ranks, b_name: str, b_ranks, k: int = 10) -> dict:
    """B minus A on the same queries, from each query's 1-based rank of its relevant document:
    recall@k and MRR, each with its seeded 95% paired bootstrap interval and verdict."""
    from course_lib import stats

    a_ranks, b_ranks = [int(r) for r in a_ranks], [int(r) for r in b_ranks]
    recall = stats.paired_bootstrap([r <= k for r in a_ranks], [r <= k for r in b_ranks])
    mrr = stats.paired_bootstrap([1 / r for r in a_ranks], [1 / r for r in b_ranks])
    return {"a": a_name, "b": b_name, f"recall@{k}": _interval(recall, higher_is_better=True),
            "mrr": _interval(mrr, higher_is_better=True)}


def paired_line(comparison: dict, metric: str) -> str:
    """``b minus a: +x [95% CI lo, hi] (verdict)`` for one metric of a recorded comparison, the
    numbers to two significant digits of the interval's half-width (`stats.format_difference`)."""
    from course_lib import stats

    m = comparison[metric]
    line = (f"{comparison['b']} minus {comparison['a']}, {metric}: "
            f"{stats.format_difference(m['difference'], m['low'], m['high'])} ({m['verdict']})")
    return line + (f", McNemar p = {m['mcnemar_p']:.3g}" if "mcnemar_p" in m else "")
