"""Writing files so that a failure leaves nothing half-written.

An export that dies half-way (disk full, an exporter's error, Ctrl-C) must not leave a truncated
``.onnx`` or ``.gguf`` file, or a checkpoint folder without its weights, where the next cell
would load it. `atomic_output` writes to a temporary name in the same folder and renames it into
place only when the writing succeeded: a rename within one file system is atomic, so a reader
sees the old output or the new one, never a part of one. It also refuses to replace an existing
output unless asked (``overwrite=True``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path, overwrite: bool = False, directory: bool = False):
    """``with atomic_output(path) as tmp:`` write to ``tmp``; it becomes ``path`` only on success.

    ``tmp`` is a fresh hidden file (or, with ``directory=True``, folder) in ``path``'s folder, so
    the final rename stays on one file system. An existing ``path`` raises ``FileExistsError``
    unless ``overwrite`` is set; then it is replaced only once the new output is complete. If the
    block raises, ``tmp`` is deleted and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another path")
    if path.exists() and path.is_dir() != directory:
        raise FileExistsError(f"{path} exists and is a {'folder' if path.is_dir() else 'file'}, but this writes a "
                              f"{'folder' if directory else 'file'}: choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp / mkstemp make outputs private to their owner
    else:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(handle)
        tmp = Path(name)
        tmp.chmod(0o644)
    try:
        yield tmp
        if directory and path.exists():  # a folder cannot be replaced in one step: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            path.rename(old / "previous")
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def exclusive_lock(path):
    """``with exclusive_lock(path):`` only one holder at a time, across processes and threads.

    ``path`` is a lock file (created if missing, left in place: deleting it would let two holders
    in). A second caller blocks until the first leaves the block. The operating system releases the
    lock when its holder dies, so a killed process never leaves the lock taken.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:  # each call opens its own handle: threads exclude each other too
        if os.name == "nt":
            import msvcrt

            while True:
                try:
                    handle.seek(0)
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # gives up after ~10 s: try again
                    break
                except OSError:
                    continue
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if os.name == "nt":
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            else:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
