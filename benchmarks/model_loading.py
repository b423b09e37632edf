"""How much the safetensors cache saves: SmolLM2 from its GGUF file vs from the cached copy.

Run:  .venv/bin/python benchmarks/model_loading.py
Both loads happen in this one run, in a fresh temporary cache, so the ratio is side by side.
"""

import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
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
    out = Path(__file__).parent / "results" / "model_loading.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    verdict = "met" if speedup >= 5 else "missed"
    print(f"FIGURE smollm2_cached_load_speedup: {speedup:.1f} (target >= 5) {verdict}")
    sys.exit(0)


if __name__ == "__main__":
    main()
