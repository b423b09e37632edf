"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), from scratch.

An adapter is a small residual MLP inserted after a sublayer of every transformer block:

    z ↦ z + W_up · f(W_down · z + b_down) + b_up,     W_down: m × h,  W_up: h × m,  m ≪ h

It adds 2·h·m + m + h parameters (two weight matrices and two bias vectors) per insertion point.
``W_up`` and ``b_up`` start at zero, so a fresh adapter is the identity and the adapted model
computes exactly what the base model did; training moves it away from there. Houlsby places one
adapter after the attention sublayer and one after the MLP of each block; Pfeiffer only after
the MLP. peft has no configuration for this method, hence this module.

In a Llama block (SmolLM2) the attention sublayer's output is ``self_attn.o_proj`` and the MLP's
is ``mlp.down_proj``: the adapter wraps those linear layers, before the block's residual sum.
Unlike LoRA, an adapter adds a nonlinearity on the forward path, so it cannot be merged into the
weights: it costs time at inference too.
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import positive_int
from .surgery import replace_module

PLACEMENTS = {
    "houlsby": ("o_proj", "down_proj"),   # after attention and after the MLP
    "pfeiffer": ("down_proj",),           # after the MLP only
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """``z + up(act(down(z)))`` with ``up`` initialised to zero: the identity until trained."""

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str = "relu",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        positive_int("bottleneck_size", bottleneck_size)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.hidden_size, self.bottleneck_size = hidden_size, bottleneck_size
        self.down = nn.Linear(hidden_size, bottleneck_size, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck_size, hidden_size, dtype=dtype, device=device)
        nn.init.zeros_(self.down.bias)   # no unit starts switched off (a dead ReLU never learns)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(self.act(self.down(z)))


class AdaptedLinear(nn.Module):
    """A frozen linear layer followed by a bottleneck adapter on its output."""

    def __init__(self, base_layer: nn.Linear, bottleneck_size: int, activation: str = "relu") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = BottleneckAdapter(base_layer.out_features, bottleneck_size, activation,
                                         dtype=base_layer.weight.dtype, device=base_layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))


def adapter_parameter_count(config, bottleneck_size: int, placement: str = "houlsby") -> int:
    """The formula: (adapters per block) × layers × (2·h·m + m + h), h = hidden size, m = bottleneck.

    ``config`` is a transformers config with ``hidden_size`` and ``num_hidden_layers`` (in a Llama
    block both ``o_proj`` and ``down_proj`` output ``hidden_size`` features).
    """
    per_block = len(_targets(placement))
    h, m = config.hidden_size, bottleneck_size
    return per_block * config.num_hidden_layers * (2 * h * m + m + h)


def _targets(placement: str) -> tuple[str, ...]:
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; known: {sorted(PLACEMENTS)}")
    return PLACEMENTS[placement]


def inject_adapters(model: nn.Module, bottleneck_size: int, placement: str = "houlsby",
                    activation: str = "relu") -> nn.Module:
    """Freeze ``model`` and wrap the output projection of each sublayer named by ``placement``
    (see `PLACEMENTS`) with a `BottleneckAdapter`; only the adapters are trainable. In place."""
    positive_int("bottleneck_size", bottleneck_size)
    targets = _targets(placement)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"no linear layer named {' or '.join(targets)} in {type(model).__name__}: "
                         "bottleneck adapters are placed by Llama-style module names")
    model.requires_grad_(False)
    for name in names:
        replace_module(model, name, AdaptedLinear(model.get_submodule(name), bottleneck_size, activation))
    return model


def adapter_layers(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """The adapters in ``model``, by the name of the module they belong to."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)}
