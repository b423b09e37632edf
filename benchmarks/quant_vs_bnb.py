"""course_lib.quant against bitsandbytes: NF4 quantize / dequantize throughput, and Linear4bit's forward cost.

Measured side by side in one run, on CPU (with ``--device cuda``, on a CUDA GPU):
1. NF4 quantization (blocksize 64, double quantization, as QLoRA stores weights) of SmolLM2's
   layer-0 ``mlp.down_proj`` weight (576 x 1536) and of a random 4096 x 4096 tensor:
   throughput ours / bitsandbytes' ``quantize_4bit``                   (target >= 1.0)
2. dequantization of the same: ours / bitsandbytes' ``dequantize_4bit`` (target >= 1.0), and beside
   it the floor of our formulation: its gather and multiply alone (`two_passes_only`) / bitsandbytes';
   on CPU also the gather alone in each of PyTorch's gather operations (`gathers`) / bitsandbytes'
   whole dequantize: the fastest bounds any look-up formulation made of PyTorch operations; and on
   CPU the look-up and multiply compiled by ``torch.compile`` into one fused loop
   (`compiled_dequantize`) / bitsandbytes': what PyTorch reaches beyond its eager operations.
   Ours runs on one thread (`quant._one_thread`), bitsandbytes' kernel on torch's thread count; on
   CPU its kernel is timed on one thread too, in the same rounds, and both ratios are reported
   (``one_thread``: the same work per core, target >= 1.0 as well). With the Makefile's
   ``OMP_WAIT_POLICY=PASSIVE`` the second thread sleeps between calls, and waking it costs a small
   tensor's call more than the second core saves
3. ``Linear4bit`` forward (that down_proj, float32 compute) over the float32 ``nn.Linear``,
   batch 8 x 128 tokens, no grad                                        (target <= 1.5)
   (bitsandbytes' ``Linear4bit`` is timed beside it for reference, in train mode so that on CPU it
   dequantizes to float32 as ours does instead of running its bfloat16 inference kernel).
4. one QLoRA training step of SmolLM2 (NF4 + double quantization, LoRA r=8 on q_proj and v_proj,
   the same initial adapters, AdamW, batch 8 of the instruction task; float32 compute on CPU,
   bfloat16 autocast on CUDA as `train.train` runs it there),
   course_lib (`qlora.prepare_model_for_qlora`) over bitsandbytes + peft (``BitsAndBytesConfig``,
   ``prepare_model_for_kbit_training``, ``get_peft_model``), each step run by `train.train` on the
   same batch in the same round: the ratio of the mean step times, with a 95% bootstrap interval
   over rounds (`course_lib.stats.time_ratio`)                          (target <= 1.0)
   and beside it, where the difference lies: on CPU a third model, course_lib's with bitsandbytes'
   ``dequantize_4bit`` kernel in place of our dequantize, stepped in the same rounds, splits the
   ratio into the dequantize's share and the rest; each model's every 4-bit layer dequantized once
   (a step does it twice per layer); and on CPU the seconds the two course_lib models' timed steps
   spent in their dequantize calls (each call timed inside the step, where the caches are cold).
   On CPU a fourth model, course_lib's with `compiled_dequantize` in place of ours, stepped in the
   same rounds: the step with the fused kernel over bitsandbytes + peft's (target <= 1.0).

Run:  .venv/bin/python -m benchmarks.quant_vs_bnb   (about 6 minutes on 2 CPU cores)
      .venv/bin/python -m benchmarks.quant_vs_bnb --device cuda   (a GPU run: quant_vs_bnb.cuda.json)
Each round calls every contender once, in rotating order, after one warm-up call; a ratio of 1-3
is the median over rounds of the two times measured in the same round, so a slow spell of a shared
machine hits both sides, with a 95% bootstrap interval resampling whole rounds
(`course_lib.stats.median_time_ratio`; a throughput ratio, ours over bitsandbytes', is our
speed-up, `course_lib.stats.speedup`, whose verdict is named for ours; its FIGURE line follows the
point's); every round's times are recorded (``seconds``). Writes
benchmarks/results/quant_vs_bnb.json (quant_vs_bnb.cuda.json for ``--device cuda``; both under
runs/ without --save) and ends with its FIGURE lines;
``--figures-only`` recomputes them from the ratios recorded there, measuring nothing.
"""

from __future__ import annotations

import functools
import itertools
import os
import statistics
import time
from functools import partial
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from benchmarks.report import (
    RESULTS_DIR,
    Run,
    argument_parser,
    figure,
    interleaved,
    interval_figure,
    recompute_figures,
    save_result,
    sync,
)
from course_lib import data, instruct, linear4bit, models, quant, train
from course_lib.stats import median_time_ratio, speedup, time_ratio

BLOCKSIZE, BATCH, SEQ = 64, 8, 128
REPEATS = {"quantize": 9, "dequantize": 41, "forward": 15, "qlora_step": {"cpu": 30, "cuda": 30}}
OUT = {"cpu": RESULTS_DIR / "quant_vs_bnb.json", "cuda": RESULTS_DIR / "quant_vs_bnb.cuda.json"}


def bnb_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    return layer.to(linear.weight.device).train()


def two_passes_only(state: quant.QuantState):
    """The floor of our formulation: its two passes alone, the gather (one look-up per byte of codes,
    two values each) and the in-place multiply by each block's absmax, into a buffer allocated once,
    without decoding the absmax, widening the codes to indices or allocating the output. On CPU
    ``index_select`` runs on one thread whatever torch's setting; bitsandbytes' C++ kernel makes one
    pass, split over all cores."""
    table = quant._byte_table(state.quant_type, state.packed.device)
    index = state.packed.int()
    absmax = quant.dequantize_absmax(state).unsqueeze(1)
    out = torch.empty(index.numel(), dtype=table.dtype, device=table.device)
    blocks = out.view(torch.float32).view(-1, state.blocksize)

    def run():
        with quant._one_thread():  # as dequantize_blockwise runs
            torch.index_select(table, 0, index, out=out)
            blocks.mul_(absmax)
    return run


def _byte_pairs(state: quant.QuantState) -> torch.Tensor:
    """The byte table (`quant._byte_table`) as 256 rows of two float32 values, row b holding what
    byte b's two codes stand for: the table an ``embedding`` or an indexing look-up takes."""
    return quant._byte_table(state.quant_type, state.packed.device).view(torch.float32).view(-1, 2)


def gathers(state: quant.QuantState) -> dict:
    """The first pass alone, what each byte of codes stands for looked up in the 256-entry byte
    table (`quant._byte_table`), in each of PyTorch's gathers, on one thread, the indices widened
    beforehand: ``index_select`` (what `quant.dequantize_blockwise` calls, int32 indices; int64
    beside it), ``take``, advanced indexing, ``gather`` and ``embedding`` (the table as 256 rows of
    two floats). Each is checked to give the same tensor. Which PyTorch operation is fastest here
    bounds every formulation built from them: its time alone is spent before any multiply.
    ``index_select`` writes into a buffer allocated once, as `two_passes_only` does, and once more
    into a fresh tensor each call (``index_select_fresh``); the others return a fresh tensor, as
    `quant.dequantize_blockwise` does (it returns the output its ``index_select`` writes), so on a
    large tensor the gap between the two ``index_select`` lines is the cost of fresh memory, and the
    fastest look-up into a fresh tensor bounds any dequantize that returns one."""
    import torch.nn.functional as F

    table = quant._byte_table(state.quant_type, state.packed.device)
    index32, index64 = state.packed.int(), state.packed.long()
    out = torch.empty(index32.numel(), dtype=table.dtype, device=table.device)
    rows = _byte_pairs(state)
    formulations = {
        "index_select": lambda: torch.index_select(table, 0, index32, out=out),
        "index_select_fresh": lambda: torch.index_select(table, 0, index32),
        "index_select_int64": lambda: torch.index_select(table, 0, index64, out=out),
        "take": lambda: torch.take(table, index64),
        "indexing": lambda: table[index64],
        "gather": lambda: torch.gather(table, 0, index64),
        "embedding": lambda: F.embedding(index64, rows).view(torch.complex64).view(-1),
    }
    expected = torch.index_select(table, 0, index32)
    for name, fn in formulations.items():
        if not torch.equal(fn(), expected):
            raise RuntimeError(f"{name} looks up other values than index_select")
    return {name: quant._one_thread()(fn) for name, fn in formulations.items()}  # one thread, as dequantize_blockwise


def _lookup_and_scale(pairs: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Each byte's two values (``pairs``: the byte table as 256 rows of two floats) times its block's
    absmax, as one expression, so that ``torch.compile`` can make it one loop."""
    return pairs[packed.long()].view(absmax.numel(), -1) * absmax.unsqueeze(1)


@functools.cache
def _fused_kernel():
    """The compiled `_lookup_and_scale`: one kernel per shape and thread count (torch.compile guards
    on both). Sets torch.compile's limit for this process to 32 kernels a function, and going past
    it to an error, rather than silently running the function uncompiled (as by default past 8);
    set once here, as changing the setting around each call costs a small layer's call 8% more."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(_lookup_and_scale, dynamic=False)


@torch.no_grad()  # as dequantize_blockwise (torch.compile guards on grad mode: one kernel, not two)
def compiled_dequantize(state: quant.QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`quant.dequantize_blockwise`'s look-up and multiply compiled by ``torch.compile``: PyTorch's
    compiler (inductor) turns them into one C++ loop over the bytes (look up the pair, multiply by
    the block's absmax, write), with no intermediate tensor and no widened indices, at torch's
    thread count; the absmax decode stays as in ours. The same float32 products, so the same
    tensor, bit for bit (checked where it is timed). 4-bit types with whole blocks only (no
    padding), as every tensor measured here; computed in float32, then cast to ``dtype``. The
    first call of each shape compiles (seconds; needs a C++ compiler on CPU)."""
    if state.quant_type not in quant.FOUR_BIT_TYPES or state.packed.numel() * 2 != state.absmax.numel() * state.blocksize:
        raise ValueError(f"compiled_dequantize takes 4-bit codes in whole blocks; got {state.quant_type} with "
                         f"{state.numel} values in blocks of {state.blocksize}: use quant.dequantize_blockwise")
    out = _fused_kernel()(_byte_pairs(state), state.packed, quant.dequantize_absmax(state)).view(state.shape)
    dtype = dtype or state.dtype
    return out if dtype == torch.float32 else out.to(dtype)


def compiled_or_why_not(state: quant.QuantState):
    """`compiled_dequantize` for ``state`` checked to give `quant.dequantize_blockwise`'s tensor, or
    the reason it cannot run here (``torch.compile`` failing, for instance for want of a C++
    compiler), to be recorded instead of its times. A different tensor is an error, not a reason."""
    try:
        got = compiled_dequantize(state)
    except Exception as error:  # noqa: BLE001 - whatever stops the compiler is recorded, not hidden
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not torch.equal(got, quant.dequantize_blockwise(state)):
        raise RuntimeError("compiled_dequantize gives another tensor than quant.dequantize_blockwise")
    return partial(compiled_dequantize, state), None


def run_device(device: str, down_proj: torch.Tensor) -> dict:
    import bitsandbytes.functional as bnbF

    g = torch.Generator().manual_seed(0)
    tensors = {"down_proj": down_proj.to(device), "random4096": torch.randn(4096, 4096, generator=g).to(device)}
    result = {"median_seconds": {}, "ratios": {}, "intervals": {}, "seconds": {}}

    def timed(name: str, fns: dict, rounds: int) -> dict:  # each contender's seconds in every round, kept
        times = result["seconds"][name] = interleaved(fns, rounds, device)
        result["median_seconds"][name] = {k: statistics.median(v) for k, v in times.items()}
        return times

    def ratio(key: str, times: dict, num: str, den: str) -> None:  # the median of the rounds' ratios, its interval
        # a throughput ratio (bitsandbytes' time over ours, "..._over_bnb") is ours' speed-up, its
        # verdict named for ours (course_lib.stats.speedup); a time ratio's for the numerator's time
        record = speedup if key.endswith("_over_bnb") else median_time_ratio
        result["intervals"][key] = record(times[num], times[den])
        result["ratios"][key] = result["intervals"][key]["ratio"]   # the median report.paired_ratio gives

    for label, x in tensors.items():
        times = timed(f"quantize_{label}", {
            "ours": partial(quant.quantize_blockwise, x, "nf4", BLOCKSIZE, double_quant=True),
            "bnb": partial(bnbF.quantize_4bit, x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True),
        }, REPEATS["quantize"])
        ratio(f"quantize_{label}_throughput_ours_over_bnb", times, "bnb", "ours")  # throughput = time theirs / ours

        ours_state = quant.quantize_blockwise(x, "nf4", BLOCKSIZE, double_quant=True)
        packed, bnb_state = bnbF.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        bnb_dequantize = {"bnb": partial(bnbF.dequantize_4bit, packed, bnb_state)}
        compiled = {}
        if device == "cpu":  # its kernel also on one thread, as ours runs: the same work per core
            bnb_dequantize["bnb_one_thread"] = quant._one_thread()(bnb_dequantize["bnb"])
            fused, why_not = compiled_or_why_not(ours_state)
            if fused is None:
                result["compiled_unavailable"] = why_not
            else:  # at torch's thread count, and on one thread as bitsandbytes' kernel beside it
                compiled = {"compiled": fused, "compiled_one_thread": quant._one_thread()(fused)}
        times = timed(f"dequantize_{label}", {
            "ours": partial(quant.dequantize_blockwise, ours_state),
            **bnb_dequantize,
            "two_passes_only": two_passes_only(ours_state),
            **compiled,
        }, REPEATS["dequantize"])
        ratio(f"dequantize_{label}_throughput_ours_over_bnb", times, "bnb", "ours")
        ratio(f"dequantize_{label}_two_passes_limit_ours_over_bnb", times, "bnb", "two_passes_only")
        if device == "cpu":
            ratio(f"dequantize_{label}_one_thread_throughput_ours_over_bnb", times, "bnb_one_thread", "ours")
            ratio(f"dequantize_{label}_one_thread_two_passes_limit_ours_over_bnb", times, "bnb_one_thread",
                  "two_passes_only")
            # bitsandbytes' time at torch's thread count (the record's "threads") over its time on one
            ratio(f"dequantize_{label}_bnb_time_threads_over_one_thread", times, "bnb", "bnb_one_thread")
            if compiled:
                ratio(f"dequantize_{label}_compiled_ours_over_bnb", times, "bnb", "compiled")
                ratio(f"dequantize_{label}_one_thread_compiled_ours_over_bnb", times, "bnb_one_thread",
                      "compiled_one_thread")
            # PyTorch's gathers, each alone, against bitsandbytes' whole dequantize (both thread settings)
            times = interleaved({**gathers(ours_state), **bnb_dequantize}, REPEATS["dequantize"], device)
            intervals = {name: {k: speedup(times[name], times[k]) for k in times if k not in bnb_dequantize}
                         for name in bnb_dequantize}
            result.setdefault("gathers", {})[label] = {
                "median_seconds": {k: statistics.median(v) for k, v in times.items()},
                **{f"{name}_dequantize_over_gather": {k: v["ratio"] for k, v in row.items()}
                   for name, row in intervals.items()},
                "intervals": intervals, "seconds": times}

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

    times = timed("forward_down_proj", {"float": call(linear), "ours": call(ours), "bnb": call(theirs)},
                  REPEATS["forward"])
    ratio("forward_ours_over_float", times, "ours", "float")
    ratio("forward_bnb_over_float", times, "bnb", "float")
    return result


def qlora_step(rounds: int, device: str = "cpu") -> dict:
    """Seconds of one QLoRA training step in ``rounds`` rounds after one warm-up round, for models
    with the same initial adapters: course_lib's, bitsandbytes + peft's, and on CPU a third,
    course_lib's with bitsandbytes' ``dequantize_4bit`` kernel called where ours is
    (``course_lib_bnb_dequantize``: the same 4-bit weights, so the same tensors and losses, checked
    every round; what differs is how the weight is decoded), and a fourth, course_lib's with
    `compiled_dequantize` where ours is called (``course_lib_compiled_dequantize``, the same tensors
    too; left out, with the reason recorded, where ``torch.compile`` cannot build it). Each round
    gives every model the same batch, in one of their orders (24 for four models), taken in turn. The step is
    `train.train`'s (forward, backward, gradient clipping, AdamW), timed by it. The third model
    splits course_lib's step time over bitsandbytes + peft's into the dequantize's share (ours over
    the hybrid) and the rest (the hybrid over bitsandbytes + peft: the autograd function, the LoRA
    wrapper). Not on CUDA: there both models quantize bfloat16 weights, and that bitsandbytes' CUDA
    kernels then decode exactly our weights (which the pairing checks) has not been tried on a GPU.

    On CUDA the device is synchronized before each step, so no queued work of one model's step is
    counted in another's, and each round first steps every model once on its batch, untimed: a
    batch of a new sequence length costs the model that meets it first new allocator blocks and
    kernel choices (in an H200 run without this, whichever ran first in a round took 0.1-2.5 s
    longer than its usual 0.2-0.4 s). On CPU no such first-in-round cost shows (ratios alike in
    either order), each round times the first step on its batch, and the two course_lib models'
    dequantize calls are timed inside their steps (``dequantize_seconds_in_step``): there, between
    matmuls that evict the caches, a call takes longer than alone."""
    import logging
    import warnings

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from benchmarks.qlora_training import adapter_state, bnb_peft_qlora, course_lib_lora

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    theirs = bnb_peft_qlora(device)  # the set-ups of benchmarks/qlora_training, the same initial adapters
    base, tokenizer = models.load_smollm2(device)
    ours = course_lib_lora(base, True, adapter_state(theirs))
    contenders = {"course_lib": ours, "bnb_peft": theirs}
    if device == "cpu":
        contenders["course_lib_bnb_dequantize"] = course_lib_lora(base, True, adapter_state(theirs))
        # each of its packed weights' address -> bitsandbytes' packed weight and QuantState
        kernel = _bnb_kernels(contenders["course_lib_bnb_dequantize"], theirs)
        fused, why_not = course_lib_lora(base, True, adapter_state(theirs)), None
        for layer in fused.modules():  # compiles each shape, checks every layer's tensor
            if isinstance(layer, linear4bit.Linear4bit) and (why_not := compiled_or_why_not(layer.quant_state)[1]):
                break
        if why_not is None:
            contenders["course_lib_compiled_dequantize"] = fused
    del base
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
                  for name, m in contenders.items()}
    stream = train.batches(data.load_instruct("train"), BATCH, seed=0)
    step_seconds = {name: [] for name in contenders}

    def bnb_dequantize(state: quant.QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight, bnb_state = kernel[state.packed.data_ptr()]
        return bnbF.dequantize_4bit(weight, bnb_state).to(dtype or state.dtype)

    dequantize = {"course_lib": quant.dequantize_blockwise, "course_lib_bnb_dequantize": bnb_dequantize,
                  "course_lib_compiled_dequantize": compiled_dequantize}
    dequantizing = [0.0]  # seconds the current step has spent in its dequantize calls (CPU)
    in_step = {name: [] for name in dequantize if name in contenders}  # on CPU: that, per timed step

    def timed(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dequantizing[0] += time.perf_counter() - start
        return run

    def step(name: str, batch) -> tuple[float, float]:  # seconds, loss
        sync(device)
        dequantizing[0] = 0.0
        fn = dequantize.get(name, quant.dequantize_blockwise)  # (bnb_peft calls neither)
        with mock.patch.object(linear4bit, "dequantize_blockwise", timed(fn) if device == "cpu" else fn):
            history = train.train(contenders[name], lambda m, b: instruct.answer_loss(m, tokenizer, b), [batch],
                                  steps=1, optimizer=optimizers[name], seed=0, progress=False)
        return history.seconds[0], history.loss[0]

    orders = list(itertools.permutations(contenders))
    for i in range(rounds + 1):
        batch = next(stream)
        if device == "cuda":
            for name in contenders:
                step(name, batch)
        losses = {}
        for name in orders[i % len(orders)]:
            seconds, losses[name] = step(name, batch)
            if i:  # round 0 warms all up
                step_seconds[name].append(seconds)
                if name in in_step and device == "cpu":
                    in_step[name].append(dequantizing[0])
        if device == "cpu" and len(set(losses.values())) != 1:  # (on CUDA, bfloat16 kernels may differ)
            raise RuntimeError(f"round {i}: the models' losses differ ({losses}): they no longer compute the "
                               "same step, so their times are not comparable")
    # what dequantization contributes: every 4-bit layer of each model dequantized once (a step does
    # it twice per layer: in forward, and again in backward), in rounds as above
    def dequantize_all(layers):
        def run():
            for layer in layers:
                layer()
        return run

    ours_layers = [m.dequantize for m in ours.modules() if isinstance(m, linear4bit.Linear4bit)]
    bnb_layers = [partial(bnbF.dequantize_4bit, m.weight, m.weight.quant_state)
                  for m in theirs.modules() if isinstance(m, bnb.nn.Linear4bit)]
    with torch.no_grad():
        times = interleaved({"course_lib": dequantize_all(ours_layers), "bnb_peft": dequantize_all(bnb_layers)},
                            REPEATS["dequantize"], device)
    split = {} if "course_lib_bnb_dequantize" not in contenders else {
        "course_lib_over_course_lib_bnb_dequantize": time_ratio(step_seconds["course_lib"],
                                                                step_seconds["course_lib_bnb_dequantize"]),
        "course_lib_bnb_dequantize_over_bnb_peft": time_ratio(step_seconds["course_lib_bnb_dequantize"],
                                                              step_seconds["bnb_peft"])}
    if "course_lib_compiled_dequantize" in contenders:
        split["course_lib_compiled_dequantize_over_bnb_peft"] = time_ratio(
            step_seconds["course_lib_compiled_dequantize"], step_seconds["bnb_peft"])
    elif device == "cpu":
        split["compiled_unavailable"] = why_not
    return {"seconds": step_seconds,
            "course_lib_over_bnb_peft": time_ratio(step_seconds["course_lib"], step_seconds["bnb_peft"]), **split,
            "dequantize_every_layer_once": {"layers": [len(ours_layers), len(bnb_layers)],
                                            "median_seconds": {k: statistics.median(v) for k, v in times.items()}},
            **({"dequantize_seconds_in_step": in_step} if device == "cpu" else {})}


def _bnb_kernels(model: nn.Module, bnb_model: nn.Module) -> dict:
    """For each `linear4bit.Linear4bit` of ``model``, keyed by its packed weight's address: the
    bitsandbytes layer of the same name in ``bnb_model`` (its packed weight and ``QuantState``),
    checked to dequantize to exactly our layer's weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    theirs = {name: m for name, m in bnb_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    kernels = {}
    for name, layer in model.named_modules():
        if isinstance(layer, linear4bit.Linear4bit):
            matches = [m for n, m in theirs.items() if n == name or n.endswith("." + name)]  # peft's names end in ours
            if len(matches) != 1:
                raise RuntimeError(f"{name}: {len(matches)} bitsandbytes layers of that name")
            weight, state = matches[0].weight, matches[0].weight.quant_state
            if not torch.equal(layer.dequantize(), bnbF.dequantize_4bit(weight, state).to(layer.weight_dtype)):
                raise RuntimeError(f"{name}: bitsandbytes' layer of that name holds another weight")
            kernels[layer.weight.data_ptr()] = (weight, state)
    if len(kernels) != len(theirs):
        raise RuntimeError(f"{len(kernels)} course_lib 4-bit layers against {len(theirs)} of bitsandbytes")
    return kernels


def _ratio_figures(lines: list[str], result: dict, name: str, key: str, op: str, target: float) -> None:
    """Append the FIGURE line of ``result``'s ratio ``key`` and, where its interval is recorded,
    the interval's line."""
    lines.append(figure(name, result["ratios"][key], op, target, ".3f"))
    if key in result.get("intervals", {}):
        lines.append(interval_figure(name, result["intervals"][key], op, target, ".3f"))


def figures(record: dict) -> list[str]:
    """The FIGURE lines of a record of this script, from its recorded ratios alone: per device, per
    tensor quantize then dequantize throughput, then the forward. Each ratio with a recorded
    interval (`course_lib.stats.median_time_ratio`; the runs before the one of 2026-12-06 at
    09:49 UTC recorded none) has its `interval_figure` line after its own."""
    lines = []
    for device, result in record["results"].items():
        ratios = result["ratios"]
        add = partial(_ratio_figures, lines, result)
        for key in ratios:
            if key.startswith("quantize_"):
                label = key.removeprefix("quantize_").removesuffix("_throughput_ours_over_bnb")
                add(f"nf4_quantize_{label}_{device}_throughput_ours_over_bnb", key, ">=", 1.0)
                add(f"nf4_dequantize_{label}_{device}_throughput_ours_over_bnb",
                    f"dequantize_{label}_throughput_ours_over_bnb", ">=", 1.0)
                if f"dequantize_{label}_two_passes_limit_ours_over_bnb" in ratios:
                    add(f"nf4_dequantize_{label}_{device}_two_passes_alone_over_bnb",
                        f"dequantize_{label}_two_passes_limit_ours_over_bnb", ">=", 1.0)
                if f"dequantize_{label}_one_thread_throughput_ours_over_bnb" in ratios:  # one thread each
                    add(f"nf4_dequantize_{label}_{device}_one_thread_throughput_ours_over_bnb",
                        f"dequantize_{label}_one_thread_throughput_ours_over_bnb", ">=", 1.0)
                    add(f"nf4_dequantize_{label}_{device}_one_thread_two_passes_alone_over_bnb",
                        f"dequantize_{label}_one_thread_two_passes_limit_ours_over_bnb", ">=", 1.0)
                for threads in ("", "one_thread_"):  # the look-up and multiply fused by torch.compile
                    if f"dequantize_{label}_{threads}compiled_ours_over_bnb" in ratios:
                        add(f"nf4_dequantize_{label}_{device}_{threads}compiled_over_bnb",
                            f"dequantize_{label}_{threads}compiled_ours_over_bnb", ">=", 1.0)
        add(f"linear4bit_forward_{device}_over_float_linear", "forward_ours_over_float", "<=", 1.5)
        if "qlora_step" in result:  # issue 22's target: course_lib's step no slower than bitsandbytes + peft's
            step = result["qlora_step"]["course_lib_over_bnb_peft"]   # paired rounds: a ratio and its interval
            lines.append(figure(f"qlora_step_{device}_course_lib_over_bnb_peft", step["ratio"], "<=", 1.0, ".3f"))
            lines.append(interval_figure(f"qlora_step_{device}_course_lib_over_bnb_peft", step, "<=", 1.0, ".3f"))
            fused = result["qlora_step"].get("course_lib_compiled_dequantize_over_bnb_peft")
            if fused:  # the same step with the look-up and multiply compiled into one loop
                lines.append(figure(f"qlora_step_{device}_compiled_dequantize_over_bnb_peft", fused["ratio"], "<=",
                                    1.0, ".3f"))
                lines.append(interval_figure(f"qlora_step_{device}_compiled_dequantize_over_bnb_peft", fused, "<=",
                                             1.0, ".3f"))
    return lines


def main() -> None:
    parser = argument_parser("quant_vs_bnb", __doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where to measure (default cpu); cuda writes quant_vs_bnb.cuda.json")
    args = parser.parse_args()
    if args.figures_only:
        print("\n".join(recompute_figures(OUT[args.device], figures)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here; run without --device to measure on the CPU")
    import bitsandbytes as bnb

    device = args.device
    run, load_at_start = Run("quant_vs_bnb", args, device=device), os.getloadavg()[0]  # others skew timings
    model, _ = models.load_smollm2("cpu")
    down_proj = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    del model
    results = {device: run_device(device, down_proj)}
    results[device]["qlora_step"] = qlora_step(REPEATS["qlora_step"][device], device)

    record = {
        **run.fields(load_average_1min_at_start_and_end=[load_at_start, os.getloadavg()[0]],
                     cuda=torch.cuda.get_device_name() if device == "cuda" else None,
                     bitsandbytes=bnb.__version__),
        "setting": f"NF4, blocksize {BLOCKSIZE}, double quantization; SmolLM2-135M-Instruct layer 0 mlp.down_proj "
                   f"(576x1536) and a random 4096x4096 tensor (seed 0); forward at batch {BATCH}x{SEQ}, float32; "
                   f"QLoRA step: SmolLM2, LoRA r=8 alpha 16 on q_proj/v_proj, AdamW 2e-3, batch {BATCH} instructions, "
                   + ("float32 compute" if device == "cpu" else "bfloat16 autocast, 4-bit matmuls in bfloat16"),
        "repeats": REPEATS,
        "ratio_method": "median over rounds of the ratio of the two times measured in the same round, with a "
                        "95% percentile bootstrap interval resampling rounds (intervals; each round's times "
                        "under seconds); throughput ratio ours/bnb = time bnb / time ours; the QLoRA step: "
                        "ratio of the mean step times over paired rounds, 95% percentile bootstrap interval "
                        "resampling rounds",
        "results": results,
    }
    lines = save_result(OUT[device], record, figures)

    for device, result in results.items():
        print(f"[{device}] median seconds")
        for where in (result, result.get("qlora_step", {})):
            if "compiled_unavailable" in where:
                print(f"  torch.compile could not build compiled_dequantize here: {where['compiled_unavailable']}")
        for name, medians in result["median_seconds"].items():
            print(f"  {name:24s} " + "  ".join(f"{k} {v * 1000:8.2f} ms" for k, v in medians.items()))
        for label, gathered in result.get("gathers", {}).items():
            for name, threads in (("bnb", f"{torch.get_num_threads()} threads"), ("bnb_one_thread", "one thread")):
                print(f"  {label}: the gather alone, bitsandbytes' whole dequantize ({threads}) time / its time: "
                      + "  ".join(f"{k} {v:.2f}" for k, v in gathered[f"{name}_dequantize_over_gather"].items()))
        print(f"  bitsandbytes Linear4bit forward / float: {result['ratios']['forward_bnb_over_float']:.3f}")
        if "qlora_step" in result:
            step = result["qlora_step"]["course_lib_over_bnb_peft"]
            print(f"  QLoRA step, course_lib / bitsandbytes + peft (mean seconds, {step['rounds']} paired rounds): "
                  f"{step['ratio']:.3f} [95% CI {step['low']:.3f}, {step['high']:.3f}] ({step['verdict']})")
            parts = {"course_lib_over_course_lib_bnb_dequantize":
                     "course_lib / course_lib with bitsandbytes' dequantize (its share)",
                     "course_lib_bnb_dequantize_over_bnb_peft":
                     "course_lib with bitsandbytes' dequantize / bitsandbytes + peft (the rest)",
                     "course_lib_compiled_dequantize_over_bnb_peft":
                     "course_lib with the compiled dequantize / bitsandbytes + peft"}
            for key, label in parts.items():
                if key in result["qlora_step"]:
                    part = result["qlora_step"][key]
                    print(f"    {label}: {part['ratio']:.3f} [95% CI {part['low']:.3f}, {part['high']:.3f}] "
                          f"({part['verdict']})")
            every = result["qlora_step"]["dequantize_every_layer_once"]
            print(f"  dequantizing all {every['layers'][0]} 4-bit layers once: " + "  ".join(
                f"{k} {v * 1000:.1f} ms" for k, v in every["median_seconds"].items()))
            seconds = result["qlora_step"]["seconds"]
            for name, in_step in result["qlora_step"].get("dequantize_seconds_in_step", {}).items():
                print(f"  {name}'s step spends {statistics.mean(in_step) * 1000:.0f} ms in its dequantize calls "
                      f"(mean of {len(in_step)} steps; {statistics.mean(seconds[name]):.2f} s a step)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
