"""LoRA from scratch: a low-rank update beside a frozen linear layer.

A linear layer computes ``y = W0 x``. LoRA freezes ``W0`` and learns ``ΔW = scaling · B A`` with
``A: r × in`` and ``B: out × r``, so the layer computes ``W0 x + scaling · B (A x)``, where
``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rank-stabilised LoRA, ``use_rslora``).
``A`` starts Kaiming-uniform and ``B`` at zero, so a freshly wrapped model *is* the pretrained one.

The vocabulary is peft's (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``; ``lora_A`` /
``lora_B`` sub-modules keyed by adapter name). `course_lib.lora_io` saves adapters in peft's file
layout, so ``peft.PeftModel.from_pretrained`` loads an adapter trained here and
`course_lib.lora_io.load_adapter` loads one trained with peft.

The base layer may also be a 4-bit `course_lib.linear4bit.Linear4bit`: that is QLoRA (chapter 02).
Its weight is packed codes, so merging into it is refused; `course_lib.qlora` has the explicit
ways (dequantize then merge, or merge and re-quantize, lossy and measured).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from .checks import boolean, fraction, known_names, positive_int, positive_number, regex
from .linear4bit import Linear4bit
from .surgery import replace_module, replace_modules, short_list

BASE_TYPES = (nn.Linear, Linear4bit)  # the layers LoRA can wrap


class LoRALinear(nn.Module):
    """An ``nn.Linear`` or 4-bit ``Linear4bit`` (kept frozen as ``base_layer``) plus named LoRA adapters.

    Per adapter ``name``: ``lora_A[name]`` (``nn.Linear(in, r)``), ``lora_B[name]``
    (``nn.Linear(r, out)``), ``lora_dropout[name]``, and the numbers ``r[name]``,
    ``lora_alpha[name]``, ``scaling[name]``. The output is ``base_layer(x)`` plus
    ``scaling · B(A(dropout(x)))`` for every adapter in ``active_adapters`` that is not already
    merged into ``base_layer.weight`` (those are listed in ``merged_adapters``). With
    ``disable_adapters`` set the layer computes the base model's output.
    """

    def __init__(self, base_layer: nn.Linear | Linear4bit, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, adapter_name: str = "default", use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, BASE_TYPES):
            raise TypeError(f"LoRALinear wraps an nn.Linear or a course_lib.linear4bit.Linear4bit, got "
                            f"{type(base_layer).__name__}; choose target_modules that name linear layers")
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)

    @property
    def active_adapter(self) -> str | None:
        """The (first) active adapter, or None."""
        return self.active_adapters[0] if self.active_adapters else None

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """Add adapter ``name`` and make it the active one: A Kaiming-uniform as in peft, B zero."""
        _check_hyperparameters(r, lora_alpha, lora_dropout, self.in_features, self.out_features, use_rslora)
        _check_name(name)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists; delete it first or pick another name")
        weight = self.base_layer.weight
        # peft keeps adapters in float32 when the base is half precision or quantized (uint8 codes)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, lora_alpha, use_rslora
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged); if it was active, none is active now."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge() before deleting it")
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.r, self.lora_alpha, self.use_rslora,
                      self.scaling):
            del table[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling · B @ A``: the update adapter ``name`` adds to ``W0`` (shape out × in)."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()  # as peft does: a disabled layer must compute W0 x
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue  # already inside base_layer.weight
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(lora_A.weight.dtype))  # LoRA runs in the adapter's dtype
            result = result + lora_B(lora_A(h)) * self.scaling[name]
        return result.to(dtype)

    def _to_merge(self, adapter_names) -> list[str]:
        if isinstance(self.base_layer, Linear4bit):
            raise TypeError(
                "cannot merge into a 4-bit base (Linear4bit): its weight is packed codes, and dequantize -> add ΔW "
                "-> re-quantize rounds most of the adapter's update away. Serve the adapter unmerged on the 4-bit "
                "base, or call course_lib.qlora.dequantize_model(model) first and merge into float weights "
                "(exact), or, knowingly, course_lib.qlora.merge_and_requantize(model) (lossy; it reports the error)")
        names = list(self.active_adapters) if adapter_names is None else known_names(
            "adapter_names", adapter_names, list(self.lora_A), owner="this layer")
        merged = [name for name in names if name in self.merged_adapters]
        if merged:
            raise ValueError(f"adapter {merged[0]!r} is already merged (merged: {self.merged_adapters}); merging "
                             "it again would add its update twice. Call unmerge() first")
        return names

    @torch.no_grad()
    def _deltas(self, names: list[str], where: str = "LoRALinear", safe_merge: bool = False) -> list[torch.Tensor]:
        """ΔW of each adapter in ``names`` in the base weight's dtype; raises, naming ``where``, if one
        holds NaN/inf (or, with ``safe_merge``, if ``W + Σ ΔW`` does). Changes nothing."""
        dtype = self.base_layer.weight.dtype
        deltas = [self.delta_weight(name).detach().to(dtype) for name in names]
        bad = [name for name, delta in zip(names, deltas) if not torch.isfinite(delta).all()]
        if bad:
            raise ValueError(f"{where}: adapter(s) {bad} hold NaN/inf in their update scaling · B @ A (in {dtype}); "
                             "nothing was merged. Check the adapter's A and B (did training diverge?)")
        if safe_merge and not torch.isfinite(sum(deltas, self.base_layer.weight.detach().clone())).all():
            raise ValueError(f"{where}: W + ΔW of adapter(s) {names} holds NaN/inf (the base weight already does, or "
                             f"the sum overflows {dtype}); nothing was merged")
        return deltas

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into ``base_layer.weight``: ``W += scaling · B @ A``.

        Checked before the weight changes: an adapter already merged (or named twice) and an update
        holding NaN/inf (also when cast to a float16 base) raise ``ValueError``. peft checks for
        NaN/inf only with ``safe_merge``; here it is always done (one more ``B @ A``, cheap next to a
        merge), and ``safe_merge`` also checks the sum ``W + ΔW``.
        """
        names = self._to_merge(adapter_names)
        weight = self.base_layer.weight
        for delta in self._deltas(names, safe_merge=safe_merge):
            weight += delta  # one adapter at a time, in peft's order
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter back out, restoring ``W0`` (to float rounding)."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            weight -= self.delta_weight(self.merged_adapters.pop()).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapters}, merged={self.merged_adapters}"


def _check_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")


def _check_hyperparameters(r, lora_alpha, lora_dropout, in_features, out_features, use_rslora=False) -> None:
    positive_int("r", r, "typically 4-64")
    if r > min(in_features, out_features):
        raise ValueError(f"r={r} exceeds min(in_features, out_features) = {min(in_features, out_features)} "
                         f"of a {in_features}->{out_features} layer; that is no longer low-rank: use a smaller r")
    positive_number("lora_alpha", lora_alpha, "often 2*r")
    fraction("lora_dropout", lora_dropout, "0.0 disables it")
    boolean("use_rslora", use_rslora)


# ---------------------------------------------------------------------------------------------
# Injecting adapters into a model, and switching between them
# ---------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` in ``model`` by its dotted module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def matches(name: str, target_modules) -> bool:
    """peft's rule: a string is a regex on the full dotted name; a list matches by name or suffix."""
    if isinstance(target_modules, str):
        what_to_do = ("peft takes a list of module names such as ['q_proj', 'v_proj'] or a regex string "
                      "matching the full dotted name, e.g. r'.*\\.(q_proj|v_proj)'")
        return regex("target_modules", target_modules, what_to_do).fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules of ``model``, leaving out the insides of LoRALinear layers."""
    wrapped = lora_layers(model)
    out = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if name and not any(".".join(parts[:i]) in wrapped for i in range(1, len(parts))):
            out[name] = module
    return out


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers LoRA can target, by name: ``nn.Linear``, `Linear4bit` and (already wrapped)
    `LoRALinear`, leaving out the layers inside a `LoRALinear`."""
    return {n: m for n, m in _candidates(model).items() if isinstance(m, (*BASE_TYPES, LoRALinear))}


def _select(model: nn.Module, target_modules) -> list[str]:
    modules = _candidates(model)
    linear = list(linear_layers(model))
    if target_modules == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n in linear if modules[n] is not output and n.split(".")[-1] != "lm_head"]
    if not isinstance(target_modules, str) and not (
            isinstance(target_modules, (list, tuple, set)) and all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"target_modules must be a list of module names, a regex string or 'all-linear', "
                        f"got {target_modules!r}")
    chosen = [n for n in modules if matches(n, target_modules)]
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in chosen if n not in linear]
    if wrong:
        raise TypeError(f"target_modules {target_modules!r} matches modules that are not linear layers: "
                        f"{short_list(wrong)}; LoRA here wraps linear layers only, so name those")
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in linear})
        raise ValueError(f"target_modules {target_modules!r} matches no module. The model's nn.Linear layers "
                         f"are {short_list(linear)}; by last name: {suffixes}")
    return chosen


def inject_adapter(model: nn.Module, settings: dict[str, tuple], adapter_name: str = "default") -> nn.Module:
    """Add ``adapter_name`` to each layer named in ``settings`` with that layer's
    ``(r, lora_alpha, lora_dropout, use_rslora)``, freeze everything else and make it active.

    `inject_lora` gives every chosen layer the same settings; `course_lib.lora_io.load_adapter`
    gives each layer those saved for it. Everything is checked before anything changes, so a bad
    argument leaves the model as it was. Returns ``model``, changed in place.
    """
    modules = dict(model.named_modules())
    names = list(settings)
    _check_name(adapter_name)
    if not names:
        raise ValueError(f"no layer to add adapter {adapter_name!r} to: settings is empty; name at least one linear layer")
    unknown = [name for name in names if not isinstance(modules.get(name), (*BASE_TYPES, LoRALinear))]
    if unknown:
        raise ValueError(f"{short_list(unknown)} name no linear layer of this model; LoRA wraps nn.Linear layers")
    for name in names:
        r, alpha, dropout, use_rslora = settings[name]
        _check_hyperparameters(r, alpha, dropout, modules[name].in_features, modules[name].out_features, use_rslora)
        if isinstance(modules[name], LoRALinear) and adapter_name in modules[name].lora_A:
            raise ValueError(f"{name} already has an adapter {adapter_name!r}; pick another adapter_name")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        if isinstance(modules[name], LoRALinear):
            modules[name].add_adapter(adapter_name, *settings[name])
        else:
            replace_module(model, name, LoRALinear(modules[name], *settings[name][:3], adapter_name,
                                                   settings[name][3]))
    set_adapter(model, adapter_name)
    return model


def inject_lora(model: nn.Module, target_modules, r: int = 8, lora_alpha: float = 16,
                lora_dropout: float = 0.0, adapter_name: str = "default", use_rslora: bool = False) -> nn.Module:
    """Wrap the linear layers named by ``target_modules`` with LoRA and freeze everything else.

    ``target_modules`` is matched as peft does: a list of names (a module matches if its dotted
    name equals one or ends with ``"." + name``, e.g. ``["query", "value"]`` or
    ``["q_proj", "v_proj"]``), a regex string that must match the *full* dotted name, or
    ``"all-linear"`` (every ``nn.Linear`` except the output layer ``lm_head``).
    Called again on an injected model, it adds the new adapter to the same ``LoRALinear`` layers.
    The new adapter becomes the active, trainable one. Returns ``model``, changed in place.
    Each ``A`` is drawn from torch's default generator, as peft draws it: torch seeds that
    generator at random in every process, so seed it first (``train.seed_everything``) for the
    same starting adapter in every run.
    """
    names = _select(model, target_modules)
    return inject_adapter(model, dict.fromkeys(names, (r, lora_alpha, lora_dropout, use_rslora)), adapter_name)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a tensor shared by two modules is counted once."""
    params = list(model.parameters())  # parameters() yields each tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of every adapter in ``model`` (in any layer), sorted."""
    return sorted({n for layer in lora_layers(model).values() for n in layer.lora_A})


def adapter_state(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """Per `LoRALinear` layer (by name): its ``adapters``, the ``active`` ones, and those
    ``merged`` into its base weight: what a model computes now, e.g. before exporting it."""
    return {name: {"adapters": list(layer.lora_A), "active": list(layer.active_adapters),
                   "merged": list(layer.merged_adapters)} for name, layer in lora_layers(model).items()}


def set_adapter(model: nn.Module, name: str | list[str]) -> None:
    """Make adapter ``name`` (or a list of them, whose outputs add up) active; only they train."""
    layers, known = lora_layers(model).values(), adapter_names(model)
    names = known_names("name", [name] if isinstance(name, str) else name, known)
    for layer in layers:
        layer.active_adapters = [n for n in names if n in layer.lora_A]
        for adapter in layer.lora_A:
            layer.lora_A[adapter].requires_grad_(adapter in names)
            layer.lora_B[adapter].requires_grad_(adapter in names)


@contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` the model computes as the base model.

    Merged adapters are unmerged on the first forward inside the block (as in peft).
    """
    layers = list(lora_layers(model).values())
    try:
        for layer in layers:
            layer.disable_adapters = True
        yield model
    finally:
        for layer in layers:
            layer.disable_adapters = False


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its parameters from every layer; refused (nothing removed) if it
    is merged into any layer's base weight."""
    layers = {n: layer for n, layer in lora_layers(model).items() if name in layer.lora_A}
    if not layers:
        raise ValueError(f"unknown adapter {name!r}; this model has {adapter_names(model)}")
    merged = [n for n, layer in layers.items() if name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into the base weight of {short_list(merged)}; "
                         "unmerge(model) before deleting it")
    for layer in layers.values():
        layer.delete_adapter(name)


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """Merge adapters (default: the active ones) into the base weights of every layer; returns ``model``.

    Every layer is checked before any weight changes, so an error leaves the model as it was:
    unknown or repeated ``adapter_names``, an adapter already merged, a 4-bit base, and an update
    ``scaling · B @ A`` holding NaN/inf raise ``ValueError`` (``TypeError`` for the 4-bit base).
    Stricter than peft by design: peft looks for NaN/inf only with ``safe_merge=True`` and otherwise
    writes them into the base weights; here the update is always checked (one more ``B @ A`` per
    layer, cheap next to a merge). ``safe_merge`` also checks the sum ``W + ΔW`` (a base weight
    already holding NaN/inf, or a float16 sum that overflows).
    """
    layers = lora_layers(model)
    if adapter_names is not None:
        known = sorted({n for layer in layers.values() for n in layer.lora_A})
        adapter_names = known_names("adapter_names", adapter_names, known)
    plan = [(name, layer, layer._to_merge(None if adapter_names is None else
                                          [n for n in adapter_names if n in layer.lora_A]))
            for name, layer in layers.items()]
    for name, layer, names in plan:
        layer._deltas(names, name, safe_merge)  # raises before any weight changes
    for _, layer, names in plan:
        layer.merge(names)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` in every layer; returns ``model``."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def _put_back_linear(model: nn.Module) -> nn.Module:
    replace_modules(model, {name: layer.base_layer for name, layer in lora_layers(model).items()})
    return model


def unload(model: nn.Module) -> nn.Module:
    """Unmerge, then put the plain ``nn.Linear`` layers back: the base model without LoRA."""
    return _put_back_linear(unmerge(model))


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters and put plain ``nn.Linear`` layers back: a model without LoRA.

    Checked as `merge` checks (an adapter update holding NaN/inf is refused even without
    ``safe_merge``, unlike peft); on an error the model keeps its LoRA layers, unmerged.
    """
    return _put_back_linear(merge(model, safe_merge=safe_merge))


def delta_weight(layer: LoRALinear, name: str) -> torch.Tensor:
    """The update ``scaling · B @ A`` of adapter ``name`` in one layer."""
    return layer.delta_weight(name)
