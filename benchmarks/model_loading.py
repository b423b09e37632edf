"""How much the safetensors cache saves: SmolLM2 from its GGUF file vs from the cached copy.

Run:  .venv/bin/python -m benchmarks.model_loading
Both loads happen in this one run, in a fresh temporary cache, so the ratio is side by side.
Writes benchmarks/runs/model_loading.json (``--save``: the committed benchmarks/results/model_loading.json)
and ends with its FIGURE line; ``--figures-only`` recomputes it from that JSON, measuring nothing.
"""

import json
import os
import tempfile
import time

from benchmarks.report import RESULTS_DIR, Run, argument_parser, figure, recompute_figures, save_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = RESULTS_DIR / "model_loading.json"


def figures(result: dict) -> list[str]:
    """The FIGURE line of a result of this script, from its recorded measurements alone."""
    return [figure("smollm2_cached_load_speedup", result["speedup"], ">=", 5, ".1f")]


def main() -> None:
    if argument_parser("model_loading", __doc__).parse_args().figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    run = Run("model_loading")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["COURSE_LIB_CACHE"] = cache
        from course_lib.models import load_smollm2

        start = time.perf_counter()
        load_smollm2("cpu")  # converts the GGUF and writes the cache
        first = time.perf_counter() - start
        start = time.perf_counter()
        load_smollm2("cpu")  # reads the safetensors copy
        second = time.perf_counter() - start
    result = {**run.fields(), "first_load_s": round(first, 2), "cached_load_s": round(second, 3),
              "speedup": round(first / second, 1)}
    lines = save_result(RESULTS, result, figures)
    print(json.dumps(result, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
