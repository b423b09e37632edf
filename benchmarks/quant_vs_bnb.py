"""course_lib.quant against bitsandbytes: NF4 quantize / dequantize throughput, and Linear4bit's forward cost.

Measured side by side in one run, on CPU (and on CUDA when a GPU is visible):
1. NF4 quantization (blocksize 64, double quantization, as QLoRA stores weights) of SmolLM2's
   layer-0 ``mlp.down_proj`` weight (576 x 1536) and of a random 4096 x 4096 tensor:
   throughput ours / bitsandbytes' ``quantize_4bit``                   (target >= 1.0)
2. dequantization of the same: ours / bitsandbytes' ``dequantize_4bit`` (target >= 1.0), and beside
   it the floor of our formulation: its gather and multiply alone (`two_passes_only`) / bitsandbytes'
3. ``Linear4bit`` forward (that down_proj, float32 compute) over the float32 ``nn.Linear``,
   batch 8 x 128 tokens, no grad                                        (target <= 1.5)
   (bitsandbytes' ``Linear4bit`` is timed beside it for reference, in train mode so that on CPU it
   dequantizes to float32 as ours does instead of running its bfloat16 inference kernel).

Run:  .venv/bin/python -m benchmarks.quant_vs_bnb   (about 1 minute on 2 CPU cores)
Each round calls every contender once, in rotating order, after one warm-up call; a ratio is the
median over rounds of the two times measured in the same round, so a slow spell of a shared
machine hits both sides. Writes benchmarks/results/quant_vs_bnb.json and ends with its FIGURE
lines; ``--figures-only`` recomputes them from the ratios recorded there, measuring nothing.
"""

from __future__ import annotations

import os
import statistics
import time
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from benchmarks.report import RESULTS_DIR, Run, argument_parser, figure, recompute_figures, save_result
from course_lib import linear4bit, models, quant

BLOCKSIZE, BATCH, SEQ = 64, 8, 128
REPEATS = {"quantize": 9, "dequantize": 15, "forward": 15}
OUT = RESULTS_DIR / "quant_vs_bnb.json"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device: str) -> dict:
    """Wall times of each callable over ``repeats`` rounds (after one warm-up call each), rotating the order."""
    for fn in fns.values():
        fn()
    names, times = list(fns), {name: [] for name in fns}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict, num: str, den: str) -> float:
    """Median over rounds of times[num] / times[den], both measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def bnb_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    return layer.to(linear.weight.device).train()


def two_passes_only(state: quant.QuantState):
    """The floor of our formulation: its two passes alone, the gather (four table values per two bytes
    of codes) and the in-place multiply by each block's absmax, into a buffer allocated once, without
    decoding the absmax or allocating the output. On CPU ``index_select`` runs on one thread whatever
    torch's setting; bitsandbytes' C++ kernel makes one pass, split over all cores."""
    table = quant._pair_table(state.quant_type, state.packed.device)
    index = quant._as_uint16(state.packed).int()
    absmax = quant.dequantize_absmax(state).unsqueeze(1)
    out = torch.empty(index.numel(), dtype=table.dtype, device=table.device)
    blocks = out.view(torch.float32).view(-1, state.blocksize)

    def run():
        with quant._one_thread():  # as dequantize_blockwise runs
            torch.index_select(table, 0, index, out=out)
            blocks.mul_(absmax)
    return run


def run_device(device: str, down_proj: torch.Tensor) -> dict:
    import bitsandbytes.functional as bnbF

    g = torch.Generator().manual_seed(0)
    tensors = {"down_proj": down_proj.to(device), "random4096": torch.randn(4096, 4096, generator=g).to(device)}
    result = {"median_seconds": {}, "ratios": {}}
    for label, x in tensors.items():
        times = interleaved({
            "ours": partial(quant.quantize_blockwise, x, "nf4", BLOCKSIZE, double_quant=True),
            "bnb": partial(bnbF.quantize_4bit, x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True),
        }, REPEATS["quantize"], device)
        ratio = paired_ratio(times, "bnb", "ours")  # throughput ours / theirs = time theirs / ours
        result["median_seconds"][f"quantize_{label}"] = {k: statistics.median(v) for k, v in times.items()}
        result["ratios"][f"quantize_{label}_throughput_ours_over_bnb"] = ratio

        ours_state = quant.quantize_blockwise(x, "nf4", BLOCKSIZE, double_quant=True)
        packed, bnb_state = bnbF.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        times = interleaved({
            "ours": partial(quant.dequantize_blockwise, ours_state),
            "bnb": partial(bnbF.dequantize_4bit, packed, bnb_state),
            "two_passes_only": two_passes_only(ours_state),
        }, REPEATS["dequantize"], device)
        ratio = paired_ratio(times, "bnb", "ours")
        result["median_seconds"][f"dequantize_{label}"] = {k: statistics.median(v) for k, v in times.items()}
        result["ratios"][f"dequantize_{label}_throughput_ours_over_bnb"] = ratio
        result["ratios"][f"dequantize_{label}_two_passes_limit_ours_over_bnb"] = paired_ratio(
            times, "bnb", "two_passes_only")

    linear = nn.Linear(down_proj.shape[1], down_proj.shape[0], bias=False, device=device).requires_grad_(False)
    linear.weight.copy_(down_proj)
    ours = linear4bit.Linear4bit.from_linear(linear, "nf4", BLOCKSIZE, double_quant=True, compute_dtype=torch.float32)
    theirs = bnb_linear(linear)
    x = torch.randn(BATCH, SEQ, linear.in_features, generator=g).to(device)

    def call(layer):
        def run():
            with torch.no_grad():
                layer(x)
        return run

    times = interleaved({"float": call(linear), "ours": call(ours), "bnb": call(theirs)}, REPEATS["forward"], device)
    ratio = paired_ratio(times, "ours", "float")
    result["median_seconds"]["forward_down_proj"] = {k: statistics.median(v) for k, v in times.items()}
    result["ratios"]["forward_ours_over_float"] = ratio
    result["ratios"]["forward_bnb_over_float"] = paired_ratio(times, "bnb", "float")
    return result


def figures(record: dict) -> list[str]:
    """The FIGURE lines of a record of this script, from its recorded ratios alone: per device, per
    tensor quantize then dequantize throughput, then the forward."""
    lines = []
    for device, result in record["results"].items():
        ratios = result["ratios"]
        for key in ratios:
            if key.startswith("quantize_"):
                label = key.removeprefix("quantize_").removesuffix("_throughput_ours_over_bnb")
                lines.append(figure(f"nf4_quantize_{label}_{device}_throughput_ours_over_bnb", ratios[key],
                                    ">=", 1.0, ".3f"))
                lines.append(figure(f"nf4_dequantize_{label}_{device}_throughput_ours_over_bnb",
                                    ratios[f"dequantize_{label}_throughput_ours_over_bnb"], ">=", 1.0, ".3f"))
                if f"dequantize_{label}_two_passes_limit_ours_over_bnb" in ratios:
                    lines.append(figure(f"nf4_dequantize_{label}_{device}_two_passes_alone_over_bnb",
                                        ratios[f"dequantize_{label}_two_passes_limit_ours_over_bnb"], ">=", 1.0,
                                        ".3f"))
        lines.append(figure(f"linear4bit_forward_{device}_over_float_linear", ratios["forward_ours_over_float"],
                            "<=", 1.5, ".3f"))
    return lines


def main() -> None:
    if argument_parser("quant_vs_bnb", __doc__).parse_args().figures_only:
        print("\n".join(recompute_figures(OUT, figures)))
        return
    import bitsandbytes as bnb

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    run, load_at_start = Run("quant_vs_bnb", device=", ".join(devices)), os.getloadavg()[0]  # others skew timings
    model, _ = models.load_smollm2("cpu")
    down_proj = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    del model
    results = {device: run_device(device, down_proj) for device in devices}

    record = {
        **run.fields(load_average_1min_at_start_and_end=[load_at_start, os.getloadavg()[0]],
                     cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                     bitsandbytes=bnb.__version__),
        "setting": f"NF4, blocksize {BLOCKSIZE}, double quantization; SmolLM2-135M-Instruct layer 0 mlp.down_proj "
                   f"(576x1536) and a random 4096x4096 tensor (seed 0); forward at batch {BATCH}x{SEQ}, float32",
        "repeats": REPEATS,
        "ratio_method": "median over rounds of the ratio of the two times measured in the same round; "
                        "throughput ratio ours/bnb = time bnb / time ours",
        "results": results,
    }
    lines = save_result(OUT, record, figures)

    for device, result in results.items():
        print(f"[{device}] median seconds")
        for name, medians in result["median_seconds"].items():
            print(f"  {name:24s} " + "  ".join(f"{k} {v * 1000:8.2f} ms" for k, v in medians.items()))
        print(f"  bitsandbytes Linear4bit forward / float: {result['ratios']['forward_bnb_over_float']:.3f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
