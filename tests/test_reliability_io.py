"""Saving and loading adapters (`course_lib.lora_io`) when something goes wrong.

A save is all or nothing: it never mixes into an adapter already in the folder, refuses to replace
one unless asked, and a crash half-way leaves the folder as it was. A load checks the config and
every tensor before it changes the model, so a bad adapter leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from course_lib import lora, lora_io
from course_lib.models import tiny_llama

CONFIG, WEIGHTS = lora_io.ADAPTER_CONFIG, lora_io.ADAPTER_WEIGHTS


def _adapted(r: int = 4, seed: int = 0):
    """A tiny Llama with a LoRA adapter on q_proj / v_proj whose B is not zero."""
    model = lora.inject_lora(tiny_llama(), ["q_proj", "v_proj"], r=r, lora_alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    return model


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    """Hidden temporary files or folders a save left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Saving: atomic, and no silent overwrite
# ---------------------------------------------------------------------------------------------
def test_save_refuses_a_folder_that_holds_an_adapter_unless_asked(tmp_path):
    folder = tmp_path / "adapter"
    lora_io.save_adapter(_adapted(seed=0), folder)
    before = _files(folder)
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        lora_io.save_adapter(_adapted(r=2, seed=1), folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert _files(folder) == before
    lora_io.save_adapter(_adapted(r=2, seed=1), folder, overwrite=True)
    assert _files(folder) != before
    assert json.loads((folder / CONFIG).read_text())["r"] == 2
    assert _leftovers(tmp_path) == []
    back = lora_io.load_adapter(tiny_llama(), folder)
    assert {layer.r["default"] for layer in lora.lora_layers(back).values()} == {2}


def test_save_into_an_existing_empty_folder_is_fine(tmp_path):
    """A fresh tempfile.TemporaryDirectory() (what chapter 01 saves into) exists but is empty."""
    lora_io.save_adapter(_adapted(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]


def test_save_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError, match="choose another"):
        lora_io.save_adapter(_adapted(), target, overwrite=True)
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "overwriting"])
def test_crash_after_the_weights_leaves_no_mismatched_pair(tmp_path, monkeypatch, existing):
    """The weights are written, then the process dies before the config: the folder must hold
    the old adapter unchanged (or not exist), never new weights next to an old config."""
    folder = tmp_path / "adapter"
    if existing:
        lora_io.save_adapter(_adapted(r=4, seed=0), folder)
    before = _files(folder) if existing else None
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_die)
    with pytest.raises(OSError, match="No space left"):
        lora_io.save_adapter(_adapted(r=2, seed=1), folder, overwrite=True)
    if existing:
        assert _files(folder) == before
    else:
        assert not folder.exists()
    assert _leftovers(tmp_path) == []


def test_non_finite_adapter_is_not_saved(tmp_path):
    model = _adapted()
    with torch.no_grad():
        next(iter(lora.lora_layers(model).values())).lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite") as err:
        lora_io.save_adapter(model, tmp_path / "adapter")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------------------------------------
# Loading: everything is checked before the model changes
# ---------------------------------------------------------------------------------------------
def _snapshot(model) -> dict:
    return {"modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _assert_unchanged(model, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def _rewrite_weights(folder: Path, change) -> None:
    state = load_file(str(folder / WEIGHTS))
    save_file(change(state), str(folder / WEIGHTS), metadata={"format": "pt"})


def _first_key(state, part="lora_A"):
    return next(k for k in sorted(state) if part in k)


def _nan(state):
    key = _first_key(state)
    state[key] = state[key].clone()
    state[key][0, 0] = float("inf")
    return state


def _drop_b(state):
    del state[_first_key(state, "lora_B")]
    return state


def _other_rank(state):
    """Weights of rank 2 next to a config that says r=4: a pair from two different saves."""
    return {k: (v[:2] if "lora_A" in k else v[:, :2]).contiguous() for k, v in state.items()}


BAD_WEIGHTS = {
    "empty safetensors": lambda folder: save_file({}, str(folder / WEIGHTS)),
    "zero bytes": lambda folder: (folder / WEIGHTS).write_bytes(b""),
    "garbage": lambda folder: (folder / WEIGHTS).write_bytes(b"\x00\x01 not safetensors"),
    "missing weights": lambda folder: (folder / WEIGHTS).unlink(),
    "non-finite": lambda folder: _rewrite_weights(folder, _nan),
    "lora_B missing": lambda folder: _rewrite_weights(folder, _drop_b),
    "integer tensors": lambda folder: _rewrite_weights(folder, lambda s: {k: v.to(torch.int32) for k, v in s.items()}),
    "rank differs from config": lambda folder: _rewrite_weights(folder, _other_rank),
    "unknown key": lambda folder: _rewrite_weights(folder, lambda s: {**s, "something.else": torch.zeros(2)}),
}


@pytest.mark.parametrize("start", ["plain model", "model with an adapter"])
@pytest.mark.parametrize("how", list(BAD_WEIGHTS))
def test_bad_weights_leave_the_model_unchanged(tmp_path, how, start):
    lora_io.save_adapter(_adapted(), tmp_path / "adapter")
    BAD_WEIGHTS[how](tmp_path / "adapter")
    model = tiny_llama(seed=3)
    if start == "model with an adapter":
        lora.inject_lora(model, ["k_proj"], r=2, lora_alpha=4, adapter_name="mine")
    before = _snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        lora_io.load_adapter(model, tmp_path / "adapter")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "adapter") in message, message
    _assert_unchanged(model, before)


def test_existing_adapter_name_leaves_the_model_unchanged(tmp_path):
    lora_io.save_adapter(_adapted(), tmp_path / "adapter")
    model = lora_io.load_adapter(tiny_llama(), tmp_path / "adapter")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        lora_io.load_adapter(model, tmp_path / "adapter")
    _assert_unchanged(model, before)


def test_a_good_adapter_still_loads_exactly(tmp_path):
    ours = _adapted()
    lora_io.save_adapter(ours, tmp_path / "adapter")
    back = lora_io.load_adapter(tiny_llama(), tmp_path / "adapter")
    x = torch.randint(0, 128, (2, 7))
    torch.testing.assert_close(back(x).logits, ours(x).logits)


# ---------------------------------------------------------------------------------------------
# A garbage adapter_config.json: one line naming the file and what is wrong
# ---------------------------------------------------------------------------------------------
def _good_config(tmp_path) -> dict:
    lora_io.save_adapter(_adapted(), tmp_path / "adapter")
    return json.loads((tmp_path / "adapter" / CONFIG).read_text())


def _without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


BAD_CONFIGS = {
    "not json": (lambda c: "{ this is not json", "not valid JSON"),
    "empty file": (lambda c: "", "not valid JSON"),
    "a list": (lambda c: json.dumps([1, 2]), "not a JSON object"),
    "a string": (lambda c: json.dumps("LORA"), "not a JSON object"),
    "no r": (lambda c: json.dumps(_without(c, "r")), "'r'"),
    "no lora_alpha": (lambda c: json.dumps(_without(c, "lora_alpha")), "'lora_alpha'"),
    "no target_modules": (lambda c: json.dumps(_without(c, "target_modules")), "'target_modules'"),
    "r a string": (lambda c: json.dumps({**c, "r": "4"}), "r must be a positive integer"),
    "r a bool": (lambda c: json.dumps({**c, "r": True}), "r must be a positive integer"),
    "r zero": (lambda c: json.dumps({**c, "r": 0}), "r must be a positive integer"),
    "lora_alpha a string": (lambda c: json.dumps({**c, "lora_alpha": "8"}), "lora_alpha must be a positive number"),
    "lora_dropout too big": (lambda c: json.dumps({**c, "lora_dropout": 1.5}), "lora_dropout must be a number"),
    "target_modules a number": (lambda c: json.dumps({**c, "target_modules": 3}), "target_modules must be"),
    "target_modules a list of numbers": (lambda c: json.dumps({**c, "target_modules": [1]}), "target_modules must be"),
    "use_rslora a string": (lambda c: json.dumps({**c, "use_rslora": "yes"}), "use_rslora must be"),
    "rank_pattern a list": (lambda c: json.dumps({**c, "rank_pattern": [4]}), "rank_pattern must be"),
    "alpha_pattern bad value": (lambda c: json.dumps({**c, "alpha_pattern": {"q_proj": "x"}}), "alpha_pattern"),
    "peft_type missing": (lambda c: json.dumps(_without(c, "peft_type")), "'LORA'"),
    "target_modules miss the weights": (lambda c: json.dumps({**c, "target_modules": ["k_proj"]}),
                                        "target_modules"),
}


@pytest.mark.parametrize("how", list(BAD_CONFIGS))
def test_garbage_config_is_one_line_naming_the_file(tmp_path, how):
    config = _good_config(tmp_path)
    text, expected = BAD_CONFIGS[how]
    (tmp_path / "adapter" / CONFIG).write_text(text(config))
    model = tiny_llama(seed=3)
    before = _snapshot(model)
    with pytest.raises(ValueError) as err:
        lora_io.load_adapter(model, tmp_path / "adapter")
    assert type(err.value) is not json.JSONDecodeError      # a ValueError, but a raw one: no file named
    message = str(err.value)
    assert "\n" not in message, message
    assert str(tmp_path / "adapter" / CONFIG) in message, message
    assert expected in message, message
    _assert_unchanged(model, before)


def test_missing_config_names_the_folder(tmp_path):
    lora_io.save_adapter(_adapted(), tmp_path / "adapter")
    (tmp_path / "adapter" / CONFIG).unlink()
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="save_adapter") as err:
        lora_io.load_adapter(model, tmp_path / "adapter")
    assert str(tmp_path / "adapter" / CONFIG) in str(err.value) and "\n" not in str(err.value)
    _assert_unchanged(model, before)


def test_peft_saved_adapter_with_a_rank_pattern_passes_the_checks(tmp_path):
    """The consistency checks (rank against the config, target_modules against the keys) accept
    what peft writes, rank_pattern included."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            rank_pattern={"v_proj": 2}))
    theirs.save_pretrained(tmp_path / "peft")
    back = lora_io.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    ranks = {name.split(".")[-1]: layer.r["default"] for name, layer in lora.lora_layers(back).items()}
    assert ranks == {"q_proj": 4, "v_proj": 2}


def test_overwrite_never_deletes_files_that_are_no_adapter(tmp_path):
    """The folder is replaced as a whole: with other files in it (a chapter folder, say) that
    would delete them, so it is refused even with overwrite=True."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.ipynb").write_text("{}")
    lora_io.save_adapter(_adapted(), folder / "adapter")
    with pytest.raises(FileExistsError, match=r"no adapter files.*choose another folder"):
        lora_io.save_adapter(_adapted(), folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "notes.ipynb"]


def test_the_working_directory_is_refused_not_moved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="working directory"):
        lora_io.save_adapter(_adapted(), ".")
    assert Path.cwd() == tmp_path and tmp_path.is_dir() and not list(tmp_path.iterdir())
    assert lora_io.save_adapter(_adapted(), "adapter") == Path("adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG, WEIGHTS]
