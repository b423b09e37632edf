"""How much the safetensors cache saves: SmolLM2 from its GGUF file vs from the cached copy.

Run:  .venv/bin/python -m benchmarks.model_loading [--rounds 5]

Each round loads SmolLM2 twice into a fresh temporary cache: first from the GGUF file, which
converts it and writes the safetensors copy, then from that copy, as a later notebook would. A
new process checks the copy's checksums on its first load (about a second for the 540 MB of
weights), which this process would otherwise skip, as it remembers the checksums it computed while
writing the copy: so before the second load it forgets them, and that load checks the copy as a
new process's does. One round before the recorded ones imports the libraries (its first load's
time, imports included, is recorded beside them). The speed-up is the median over rounds of the
two loads' time ratio, with its 95% interval (`course_lib.stats.speedup`).

Writes benchmarks/runs/model_loading.json (``--save``: the committed
benchmarks/results/model_loading.json) and ends with its FIGURE lines; ``--figures-only``
recomputes them from that JSON, measuring nothing.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = RESULTS_DIR / "model_loading.json"


def figures(result: dict) -> list[str]:
    """The FIGURE lines of a result of this script, from its recorded measurements alone (the
    interval's line where the run recorded one: the runs from 2026-12-06 12:21 UTC on)."""
    lines = [figure("smollm2_cached_load_speedup", result["speedup"], ">=", 5, ".1f")]
    if "interval" in result:
        lines.append(interval_figure("smollm2_cached_load_speedup", result["interval"], ">=", 5, ".1f"))
    return lines


def one_round(load: Callable[[], object]) -> tuple[float, float]:
    """Seconds of a load from the GGUF file and of a load from the copy it leaves, in a fresh cache
    (``$COURSE_LIB_CACHE``, restored after); the second starts with no checksums remembered, as
    in a new process."""
    from course_lib import models

    before = os.environ.get(models.CACHE_ENV)
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ[models.CACHE_ENV] = cache
            start = time.perf_counter()
            load()                        # converts the GGUF and writes the copy
            from_gguf = time.perf_counter() - start
            models._HASHED.clear()        # what a new process has not computed yet
            start = time.perf_counter()
            load()                        # reads the copy, checking its checksums first
            return from_gguf, time.perf_counter() - start
    finally:
        if before is None:
            os.environ.pop(models.CACHE_ENV, None)
        else:
            os.environ[models.CACHE_ENV] = before


def main() -> None:
    parser = argument_parser("model_loading", __doc__)
    parser.add_argument("--rounds", type=int, default=5, help="recorded rounds, after one that imports the libraries")
    args = parser.parse_args()
    require_paired_rounds(parser, "--rounds", args.rounds)
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    run = Run("model_loading", args)
    from course_lib.models import load_smollm2
    from course_lib.stats import speedup

    def load() -> None:
        load_smollm2("cpu")

    with_imports = one_round(load)[0]
    times = [one_round(load) for _ in range(args.rounds)]
    gguf, cached = [t[0] for t in times], [t[1] for t in times]
    interval = speedup(gguf, cached)
    result = {**run.fields(), "first_load_with_imports_s": round(with_imports, 2),
              "rounds": {"gguf": gguf, "cached": cached},
              "first_load_s": round(statistics.median(gguf), 2), "cached_load_s": round(statistics.median(cached), 3),
              "speedup": round(interval["ratio"], 1), "interval": interval}
    lines = save_result(RESULTS, result, figures)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "rounds")}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
