"""course_lib: the techniques of the low-resource fine-tuning course, from scratch and checked.

One idea per module, each readable top to bottom. Imports go one way: infrastructure never
imports a technique; the tooling imports both.

Techniques
    ``lora`` (LoRA layers, injection, merging), ``lora_io`` (saving / loading in peft's layout),
    ``lora_combine`` (several adapters into one), ``quant`` (NF4 / FP4 / INT8 from scratch),
    ``linear4bit`` (the frozen 4-bit layer), ``qlora``, ``gradcache``, ``matryoshka``,
    ``adapters`` (bottleneck adapters), ``peft_methods`` (chapter 07's methods side by side),
    ``distributed`` (processes, gathered contrastive loss, FSDP2 / ZeRO sharding),
    ``export`` (merge, ONNX, INT8) and ``gguf_export``.

Infrastructure
    ``models`` (all-MiniLM-L6-v2 and SmolLM2-135M-Instruct, offline; tiny test configs),
    ``data`` (the shipped datasets), ``train`` (the training loop), ``retrieval`` (embeddings,
    contrastive loss, recall@k / MRR), ``instruct`` (the instruction task: exact match,
    perplexity), ``memory`` (measurement), ``budget/`` (memory budgets from a config:
    ``configs`` → ``settings`` → ``estimate`` → ``planner``), ``generation`` (greedy decoding, KV
    cache), ``surgery`` (replacing submodules), ``checks`` (argument checks), ``atomic_files``,
    and ``cli`` (the ``course-lib`` command).

Course tooling (``tooling/``)
    ``sitegen`` (the site's generated parts), ``figures`` (the benchmarks' FIGURE lines),
    ``student`` (students' copies of the chapters), ``ddp_demo`` (chapter 07's two processes).
"""

__version__ = "0.1.0"
