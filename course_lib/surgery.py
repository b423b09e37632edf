"""Model surgery: find a submodule by its dotted name and put another module in its place.

Every technique that changes a model's structure does the same small operation: LoRA wraps a
linear layer (and later puts the plain layer back), quantization swaps ``nn.Linear`` for a 4-bit
layer, QLoRA swaps it back, bottleneck adapters wrap an output projection. A name such as
``"model.layers.3.self_attn.q_proj"`` (as ``model.named_modules()`` gives it) is split at its
last dot into the *parent* module ``model.layers.3.self_attn`` and the *child* attribute
``q_proj``; ``setattr(parent, "q_proj", new)`` then replaces the layer, and PyTorch registers
``new`` as a submodule in its place (parameters, ``.to()``, ``state_dict`` keys all follow).

`replace_module` checks the name before it changes anything, so a typo leaves the model as it
was; `replace_modules` checks every name before the first swap. `short_list` shortens a long
list of module names for an error message.
"""

from __future__ import annotations

from torch import nn


def parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds submodule ``name`` and the attribute it is held under.

    ``parent_and_child(model, "encoder.layer.0.attention.self.query")`` returns the
    ``encoder.layer.0.attention.self`` module and ``"query"``; a top-level name such as
    ``"lm_head"`` returns ``model`` itself. Raises ``ValueError`` if ``model`` has no submodule
    of that name (or the name is empty: the model cannot replace itself).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name a submodule by its dotted name (as model.named_modules() gives it), got {name!r}")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    if parent is None or not isinstance(getattr(parent, child, None), nn.Module):
        raise ValueError(f"{type(model).__name__} has no submodule {name!r}; the names are those of "
                         f"model.named_modules(), e.g. {short_list([n for n, _ in model.named_modules() if n], 3)}")
    return parent, child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where submodule ``name`` of ``model`` is, and return the module it replaced.

    The name is checked first (see `parent_and_child`), so on an error the model is unchanged.
    """
    if not isinstance(new, nn.Module):
        raise TypeError(f"the replacement for {name!r} must be an nn.Module, got {type(new).__name__}")
    parent, child = parent_and_child(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """`replace_module` for several names at once: every name and replacement is checked before the
    first swap, so a bad one leaves the model as it was. Returns the replaced modules by name.

    Build all the replacements first (quantize, dequantize, merge), then call this: a failure while
    building one then cannot leave the model half converted.
    """
    for name, new in replacements.items():
        if not isinstance(new, nn.Module):
            raise TypeError(f"the replacement for {name!r} must be an nn.Module, got {type(new).__name__}")
        parent_and_child(model, name)
    return {name: replace_module(model, name, new) for name, new in replacements.items()}


def short_list(names: list[str], keep: int = 6) -> str:
    """``names`` as a string for a message; a list longer than ``keep`` is cut, with its length."""
    return str(names) if len(names) <= keep else f"{names[:keep]} ... ({len(names)} in all)"
