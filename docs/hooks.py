"""mkdocs hooks (``hooks:`` in mkdocs.yml): the pages' generated parts, filled in at build time.

A page asks for a part with a placeholder comment, replaced by what `course_lib.tooling.sitegen` makes
of the repository as it is at build time:

* ``<!-- course:chapter-times -->``: the chapters and the time each took when it was executed
  (`course_lib.tooling.sitegen.chapter_times_table` on ``notebooks/``);
* ``<!-- course:benchmarks -->``: every ``benchmarks/results/*.json``
  (`course_lib.tooling.sitegen.benchmarks_page`).
"""

from __future__ import annotations

from pathlib import Path

from course_lib.tooling.sitegen import benchmarks_page, chapter_times_table

PLACEHOLDERS = {
    "<!-- course:chapter-times -->": lambda root: chapter_times_table(root / "notebooks"),
    "<!-- course:benchmarks -->": lambda root: benchmarks_page(root / "benchmarks" / "results"),
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace each placeholder in a page's markdown; paths are relative to mkdocs.yml's folder."""
    root = Path(config["config_file_path"]).resolve().parent
    for placeholder, render in PLACEHOLDERS.items():
        if placeholder in markdown:
            markdown = markdown.replace(placeholder, render(root))
    return markdown
