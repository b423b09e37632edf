"""Memory measurement: what a training set-up holds, counted from the tensors themselves.

Chapter 01 compares LoRA with full fine-tuning by `optimizer_state_bytes`; chapter 03 measures
whole training steps with `SavedActivations` (the tensors autograd keeps for backward, through
`torch.autograd.graph.saved_tensors_hooks`) and `measure_step` (parameters + gradients +
optimizer state + peak saved activations, and on CUDA the allocator's peak beside them).
`course_lib.budget` estimates the same figures from a model's config alone, without torch; its
tests hold the estimate to these measurements.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import set_gradient_checkpointing


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors.

    AdamW keeps two moments per trainable parameter (8 bytes in float32); its scalar step
    counters are not counted. State exists only after the first ``optimizer.step()``.
    """
    return sum(value.numel() * value.element_size()
               for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value) and value.dim() > 0)


def parameter_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the model's parameters (each shared tensor once), or of the trainable ones."""
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p.requires_grad or not trainable_only)


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors currently held by the model's parameters."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr())


class _Saved:
    """What the pack hook hands autograd: the tensor plus a ticket that is returned on release."""
    __slots__ = ("__weakref__", "_release", "tensor")

    def __init__(self, tensor: torch.Tensor, release) -> None:
        self.tensor = tensor
        self._release = release

    def __del__(self) -> None:
        if self._release is not None:
            self._release()


class SavedActivations:
    """Exact accounting of the tensors autograd saves for the backward pass.

    Inside ``with SavedActivations(model) as saved:``, every tensor a forward pass stores for
    backward goes through `torch.autograd.graph.saved_tensors_hooks`. Each distinct storage is
    counted once, by its full size in bytes, while any graph node still holds it; a storage
    leaves the count when the graph that saved it is freed (after ``backward``, or when the
    output is dropped). ``saved.peak`` is the most bytes alive at once, ``saved.current`` what is
    alive now. The model's own parameters (and any tensors in ``exclude``) are not activations and
    are not counted: they are counted by `parameter_bytes`.

    This is the memory that grows with the batch; transient buffers freed inside one operation
    are not included, so the figure is a lower bound of the allocator's peak (on CUDA
    `measure_step` also reports ``torch.cuda.max_memory_allocated`` for comparison).
    """

    def __init__(self, *models: nn.Module, exclude: tuple = ()) -> None:
        tensors = [p for m in models for p in m.parameters()] + [b for m in models for b in m.buffers()]
        self._excluded = {_storage_key(t) for t in [*tensors, *exclude]}
        self._live: dict[tuple, list] = {}   # storage key -> [references, bytes]
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        key = _storage_key(tensor)
        if key in self._excluded or tensor.untyped_storage().nbytes() == 0:
            return _Saved(tensor, None)
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [0, tensor.untyped_storage().nbytes()]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1

        def release(key=key) -> None:
            e = self._live.get(key)
            if e is None:
                return
            e[0] -= 1
            if e[0] == 0:
                self.current -= e[1]
                del self._live[key]
        return _Saved(tensor, release)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def reset_peak(self) -> None:
        self.peak = self.current

    def __enter__(self) -> SavedActivations:  # noqa: PYI034 (typing.Self is Python 3.11+; we support 3.10)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def measure_step(step, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Run ``step()`` (forward + backward, and ``optimizer.step()`` if it does that) once and report
    its memory in bytes, counted from the tensors: ``parameters``, ``gradients`` (after the step),
    ``optimizer_state``, ``activations_peak`` (saved for backward, `SavedActivations`) and their
    ``total``. On CUDA also ``cuda_max_allocated``, the allocator's peak during the step, and
    ``cuda_allocated_at_start``, what it held when the step began (the weights, the optimizer state,
    the inputs, cuBLAS's workspace, and any other tensor alive in the process): their difference is
    what the step itself added, whatever else the process holds.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        at_start = torch.cuda.memory_allocated(device)
    with SavedActivations(model) as saved:
        step()
    result = {"parameters": parameter_bytes(model), "gradients": gradient_bytes(model),
              "optimizer_state": optimizer_state_bytes(optimizer) if optimizer is not None else 0,
              "activations_peak": saved.peak}
    result["total"] = sum(result.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        result["cuda_allocated_at_start"] = at_start
    return result


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights a model keeps as buffers: the frozen base of a QLoRA model,
    which `parameter_bytes` does not see.

    A quantized layer (`course_lib.linear4bit.Linear4bit`) stores its ``weight`` not as a
    parameter but as a buffer of packed uint8 codes, beside its absmax constants; every buffer of
    such a layer is counted. Other buffers (rotary frequencies, position ids) are not weights.
    """
    def quantized(module: nn.Module) -> bool:
        weight = module._buffers.get("weight")
        return weight is not None and weight.dtype == torch.uint8

    return sum(b.numel() * b.element_size() for m in model.modules() if quantized(m)
               for b in m.buffers(recurse=False))


CHECKPOINTING = (None, "reentrant", "default")


def measure_causal_lm_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                           checkpointing: str | None = None) -> dict:
    """One training step of a transformers causal LM on ``input_ids`` (labels = inputs: forward,
    backward, ``optimizer.step()``), measured by `measure_step`, with the 4-bit buffers counted.

    ``checkpointing``: None (off), ``"reentrant"`` or ``"default"`` (transformers' default,
    non-reentrant). Use ``"reentrant"`` to measure: the non-reentrant checkpoint recomputes each
    layer in backward under its own saved-tensor hooks, which hides that layer's activations from
    `SavedActivations` (the memory is still needed on a GPU). The result adds ``weights``
    (parameters + `quantized_weight_bytes`), and ``total`` includes the 4-bit buffers.
    """
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    set_gradient_checkpointing(model, checkpointing is not None, use_reentrant=checkpointing == "reentrant")
    optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        # a training step keeps no KV cache (with checkpointing on, transformers would warn and turn it off)
        model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
        optimizer.step()

    result = measure_step(step, model, optimizer)
    quantized = quantized_weight_bytes(model)
    result["weights"] = result["parameters"] + quantized
    result["total"] += quantized
    return result

