"""Checks for the chapters' build-it exercises, which a shortcut cannot pass.

A build-it exercise asks the learner to write the core of a technique (a LoRA forward, an NF4
block quantizer, a GradCache step...). Its check calls the learner's function on inputs the
check builds, compares the result with values worked out independently (plain tensor algebra,
a hand-worked case, or the production library run *before* the learner's code), and runs the
learner's function inside :func:`forbidden`: there, the functions that already do the job
(``course_lib``'s and the library's) raise :class:`ShortcutError`. So calling them is caught,
and the test suite proves it for every exercise (``tests/test_exercises_*.py``).

One module per chapter: ``lora`` (01), ``nf4`` (02), ``gradcache`` (03), ``matryoshka`` (04),
``memory`` (05), ``kv_cache`` (06), ``ia3`` (07).
"""

from __future__ import annotations

import contextlib
import functools


class ShortcutError(AssertionError):
    """The learner's solution called a function that already does what the exercise asks."""


def _refuse(name: str, hint: str):
    def refused(*args, **kwargs):
        raise ShortcutError(f"this exercise asks you to write it yourself: your solution called {name}"
                            f"{' (' + hint + ')' if hint else ''}")
    return refused


@contextlib.contextmanager
def forbidden(*targets: tuple[object, str], hint: str = ""):
    """Inside the block, each ``(owner, attribute)`` in ``targets`` raises :class:`ShortcutError` when called.

    ``owner`` is a module or a class; the attribute is put back on exit, whatever happens inside.
    """
    saved = []
    try:
        for owner, attribute in targets:
            original = getattr(owner, attribute)       # an AttributeError here is a typo in the check
            name = f"{getattr(owner, '__name__', owner)}.{attribute}"
            stub = _refuse(name, hint)
            if isinstance(original, (staticmethod, classmethod)):
                stub = staticmethod(stub)
            saved.append((owner, attribute, owner.__dict__.get(attribute, original) if hasattr(owner, "__dict__") else original,
                          attribute in getattr(owner, "__dict__", {})))
            setattr(owner, attribute, functools.wraps(original)(stub) if callable(original) else stub)
        yield
    finally:
        for owner, attribute, original, own in reversed(saved):
            if own:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)


def close(name: str, got, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Assert two tensors (or numbers) agree, with a message a learner can act on."""
    import torch

    got_t, expected_t = torch.as_tensor(got), torch.as_tensor(expected)
    if got_t.shape != expected_t.shape:
        raise AssertionError(f"{name}: expected shape {tuple(expected_t.shape)}, got {tuple(got_t.shape)}")
    if not torch.allclose(got_t.double(), expected_t.double(), atol=atol, rtol=rtol):
        worst = (got_t.double() - expected_t.double()).abs().max().item()
        raise AssertionError(f"{name}: not equal to the expected values (largest difference {worst:.3g})")
