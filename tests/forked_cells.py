"""Runs code cells, each in a new process forked from one that has imported the heavy libraries once.

tests/test_cpu_paths.py runs every chapter's set-up cell on the AVX2 path this way (it starts this
script with that environment). A new interpreter per cell spends 5 to 20 s importing torch,
transformers, peft, bitsandbytes and sentence-transformers again; here they are imported once, and
each cell runs in a child forked after that.

A cell prints in its child what it prints in a new interpreter (``python -c``) as long as the
imports made here print nothing: the imports a cell repeats are then silent no-ops. What they
printed is returned as ``imports_printed`` for the caller to check. A child exits without running
atexit handlers (they belong to the imports made here, shared by every child).

    python tests/forked_cells.py JOBS.json RESULTS.json

JOBS.json: ``{"preload": [module, ...], "cells": [{"name", "code", "cwd", "tmpdir"}, ...]}``.
RESULTS.json gets ``{"imports_printed": str, "runs": {name: {"returncode": int, "stdout": str,
"stderr": str}}}``; the cells' output files go beside it.
"""

import json
import os
import signal
import sys
import tempfile
import traceback

CELL_TIMEOUT_S = 600


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _point_at(path: str, *fds: int) -> None:
    """Points the given file descriptors at a new file `path`."""
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd in fds:
        os.dup2(target, fd)
    os.close(target)


def _redirected(path: str, fds=(1, 2)) -> list[int]:
    """Points the given file descriptors at `path`; returns copies of the old ones to restore."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    _point_at(path, *fds)
    return saved


def _restore(saved: list[int], fds=(1, 2)) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, old in zip(fds, saved):
        os.dup2(old, fd)
        os.close(old)


def _run_child(job: dict, out: str, err: str) -> None:
    """In the forked child: the cell's stdout and stderr go to their files, as a new `python -c` would
    print them; exits 0, or 1 with the traceback on stderr, or the cell's own SystemExit code."""
    code = 1
    try:
        signal.alarm(CELL_TIMEOUT_S)          # a hung cell ends the child, not the run
        os.chdir(job["cwd"])
        os.environ["TMPDIR"] = job["tmpdir"]
        tempfile.tempdir = None               # tempfile read TMPDIR once already, in the parent
        _point_at(out, 1)
        _point_at(err, 2)
        sys.argv = ["-c"]
        exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 (a test's cell, as python -c runs it)
        code = 0
    except SystemExit as exc:             # as the interpreter ends on sys.exit(...)
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (any other exception ends the cell with its traceback, as in python -c)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(jobs_path: str, results_path: str) -> None:
    jobs = json.loads(_read(jobs_path))
    work = os.path.dirname(os.path.abspath(results_path))   # the outputs' files go beside the results
    imports_out = os.path.join(work, "imports.out")
    saved = _redirected(imports_out)
    try:
        for name in jobs["preload"]:
            __import__(name)
    finally:
        _restore(saved)
    results = {"imports_printed": _read(imports_out), "runs": {}}
    for i, job in enumerate(jobs["cells"]):
        out, err = os.path.join(work, f"cell-{i}.out"), os.path.join(work, f"cell-{i}.err")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(job, out, err)
        _, status = os.waitpid(pid, 0)
        returncode = os.waitstatus_to_exitcode(status)
        results["runs"][job["name"]] = {"returncode": returncode, "stdout": _read(out) if os.path.exists(out) else "",
                                        "stderr": _read(err) if os.path.exists(err) else ""}
    tmp = results_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f)
    os.replace(tmp, results_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/forked_cells.py JOBS.json RESULTS.json")
    main(sys.argv[1], sys.argv[2])
