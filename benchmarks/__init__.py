"""The course's benchmarks: one script per set of figures, run from the repository root as

    .venv/bin/python -m benchmarks.<name> [options]      # --help lists them

Each measures what a chapter's time budget cannot (the reference library beside ours in one run,
longer training, larger samples), writes ``benchmarks/results/<name>.json`` (the command, date,
machine and every measurement; committed, and rendered on the site's benchmarks page), and ends
by printing one line per figure, ``FIGURE <name>: <value> (target <op> <value>) met|missed``
(`course_lib.tooling.figures`), which the JSON stores under ``"figures"``.

``--figures-only`` measures nothing: the script recomputes its figures from the measurements
recorded in its JSON, stores them there (with ``"figures_recomputed"``, unless they are
unchanged) and prints them. What the scripts share is in `benchmarks.report`.
"""
