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

Nothing is half-done (DESIGN.md, principle 8). `save_adapter` writes both files into a hidden
folder beside the target and renames it into place (`course_lib.atomic_files`), so a crash leaves
the old adapter or none, never new weights beside an old config; it refuses to replace a folder
that already holds files unless asked. `load_adapter` checks the config, every tensor's name,
shape, rank and values before it changes the model, so a bad adapter leaves the model as it was.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .atomic_files import atomic_output
from .checks import fraction, positive_int, positive_number, regex
from .lora import adapter_names, inject_adapter, linear_layers, lora_layers, matches

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RESAVE = "save the adapter again (course_lib.lora_io.save_adapter or peft's save_pretrained)"


def _most_common_and_pattern(values: dict[str, float]) -> tuple[float, dict[str, float]]:
    """peft's config holds one r / lora_alpha plus a pattern of per-module exceptions."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(n): v for n, v in values.items() if v != common}


ADAPTER_FILES = {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md"}  # what an adapter folder holds (peft adds README.md)


def _check_target(directory: Path, overwrite: bool) -> None:
    """Refuse a file, and a folder that already holds files unless ``overwrite`` (an empty one is
    fine). The folder is replaced as a whole, so even with ``overwrite`` it must hold nothing but
    an adapter's files, and it cannot be the working directory."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a folder: choose another path for the adapter")
    if not directory.is_dir():
        return
    held = sorted(p.name for p in directory.iterdir())
    if held and not overwrite:
        raise FileExistsError(f"{directory} already holds {held[:3]}{' ...' if len(held) > 3 else ''}: pass "
                              f"overwrite=True to replace that folder, or choose another one")
    foreign = [name for name in held if name not in ADAPTER_FILES]
    if foreign:
        raise FileExistsError(f"{directory} holds {foreign[:3]}{' ...' if len(foreign) > 3 else ''}, which are no "
                              f"adapter files, and overwrite=True would delete them: choose another folder")
    if os.path.samefile(directory, "."):
        raise FileExistsError(f"{directory} is the working directory, which save_adapter cannot replace (it "
                              "writes a whole new folder): pass a subfolder such as 'adapter'")


def save_adapter(model: nn.Module, directory, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, task_type: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` as peft's ``save_pretrained`` does.

    Tensor keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (peft drops
    the adapter name on save); layers whose rank or alpha differ from the most common one go to
    the config's ``rank_pattern`` / ``alpha_pattern``. ``task_type`` is peft's (e.g.
    ``"CAUSAL_LM"``, ``"FEATURE_EXTRACTION"``) or None. Returns the directory.

    Both files are written into a hidden folder beside ``directory`` that is renamed into place
    once complete, so a crash leaves the old adapter (or none), never new weights beside an old
    config. A ``directory`` that exists and holds files raises ``FileExistsError`` unless
    ``overwrite`` is set; then the old folder is removed only after the new one is complete. The
    folder is replaced as a whole, so one holding files other than an adapter's, or the working
    directory, is refused even then. An adapter with NaN or inf values is refused
    (``ValueError``). Nothing is written when anything is refused.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    _check_target(directory, overwrite)
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"no layer holds adapter {adapter_name!r}; this model has {adapter_names(model)}")
    if len({m.use_rslora[adapter_name] for m in layers.values()}) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes use_rslora True and False; peft's config holds one value")
    state = {f"base_model.model.{name}.{part}.weight": getattr(m, part)[adapter_name].weight.detach().cpu()
             .contiguous() for name, m in layers.items() for part in ("lora_A", "lora_B")}
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"adapter {adapter_name!r}: {key} holds values that are not finite (NaN or inf), "
                             "so training diverged: train again with a lower learning rate; nothing was saved")
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
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    # overwrite=True here: _check_target has refused a folder with files in it unless asked
    # an absolute target, so that "." or "out/.." also have a parent to write the hidden folder in
    with atomic_output(Path(os.path.abspath(directory)), overwrite=True, directory=True) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(text)
    return directory


def _pattern_value(pattern: dict, name: str, default):
    """peft's lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)`` wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _config_problem(config) -> str | None:
    """What is wrong with a parsed ``adapter_config.json`` (a file's content, so a ValueError's
    business, not a TypeError's), or None."""
    if not isinstance(config, dict):
        return f"not a JSON object but a {type(config).__name__}"
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        return f"lacks {missing}, which a LoRA config must hold"
    targets = config["target_modules"]
    if not isinstance(targets, str) and not (isinstance(targets, list) and targets
                                             and all(isinstance(t, str) for t in targets)):
        return f"target_modules must be a list of module names or a regex string, got {targets!r}"
    if not isinstance(config.get("use_rslora", False), bool):
        return f"use_rslora must be true or false, got {config['use_rslora']!r}"
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            return f"{key} must be an object from module name to value, got {config[key]!r}"
    try:
        positive_int("r", config["r"])
        positive_number("lora_alpha", config["lora_alpha"])
        fraction("lora_dropout", config.get("lora_dropout", 0.0))
        if isinstance(targets, str):
            regex("target_modules", targets)
        for key, check in (("rank_pattern", positive_int), ("alpha_pattern", positive_number)):
            for module, value in (config.get(key) or {}).items():
                regex(f"{key} key", module)
                check(f"{key}[{module!r}]", value)
    except ValueError as error:
        return str(error)
    return None


def _read_config(directory: Path) -> dict:
    """``adapter_config.json``, checked key by key; any fault is one line naming the file."""
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass a folder written by save_adapter or peft's "
                                "save_pretrained (it holds that file and the weights)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): {RESAVE}") from None
    if isinstance(config, dict) and config.get("peft_type") != "LORA":
        raise ValueError(f"{path} holds a {config.get('peft_type')!r} adapter, not 'LORA'; load it with peft")
    problem = _config_problem(config)
    if problem:
        raise ValueError(f"{path}: {problem}: {RESAVE}")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "modules_to_save", "lora_bias") if config.get(k)]
    unsupported += ["bias"] if config.get("bias", "none") != "none" else []
    if unsupported:
        raise ValueError(f"{path}: the adapter uses {unsupported}, which course_lib.lora does not implement; "
                         "load it with peft")
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``: a readable, non-empty file of finite floats."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {RESAVE}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({' '.join(str(error).split())}): "
                         f"{RESAVE}") from None
    if not state:
        raise ValueError(f"{path} holds no tensors (an empty adapter file): {RESAVE}")
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: {key} holds {tensor.dtype} values, not floating point: {RESAVE}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {key} holds values that are not finite (NaN or inf): the adapter is "
                             "corrupt or its training diverged; train and save it again")
    return state


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_[AB])(?:\.[^.]+)?\.weight$")


def load_adapter(model: nn.Module, directory, adapter_name: str = "default") -> nn.Module:
    """Inject and fill an adapter saved by `save_adapter` or by peft's ``save_pretrained``.

    Everything is checked before the model changes: the config must be a plain, well-formed LoRA
    one; every tensor must be finite and named for a linear layer of ``model`` that the config's
    ``target_modules`` select; every A / B must fit that layer's shape and the rank the config
    gives it. A failed check raises (``ValueError``, or ``FileNotFoundError`` for a missing file)
    and leaves ``model`` exactly as it was. Returns ``model`` with the adapter active.
    """
    directory = Path(directory)
    config = _read_config(directory)
    state = _read_weights(directory)
    config_path, path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    trained_on = config.get("base_model_name_or_path")
    linear = linear_layers(model)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: unexpected key {key!r}, not a LoRA A/B weight: {RESAVE}")
        name = match["module"]
        if name not in linear:
            raise ValueError(f"{path}: key {key!r} names module {name!r}, which is not a linear layer of this "
                             f"model: the adapter belongs to another base model (it was trained on {trained_on!r})")
        if config["target_modules"] != "all-linear" and not matches(name, config["target_modules"]):
            raise ValueError(f"{config_path}: target_modules {config['target_modules']!r} do not select {name!r}, "
                             f"which {ADAPTER_WEIGHTS} holds: the two files come from different saves; {RESAVE}")
        tensors.setdefault(name, {})[match["part"]] = tensor
    settings = {}
    for name, parts in tensors.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: {name} has {sorted(parts)} but needs both lora_A and lora_B: {RESAVE}")
        module, r = linear[name], parts["lora_A"].shape[0]
        for part, expected in (("lora_A", (r, module.in_features)), ("lora_B", (module.out_features, r))):
            if tuple(parts[part].shape) != expected:
                raise ValueError(f"{path}: {name}.{part}: the adapter has shape {tuple(parts[part].shape)}, this "
                                 f"model needs {expected}: the adapter belongs to another base model (trained "
                                 f"on {trained_on!r})")
        configured = _pattern_value(config.get("rank_pattern"), name, config["r"])
        if r != configured:
            raise ValueError(f"{path}: {name} has rank {r}, but {config_path} gives it r={configured}: the two "
                             f"files come from different saves; {RESAVE}")
        alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        settings[name] = (r, alpha, config.get("lora_dropout", 0.0), config.get("use_rslora", False))
    inject_adapter(model, settings, adapter_name)  # checks its own arguments before it changes anything
    layers = lora_layers(model)
    with torch.no_grad():
        for name, parts in tensors.items():
            for part, tensor in parts.items():
                getattr(layers[name], part)[adapter_name].weight.copy_(tensor)
    return model
