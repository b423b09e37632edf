"""How much the safetensors cache saves: SmolLM2 from its GGUF file vs from the cached copy.

Run:  .venv/bin/python benchmarks/model_loading.py
Both loads happen in this one run, in a fresh temporary cache, so the ratio is side by side.
Ends with its FIGURE line, which the JSON stores under "figures".

``--figures-only`` measures nothing: it recomputes the figure from the measurements recorded in
benchmarks/results/model_loading.json, stores it there (with "figures_recomputed") and prints it.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from report import FIGURES_ONLY_HELP, recompute_figures

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results" / "model_loading.json"


def figures(result: dict) -> list[str]:
    """The FIGURE line of a result of this script, from its recorded measurements alone."""
    speedup = result["speedup"]
    verdict = "met" if speedup >= 5 else "missed"
    return [f"FIGURE smollm2_cached_load_speedup: {speedup:.1f} (target >= 5) {verdict}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures-only", action="store_true", help=FIGURES_ONLY_HELP)
    args = parser.parse_args()
    if args.figures_only:
        print("\n".join(recompute_figures(RESULTS, figures)))
        return
    with tempfile.TemporaryDirectory() as cache:
        os.environ["COURSE_LIB_CACHE"] = cache
        from course_lib.models import load_smollm2

        start = time.perf_counter()
        load_smollm2("cpu")  # converts the GGUF and writes the cache
        first = time.perf_counter() - start
        start = time.perf_counter()
        load_smollm2("cpu")  # reads the safetensors copy
        second = time.perf_counter() - start
    speedup = first / second
    result = {"first_load_s": round(first, 2), "cached_load_s": round(second, 3),
              "speedup": round(speedup, 1), "date": str(date.today()),
              "command": "python benchmarks/model_loading.py"}
    result["figures"] = figures(result)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("\n".join(result["figures"]))
    sys.exit(0)


if __name__ == "__main__":
    main()
