"""The course datasets, built from Python's standard library and shipped in ``data/``.

Three gzip-compressed JSON-lines files, all made from the source of CPython 3.11.7's stdlib:

* ``code_search.jsonl.gz``: (query, document) pairs. The query is the first paragraph of a
  function's docstring; the document is that function's source with the docstring removed.
  Train / val / test are split by top-level module, so the test modules are unseen in training.
* ``distractors.jsonl.gz``: further stdlib functions, none of them a pair's document, that make
  retrieval harder than picking among the pairs alone.
* ``instruct.jsonl.gz``: the same pairs as an instruction task for SmolLM2: given the module and
  the docstring summary, answer the function's bare name.

``python -m course_lib.data build`` rebuilds the files by parsing the stdlib with ``ast`` (nothing
is imported); on CPython 3.11.7 the rebuild is byte-identical to the shipped files. The build also
writes ``SHA256SUMS`` (``sha256sum`` format) beside them, and every load checks its file against it
(once per process and file), so a truncated, emptied or edited file is refused with the rebuild
command instead of giving fewer rows.

Where the files are read from (`DATA_DIR`): ``$COURSE_DATA_DIR`` if set; else the package's own
``course_lib/datasets/``, where a wheel (``pip install .``) carries them as package data, mapped
from the checkout's ``data/`` by ``pyproject.toml``; else ``data/`` next to the package, which is
where a source checkout and an editable install (``pip install -e .``) find them.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import platform
import random
import re
import sys
import tokenize
import warnings
import zlib
from pathlib import Path

from .atomic_files import atomic_output

PACKAGED_DATA_DIR = Path(__file__).resolve().parent / "datasets"   # inside an installed wheel
CHECKOUT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # a source checkout, pip install -e
CODE_SEARCH_FILE = "code_search.jsonl.gz"
DISTRACTORS_FILE = "distractors.jsonl.gz"
INSTRUCT_FILE = "instruct.jsonl.gz"
SPLITS = ("train", "val", "test")
REBUILD = "python -m course_lib.data build"
SUMS_FILE = "SHA256SUMS"  # beside the data files, written by the build, checked by every load
DATA_FILES = (CODE_SEARCH_FILE, DISTRACTORS_FILE, INSTRUCT_FILE)


def _shipped_dir() -> Path:
    """The folder the shipped files are in: the wheel's package data, else the checkout's data/."""
    return PACKAGED_DATA_DIR if PACKAGED_DATA_DIR.is_dir() else CHECKOUT_DATA_DIR


DATA_DIR = Path(os.environ.get("COURSE_DATA_DIR") or _shipped_dir())


class DataError(RuntimeError):
    """A data file is missing or corrupt; the message names the file and how to rebuild it."""


# ---------------------------------------------------------------------------------------------
# Loading the shipped files
# ---------------------------------------------------------------------------------------------
def _data_dir() -> Path:
    """DATA_DIR, or the folder named by $COURSE_DATA_DIR when it is set now."""
    return Path(os.environ["COURSE_DATA_DIR"]) if os.environ.get("COURSE_DATA_DIR") else DATA_DIR


def _read_jsonl(name: str, keys: tuple[str, ...]) -> list[dict]:
    """Read one data file, checking every row has ``keys``; any fault becomes a DataError."""
    path = _data_dir() / name
    if not path.is_file():
        if os.environ.get("COURSE_DATA_DIR") or _data_dir() != CHECKOUT_DATA_DIR:
            raise DataError(f"{path} is missing: rebuild the data with `{REBUILD}`")
        raise DataError(f"{name} is neither in {PACKAGED_DATA_DIR} (an installed wheel's package data) "
                        f"nor in {CHECKOUT_DATA_DIR} (a source checkout): install course-lib from its "
                        f"source tree (`pip install .` or `pip install -e .`), set $COURSE_DATA_DIR to a "
                        f"folder that holds the files, or rebuild them there with `{REBUILD} --out DIR`")
    _verify(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is corrupt ({e}): rebuild the data with `{REBUILD}`") from e
    for i, row in enumerate(rows, 1):
        missing = [k for k in keys if k not in row] if isinstance(row, dict) else list(keys)
        if missing:
            raise DataError(f"{path} line {i} lacks {missing}: rebuild the data with `{REBUILD}`")
    return rows


_VERIFIED: dict[Path, tuple[int, int, int]] = {}  # resolved path -> (size, mtime_ns, inode) it verified at


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_sums(sums: Path, path: Path) -> dict[str, str]:
    """File name -> SHA-256 from a ``sha256sum``-format file; a fault names both files."""
    if not sums.is_file():
        raise DataError(f"{sums} is missing, so {path} cannot be verified: rebuild the data with `{REBUILD}`")
    found = {}
    for number, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip())
        if match is None:
            raise DataError(f"{sums} line {number} is not '<sha256>  <file name>', so {path} cannot be "
                            f"verified: rebuild the data with `{REBUILD}`")
        found[match[2]] = match[1]
    return found


def _verify(path: Path) -> None:
    """Check ``path`` against the SHA-256 in ``SHA256SUMS`` beside it; once per process while the
    file stays the same (size, modification time, inode), so loading again costs nothing."""
    stat = path.stat()
    key, stamp = path.resolve(), (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if _VERIFIED.get(key) == stamp:
        return
    sums = path.parent / SUMS_FILE
    expected = _read_sums(sums, path).get(path.name)
    if expected is None:
        raise DataError(f"{sums} lists no SHA-256 for {path.name}, so {path} cannot be verified: rebuild the "
                        f"data with `{REBUILD}`")
    actual = _file_sha256(path)
    if actual != expected:
        raise DataError(f"{path} does not match its SHA-256 in {sums} ({stat.st_size:,} bytes, sha256 "
                        f"{actual[:12]}..., expected {expected[:12]}...): the file is truncated, corrupt or "
                        f"edited; rebuild the data with `{REBUILD}`")
    _VERIFIED[key] = stamp


def _write_sums(out_dir: Path) -> None:
    """``SHA256SUMS`` for the three files in ``out_dir`` (``sha256sum -c SHA256SUMS`` checks them)."""
    lines = "".join(f"{_file_sha256(out_dir / n)}  {n}\n" for n in sorted(DATA_FILES))
    with atomic_output(out_dir / SUMS_FILE, overwrite=True) as tmp:
        tmp.write_text(lines, encoding="utf-8")


def _by_split(rows: list[dict], split: str) -> list[dict]:
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}: use one of 'train', 'val', 'test', 'all'")
    return rows if split == "all" else [r for r in rows if r["split"] == split]


def load_code_search(split: str) -> list[dict]:
    """Code-search pairs of one split (``"train"``, ``"val"``, ``"test"`` or ``"all"``).

    Each row: ``id`` (``"module:qualname"``), ``module``, ``qualname``, ``query`` (the first
    paragraph of the docstring, on one line), ``document`` (the source without its docstring)
    and ``split``. Rows are sorted by id.
    """
    keys = ("id", "module", "qualname", "query", "document", "split")
    return _by_split(_read_jsonl(CODE_SEARCH_FILE, keys), split)


def load_distractors(n: int | None = None, seed: int = 0, exclude_ids=()) -> list[dict]:
    """Distractor functions (``id``, ``module``, ``qualname``, ``document``), sorted by id.

    With ``n``, a random sample of ``n`` of them, the same for the same ``seed``, kept in file
    order. Rows whose id is in ``exclude_ids`` are left out before sampling.
    """
    rows = _read_jsonl(DISTRACTORS_FILE, ("id", "module", "qualname", "document"))
    excluded = set(exclude_ids)
    rows = [r for r in rows if r["id"] not in excluded]
    if n is None:
        return rows
    if n < 0 or n > len(rows):
        raise ValueError(f"n={n} distractors asked for, but {len(rows)} exist: use 0 <= n <= {len(rows)}")
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def load_instruct(split: str) -> list[dict]:
    """Instruction rows of one split: ``id``, ``module``, ``instruction``, ``answer``, ``split``.

    Row ``id`` matches the code-search pair it was made from; ``answer`` is the function's bare
    name (the last part of the pair's qualname).
    """
    return _by_split(_read_jsonl(INSTRUCT_FILE, ("id", "module", "instruction", "answer", "split")), split)


def to_dataset(rows: list[dict]):
    """The rows as a Hugging Face ``datasets.Dataset`` (one column per key)."""
    import datasets

    return datasets.Dataset.from_list(list(rows))


# ---------------------------------------------------------------------------------------------
# Building the files from the stdlib source
# ---------------------------------------------------------------------------------------------
STDLIB_VERSION = "3.11.7"  # the CPython whose stdlib the shipped files come from
SKIPPED = {"test", "tests", "idlelib", "lib2to3", "turtledemo"}  # no pairs; distractors only if needed
MIN_DISTRACTORS = 20_000
TEST_FRACTION = VAL_FRACTION = 0.10


def _functions(body: list[ast.stmt], prefix: str = ""):
    """(qualname, node) of the functions and methods in ``body``, in source order.

    Classes are entered (``Class.method``); so are module-level ``if``/``try``/``with`` blocks,
    where the stdlib defines platform-dependent variants. Functions nested in functions are not.
    """
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, prefix + node.name + ".")
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            for block in blocks + [h.body for h in getattr(node, "handlers", [])]:
                yield from _functions(block, prefix)


def _summary(docstring: str | None) -> str | None:
    """First paragraph of a docstring on one line, or None if it has < 4 words or a doctest."""
    if not docstring:
        return None
    summary = " ".join(re.split(r"\n\s*\n", docstring.strip())[0].split())
    return summary if len(summary.split()) >= 4 and ">>>" not in summary else None


def _does_nothing(stmt: ast.stmt) -> bool:
    """``pass``, a bare constant (``...``, a stray string) or ``raise NotImplementedError``."""
    if isinstance(stmt, ast.Pass) or isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True
    exc = getattr(stmt, "exc", None) if isinstance(stmt, ast.Raise) else None
    exc = exc.func if isinstance(exc, ast.Call) else exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def _document(node: ast.FunctionDef, lines: list[str]) -> str | None:
    """The function's source (decorators, comments kept) without its docstring, dedented.

    None when the result is not a standalone function that parses, is a single line, still has
    a docstring, or does nothing (every statement of the body passes ``_does_nothing``).
    """
    body, dropped = node.body, range(0)
    if ast.get_docstring(node, clean=False) is not None:
        doc, body = body[0], body[1:]
        before = lines[doc.lineno - 1].encode()[: doc.col_offset]  # ast offsets count UTF-8 bytes
        after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset:]
        if before.strip() or after.strip():
            return None  # the docstring shares a line with other code
        dropped = range(doc.lineno, doc.end_lineno + 1)
    if all(_does_nothing(s) for s in body):
        return None
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    kept = [lines[i - 1] for i in range(start, node.end_lineno + 1) if i not in dropped]
    # Dedent by the def's own indentation; lines of a string literal that sit further left stay.
    indent = node.col_offset
    text = "\n".join(line[indent:] if not line[:indent].strip() else line for line in kept)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or ast.get_docstring(tree.body[0]) is not None:
        return None
    return text if sum(1 for line in kept if line.strip()) >= 2 else None


def _stdlib_functions(stdlib_dir: Path) -> list[dict]:
    """Every function and method of the stdlib as a row, with ``query``/``document`` or None.

    A ``skipped`` flag marks the packages that give no pairs. Where a module defines the same
    qualname twice (platform variants, property setters), only the first definition is kept.
    """
    rows: dict[str, dict] = {}
    for path in sorted(stdlib_dir.rglob("*.py")):
        parts = path.relative_to(stdlib_dir).with_suffix("").parts
        if not all(p.isidentifier() for p in parts) or "site-packages" in parts:
            continue  # third-party packages; config-3.11-x86_64-linux-gnu/ and the like are no modules
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            with tokenize.open(path) as f:
                text = f.read()
            tree = ast.parse(text)
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        lines = text.splitlines()
        for qualname, node in _functions(tree.body):
            rows.setdefault(f"{module}:{qualname}", {
                "id": f"{module}:{qualname}", "module": module, "qualname": qualname,
                "query": _summary(ast.get_docstring(node)), "document": _document(node, lines),
                "skipped": any(p in SKIPPED for p in parts)})
    return sorted(rows.values(), key=lambda r: r["id"])


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _assign_splits(pairs: list[dict]) -> None:
    """Set each pair's split by its top-level module (``email.*`` all in one split).

    Modules are taken in order of the sha256 of their name; each goes to test if test stays
    within 10% of the pairs with it, else to val under the same rule, else to train.
    """
    sizes: dict[str, int] = {}
    for p in pairs:
        top = p["module"].split(".")[0]
        sizes[top] = sizes.get(top, 0) + 1
    split_of, filled = {}, {"test": 0, "val": 0, "train": 0}
    for top in sorted(sizes, key=_sha256):
        limits = (("test", TEST_FRACTION), ("val", VAL_FRACTION), ("train", 1.0))
        split_of[top] = next(s for s, frac in limits if filled[s] + sizes[top] <= frac * len(pairs))
        filled[split_of[top]] += sizes[top]
    for p in pairs:
        p["split"] = split_of[p["module"].split(".")[0]]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Gzip-compressed JSON lines with no timestamp or file name inside: same rows, same bytes."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as f:
        f.write(data)
    os.replace(tmp, path)


def instruction(module: str, summary: str) -> str:
    """The SmolLM2 prompt for one pair: the module and docstring summary, asking for the name."""
    return (f"A function in the Python standard library module `{module}` has this docstring "
            f"summary:\n{summary}\nWhat is the function's name? Answer with the name only.")


def build(out_dir: Path = DATA_DIR, stdlib_dir: Path | None = None) -> dict:
    """Build the three data files into ``out_dir`` from the stdlib source; return the counts.

    ``stdlib_dir`` defaults to the running Python's stdlib; the shipped files come from
    CPython 3.11.7's, and another version gives other (still valid) files, with a warning.
    """
    if stdlib_dir is None:
        stdlib_dir = Path(ast.__file__).parent
        if platform.python_version() != STDLIB_VERSION:
            warnings.warn(f"building from Python {platform.python_version()}'s stdlib; the shipped "
                          f"files come from {STDLIB_VERSION}'s, so the result will differ", stacklevel=2)
    functions = _stdlib_functions(Path(stdlib_dir))
    usable = [f for f in functions if f["document"] is not None]

    pairs, queries, documents = [], set(), set()
    for f in (f for f in usable if f["query"] and not f["skipped"]):  # sorted by id: first one wins
        if f["query"] not in queries and f["document"] not in documents:
            pairs.append({k: f[k] for k in ("id", "module", "qualname", "query", "document")})
            queries.add(f["query"])
            documents.add(f["document"])
    _assign_splits(pairs)

    seen, distractors, spare = set(documents), [], []
    # Functions that answer a pair's query or repeat a pair's document would be false negatives.
    # Stable sort: the stdlib proper comes first, so a duplicate is dropped from the skipped ones.
    for f in sorted(usable, key=lambda f: f["skipped"]):
        if f["query"] in queries or f["document"] in seen:
            continue
        seen.add(f["document"])
        (spare if f["skipped"] else distractors).append({k: f[k] for k in ("id", "module", "qualname", "document")})
    from_skipped = sorted(spare, key=lambda r: _sha256(r["id"]))[: max(0, MIN_DISTRACTORS - len(distractors))]
    distractors = sorted(distractors + from_skipped, key=lambda r: r["id"])

    instruct = [{"id": p["id"], "module": p["module"], "instruction": instruction(p["module"], p["query"]),
                 "answer": p["qualname"].split(".")[-1], "split": p["split"]} for p in pairs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / CODE_SEARCH_FILE, pairs)
    _write_jsonl(out_dir / DISTRACTORS_FILE, distractors)
    _write_jsonl(out_dir / INSTRUCT_FILE, instruct)
    _write_sums(out_dir)  # last: a build that dies before this leaves files that fail their old sums
    counts = {s: sum(p["split"] == s for p in pairs) for s in SPLITS}
    return {**counts, "pairs": len(pairs), "distractors": len(distractors),
            "distractors_from_skipped": len(from_skipped), "instruct": len(instruct)}


# ---------------------------------------------------------------------------------------------
# Command line: python -m course_lib.data build [--out DIR] | stats
# ---------------------------------------------------------------------------------------------
def stats() -> dict:
    """Counts of the shipped files: pairs per split, distractors, instruction rows."""
    pairs = load_code_search("all")
    counts = {s: sum(p["split"] == s for p in pairs) for s in SPLITS}
    return {**counts, "pairs": len(pairs), "distractors": len(load_distractors()),
            "instruct": len(load_instruct("all"))}


def main(argv: list[str] | None = None) -> int:
    """Run ``build [--out DIR]`` or ``stats``; print the counts, or one line of error."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["build"] and len(args) in (1, 3) and args[1:2] in ([], ["--out"]):
            counts = build(Path(args[2]) if len(args) == 3 else _data_dir())
        elif args == ["stats"]:
            counts = stats()
        else:
            print(f"error: unknown command {' '.join(args)!r}: use `build [--out DIR]` or `stats`", file=sys.stderr)
            return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
