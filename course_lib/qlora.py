"""QLoRA: LoRA adapters trained in 32/16-bit on top of a frozen 4-bit base.

The recipe of the QLoRA paper (Dettmers et al., 2023), built from this package's pieces:

1. `prepare_model_for_qlora` replaces a model's linear layers by `course_lib.linear4bit.Linear4bit`
   (NF4 with double quantization by default), freezes every remaining parameter, keeps the
   non-quantized ones (embeddings, norms) in float32 and, as an option, turns on gradient
   checkpointing. It plays the part of transformers' ``BitsAndBytesConfig(load_in_4bit=True)``
   followed by peft's ``prepare_model_for_kbit_training``.
2. `course_lib.lora.inject_lora` then wraps the 4-bit layers: only A and B train.

After training there are three ways to deploy, and one of them is a trap:

* keep the adapter **unmerged** on the 4-bit base (what QLoRA trained; exact, smallest);
* `dequantize_model`, then `lora.merge_and_unload`: a float model whose weights are exactly
  ``dequantize(W_4bit) + ΔW`` (exact, but 16/32-bit sized);
* `merge_and_requantize`: dequantize, add ΔW, quantize again to 4 bits. The update ΔW is usually
  much smaller than the gap between two 4-bit levels, so re-quantization rounds most of it away.
  The function does it only when asked and returns how much of the update survived.
"""

from __future__ import annotations

import torch
from torch import nn

from . import lora, quant
from .linear4bit import Linear4bit, quantize_model
from .models import set_gradient_checkpointing
from .surgery import replace_modules


def prepare_model_for_qlora(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                            blocksize: int = 64, compute_dtype: torch.dtype | None = None, skip=("lm_head",),
                            gradient_checkpointing: bool = False) -> dict:
    """Quantize ``model``'s linear layers to 4 bits in place and get it ready for LoRA training.

    Every ``nn.Linear`` except those in ``skip`` becomes a frozen `linear4bit.Linear4bit`
    (``quant_type`` nf4 / fp4 / int4, ``blocksize`` values per absmax, ``double_quant`` for 8-bit
    absmax). All remaining parameters are frozen and those in half precision are cast to float32,
    as peft's ``prepare_model_for_kbit_training`` does, so layer norms and the loss stay accurate.
    ``compute_dtype`` is the dtype of the 4-bit matmuls (None: float32 on CPU, bfloat16 on CUDA).
    With ``gradient_checkpointing`` the model's transformer blocks recompute their activations in
    backward (needs a transformers model). Returns `linear4bit.quantize_model`'s byte report.
    Everything is checked before the model changes: on an error (a NaN weight in any layer) it is
    left as it was, neither quantized nor frozen.
    """
    if lora.lora_layers(model):
        raise ValueError("the model already has LoRA layers: prepare (quantize) it first, then inject_lora")
    can_checkpoint = hasattr(model, "activation_checkpointing_enable") or hasattr(model, "gradient_checkpointing_enable")
    if gradient_checkpointing and not (can_checkpoint and getattr(model, "supports_gradient_checkpointing", True)):
        raise ValueError(f"gradient checkpointing needs a transformers model that supports it; {type(model).__name__} "
                         "does not: pass gradient_checkpointing=False (the model is unchanged)")
    report = quantize_model(model, quant_type, double_quant, blocksize, skip, compute_dtype)
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    return report


def _as_linear(layer: Linear4bit, dtype: torch.dtype | None) -> nn.Linear:
    weight = layer.dequantize(dtype)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear.requires_grad_(False)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `linear4bit.Linear4bit` (also those under a LoRA layer) by an ``nn.Linear`` holding
    its dequantized weight in ``dtype`` (default: the dtype it was quantized from). LoRA adapters
    stay as they are, so `lora.merge` is then exact. Returns ``model``, changed in place.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    replace_modules(model, {n: _as_linear(m, dtype) for n, m in model.named_modules() if isinstance(m, Linear4bit)})
    return model


@torch.no_grad()
def merge_and_requantize(model: nn.Module) -> dict:
    """Merge the active adapters into the 4-bit base *and quantize again*: lossy, and measured.

    For each LoRA layer over a `linear4bit.Linear4bit`: ``W = dequantize(W_4bit) + ΔW`` is quantized
    with the layer's own settings, and the layer is replaced by the new `linear4bit.Linear4bit`
    (the adapters are dropped). Returns, over all layers together (Frobenius norms):

    * ``update_error``: ``|ΔW_kept - ΔW| / |ΔW|`` where ``ΔW_kept = dequantize(new) - dequantize(old)``
      is the update the re-quantized model actually applies (0 = exact, 1 = as wrong as no update);
    * ``update_kept``: ``<ΔW_kept, ΔW> / |ΔW|²``, the share of the update that survives along its
      own direction;
    * ``codes_changed``: the fraction of 4-bit codes that differ from the old ones;
    * ``layers``: the number of layers merged.

    Layers with a float base are left alone. The safe alternatives are to keep the adapter
    unmerged, or `dequantize_model` followed by `lora.merge_and_unload`. Every layer is merged and
    re-quantized before the first is swapped in, so an error (no active adapter, or an update
    holding NaN/inf, in any layer) leaves the model as it was, adapters included.
    """
    layers = {n: m for n, m in lora.lora_layers(model).items() if isinstance(m.base_layer, Linear4bit)}
    if not layers:
        raise ValueError("no LoRA layer over a Linear4bit base in this model: nothing to merge and re-quantize")
    for name, layer in layers.items():
        if layer.disable_adapters or not layer.active_adapters:
            raise ValueError(f"{name}: no active adapter to merge; set_adapter(model, name) first (the model is unchanged)")
    err2 = dot = delta2 = 0.0
    changed = total = 0
    replacements = {}
    for name, layer in layers.items():
        old = layer.base_layer
        dense = old.dequantize(torch.float32)
        delta = sum(layer.delta_weight(a).float() for a in layer.active_adapters)
        if not torch.isfinite(delta).all():
            raise ValueError(f"{name}: adapter(s) {layer.active_adapters} hold NaN/inf in their update scaling · B @ A; "
                             "nothing was merged (the model is unchanged). Check A and B (did training diverge?)")
        state = quant.quantize_blockwise(dense + delta, old.quant_type, old.blocksize, old.absmax_offset is not None)
        replacements[name] = Linear4bit(state, old.bias, old.compute_dtype)
        replacements[name].weight_dtype = old.weight_dtype
        kept = quant.dequantize_blockwise(state, torch.float32) - dense
        err2 += (kept - delta).pow(2).sum().item()
        dot += (kept * delta).sum().item()
        delta2 += delta.pow(2).sum().item()
        changed += _codes_changed(old.weight, state.packed)
        total += old.in_features * old.out_features
    replace_modules(model, replacements)
    delta2 = max(delta2, 1e-30)
    return {"layers": len(layers), "update_error": (err2 / delta2) ** 0.5, "update_kept": dot / delta2,
            "codes_changed": changed / total}


def _codes_changed(packed_old: torch.Tensor, packed_new: torch.Tensor) -> int:
    """Number of 4-bit codes that differ between two packed uint8 tensors (two codes per byte)."""
    diff = packed_old.view(-1) ^ packed_new.view(-1)
    return int(((diff >> 4) != 0).sum().item() + ((diff & 0x0F) != 0).sum().item())
