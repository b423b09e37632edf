"""Edge deployment, part 1: merge a fine-tuned adapter, save the plain model, export it to ONNX
and quantize it to INT8 for onnxruntime on a CPU.

The pipeline of chapter 06:

1. `merge_adapter` folds the adapter into the base weights (``W = W0 + scaling · B A``), through
   `course_lib.lora.merge_and_unload` for this package's LoRA or peft's ``merge_and_unload`` for a
   ``PeftModel``. It refuses what would not equal the model as it runs: several active adapters,
   adapters that differ between layers, an inactive adapter left merged into the weights.
2. `save_merged` writes an ordinary transformers checkpoint (``model.safetensors`` + config).
3. `export_onnx_encoder` / `export_onnx_causal_lm` export with ``torch.onnx.export(...,
   dynamo=True)``: the exporter torch recommends since 2.9 (``torch.export`` traces the model,
   onnxscript translates it); the older TorchScript exporter is deprecated. The causal LM is
   exported *with* its KV cache as inputs and outputs, so one file serves both generation with
   the cache and plain logits (pass an empty cache).
4. `quantize_onnx_int8` applies onnxruntime's dynamic quantization: weights are stored as int8,
   activations are quantized on the fly per batch, so no calibration data is needed. It suits
   the MiniLM encoder (recall unchanged) far better than SmolLM2 (see its docstring).
5. `OnnxEncoder` and `OnnxCausalLM` run the files with onnxruntime behind the same call
   signature as the transformers models, so `course_lib.retrieval`, `course_lib.instruct` and
   `course_lib.generation` score and time them with the very code that scores the PyTorch models.

Every writer refuses an existing output unless ``overwrite=True``, and writes to a temporary
file next to the target that is renamed into place only on success (`course_lib.atomic_files`):
a failed export leaves nothing behind. The GGUF export (for llama.cpp) lives in `course_lib.gguf_export`.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from . import lora
from .atomic_files import atomic_output
from .generation import cache_keyword, cache_shape, returned_cache
from .linear4bit import Linear4bit
from .surgery import short_list

ONNX_INT8_TYPES = ("int8", "uint8")  # the weight types of onnxruntime's dynamic quantization


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------
def _peft_layers(model: nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def check_plain(model: nn.Module, action: str = "export") -> None:
    """Raise ``ValueError`` unless ``model`` is a plain float model: no LoRA layers (ours or
    peft's) and no 4-bit layers, which no exporter here understands."""
    from peft import PeftModel

    ours, theirs = list(lora.lora_layers(model)), _peft_layers(model)
    if isinstance(model, PeftModel) or ours or theirs:
        where = short_list(ours or theirs) if (ours or theirs) else "a PeftModel"
        raise ValueError(f"cannot {action} a model that still holds unmerged LoRA adapters ({where}): "
                         "call course_lib.export.merge_adapter(model) first and pass the model it returns")
    four_bit = [name for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    if four_bit:
        raise ValueError(f"cannot {action} 4-bit layers ({short_list(four_bit)}): turn them back into float "
                         "with course_lib.qlora.dequantize_model(model) first")


def merge_adapter(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold the adapter into the base weights and return a plain model without LoRA layers.

    ``model`` is a model with `course_lib.lora` adapters (changed in place) or a peft
    ``PeftModel`` (its ``merge_and_unload()`` returns the underlying transformers model). With
    ``adapter_name`` None exactly one adapter must be active, as the model computes it now;
    name one to merge that adapter instead. Inactive adapters are dropped.

    Refused with a ``ValueError`` saying what to do: a model without adapters, several active
    adapters (merging would add them all), layers whose active adapters differ, and an adapter
    merged into the weights that is not the active one (the merged model would differ from
    what the model computes now).
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return _merge_peft(model, adapter_name)
    if _peft_layers(model):
        raise TypeError("the model holds peft LoRA layers but is not a PeftModel (peft.inject_adapter_in_model?); "
                        "wrap it with peft.get_peft_model / PeftModel.from_pretrained, or merge it with peft")
    layers = lora.adapter_state(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters, so there is nothing to merge: export it as it is, "
                         "or load the adapter first (course_lib.lora_io.load_adapter or peft.PeftModel.from_pretrained)")
    known = lora.adapter_names(model)
    if adapter_name is not None and adapter_name not in known:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {known}")
    per_layer = {name: tuple(layer["active"]) if adapter_name is None else
                 (adapter_name,) if adapter_name in layer["adapters"] else () for name, layer in layers.items()}
    several = {name: active for name, active in per_layer.items() if len(active) > 1}
    if several:
        name, active = next(iter(several.items()))
        raise ValueError(f"several adapters are active ({list(active)} in {name}); merging would add them all. "
                         f"Merge one: merge_adapter(model, adapter_name={active[0]!r}), or combine them first "
                         "with course_lib.lora_combine.add_weighted_adapter and merge the result")
    active = sorted({a for names in per_layer.values() for a in names})
    if len(active) > 1:
        raise ValueError(f"mismatched adapters: different layers have different active adapters {active}; "
                         "choose one with merge_adapter(model, adapter_name=...)")
    if not active:
        raise ValueError("no adapter is active; name the one to merge: merge_adapter(model, adapter_name=...)")
    stray = {name: [a for a in layer["merged"] if a != active[0]] for name, layer in layers.items()}
    stray = {name: merged for name, merged in stray.items() if merged}
    if stray:
        name, merged = next(iter(stray.items()))
        raise ValueError(f"mismatched adapters: {merged} is merged into {name}'s weights but the active adapter is "
                         f"{active[0]!r}; call course_lib.lora.unmerge(model) first")
    lora.set_adapter(model, active[0])
    lora.unmerge(model)  # layers where the adapter is already merged: merge every layer afresh
    return lora.merge_and_unload(model)


def _merge_peft(model, adapter_name: str | None) -> nn.Module:
    if adapter_name is not None:
        if adapter_name not in model.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(model.peft_config)}")
        model.set_adapter(adapter_name)
    active = list(model.active_adapters)
    if len(active) != 1:
        raise ValueError(f"{'several adapters are' if active else 'no adapter is'} active ({active}); "
                         "merge one: merge_adapter(model, adapter_name=...), or combine them first with "
                         "peft's add_weighted_adapter")
    merged = model.merge_and_unload()
    check_plain(merged, "return")  # peft must have left no LoRA layer behind
    return merged


def save_merged(model: nn.Module, directory, tokenizer=None, overwrite: bool = False) -> Path:
    """Save a merged model (and its tokenizer) as an ordinary transformers checkpoint.

    ``model.safetensors`` + ``config.json`` (+ the tokenizer files), loadable with
    ``AutoModel.from_pretrained(directory)`` without peft or course_lib. A model still holding
    LoRA layers is refused ("merge first"). Returns the directory.
    """
    check_plain(model, "save")
    directory = Path(directory)
    with atomic_output(directory, overwrite, directory=True) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return directory


# ---------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------
@contextmanager
def _quiet(*loggers: str):
    """Silence the exporters' and the quantizer's advice for their developers (optional torchvision
    operators not registered, pytree deprecations, "consider pre-processing", shape-inference notes
    on integer tensors): warnings and log records below ERROR, for the duration of the block."""
    saved = {}
    for name in loggers:
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        saved[logger] = logger.level
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)


def _export_onnx(module: nn.Module, args: tuple, path, overwrite: bool, optimize: bool, dynamic_shapes,
                 input_names: list[str], output_names: list[str]) -> Path:
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters() if p.is_floating_point()})
    if dtypes and dtypes != ["float32"]:
        raise ValueError(f"export a float32 model (model.float()), got {dtypes}: onnxruntime's CPU kernels and "
                         "its INT8 quantization start from float32")
    parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if parameter_bytes >= 2**31:
        raise ValueError(f"the weights take {parameter_bytes / 2**30:.1f} GiB; one .onnx file holds < 2 GiB "
                         "(protobuf's limit) and these exporters write a single file")
    path = Path(path)
    with atomic_output(path, overwrite) as tmp, torch.no_grad(), _quiet("torch.onnx", "torch.export"):
        program = torch.onnx.export(module.eval(), args, dynamo=True, optimize=False, verbose=False,
                                    dynamic_shapes=dynamic_shapes, input_names=input_names,
                                    output_names=output_names)
        if optimize:
            _fold_constants(program.model)
        program.save(str(tmp), external_data=False)
    return path


def _fold_constants(model) -> None:
    """Fold the exported graph's constants in place: what the course's files need of onnxscript's
    optimizer (the one ``torch.onnx.export(..., optimize=True)`` runs).

    Folding turns a weight's ``Transpose`` into a transposed weight, stored as an initializer: the
    form `quantize_onnx_int8` quantizes. The rest of that optimizer, pattern rewrites and operator
    fusions, is left out: on SmolLM2 it took ~35 s of a ~90 s export (one CPU thread), and
    onnxruntime optimizes the graph itself when it loads a file. Measured: SmolLM2's and MiniLM's
    files, float32 and INT8, gave bit-identical outputs either way, and their INT8 files differ in
    size by at most 0.2% (tests/test_export.py checks it on SmolLM2 cut to two layers).
    """
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    common.InlinePass()(model)
    fold_constants(model, onnx_shape_inference=True)
    for cleanup in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
                    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                    common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
                    common.OutputFixPass(), common.NameFixPass()):
        cleanup(model)


class _EncoderForExport(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


def export_onnx_encoder(model: nn.Module, path, tokenizer=None, overwrite: bool = False,
                        optimize: bool = True) -> Path:
    """Export a transformers encoder (MiniLM's BERT) to ONNX: token ids in, ``last_hidden_state`` out.

    Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the model takes them),
    all ``(batch, sequence)`` int64 with both dimensions dynamic. Pooling stays outside the
    graph: `OnnxEncoder` mean-pools as `course_lib.retrieval` does. The example batch is
    tokenized with ``tokenizer`` if given, else random ids. ``optimize`` folds the graph's
    constants (`_fold_constants`). Returns the path of the single ``.onnx`` file.
    """
    check_plain(model)
    if tokenizer is not None:
        example = tokenizer(["an example sentence to trace the encoder", "a second, shorter one"],
                            padding=True, return_tensors="pt")
    else:
        ids = torch.randint(0, model.config.vocab_size, (2, 8))
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        example["attention_mask"][1, -3:] = 0
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted and n in example]
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = tuple({0: batch, 1: sequence} for _ in names)
    return _export_onnx(_EncoderForExport(model, names), tuple(example[n] for n in names), path, overwrite,
                        optimize, (dynamic,), names, ["last_hidden_state"])


class _CausalLMForExport(nn.Module):
    """The causal LM with its KV cache flattened into plain tensors, as ONNX needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{cache_keyword(self.model): cache})
        present = [t for layer in returned_cache(out).layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def export_onnx_causal_lm(model: nn.Module, path, overwrite: bool = False, optimize: bool = True) -> Path:
    """Export a transformers causal LM (SmolLM2) to ONNX with its KV cache as inputs and outputs.

    Inputs: ``input_ids``, ``position_ids`` ``(batch, sequence)``, ``attention_mask``
    ``(batch, past + sequence)`` and per layer ``past.{i}.key`` / ``past.{i}.value``
    ``(batch, kv_heads, past, head_dim)``; outputs: ``logits`` and ``present.{i}.key`` /
    ``present.{i}.value``, the cache grown by ``sequence`` positions. Batch, sequence and past are
    dynamic, and past may be 0: then the graph computes plain logits with no cache.
    `OnnxCausalLM` hides all of this. Exporting SmolLM2 took 54 s on one CPU thread (90 s with
    onnxscript's whole optimizer, see `_fold_constants`) and writes ~540 MB. Returns the path of
    the single ``.onnx`` file.
    """
    check_plain(model)
    config = model.config
    layers, kv_heads, head_dim = cache_shape(config)
    batch, sequence, past, total = 2, 3, 5, 8  # not 0 or 1: torch.export would fix such sizes
    ids = torch.randint(0, config.vocab_size, (batch, sequence))
    mask = torch.ones(batch, total, dtype=torch.long)
    positions = torch.arange(past, total).expand(batch, sequence)
    cache = [torch.zeros(batch, kv_heads, past, head_dim, dtype=model.dtype) for _ in range(2 * layers)]
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past", "total"))
    dynamic = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, [{0: b, 2: p} for _ in cache])
    names = [f"{kind}.{i}.{kv}" for kind in ("past", "present") for i in range(layers) for kv in ("key", "value")]
    return _export_onnx(_CausalLMForExport(model), (ids, mask, positions, cache), path, overwrite, optimize,
                        dynamic, ["input_ids", "attention_mask", "position_ids", *names[:2 * layers]],
                        ["logits", *names[2 * layers:]])


def quantize_onnx_int8(src, dst, overwrite: bool = False, weight_type: str = "int8",
                       per_channel: bool = True) -> Path:
    """Dynamic INT8 quantization of an ONNX file with ``onnxruntime.quantization.quantize_dynamic``.

    MatMul weights (and embedding tables) are stored as 8-bit integers with a scale per output
    channel (``per_channel``) or per tensor; activations are quantized per batch at run time,
    so no calibration data is needed. ``weight_type`` is ``"int8"`` or ``"uint8"``. Returns ``dst``.

    Measured on 2 CPU cores: MiniLM shrinks from 91 MB to 23 MB, encodes ~1.7x faster, and its
    recall@10 on the code-search test split moves from 0.792 to 0.800 (per tensor: 0.808, with
    a lower MRR). SmolLM2 shrinks from 543 MB to 140 MB, but on a few short texts its greedy
    next token agrees with float32 at only ~73% of positions, against ~97% for GGUF ``q8_0``
    (8-bit weights in blocks of 32, float activations): most likely the activations, quantized
    with one scale per tensor, cost the difference. Check a quantized decoder before shipping it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_type not in ONNX_INT8_TYPES:
        raise ValueError(f"unsupported weight_type {weight_type!r}; onnxruntime's dynamic quantization supports "
                         f"{list(ONNX_INT8_TYPES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist: export the model first (export_onnx_encoder / "
                                "export_onnx_causal_lm)")
    if src.resolve() == dst.resolve():
        raise ValueError("dst must differ from src: the float32 file is the input of the quantization")
    qtype = QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8
    with atomic_output(dst, overwrite) as tmp, _quiet("root"):
        quantize_dynamic(str(src), str(tmp), weight_type=qtype, per_channel=per_channel)
    return dst


# ---------------------------------------------------------------------------------------------
# Running the ONNX files with onnxruntime
# ---------------------------------------------------------------------------------------------
def _session(path, num_threads: int | None):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: export the model first")
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or torch.get_num_threads()  # as many threads as PyTorch
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder(nn.Module):
    """An encoder ONNX file behind the transformers call signature.

    ``encoder(input_ids=..., attention_mask=...)`` returns an object with ``last_hidden_state``
    (a float32 CPU tensor), so `course_lib.retrieval.embed` and ``evaluate_code_search`` score
    it exactly as they score the PyTorch encoder. It is an ``nn.Module`` without parameters
    only so that ``.eval()`` / ``.train()`` work; onnxruntime does the computing.
    """

    def __init__(self, path, num_threads: int | None = None):
        super().__init__()
        self.session = _session(path, num_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.config = SimpleNamespace(hidden_size=self.session.get_outputs()[0].shape[-1])

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if given["attention_mask"] is None:
            given["attention_mask"] = torch.ones_like(input_ids)
        if given["token_type_ids"] is None:
            given["token_type_ids"] = torch.zeros_like(input_ids)
        feed = {name: given[name].detach().cpu().long().numpy() for name in self.input_names}
        (hidden,) = self.session.run(["last_hidden_state"], feed)
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


class OnnxCausalLM:
    """A causal-LM ONNX file (from `export_onnx_causal_lm`) behind the transformers call signature.

    ``lm(input_ids, cache=None, use_cache=True)`` returns ``logits`` and ``cache`` (a flat list
    of key and value tensors, two per layer, or None without the cache), so
    `course_lib.generation.generate` runs it like the PyTorch model; older transformers' name
    ``past_key_values`` works too. Without an ``attention_mask`` every token is attended.
    Positions count on from the cache length, so batches must not be left-padded when a cache is
    passed.
    """

    def __init__(self, path, num_threads: int | None = None):
        self.session = _session(path, num_threads)
        past = [i for i in self.session.get_inputs() if i.name.startswith("past.")]
        self.num_layers, self.kv_heads, self.head_dim = len(past) // 2, past[0].shape[1], past[0].shape[3]
        self.past_names = [i.name for i in past]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, input_ids, attention_mask=None, cache=None, use_cache: bool = True, past_key_values=None):
        import numpy as np

        cache = cache if cache is not None else past_key_values
        ids = input_ids.detach().cpu().long().numpy()
        batch, length = ids.shape
        if cache is None:
            past = [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]
        else:
            past = [t.detach().cpu().numpy() for t in cache]
        start = past[0].shape[2]
        mask = (np.ones((batch, start + length), np.int64) if attention_mask is None
                else attention_mask.detach().cpu().long().numpy())
        positions = np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (batch, length))
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(positions),
                **dict(zip(self.past_names, past))}
        logits, *present = self.session.run(self.output_names, feed)
        present = [torch.from_numpy(t) for t in present] if use_cache else None
        return SimpleNamespace(logits=torch.from_numpy(logits), cache=present, past_key_values=present)
