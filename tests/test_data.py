"""The shipped datasets: module-disjoint splits, docstrings really removed, byte-identical rebuild,
and errors that say how to repair a missing or corrupt file."""

import ast
import gzip
import hashlib
import importlib
import inspect
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from course_lib import data

FILES = (data.CODE_SEARCH_FILE, data.DISTRACTORS_FILE, data.INSTRUCT_FILE)
same_stdlib = pytest.mark.skipif(
    platform.python_version() != data.STDLIB_VERSION,
    reason=f"the shipped data come from CPython {data.STDLIB_VERSION}'s stdlib, this is "
           f"{platform.python_version()}: its stdlib source differs")


@pytest.fixture(scope="module")
def pairs():
    return data.load_code_search("all")


@pytest.fixture(scope="module")
def distractors():
    return data.load_distractors()


def top_level(module: str) -> str:
    return module.split(".")[0]


# ---------------------------------------------------------------------------------------------
# Code-search pairs
# ---------------------------------------------------------------------------------------------
def test_splits_are_disjoint_by_top_level_module(pairs):
    splits_of = {}
    for p in pairs:
        splits_of.setdefault(top_level(p["module"]), set()).add(p["split"])
    assert {m: s for m, s in splits_of.items() if len(s) > 1} == {}
    by_split = {s: data.load_code_search(s) for s in data.SPLITS}
    assert sum(map(len, by_split.values())) == len(pairs)
    assert all(r["split"] == s for s, rows in by_split.items() for r in rows)


def test_sizes_are_what_the_course_needs(pairs):
    assert 3000 <= len(pairs) <= 8000
    n = {s: len(data.load_code_search(s)) for s in data.SPLITS}
    assert n["test"] >= 300 and n["val"] >= 300
    assert n["train"] > 0.7 * len(pairs)


def test_ids_are_unique_and_name_module_and_qualname(pairs):
    ids = [p["id"] for p in pairs]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(p["id"] == f"{p['module']}:{p['qualname']}" for p in pairs)


def test_queries_are_one_line_summaries_of_four_words_or_more(pairs):
    queries = [p["query"] for p in pairs]
    assert len(set(queries)) == len(queries)
    assert all(len(q.split()) >= 4 and q == " ".join(q.split()) for q in queries)


def test_documents_are_parsable_functions_without_their_docstring(pairs):
    assert len({p["document"] for p in pairs}) == len(pairs)
    for p in pairs:
        tree = ast.parse(textwrap.dedent(p["document"]))
        assert len(tree.body) == 1, p["id"]
        fn = tree.body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)), p["id"]
        assert fn.name == p["qualname"].split(".")[-1], p["id"]
        assert ast.get_docstring(fn) is None, p["id"]
        strings = [" ".join(n.value.split()) for n in ast.walk(fn)
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert not any(p["query"][:30] in s for s in strings), p["id"]


@same_stdlib
@pytest.mark.parametrize("pair_id", ["json.decoder:JSONDecoder.decode", "textwrap:dedent",
                                     "enum:EnumType._get_mixins_", "logging:Logger.info"])
def test_document_is_the_source_less_exactly_the_docstring(pairs, pair_id):
    """Checked against inspect on the imported function, not against the builder's own ast code."""
    pair = next(p for p in pairs if p["id"] == pair_id)
    obj = importlib.import_module(pair["module"])
    for name in pair["qualname"].split("."):
        obj = getattr(obj, name)
    source = textwrap.dedent(inspect.getsource(obj)).rstrip("\n").splitlines()
    document = pair["document"].splitlines()
    cut = next(i for i, (a, b) in enumerate(zip(source, document)) if a != b)
    removed = source[cut: cut + len(source) - len(document)]
    assert source[:cut] + source[cut + len(removed):] == document
    # dedenting the method shifted its docstring's lines, so compare them cleaned
    assert inspect.cleandoc(ast.literal_eval("\n".join(removed).strip())) == inspect.cleandoc(obj.__doc__)
    assert pair["query"] == " ".join(inspect.getdoc(obj).split("\n\n")[0].split())


def test_bad_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="'train', 'val', 'test', 'all'"):
        data.load_code_search("validation")
    with pytest.raises(ValueError, match="'train'"):
        data.load_instruct("dev")


# ---------------------------------------------------------------------------------------------
# Distractors and the instruction task
# ---------------------------------------------------------------------------------------------
def test_distractors_are_many_distinct_and_never_a_pair(pairs, distractors):
    assert len(distractors) >= data.MIN_DISTRACTORS
    ids = [d["id"] for d in distractors]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert not set(ids) & {p["id"] for p in pairs}
    documents = {d["document"] for d in distractors}
    assert len(documents) == len(distractors)
    assert not documents & {p["document"] for p in pairs}
    assert (data.DATA_DIR / data.DISTRACTORS_FILE).stat().st_size <= 15 * 2**20


def test_skipped_packages_only_fill_up_to_the_minimum(distractors):
    from_skipped = [d for d in distractors if set(d["module"].split(".")) & data.SKIPPED]
    assert len(distractors) - len(from_skipped) < data.MIN_DISTRACTORS
    assert len(distractors) == data.MIN_DISTRACTORS  # so only as many as needed were taken


def test_distractor_sampling_is_seeded(distractors):
    a, b = data.load_distractors(500, seed=1), data.load_distractors(500, seed=1)
    assert a == b and len(a) == 500
    assert a != data.load_distractors(500, seed=2)
    assert [d["id"] for d in a] == sorted(d["id"] for d in a)  # file order kept
    excluded = {d["id"] for d in a[:10]}
    assert not excluded & {d["id"] for d in data.load_distractors(len(distractors) - 10, exclude_ids=excluded)}
    with pytest.raises(ValueError, match=f"{len(distractors)} exist"):
        data.load_distractors(len(distractors) + 1)
    with pytest.raises(ValueError):
        data.load_distractors(-1)


def test_instruct_rows_answer_the_pairs_function_name(pairs):
    rows = data.load_instruct("all")
    assert [r["id"] for r in rows] == [p["id"] for p in pairs]
    for r, p in zip(rows, pairs):
        assert r["answer"] == p["qualname"].split(".")[-1]
        assert r["split"] == p["split"] and r["module"] == p["module"]
        assert p["query"] in r["instruction"] and p["module"] in r["instruction"]
    assert len(data.load_instruct("test")) == len(data.load_code_search("test"))


def test_to_dataset_keeps_rows_and_columns():
    rows = data.load_instruct("val")[:20]
    ds = data.to_dataset(rows)
    assert ds.column_names == list(rows[0]) and ds.to_list() == rows


# ---------------------------------------------------------------------------------------------
# Provenance: rebuild, README, errors, command line
# ---------------------------------------------------------------------------------------------
@same_stdlib
def test_rebuild_is_byte_identical(tmp_path):
    counts = data.build(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (data.DATA_DIR / name).read_bytes(), name
    assert (tmp_path / data.SUMS_FILE).read_bytes() == (data.DATA_DIR / data.SUMS_FILE).read_bytes()
    assert {k: counts[k] for k in data.stats()} == data.stats()


def test_readme_states_the_shipped_counts_and_rebuild_command():
    readme = (data.DATA_DIR / "README.md").read_text()
    assert data.REBUILD in readme and data.STDLIB_VERSION in readme
    for name, n in data.stats().items():
        assert f"{n:,}" in readme, f"README lacks the {name} count {n:,}"
    for name in FILES:
        assert f"{(data.DATA_DIR / name).stat().st_size:,}" in readme, f"README lacks the size of {name}"
        digest = hashlib.sha256((data.DATA_DIR / name).read_bytes()).hexdigest()
        assert f"`{digest}`" in readme, f"README lacks the SHA-256 of {name}"


def corrupt(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"this is not gzip at all")
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "bad json":
        path.write_bytes(gzip.compress(b'{"id": "x", \n'))
    elif how == "missing key":
        path.write_bytes(gzip.compress(b'{"id": "x"}\n'))
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["garbage", "truncated", "bad json", "missing key", "missing file"])
@pytest.mark.parametrize("name, load", [(data.CODE_SEARCH_FILE, lambda: data.load_code_search("all")),
                                        (data.DISTRACTORS_FILE, data.load_distractors),
                                        (data.INSTRUCT_FILE, lambda: data.load_instruct("all"))])
def test_broken_file_says_how_to_rebuild(tmp_path, monkeypatch, how, name, load):
    shutil.copy(data.DATA_DIR / name, tmp_path / name)
    corrupt(tmp_path / name, how)
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DataError, match="python -m course_lib.data build") as err:
        load()
    assert str(tmp_path / name) in str(err.value)


def test_no_data_anywhere_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    """Neither a wheel's package data nor a checkout's data/: the error names both places and the
    three ways out (install from the source tree, $COURSE_DATA_DIR, rebuild)."""
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "PACKAGED_DATA_DIR", tmp_path / "course_lib" / "datasets")
    monkeypatch.setattr(data, "CHECKOUT_DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(data, "DATA_DIR", data._shipped_dir())
    assert data.DATA_DIR == tmp_path / "data"
    with pytest.raises(data.DataError) as err:
        data.load_instruct("test")
    message = str(err.value)
    for part in (str(tmp_path / "course_lib" / "datasets"), str(tmp_path / "data"), "pip install .",
                 "COURSE_DATA_DIR", "python -m course_lib.data build --out DIR"):
        assert part in message, part


def test_command_line():
    run = [sys.executable, "-m", "course_lib.data"]
    bad = subprocess.run(run + ["rebuild"], check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "build" in bad.stderr
    ok = subprocess.run(run + ["stats"], check=False, capture_output=True, text=True)
    assert ok.returncode == 0 and f"pairs={len(data.load_code_search('all'))}" in ok.stdout


# ---------------------------------------------------------------------------------------------
# SHA-256 sums: a truncated, emptied or edited file is refused before it is parsed
# ---------------------------------------------------------------------------------------------
def _copy_of_the_data(folder: Path, sums: bool = True) -> Path:
    folder.mkdir()
    for name in FILES + ((data.SUMS_FILE,) if sums else ()):
        shutil.copy(data.DATA_DIR / name, folder / name)
    return folder


def _tamper(path: Path, how: str) -> None:
    if how == "0-byte file":
        path.write_bytes(b"")
    elif how == "empty gzip":
        path.write_bytes(gzip.compress(b""))
    else:  # the first 100 rows, well-formed: only the checksum can tell
        lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
        path.write_bytes(gzip.compress(b"".join(lines[:100]), mtime=0))


LOADERS = [(data.CODE_SEARCH_FILE, lambda: data.load_code_search("all")),
           (data.DISTRACTORS_FILE, data.load_distractors),
           (data.INSTRUCT_FILE, lambda: data.load_instruct("all"))]


def test_shipped_sums_are_the_files_sums():
    lines = (data.DATA_DIR / data.SUMS_FILE).read_text().splitlines()
    assert lines == [f"{hashlib.sha256((data.DATA_DIR / n).read_bytes()).hexdigest()}  {n}" for n in sorted(FILES)]
    for name in FILES:
        data._verify(data.DATA_DIR / name)  # the shipped files verify


@pytest.mark.parametrize("how", ["0-byte file", "empty gzip", "100 rows"])
@pytest.mark.parametrize("name, load", LOADERS)
def test_tampered_file_fails_its_checksum(tmp_path, monkeypatch, how, name, load):
    folder = _copy_of_the_data(tmp_path / "data")
    _tamper(folder / name, how)
    monkeypatch.setenv("COURSE_DATA_DIR", str(folder))
    with pytest.raises(data.DataError, match="SHA-256") as err:
        load()
    message = str(err.value)
    assert "\n" not in message and str(folder / name) in message and data.REBUILD in message, message


def test_missing_sums_file_is_refused(tmp_path, monkeypatch):
    folder = _copy_of_the_data(tmp_path / "data", sums=False)
    monkeypatch.setenv("COURSE_DATA_DIR", str(folder))
    with pytest.raises(data.DataError) as err:
        data.load_instruct("test")
    message = str(err.value)
    assert str(folder / data.SUMS_FILE) in message and str(folder / data.INSTRUCT_FILE) in message
    assert data.REBUILD in message and "\n" not in message


@pytest.mark.parametrize("sums", ["not a checksum line\n", ""], ids=["garbage", "empty"])
def test_broken_sums_file_is_refused(tmp_path, monkeypatch, sums):
    folder = _copy_of_the_data(tmp_path / "data")
    (folder / data.SUMS_FILE).write_text(sums)
    monkeypatch.setenv("COURSE_DATA_DIR", str(folder))
    with pytest.raises(data.DataError) as err:
        data.load_code_search("test")
    message = str(err.value)
    assert str(folder / data.SUMS_FILE) in message and data.REBUILD in message and "\n" not in message


def test_sums_are_checked_once_per_file_and_again_when_it_changes(tmp_path, monkeypatch):
    folder = _copy_of_the_data(tmp_path / "data")
    monkeypatch.setenv("COURSE_DATA_DIR", str(folder))
    hashed = []
    real = data._file_sha256
    monkeypatch.setattr(data, "_file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    rows = data.load_instruct("all")
    assert data.load_instruct("test") and data.load_instruct("all") == rows
    assert hashed == [data.INSTRUCT_FILE]                     # verified once, then cached
    _tamper(folder / data.INSTRUCT_FILE, "100 rows")
    with pytest.raises(data.DataError, match="SHA-256"):     # a changed file is verified again
        data.load_instruct("all")


def test_build_writes_the_sums_its_files_verify_against(tmp_path, monkeypatch):
    stdlib = tmp_path / "stdlib"
    (stdlib / "alpha").mkdir(parents=True)
    for module in ("alpha/__init__", "beta", "gamma"):
        (stdlib / f"{module}.py").write_text(textwrap.dedent(f'''
            def {module.split("/")[0]}_one(x):
                """Return the argument plus one, for {module}."""
                y = x + 1
                return y

            def helper_{module.split("/")[0]}(x):
                y = x * 2
                return y
            '''))
    out = tmp_path / "out"
    data.build(out, stdlib_dir=stdlib)
    sums = (out / data.SUMS_FILE).read_text()
    for name in FILES:
        assert f"{hashlib.sha256((out / name).read_bytes()).hexdigest()}  {name}\n" in sums
    monkeypatch.setenv("COURSE_DATA_DIR", str(out))
    assert len(data.load_code_search("all")) == 3 and len(data.load_distractors()) == 3
