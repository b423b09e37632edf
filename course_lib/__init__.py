"""course_lib: the techniques of the low-resource fine-tuning course, from scratch and checked.

One module per technique, each readable top to bottom:

* ``models``: the two real models (all-MiniLM-L6-v2, SmolLM2-135M-Instruct), loaded offline.
* ``data``: the course datasets shipped in ``data/`` (code search, distractors, instruction task).
* ``retrieval``: embeddings, recall@k / MRR, exact match and perplexity, shared by every chapter.
"""

__version__ = "0.1.0"
