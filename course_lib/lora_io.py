"""Saving and loading LoRA adapters in peft's file layout.

An adapter is two files in a folder, exactly what peft's ``save_pretrained`` writes:

* ``adapter_model.safetensors``: per wrapped layer its ``A`` and ``B`` matrices under the keys
  ``base_model.model.<module name>.lora_A.weight`` / ``.lora_B.weight`` (peft leaves the adapter
  name out of the file; the folder is the adapter);
* ``adapter_config.json``: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
  ``use_rslora`` and the rest of peft's ``LoraConfig``, with ``rank_pattern`` /
  ``alpha_pattern`` for layers whose rank or alpha differ from the most common one.

So ``peft.PeftModel.from_pretrained(base, folder)`` loads an adapter saved by `save_adapter`, and
`load_adapter` loads one saved by peft (a plain LoRA one: DoRA, biases and the like are refused).
The adapter itself, and how it is injected, is `course_lib.lora`'s business.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .lora import adapter_names, inject_adapter, linear_layers, lora_layers, matches

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _most_common_and_pattern(values: dict[str, float]) -> tuple[float, dict[str, float]]:
    """peft's config holds one r / lora_alpha plus a pattern of per-module exceptions."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(n): v for n, v in values.items() if v != common}


def save_adapter(model: nn.Module, directory, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` as peft's ``save_pretrained`` does.

    Tensor keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (peft drops
    the adapter name on save); layers whose rank or alpha differ from the most common one go to
    the config's ``rank_pattern`` / ``alpha_pattern``. ``task_type`` is peft's (e.g.
    ``"CAUSAL_LM"``, ``"FEATURE_EXTRACTION"``) or None. Returns the directory.
    """
    from safetensors.torch import save_file

    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"no layer holds adapter {adapter_name!r}; this model has {adapter_names(model)}")
    if len({m.use_rslora[adapter_name] for m in layers.values()}) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes use_rslora True and False; peft's config holds one value")
    state = {f"base_model.model.{name}.{part}.weight": getattr(m, part)[adapter_name].weight.detach().cpu()
             .contiguous() for name, m in layers.items() for part in ("lora_A", "lora_B")}
    r, rank_pattern = _most_common_and_pattern({n: m.r[adapter_name] for n, m in layers.items()})
    alpha, alpha_pattern = _most_common_and_pattern({n: m.lora_alpha[adapter_name] for n, m in layers.items()})
    # target_modules: the short names if they pick exactly these layers, else the full names
    short = sorted({n.split(".")[-1] for n in layers})
    targets = short if {n for n in linear_layers(model) if matches(n, short)} == set(layers) else sorted(layers)
    dropout = next(iter(layers.values())).lora_dropout[adapter_name]
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
        "lora_dropout": getattr(dropout, "p", 0.0), "target_modules": targets,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": next(iter(layers.values())).use_rslora[adapter_name], "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False, "lora_bias": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _pattern_value(pattern: dict, name: str, default):
    """peft's lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)`` wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_[AB])(?:\.[^.]+)?\.weight$")


def load_adapter(model: nn.Module, directory, adapter_name: str = "default") -> nn.Module:
    """Inject and fill an adapter saved by `save_adapter` or by peft's ``save_pretrained``.

    Everything is checked before the model changes: the config must be a plain LoRA one, every
    key must name a linear layer of ``model``, and every A / B must fit that layer's shape.
    Returns ``model`` with the adapter active.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {config.get('peft_type')!r} adapter, not 'LORA'; load it with peft")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "modules_to_save", "lora_bias") if config.get(k)]
    unsupported += ["bias"] if config.get("bias", "none") != "none" else []
    if unsupported:
        raise ValueError(f"the adapter uses {unsupported}, which course_lib.lora does not implement; load it with peft")
    trained_on = config.get("base_model_name_or_path")
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    linear = linear_layers(model)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected key {key!r} in {ADAPTER_WEIGHTS}: not a LoRA A/B weight")
        name = match["module"]
        if name not in linear:
            raise ValueError(f"key {key!r} names module {name!r}, which is not a linear layer of this model: the "
                             f"adapter belongs to another base model (it was trained on {trained_on!r})")
        tensors.setdefault(name, {})[match["part"]] = tensor
    settings = {}
    for name, parts in tensors.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{name}: the adapter holds {sorted(parts)} but needs both lora_A and lora_B")
        module, r = linear[name], parts["lora_A"].shape[0]
        for part, expected in (("lora_A", (r, module.in_features)), ("lora_B", (module.out_features, r))):
            if tuple(parts[part].shape) != expected:
                raise ValueError(f"{name}.{part}: the adapter has shape {tuple(parts[part].shape)}, this model needs "
                                 f"{expected}: the adapter belongs to another base model (trained on {trained_on!r})")
        alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        settings[name] = (r, alpha, config.get("lora_dropout", 0.0), config.get("use_rslora", False))
    inject_adapter(model, settings, adapter_name)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, parts in tensors.items():
            for part, tensor in parts.items():
                getattr(layers[name], part)[adapter_name].weight.copy_(tensor)
    return model
