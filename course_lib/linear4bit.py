"""QLoRA's frozen 4-bit linear layer, and the conversion of a whole model to it.

`Linear4bit` stores a linear layer's weight as a `course_lib.quant.QuantState` (4-bit codes plus
blockwise absmax constants, optionally double-quantized) and dequantizes it on every forward
pass, in ``compute_dtype``. Its weight gets no gradient, but the input's gradient flows through
it, so a LoRA branch beside it (`course_lib.lora.LoRALinear` wraps it) trains while the 4-bit
weight stays frozen: that is QLoRA. `_Matmul4bit` is the autograd function that makes this
cheap in memory: it saves nothing weight-sized for backward and dequantizes a second time there.

`quantize_model` replaces every ``nn.Linear`` of a model by a `Linear4bit` and reports the bytes
before and after, measured from the tensors actually stored. It is the from-scratch counterpart
of loading with transformers' ``BitsAndBytesConfig(load_in_4bit=True)``; the tests check its
layers against bitsandbytes' ``Linear4bit``.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .models import cuda_half_dtype
from .quant import (
    FOUR_BIT_TYPES,
    QuantState,
    check_blocksize,
    check_float_dtype,
    check_quant_type,
    dequantize_blockwise,
    quantize_blockwise,
)
from .surgery import replace_modules


# ---------------------------------------------------------------------------------------------
# The 4-bit linear layer
# ---------------------------------------------------------------------------------------------
class _Matmul4bit(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantized in forward and *again* in backward.

    Nothing weight-sized is saved for backward (``F.linear`` would keep the dequantized float
    weight alive), which is what keeps QLoRA's activation memory small; no gradient goes to ``W``.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ ctx.layer.dequantize(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits (NF4, FP4 or INT4) and dequantized on the fly.

    ``weight`` is the packed uint8 buffer (two codes per byte, like bitsandbytes' ``Params4bit``):
    it is not a parameter and receives no gradient. The input gradient flows, so a LoRA branch on
    top trains (QLoRA). ``bias`` is a frozen ``nn.Parameter``. The matmul runs in
    ``compute_dtype``; ``None`` means float32 on CPU and bfloat16 (float16 without bf16) on CUDA.
    """

    def __init__(self, state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        check_quant_type(state.quant_type, FOUR_BIT_TYPES)
        check_float_dtype(compute_dtype)
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight (out_features, in_features), got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        self.quant_type, self.blocksize = state.quant_type, state.blocksize
        self.weight_dtype, self.compute_dtype = state.dtype, compute_dtype
        self.register_buffer("weight", state.packed)
        for name in ("absmax", "absmax_offset", "absmax_absmax"):
            self.register_buffer(name, getattr(state, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantize an ``nn.Linear``'s weight (on its device) and keep its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        check_quant_type(quant_type, FOUR_BIT_TYPES)
        check_float_dtype(compute_dtype)
        state = quantize_blockwise(linear.weight.detach(), quant_type, blocksize, double_quant)
        return cls(state, linear.bias, compute_dtype)

    @property
    def quant_state(self) -> QuantState:
        """The stored tensors as a `QuantState` (views, no copy)."""
        return QuantState(self.weight, self.absmax, torch.Size((self.out_features, self.in_features)),
                          self.weight_dtype, self.blocksize, self.quant_type, self.absmax_offset, self.absmax_absmax)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a float tensor (out_features × in_features), default in the original dtype."""
        return dequantize_blockwise(self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or _default_compute_dtype(x.device)
        out = _Matmul4bit.apply(x.to(dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        """``model.to(device)`` moves the quantization constants; ``model.half()`` & co. leave them float32."""
        constants = {name: self._buffers[name] for name in ("absmax", "absmax_offset", "absmax_absmax")}
        super()._apply(fn, recurse)
        for name, before in constants.items():
            if before is not None:
                self._buffers[name] = before.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.absmax_offset is not None}")


# ---------------------------------------------------------------------------------------------
# Converting a model
# ---------------------------------------------------------------------------------------------
def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                   skip=("lm_head",), compute_dtype: torch.dtype | None = None) -> dict:
    """Replace every ``nn.Linear`` of ``model`` in place by a `Linear4bit`, except those named in ``skip``.

    A module is skipped when its dotted name equals an entry of ``skip`` or ends with ``"." + entry``
    (SmolLM2's ``lm_head`` shares its weight with the embedding: quantizing it would store a second
    copy). Returns a report from the stored tensors: ``layers_replaced``, ``weight_numel``,
    ``weight_bytes_before``/``_after`` (the replaced weights alone), ``bits_per_parameter`` of those,
    and ``model_bytes_before``/``_after`` (all parameters and buffers, each shared tensor once).

    Every layer is quantized before the first one is swapped in, so an error (a NaN weight in the
    last layer) leaves the model as it was; the price is holding the 4-bit copies (about 1/7 of
    the float32 weights) next to the originals until the swap.
    """
    check_quant_type(quant_type, FOUR_BIT_TYPES)
    check_blocksize(blocksize)
    check_float_dtype(compute_dtype)
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    chosen = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
              and not any(name == s or name.endswith("." + s) for s in skip)}
    report = {"layers_replaced": 0, "weight_numel": 0, "weight_bytes_before": 0, "weight_bytes_after": 0,
              "model_bytes_before": _model_bytes(model)}
    new = {}
    for name, linear in chosen.items():
        try:
            new[name] = Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{name}: {error}; the model is unchanged") from error
    replace_modules(model, new)
    for name, linear in chosen.items():
        report["layers_replaced"] += 1
        report["weight_numel"] += linear.weight.numel()
        report["weight_bytes_before"] += linear.weight.numel() * linear.weight.element_size()
        report["weight_bytes_after"] += new[name].quant_state.nbytes
    report["model_bytes_after"] = _model_bytes(model)
    report["bits_per_parameter"] = 8 * report["weight_bytes_after"] / max(report["weight_numel"], 1)
    return report


def _model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each shared tensor counted once."""
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _default_compute_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU; on CUDA bfloat16, or float16 where the GPU has no bfloat16."""
    return cuda_half_dtype() if device.type == "cuda" else torch.float32
