"""The errata page (docs/errata.md): its links reach the notebook cells that measured each claim,
every claim anchor in the notebooks is cited, every chapter contributes, every verdict is one of four."""

import re
from collections import Counter
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "errata.md"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
VERDICTS = ("holds", "wrong", "partly", "cannot be checked here")
LINK = re.compile(r"\]\((notebooks/([^)#\s]+\.ipynb))#([^)\s]+)\)")
ANCHOR = re.compile(r'<a id="(claim-[^"]+)"></a>')


def page_text() -> str:
    return PAGE.read_text(encoding="utf-8")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(the last `##` heading above it, header cells, body rows) for every markdown table."""
    found, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading = line[3:].strip()
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[\s|:-]+\|", lines[i + 1].strip()):
            header, rows, i = cells(line), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            found.append((heading, header, rows))
            continue
        i += 1
    return found


def claim_tables() -> list[tuple[str, list[str], list[list[str]]]]:
    return [t for t in tables(page_text()) if "verdict" in t[1] and t[1][0] != "verdict"]


def verdict_of(cell: str) -> str:
    plain = cell.lstrip("*_ ").lower()
    return next((v for v in VERDICTS if plain.startswith(v)), "")


def markdown_anchors(path: Path) -> set[str]:
    nb = nbformat.read(path, as_version=4)
    return {a for c in nb.cells if c.cell_type == "markdown" for a in ANCHOR.findall(c.source)}


def test_page_exists_with_title():
    assert page_text().startswith("# Errata: the seeds' claims, checked")


def test_every_link_reaches_an_anchor_in_a_markdown_cell():
    links = LINK.findall(page_text())
    assert links, "the page links no notebook cell"
    for target, name, anchor in links:
        path = ROOT / "notebooks" / name
        assert path.is_file(), f"{target}: no such notebook"
        nb = nbformat.read(path, as_version=4)
        assert any(f'id="{anchor}"' in c.source for c in nb.cells if c.cell_type == "markdown"), \
            f"{target}#{anchor}: no markdown cell has this anchor"


def test_every_claim_anchor_in_the_notebooks_is_linked():
    linked = {(name, anchor) for _, name, anchor in LINK.findall(page_text())}
    orphans = [(p.name, a) for p in NOTEBOOKS for a in sorted(markdown_anchors(p)) if (p.name, a) not in linked]
    assert not orphans, f"anchors no errata row links to: {orphans}"


def test_claim_anchors_are_unique_and_named_by_chapter():
    seen = Counter(a for p in NOTEBOOKS for a in markdown_anchors(p))
    assert not [a for a, n in seen.items() if n > 1], "an anchor id is used twice"
    for path in NOTEBOOKS:
        for anchor in markdown_anchors(path):
            assert re.fullmatch(rf"claim-{path.name[:2]}-[a-z0-9-]+", anchor), (path.name, anchor)


@pytest.mark.parametrize("chapter", [f"{n:02d}" for n in range(1, 9)])
def test_each_chapter_contributes_a_row(chapter):
    rows = [row for heading, _, body in claim_tables() if heading.startswith(chapter) for row in body]
    assert rows, f"no errata row for chapter {chapter}"
    notebook = next(p.name for p in NOTEBOOKS if p.name.startswith(chapter))
    for row in rows:
        assert f"notebooks/{notebook}#" in " ".join(row), f"a chapter {chapter} row links no cell of its chapter: {row[0]}"


def test_every_verdict_is_one_of_four():
    body = [(header, row) for _, header, rows in claim_tables() for row in rows]
    assert len(body) >= 40
    for header, row in body:
        assert len(row) == len(header), row
        verdict = row[header.index("verdict")]
        assert verdict_of(verdict), f"verdict {verdict!r} does not start with one of {VERDICTS}"


def test_summary_counts_match_the_rows():
    counts = Counter()
    for heading, header, rows in claim_tables():
        column = "API" if heading.lower().startswith("api") else heading[:2]
        for row in rows:
            verdict = verdict_of(row[header.index("verdict")])
            counts[verdict, column] += 1
            counts[verdict, "all"] += 1
    summary = next(t for t in tables(page_text()) if t[1][0] == "verdict" and "all" in t[1])
    _, header, rows = summary
    for row in rows:
        verdict = row[0].strip("*").lower()
        if verdict == "all":
            continue
        for column, value in zip(header[1:], row[1:]):
            assert int(value or 0) == counts[verdict, column], (verdict, column, value, counts[verdict, column])
