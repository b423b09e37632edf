"""Memory counts checked against what AdamW is documented to store."""

import torch
from torch import nn

from course_lib import memory


def test_adamw_state_is_two_float32_moments_per_trainable_parameter():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert memory.optimizer_state_bytes(optimizer) == 0  # nothing before the first step
    model(torch.randn(3, 10)).sum().backward()
    optimizer.step()
    trainable = 20 * 5 + 5
    assert memory.optimizer_state_bytes(optimizer) == 2 * 4 * trainable
    assert memory.parameter_bytes(model, trainable_only=True) == 4 * trainable
    assert memory.parameter_bytes(model) == 4 * (10 * 20 + 20 + trainable)
