"""Memory budget of a fine-tuning run from a model's config alone: no weights, no GPU, no torch.

Read the modules in the order they import each other (one direction, no cycles):

* `course_lib.budget.configs`: what the estimate needs of a transformer (`ModelConfig`), the
  models the seeds and the papers discuss (`MODELS`), and `get_config`;
* `course_lib.budget.settings`: one training step's choices (`Settings`), checked once, when
  they are built;
* `course_lib.budget.sharding`: what data parallelism with ZeRO / FSDP sharding divides by the
  number of GPUs (`ModelStates` → `per_gpu`);
* `course_lib.budget.estimate`: the bytes each kind of tensor takes (`estimate` → `Budget`), and
  the memory units (`parse_memory`, `format_bytes`, `GiB`, `MiB`);
* `course_lib.budget.planner`: seed 000's decision tree and its out-of-memory ladder, checked
  by the estimate (`plan` → `Plan`, `seed_recipe`);
* `course_lib.budget.multi_gpu`: how many GPUs of a given memory, with which sharding strategy
  (`plan_gpus` → `GpuPlan`).

    from course_lib import budget
    budget.estimate("llama-3-8b", "qlora", seq_len=2048).peak
    budget.plan("llama-3-8b", "24GB").summary()
    budget.estimate("llama-3-70b", "full", gpus=16, sharding="full", master_weights=True).peak  # per GPU
    budget.plan_gpus("llama-3-70b", "80GB", "full").line()

GPU memory is sold in binary units (a "24 GB" card holds 24 GiB), so ``"24GB"`` means 24 · 2³⁰
bytes here, and figures are printed in MiB and GiB.
"""

from .configs import ALIASES, ARCHITECTURES, MODELS, ModelConfig, get_config
from .estimate import (
    LINES,
    Budget,
    GiB,
    MiB,
    activation_parts,
    estimate,
    estimate_settings,
    format_bytes,
    four_bit_storage_bytes,
    parse_memory,
)
from .multi_gpu import MAX_GPUS, STRATEGIES, GpuPlan, plan_gpus
from .planner import Plan, plan, seed_recipe
from .settings import (
    ATTENTION,
    DEVICES,
    DTYPE_BYTES,
    METHODS,
    OPTIMIZERS,
    QUANT_STORAGE,
    QUANT_TYPES,
    SHARDING,
    Settings,
    default_target_modules,
    lora_targets,
)

__all__ = [  # the API in short: estimate, plan, plan_gpus, get_config, parse_memory, Budget, Plan, Settings
    "ALIASES", "ARCHITECTURES", "ATTENTION", "DEVICES", "DTYPE_BYTES", "LINES", "MAX_GPUS", "METHODS", "MODELS",
    "OPTIMIZERS", "QUANT_STORAGE", "QUANT_TYPES", "SHARDING", "STRATEGIES", "Budget", "GiB", "GpuPlan", "MiB",
    "ModelConfig", "Plan", "Settings", "activation_parts", "default_target_modules", "estimate",
    "estimate_settings", "format_bytes", "four_bit_storage_bytes", "get_config", "lora_targets", "parse_memory",
    "plan", "plan_gpus", "seed_recipe",
]
