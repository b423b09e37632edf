"""Memory measurement: what a training set-up holds, counted from the tensors themselves.

Chapter 01 uses the optimizer-state count to compare LoRA with full fine-tuning; chapters 03
and 05 extend this module with activation accounting and an estimator.
"""

from __future__ import annotations

import torch
from torch import nn


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
