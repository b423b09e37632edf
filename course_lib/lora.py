"""LoRA from scratch: a low-rank update beside a frozen linear layer.

A linear layer computes ``y = W0 x``. LoRA freezes ``W0`` and learns ``ΔW = B A`` with
``A: r × in`` and ``B: out × r``, so the layer computes ``W0 x + scaling · B (A x)`` with
``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)``, rank-stabilised LoRA). ``B`` starts at
zero, so a freshly wrapped model is exactly the pretrained one.

The names follow peft (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
``lora_A``/``lora_B`` sub-modules keyed by adapter name), and adapters are saved in peft's file
layout, so ``peft.PeftModel.from_pretrained`` loads an adapter trained here and
``load_adapter`` loads one trained with peft.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (kept as ``base_layer``, frozen) plus any number of named LoRA adapters.

    Only the active adapter contributes to the output; ``disabled`` turns all of them off.
    Merged adapters live inside ``base_layer.weight`` and are listed in ``merged_adapters``.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 adapter_name: str = "default", use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.active_adapter = adapter_name
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """Add adapter ``name``: A Kaiming-uniform (as peft and nn.Linear do), B zero."""
        _check_hyperparameters(r, lora_alpha, lora_dropout, self.in_features, self.out_features)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists; delete it first or pick another name")
        weight = self.base_layer.weight
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.r[name] = r

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling · B @ A``: the update this adapter adds to ``W0`` (shape out × in)."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged_adapters:
            return out  # a merged adapter is already inside base_layer.weight
        if self.merged_adapters:  # another adapter is merged in: serve exactly the active one
            raise RuntimeError("an adapter is merged into this layer; unmerge() before switching adapters")
        a, b = self.lora_A[name], self.lora_B[name]
        h = self.lora_dropout[name](x.to(a.weight.dtype))
        return out + (b(a(h)) * self.scaling[name]).to(out.dtype)

    def merge(self, safe_merge: bool = False) -> None:
        """Fold the active adapter into ``base_layer.weight`` (``W = W0 + scaling·B@A``)."""
        name = self.active_adapter
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is already merged; merging twice would add it twice")
        weight = self.base_layer.weight
        delta = self.delta_weight(name).detach().to(weight.dtype)
        if safe_merge:
            merged = weight.data + delta
            if not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives NaN/inf weights; the layer is left unchanged")
            weight.data.copy_(merged)
        else:
            weight.data += delta
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter back out, restoring ``W0`` (to float rounding)."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data -= self.delta_weight(name).detach().to(weight.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapter!r}, merged={self.merged_adapters}"


def _check_hyperparameters(r, lora_alpha, lora_dropout, in_features, out_features) -> None:
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if r > min(in_features, out_features):
        raise ValueError(f"r={r} exceeds min(in_features, out_features) = {min(in_features, out_features)}: "
                         "a rank that large is no longer low-rank; use a smaller r")
    if lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


# ---------------------------------------------------------------------------------------------
# Injecting adapters into a model
# ---------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in ``model`` by its dotted module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, target_modules) -> bool:
    if target_modules == "all-linear":
        return name.split(".")[-1] != "lm_head"
    if isinstance(target_modules, str):  # a regex matched against the full name, as peft does
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject_lora(model: nn.Module, target_modules, r: int = 8, lora_alpha: float = 16,
                lora_dropout: float = 0.0, adapter_name: str = "default", use_rslora: bool = False) -> nn.Module:
    """Wrap the linear layers named by ``target_modules`` with LoRA and freeze everything else.

    ``target_modules`` is a list of names (a module matches if its dotted name equals one or
    ends with ``"." + name``, e.g. ``["query", "value"]`` or ``["q_proj", "v_proj"]``), a regex
    string matched against the full dotted name, or ``"all-linear"`` (every ``nn.Linear`` but
    the output layer ``lm_head``). Called again with a new ``adapter_name`` on an injected model,
    it adds a second adapter to the same layers. Returns ``model``, changed in place.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))
             and not n.endswith(".base_layer") and ".lora_" not in n]
    chosen = [n for n in names if _matches(n, target_modules)]
    if not chosen:
        other = [n for n, m in model.named_modules() if n and _matches(n, target_modules)]
        if other:
            raise TypeError(f"target_modules {target_modules!r} matches {other[:3]}, which are not nn.Linear; "
                            "LoRA here wraps linear layers only")
        short = sorted({n.split(".")[-1] for n in names})
        raise ValueError(f"target_modules {target_modules!r} matches no linear layer; "
                         f"the model's linear layers are named {short}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
        else:
            setattr(parent, child, LoRALinear(module, r, lora_alpha, lora_dropout, adapter_name, use_rslora))
    set_adapter(model, adapter_name)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one in every layer; only its parameters train."""
    layers = lora_layers(model)
    known = {n for layer in layers.values() for n in layer.lora_A}
    if name not in known:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(known)}")
    for layer in layers.values():
        layer.active_adapter = name if name in layer.lora_A else None
        for adapter in layer.lora_A:
            trainable = adapter == name
            layer.lora_A[adapter].requires_grad_(trainable)
            layer.lora_B[adapter].requires_grad_(trainable)


@contextmanager
def disable_adapters(model: nn.Module):
    """Inside this block the model computes as the base model (unmerged adapters switched off)."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (it must not be merged) from every layer."""
    for layer in lora_layers(model).values():
        if name in layer.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
        if name in layer.lora_A:
            del layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
            del layer.scaling[name], layer.r[name]
            if layer.active_adapter == name:
                layer.active_adapter = next(iter(layer.lora_A), None)


def merge(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapter into the base weights of every layer; returns ``model``."""
    for layer in lora_layers(model).values():
        if layer.active_adapter is not None:
            layer.merge(safe_merge)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` in every layer; returns ``model``."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and put plain ``nn.Linear`` layers back: a model without LoRA."""
    merge(model, safe_merge=True)
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    return model


def delta_weight(layer: LoRALinear, name: str) -> torch.Tensor:
    """The update ``scaling · B @ A`` of adapter ``name`` in one layer."""
    return layer.delta_weight(name)


# ---------------------------------------------------------------------------------------------
# Weighted combination of adapters
# ---------------------------------------------------------------------------------------------
def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], new_name: str,
                         combination_type: str = "cat") -> None:
    """Combine adapters into a new one, as peft's ``add_weighted_adapter`` does.

    ``"cat"`` (exact): stack ``w_i · scaling_i · A_i`` along the rank and the ``B_i`` beside each
    other, so ``B_new A_new = Σ w_i ΔW_i`` exactly (rank = Σ r_i, scaling 1).
    ``"linear"``: needs equal ranks; ``A_new = Σ sqrt(w_i·scaling_i) A_i`` and
    ``B_new = Σ sqrt(w_i·scaling_i) B_i`` (peft's choice of splitting the weight between A and
    B). Their product has cross terms ``B_i A_j``: it is *not* ``Σ w_i ΔW_i``.
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("give one weight per adapter")
    if combination_type not in ("cat", "linear"):
        raise ValueError(f"combination_type must be 'cat' or 'linear', got {combination_type!r}")
    for layer in lora_layers(model).values():
        if not all(a in layer.lora_A for a in adapters):
            continue
        ranks = [layer.r[a] for a in adapters]
        if combination_type == "linear" and len(set(ranks)) > 1:
            raise ValueError(f"'linear' needs adapters of equal rank, got {ranks}; use 'cat'")
        r = sum(ranks) if combination_type == "cat" else ranks[0]
        layer.add_adapter(new_name, r, lora_alpha=r)  # scaling 1: the weights carry the scale
        with torch.no_grad():
            new_a, new_b = layer.lora_A[new_name].weight, layer.lora_B[new_name].weight
            if combination_type == "cat":
                new_a.copy_(torch.cat([w * layer.scaling[a] * layer.lora_A[a].weight
                                       for a, w in zip(adapters, weights)]))
                new_b.copy_(torch.cat([layer.lora_B[a].weight for a in adapters], dim=1))
            else:
                factors = [math.copysign(math.sqrt(abs(w * layer.scaling[a])), w) for a, w in zip(adapters, weights)]
                new_a.copy_(sum(f * layer.lora_A[a].weight for a, f in zip(adapters, factors)))
                new_b.copy_(sum(math.sqrt(abs(w * layer.scaling[a])) * layer.lora_B[a].weight
                                for a, w in zip(adapters, weights)))
    set_adapter(model, new_name)


# ---------------------------------------------------------------------------------------------
# Saving and loading in peft's layout
# ---------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` as peft does.

    Keys are ``base_model.model.<module>.lora_A.weight`` (peft drops the adapter name on save).
    """
    from safetensors.torch import save_file

    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"no layer holds adapter {adapter_name!r}")
    state, ranks, alphas = {}, set(), set()
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            tensor = getattr(layer, part)[adapter_name].weight.detach()
            state[f"base_model.model.{name}.{part}.weight"] = tensor.contiguous().cpu()
        ranks.add(layer.r[adapter_name])
        alphas.add(layer.scaling[adapter_name] * layer.r[adapter_name])
    if len(ranks) > 1:
        raise ValueError(f"adapter {adapter_name!r} has several ranks {sorted(ranks)}; peft's config holds one")
    first = next(iter(layers.values()))
    dropout = first.lora_dropout[adapter_name]
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": ranks.pop(), "lora_alpha": alphas.pop(),
        "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        "target_modules": sorted({n.split(".")[-1] for n in layers}), "bias": "none",
        "use_rslora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "modules_to_save": None, "use_dora": False,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def load_adapter(model: nn.Module, directory, adapter_name: str = "default") -> nn.Module:
    """Inject and fill an adapter saved by `save_adapter` or by peft's ``save_pretrained``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {config.get('peft_type')} adapter, not LORA")
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    modules = sorted({re.sub(r"^base_model\.model\.|\.lora_[AB](\.\w+)?\.weight$", "", k) for k in state})
    missing = [m for m in modules if m not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"the adapter names modules this model lacks, e.g. {missing[:3]}: "
                         "is it an adapter for another base model?")
    inject_lora(model, _exact(modules),
                r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config.get("lora_dropout", 0.0),
                adapter_name=adapter_name, use_rslora=config.get("use_rslora", False))
    layers = lora_layers(model)
    with torch.no_grad():
        for key, tensor in state.items():
            name = re.sub(r"^base_model\.model\.", "", key)
            module, part = re.match(r"(.*)\.(lora_[AB])(?:\.\w+)?\.weight$", name).groups()
            target = getattr(layers[module], part)[adapter_name].weight
            if target.shape != tensor.shape:
                raise ValueError(f"{module}.{part}: the adapter has shape {tuple(tensor.shape)}, the model "
                                 f"expects {tuple(target.shape)}: the adapter belongs to another base model")
            target.copy_(tensor)
    return model


def _exact(modules: list[str]) -> str:
    """A regex that matches exactly these dotted module names."""
    return "|".join(re.escape(m) for m in modules)
