"""mkdocs hooks (``hooks:`` in mkdocs.yml): the pages' generated parts, filled in at build time, and
the site's own copy of MathJax.

A page asks for a part with a placeholder comment, replaced by what `course_lib.tooling.sitegen` makes
of the repository as it is at build time:

* ``<!-- course:chapter-times -->``: the chapters and the time each took when it was executed
  (`course_lib.tooling.sitegen.chapter_times_table` on ``notebooks/``);
* ``<!-- course:benchmarks -->``: every ``benchmarks/results/*.json``
  (`course_lib.tooling.sitegen.benchmarks_page`);
* ``<!-- course:solutions -->``: every chapter's exercise solutions
  (`course_lib.tooling.sitegen.solutions_page`).

Formulas render offline: MathJax 2.7 (the ``jupyter-server-mathjax`` package) is copied into
``assets/mathjax/`` of the built site; the chapter pages load it through mkdocs-jupyter's
``custom_mathjax_url``, and a Markdown page with formulas (pymdownx.arithmatex) gets the same
script here. Nothing is fetched from the internet.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from course_lib.tooling.sitegen import benchmarks_page, chapter_times_table, solutions_page

PLACEHOLDERS = {
    "<!-- course:chapter-times -->": lambda root: chapter_times_table(root / "notebooks"),
    "<!-- course:benchmarks -->": lambda root: benchmarks_page(root / "benchmarks" / "results"),
    "<!-- course:solutions -->": lambda root: solutions_page(root / "notebooks"),
}
MATHJAX_DIR = "assets/mathjax"
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace each placeholder in a page's markdown; paths are relative to mkdocs.yml's folder."""
    root = Path(config["config_file_path"]).resolve().parent
    for placeholder, render in PLACEHOLDERS.items():
        if placeholder in markdown:
            markdown = markdown.replace(placeholder, render(root))
    return markdown


def on_post_page(output: str, page, config) -> str:
    """A Markdown page with formulas loads the site's MathJax (chapter pages load it themselves)."""
    if 'class="arithmatex"' not in output or "MathJax.js" in output:
        return output
    depth = page.url.count("/")   # "solutions/" (or "a/b.html") sits that many folders below the root
    script = (f'<script src="{"../" * depth}{MATHJAX_DIR}/MathJax.js?config={MATHJAX_CONFIG}"></script>')
    return output.replace("</body>", script + "\n</body>", 1)


def on_post_build(config) -> None:
    """Copy MathJax into the built site (the whole package: its fonts and extensions load on demand)."""
    import jupyter_server_mathjax

    source = Path(jupyter_server_mathjax.__file__).parent / "static"
    target = Path(config["site_dir"]) / MATHJAX_DIR
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
