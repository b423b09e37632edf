"""Combining LoRA adapters into one: peft's ``add_weighted_adapter``, "cat" and "linear".

Two adapters trained on different data (chapter 01 trains one on code from modules named a-l,
one on m-z) can be blended into a third without training: its update should be ``Σ w_i ΔW_i``. Stacking the
adapters along the rank ("cat") gives exactly that, at the sum of their ranks; averaging their
A and B matrices ("linear") keeps the rank but adds cross terms, so it is only approximately the
blend. `add_weighted_adapter` builds either, as peft does, and makes it the active adapter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .checks import finite_numbers
from .lora import adapter_names, lora_layers, set_adapter


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], new_name: str,
                         combination_type: str = "cat") -> None:
    """Combine adapters into a new adapter ``new_name`` (made active), as peft does.

    Write ``s_i`` for adapter i's scaling, so ``ΔW_i = s_i B_i A_i``. The new adapter has
    scaling 1 (peft gives it ``lora_alpha = r``) and adapter 0's dropout.

    * ``"cat"`` (exact): ``A_new = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`` stacked along the rank and
      ``B_new = [B_1, B_2, ...]`` side by side, so ``B_new A_new = Σ w_i ΔW_i`` exactly; the rank
      is ``Σ r_i``.
    * ``"linear"``: needs equal ranks. With ``c_i = sqrt(|w_i s_i|)``,
      ``A_new = Σ sign(w_i s_i) c_i A_i`` and ``B_new = Σ c_i B_i``. The product has cross terms
      ``c_i c_j B_i A_j`` (i ≠ j), so it is *not* ``Σ w_i ΔW_i``; it keeps rank r.

    With a single adapter peft always uses "linear" (then both give ``w ΔW``); so do we.
    Unlike peft, an existing ``new_name`` raises instead of being silently kept, and the new
    adapter's scaling is 1 even when the inputs used rsLoRA (peft 0.21 gives it
    ``sqrt(r_new)`` then, which scales the blend by ``sqrt(r_new)``). Everything is checked (names,
    finite weights, ranks in every layer) before the first layer changes.
    """
    layers, known = lora_layers(model).values(), adapter_names(model)
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    weights = finite_numbers("weights", weights, "one per adapter, e.g. [0.5, 0.5]")
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise ValueError(f"unknown adapter {unknown[0]!r}; this model has {known}")
    if new_name in known:
        raise ValueError(f"adapter {new_name!r} already exists; delete it first or pick another name")
    if combination_type not in ("cat", "linear"):
        raise ValueError(f"combination_type must be 'cat' (exact) or 'linear', got {combination_type!r}")
    if len(adapters) == 1:
        combination_type = "linear"
    plan = []  # check every layer before changing any
    for layer in layers:
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        ranks = [layer.r[a] for a, _ in present]
        if combination_type == "linear" and len(set(ranks)) > 1:
            raise ValueError(f"'linear' needs adapters of equal rank, got ranks {ranks}; use 'cat'")
        r = sum(ranks) if combination_type == "cat" else ranks[0] if ranks else 0
        if r > min(layer.in_features, layer.out_features):
            raise ValueError(f"'cat' of ranks {ranks} gives rank {r} > min(in_features, out_features) = "
                             f"{min(layer.in_features, layer.out_features)}; combine fewer adapters or use 'linear'")
        if present:
            plan.append((layer, present, r))
    for layer, present, r in plan:
        dropout = layer.lora_dropout[present[0][0]]
        layer.add_adapter(new_name, r, lora_alpha=r, lora_dropout=getattr(dropout, "p", 0.0))
        new_A, new_B = layer.lora_A[new_name].weight, layer.lora_B[new_name].weight
        A = {a: layer.lora_A[a].weight for a, _ in present}
        B = {a: layer.lora_B[a].weight for a, _ in present}
        if combination_type == "cat":
            new_A.copy_(torch.cat([w * layer.scaling[a] * A[a] for a, w in present], dim=0))
            new_B.copy_(torch.cat([B[a] for a, _ in present], dim=1))
        else:
            c = {a: math.sqrt(abs(w * layer.scaling[a])) for a, w in present}
            new_A.copy_(sum(math.copysign(c[a], w * layer.scaling[a]) * A[a] for a, w in present))
            new_B.copy_(sum(c[a] * B[a] for a, _ in present))
    set_adapter(model, new_name)
