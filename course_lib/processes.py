"""Processes for `course_lib.distributed`: ``fn(rank, world_size, *args)`` in N processes joined in one
process group (gloo on CPU, NCCL on GPUs), their results or a child's exception brought back, a hang
turned into a ``TimeoutError``.

`launch` starts the processes itself; the same ``fn`` runs under ``torchrun --nproc_per_node N
script.py`` or ``accelerate launch --multi_gpu --num_processes N script.py`` when the script calls
it as ``fn(*init_from_env())``. `rank_and_world` and `current_device` say where a process stands,
inside a group or not. `course_lib.distributed` re-exports all five.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import re
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from functools import reduce
from pathlib import Path

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

from .checks import one_of, positive_int, positive_number

__all__ = ["current_device", "free_port", "init_from_env", "launch", "rank_and_world"]


def free_port(port: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free now: ``port`` itself (a ``ValueError`` if it is in use)
    or, with ``None``, one the system picks (binding port 0 makes it choose a free one)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port or 0))
        except OSError as error:
            raise ValueError(f"port {port} on 127.0.0.1 is in use ({error.strerror}); pass port=None to let "
                             "launch pick a free one, or choose another port") from None
        return s.getsockname()[1]


def _backend(backend: str | None, nprocs: int) -> str:
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    one_of("backend", backend, {"gloo", "nccl"})
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise ValueError(f"nccl needs one GPU per process: {nprocs} processes, {torch.cuda.device_count()} GPUs; "
                         "use fewer processes, or backend='gloo' to run them on the CPU")
    return backend


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def current_device() -> torch.device:
    """This process's device: its own GPU under NCCL, otherwise the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout: float = 600.0) -> tuple[int, int]:
    """Join the process group ``torchrun`` / ``accelerate launch`` describe in the environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...; under NCCL each process takes GPU ``LOCAL_RANK``);
    returns ``(rank, world_size)``. A script ``fn(*init_from_env(), ...)`` runs ``fn`` as `launch` does."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = _backend(backend, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return rank_and_world()


def _to_cpu(value):
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _save_record(folder, index: int, record: dict) -> None:
    torch.save(record, Path(folder) / f"rank{index}.tmp")
    os.replace(Path(folder) / f"rank{index}.tmp", Path(folder) / f"rank{index}")


def _worker(index, fn, args, world_size, port, backend, folder, timeout, environ) -> None:
    os.environ.clear()       # the caller's environment at launch, not the one the fork server started with
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        if backend == "nccl":
            torch.cuda.set_device(index)
        else:   # share the cores instead of each process starting one thread per core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        # a collective times out a minute after launch's own deadline, so that the clearer TimeoutError comes first
        dist.init_process_group(backend, rank=index, world_size=world_size, timeout=timedelta(seconds=timeout + 60))
        result = _to_cpu(fn(index, world_size, *args))
        dist.barrier()                   # no rank tears its connections down while a peer still uses them
        dist.destroy_process_group()     # only on success: after a failure the peers may be stuck mid-collective
        _save_record(folder, index, {"result": result})
    except BaseException as error:
        # plain strings, so that launch reads the record back with weights_only=True; the time (one clock
        # for every process of the machine) tells launch which rank failed first
        _save_record(folder, index, {"error_type": f"{type(error).__module__}:{type(error).__qualname__}",
                                     "message": str(error), "traceback": traceback.format_exc(),
                                     "failed_at": time.monotonic()})
        raise
    # Saved, group gone: leave without the interpreter's shutdown, whose C++ destructors (gloo's threads,
    # OpenMP's pool) once aborted a rank (SIGABRT) after it had saved a correct result.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _exception_type(name: str) -> type:
    module, _, qualname = name.partition(":")
    try:
        found = reduce(getattr, qualname.split("."), importlib.import_module(module))
    except (ImportError, AttributeError, ValueError):
        return RuntimeError
    return found if isinstance(found, type) and issubclass(found, BaseException) else RuntimeError


def _first_failure(folder: Path, world: int, noticed: int) -> int:
    """The rank whose exception came first. When one rank raises, its peers' collectives fail too
    ("Connection closed by peer"), and the rank torch notices first (``noticed``) may be one of
    those: on a busy machine several have ended before launch looks. Every rank that raised saved
    the time it did; the earliest is the cause. ``noticed`` if no rank saved one (it died without a
    Python exception)."""
    times = {rank: record["failed_at"] for rank in range(world)
             if (record := _read_record(folder, rank)) is not None and "failed_at" in record}
    return min(times, key=times.get) if times else noticed


def _read_record(folder: Path, rank: int) -> dict | None:
    """What rank ``rank`` saved (`_save_record`), or None if it saved nothing readable."""
    try:
        return torch.load(folder / f"rank{rank}", weights_only=True)
    except (OSError, pickle.UnpicklingError, EOFError, RuntimeError):
        return None


def _child_error(folder: Path, rank: int, world: int, failure: Exception) -> Exception:
    """The child's own exception, its message prefixed with the rank, its traceback as a note."""
    record = _read_record(folder, rank)
    if record is None:
        return RuntimeError(f"rank {rank} of {world} died without a Python exception: {failure}")
    if "result" in record:
        return RuntimeError(f"rank {rank} of {world} returned its result, then its process died while exiting "
                            f"({failure}): a crash in a library's clean-up; run again, and report it if it repeats")
    kind = _exception_type(record["error_type"])
    text = f"rank {rank} of {world} raised {record['error_type'].rpartition(':')[2]}: {record['message']}"
    try:
        raised = kind(text)
    except TypeError:     # an exception class that wants other arguments than a message
        raised = RuntimeError(text)
    raised.add_note("traceback in the child process:\n" + record["traceback"])
    return raised


def _load_result(folder: Path, rank: int):
    try:
        return torch.load(folder / f"rank{rank}", weights_only=True)["result"]
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"a {found.group(1)}" if found else "an object of another kind"
        raise TypeError(f"rank {rank} returned something launch cannot bring back safely ({what}): return "
                        "tensors, numbers, strings, dtypes, and lists, tuples or dicts of them") from None


# A rank is a fork of one clean server process that imported torch and the package once (the first launch
# starts it; it lives as long as the caller, and never runs a kernel, so no thread pool is forked): a later
# launch of two ranks took 0.07 s instead of 4.2 s, each rank importing torch again with "spawn" (~3 s of CPU
# per rank on 2 cores). Where there is no fork server (Windows), spawn.
_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _preload(fn) -> list[str]:
    """What the fork server imports before the first fork: the package's distributed module (torch,
    torch.distributed, FSDP), and ``fn``'s module when it is one of this package's. Never the caller's
    own module: a rank imports that afresh, as a spawned process would, so an edited file is read again."""
    package = __name__.partition(".")[0]
    module = getattr(fn, "__module__", None) or ""
    return list(dict.fromkeys([f"{package}.distributed"] + ([module] if module.partition(".")[0] == package else [])))


def launch(fn, nprocs: int, *args, timeout: float = 300.0, backend: str | None = None,
           port: int | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` new processes and return their results, by rank.

    The processes (``torch.multiprocessing``, forks of a clean server process: see ``_START_METHOD``)
    join one process group on 127.0.0.1:``port`` (default: a free one) with ``backend`` (default:
    NCCL, one GPU per process, when CUDA is available, else gloo, the CPU cores shared out); they see
    the caller's environment as it is at the call. ``fn`` must be importable (defined at the top of a
    module, not in a notebook cell) and return tensors, numbers, strings, dtypes, or lists, tuples and
    dicts of them (read back with ``weights_only=True``); tensors come back on the CPU. If a process
    raises, the others are stopped and its exception is raised here, naming its rank (its traceback
    attached as a note; of several that raised, the first, whose failure made the others' fail). If they have not all finished after ``timeout`` seconds they are killed and
    ``TimeoutError`` is raised: a hang fails instead of blocking.
    """
    positive_int("nprocs", nprocs)
    positive_number("timeout", timeout)
    backend = _backend(backend, nprocs)
    port = free_port(None if port is None else positive_int("port", port))
    if _START_METHOD == "forkserver":
        multiprocessing.set_forkserver_preload(_preload(fn))   # used by the server the first launch starts
    with tempfile.TemporaryDirectory(prefix="course-launch-") as tmp:
        folder = Path(tmp)
        context = torch.multiprocessing.start_processes(
            _worker, args=(fn, args, nprocs, port, backend, tmp, timeout, dict(os.environ)), nprocs=nprocs,
            join=False, start_method=_START_METHOD)
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.01, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                        process.join()
                    raise TimeoutError(f"{nprocs} processes running {getattr(fn, '__name__', fn)} did not finish "
                                       f"within {timeout:g} s and were killed: usually one rank waits in a collective "
                                       "that another never reaches (e.g. ranks given different numbers of batches)")
        except ProcessException as failure:
            rank = _first_failure(folder, nprocs, failure.error_index)
            raise _child_error(folder, rank, nprocs, failure) from None
        finally:   # torch's traceback file of each rank that raised (in the temp folder, not ours)
            for name in context.error_files:
                Path(name).unlink(missing_ok=True)
        return [_load_result(folder, r) for r in range(nprocs)]
