"""`course_lib.budget` as a package: one direction of imports, settings checked once, plain JSON."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from course_lib import budget, memory
from course_lib.budget import Settings, estimate

PACKAGE = Path(budget.__file__).parent
ORDER = ["configs", "settings", "sharding", "estimate", "planner", "multi_gpu"]  # each imports only those before it


def _imported_siblings(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.add(node.module)
        if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module and node.module.startswith("budget"):
            names.add(node.module.removeprefix("budget."))
    return names


@pytest.mark.parametrize("module", ORDER)
def test_modules_import_one_way(module):
    before = set(ORDER[:ORDER.index(module)])
    assert _imported_siblings(module) <= before, f"{module} imports {_imported_siblings(module) - before}"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")) + [Path(memory.__file__)], ids=lambda p: p.name)
def test_no_import_below_the_first_definition(path):
    """Imports at the top only: an import at the bottom of a module is how the old cycle was hidden."""
    body = ast.parse(path.read_text()).body
    kinds = [isinstance(node, (ast.Import, ast.ImportFrom)) for node in body]
    docstring = int(bool(body) and isinstance(body[0], ast.Expr))
    first_other = kinds.index(False, docstring) if False in kinds[docstring:] else len(body)
    assert not [node.lineno for node in body[first_other:] if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_memory_does_not_re_export_the_estimate():
    assert not hasattr(memory, "estimate") and not hasattr(memory, "plan")
    assert not hasattr(memory, "four_bit_bytes") and not hasattr(budget, "four_bit_bytes")


def test_public_api():
    for name in ("estimate", "plan", "get_config", "parse_memory", "Budget", "Plan", "Settings", "GiB", "MiB",
                 "format_bytes", "MODELS", "ModelConfig", "seed_recipe", "four_bit_storage_bytes"):
        assert hasattr(budget, name), name
    assert set(budget.__all__) <= set(dir(budget))


def test_settings_are_frozen_and_complete():
    s = estimate("llama-3-8b", "qlora").settings
    assert isinstance(s, Settings)
    assert (s.model, s.method, s.r, s.target_modules) == ("llama-3-8b", "qlora", 8, ("q_proj", "v_proj"))
    assert (s.quant_type, s.double_quant, s.chunk_size, s.gradient_checkpointing) == ("nf4", True, None, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.r = 16
    full = estimate("llama-3-8b", "full").settings
    assert (full.r, full.target_modules, full.quant_type, full.double_quant) == (None, None, None, None)


def test_settings_built_once_give_the_same_estimate():
    s = Settings.build("minilm", "lora", r=16, batch_size=64, seq_len=128, chunk_size=16)
    assert budget.estimate_settings("minilm", s) == estimate("minilm", "lora", r=16, batch_size=64, seq_len=128,
                                                             chunk_size=16)
    with pytest.raises(ValueError, match="built for minilm, not llama-7b"):
        budget.estimate_settings("llama-7b", s)


@pytest.mark.parametrize("change, words", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"r": None}, "r must be a positive integer"),
    ({"method": "full"}, "r, target_modules do not apply to full fine-tuning"),
    ({"chunk_size": 128}, "chunk_size must be an integer from 1 to batch_size (64)"),
    ({"double_quant": True}, "use method='qlora'"),
    ({"target_modules": "query"}, "must be a list of module names or 'all-linear'"),
    ({"attention": "flash"}, "attention must be one of"),
])
def test_settings_changed_by_hand_are_checked_too(change, words):
    s = Settings.build("minilm", "lora", batch_size=64)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(s, **change)


def test_to_dict_is_the_plain_dict_the_json_had():
    """The ``--json`` output keeps its shape: the settings as a plain dict, in the same order."""
    b = estimate("smollm2-135m", "lora", r=16, target_modules=["q_proj", "v_proj"], gradient_checkpointing=True)
    out = b.to_dict()
    assert list(out["settings"]) == ["model", "method", "r", "target_modules", "weight_dtype", "lora_dtype",
                                     "quant_type", "double_quant", "optimizer", "gradient_checkpointing",
                                     "batch_size", "seq_len", "gradient_accumulation_steps", "chunk_size",
                                     "attention", "device", "gpus", "sharding", "offload", "master_weights",
                                     "quant_storage"]  # chapter 08's settings, appended: the old keys keep their order
    assert out["settings"]["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads(json.dumps(out))["settings"] == out["settings"]
    p = budget.plan("minilm", "10GB").to_dict()
    assert p["settings"] == p["budget"]["settings"] and p["settings"]["chunk_size"] == 32
