"""The published site, checked in a real browser: Debian's Chromium driven by Playwright.

The test builds the site (``mkdocs build --strict``) into ``build/site-test`` (``site-test-gw0``
... under pytest-xdist: each worker that runs some of these tests builds its own), serves it on
127.0.0.1 and opens every page of the navigation. Every chapter page must show its title, at
least one rendered plot (an image the browser decoded), and no error output; no page may hold
an internal link that is broken (a missing page, or a ``#fragment`` with no such id on its
page); the search box must find "NF4" in chapter 02. A screenshot of each page goes to
``build/screenshots/``.

``make test``'s set-up installs Chromium with apt when it is missing. Without it (or without
Playwright) the test skips, saying so, except where apt could have installed it (root with
apt-get): there a missing browser is a failed set-up, and the test fails.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
import yaml

from course_lib.tooling import sitegen

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# one site per pytest-xdist worker: without --dist loadfile two workers run this module's fixtures
# at once, and two mkdocs builds into one folder delete each other's files
SITE = ROOT / "build" / "-".join(filter(None, ["site-test", os.environ.get("PYTEST_XDIST_WORKER")]))
SHOTS = ROOT / "build" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)"
    return None


def _could_install() -> bool:
    return shutil.which("apt-get") is not None and hasattr(os, "geteuid") and os.geteuid() == 0


MISSING = _browser_missing()


@pytest.fixture(scope="module")
def browser():
    if MISSING:
        if _could_install():
            pytest.fail(f"{MISSING}, although apt could install it here: run `make setup` (make test does)")
        pytest.skip(f"browser test skipped: {MISSING}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _nav_pages() -> list[tuple[str, str]]:
    """(title, source path) of every page in mkdocs.yml's navigation, in order."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = []

    def walk(items):
        for item in items:
            for title, value in item.items():
                if isinstance(value, list):
                    walk(value)
                else:
                    pages.append((title, value))

    walk(config["nav"])
    return pages


def _url_path(source: str) -> str:
    """The URL path mkdocs gives a page (use_directory_urls): docs/a/b.md -> a/b/, index.md -> ''."""
    stem = source.rsplit(".", 1)[0]
    if stem == "index":
        return ""
    if stem.endswith("/index"):
        return stem[: -len("index")]
    return stem + "/"


def _notebook_title(source: str) -> str:
    return sitegen.notebook_title(ROOT / "docs" / source)


@pytest.fixture(scope="module")
def site_url(browser):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(SITE)],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr[-3000:]}"
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    # generous waits: on a busy 2-core machine the search worker indexes the chapters for a minute
    # or more (a wait, not a timing claim: the page only has to get there)
    page.set_default_timeout(180_000)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.js_errors = errors
    # offline, as a reader without internet sees it: any request off this machine is refused and noted
    external = []

    def offline(route):
        if urllib.parse.urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost", None):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    context.route("**/*", offline)
    page.external_requests = external
    yield page
    context.close()


PAGES = _nav_pages()
CHAPTERS = [(title, source) for title, source in PAGES if source.endswith(".ipynb")]


def _internal_links(page, base: str) -> list[str]:
    hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
    return sorted({h for h in hrefs if h.startswith(base)})


_ids_cache: dict[str, set[str]] = {}


def _ids_of(page, url: str) -> set[str] | None:
    """The element ids of the page at ``url`` (None when it does not load)."""
    if url not in _ids_cache:
        response = page.request.get(url)
        if not response.ok:
            return None
        html = response.text()
        _ids_cache[url] = set(re.findall(r"""\bid=["']?([^"'\s>]+)""", html))
    return _ids_cache[url]


# nbconvert's lab template (mkdocs-jupyter) renders every output as .jp-OutputArea-output; an error
# output shows IPython's traceback header
OUTPUTS = ".jp-OutputArea-output"
ERRORS_JS = ("nodes => nodes.map(n => n.innerText)"
             ".filter(t => /Traceback \\(most recent call last\\)|^\\w*(Error|Exception): /m.test(t))")


def test_the_error_check_sees_an_error(page):
    page.set_content('<div class="jp-OutputArea-output">AssertionError    Traceback (most recent call last)</div>'
                     '<div class="jp-OutputArea-output">ValueError: bad</div>'
                     '<div class="jp-OutputArea-output">recall@10 0.842</div>')
    assert len(page.eval_on_selector_all(OUTPUTS, ERRORS_JS)) == 2


def test_every_chapter_is_in_the_navigation():
    sources = [s for _, s in CHAPTERS]
    on_disk = sorted(f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sources == on_disk, "mkdocs.yml's nav must list every chapter, in order"


@pytest.mark.parametrize("title,source", PAGES, ids=[s for _, s in PAGES])
def test_page(site_url, page, title, source):
    url = site_url + _url_path(source)
    page.external_requests.clear()
    response = page.goto(url, wait_until="load")
    assert response is not None and response.ok, f"{url}: HTTP {response and response.status}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / (Path(source).stem + ".png")))
    site_name = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["site_name"]
    # mkdocs-jupyter titles a chapter with the notebook's first heading, mkdocs a page with its nav title
    shown = _notebook_title(source) if source.endswith(".ipynb") else title
    expected = site_name if source == "index.md" else f"{shown} - {site_name}"
    assert page.title() == expected, f"{source}: the document title is {page.title()!r}, not {expected!r}"

    broken = []
    for link in _internal_links(page, site_url):
        target, _, fragment = link.partition("#")
        ids = _ids_of(page, target)
        if ids is None or (fragment and urllib.parse.unquote(fragment) not in ids):
            broken.append(link)
    assert not broken, f"{source}: broken internal links: {broken}"

    if source.endswith(".ipynb"):
        heading = _notebook_title(source)
        headings = [h.strip().rstrip("¶").strip() for h in page.locator("h1").all_inner_texts()]
        assert heading in headings, f"{source}: the chapter's title {heading!r} is not shown (h1: {headings})"
        plots = page.eval_on_selector_all(
            "img[src^='data:image/png'], img[src^='data:image/svg'], img[src$='.png'], img[src$='.svg']",
            "imgs => imgs.filter(i => i.complete && i.naturalWidth > 50).length")
        assert plots >= 1, f"{source}: no rendered plot image"
        assert page.locator(OUTPUTS).count() > 0, f"{source}: no output cell found (did the template change?)"
        errors = page.eval_on_selector_all(OUTPUTS, ERRORS_JS)
        assert not errors, f"{source}: an error output is shown: {errors[0][:500]}"
        _assert_math_rendered(page, source)
        shown = [t for t in page.locator(".jp-CodeCell").all_inner_texts() if "BEGIN SOLUTION" in t]
        assert not shown, f"{source}: an exercise's solution is shown on the chapter's page: {shown[0][:200]}"
    if source == "solutions.md":
        code = "\n".join(page.locator("pre").all_inner_texts())
        assert code.count("BEGIN SOLUTION") >= 2 * len(CHAPTERS), f"{source}: the solutions are not all there"
    assert not page.external_requests, f"{source}: the page asked the internet for {page.external_requests}"
    assert not page.js_errors, f"{source}: JavaScript errors: {page.js_errors}"


# MathJax 2's HTML-CSS output: each typeset formula becomes a span.MathJax (display: .MathJax_Display)
MATH = ".MathJax, .MathJax_Display"


def _assert_math_rendered(page, source: str) -> None:
    """The chapter's formulas are typeset by the site's own MathJax and no raw TeX is left in the text."""
    page.wait_for_function("() => window.MathJax && MathJax.isReady && document.querySelector('.MathJax') "
                           "&& MathJax.Hub.queue.pending === 0 && MathJax.Hub.queue.running === 0")
    assert page.locator(MATH).count() > 0, f"{source}: no rendered formula (MathJax did not typeset)"
    # the text a reader sees: markdown cells only (code and outputs may legitimately hold a $)
    raw = page.eval_on_selector_all(".jp-MarkdownCell", "cells => cells.map(c => c.innerText).join('\\n')")
    leftovers = [s for s in ("$$", "\\frac", "\\alpha", "\\mathcal") if s in raw]
    assert not leftovers, f"{source}: raw TeX shown as text: {leftovers}"


def test_raw_tex_would_be_seen(page):
    page.set_content('<div class="jp-MarkdownCell">y = $$\\frac{a}{b}$$</div>')
    raw = page.eval_on_selector_all(".jp-MarkdownCell", "cells => cells.map(c => c.innerText).join('\\n')")
    assert "$$" in raw and "\\frac" in raw


def test_search_finds_nf4(site_url, page):
    page.goto(site_url, wait_until="load")
    page.locator("label.md-search__icon, .md-search__input").first.click()
    # typed key by key, not fill(): mkdocs-material reads the query on keyup (and once, when its
    # worker reports the index built), never on an input event, so a fill() landing after the
    # worker is ready is never searched (the flake on a loaded machine: fill() only dispatches
    # `input`). A query typed before the index is ready is kept and sent once it is.
    page.locator("input.md-search__input").press_sequentially("NF4")
    results = page.locator(".md-search-result__item a")
    results.first.wait_for(timeout=180_000)
    hrefs = results.evaluate_all("links => links.map(a => a.href)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "search-NF4.png"))
    assert any("02_qlora" in h for h in hrefs), f"searching NF4 did not find chapter 02: {hrefs[:10]}"


def test_screenshots_saved(browser):
    """Runs last in this file: a screenshot per page of the navigation (written by test_page)."""
    missing = [s for _, s in PAGES if not (SHOTS / (Path(s).stem + ".png")).exists()]
    assert not missing, f"no screenshot for {missing}"
    # the page list the shots came from, for whoever looks at build/screenshots
    (SHOTS / "pages.json").write_text(json.dumps([{"title": t, "source": s} for t, s in PAGES], indent=2))
