"""Show the code that runs: a chapter displays ``course_lib``'s own source of a technique's core.

``show(LoRALinear.forward, LoRALinear.merge)`` renders each object's source (as
:func:`inspect.getsource` reads it from the installed ``course_lib``) as one Python code block, so
the page shows exactly the lines the chapter then calls, never a copy that could drift from them.
"""

from __future__ import annotations

import inspect
import textwrap

from IPython.display import Markdown, display


def source(*objects) -> str:
    """The dedented source of each object (function, method, class), blank line between them."""
    if not objects:
        raise ValueError("show/source needs at least one function, method or class to show")
    parts = []
    for obj in objects:
        target = obj.fget if isinstance(obj, property) else obj
        try:
            parts.append(textwrap.dedent(inspect.getsource(target)).rstrip())
        except (TypeError, OSError) as err:
            raise TypeError(f"cannot show the source of {obj!r}: pass a function, method or class "
                            f"defined in a .py file ({err})") from None
    return "\n\n".join(parts)


def show(*objects) -> None:
    """Display the objects' source as a Markdown Python code block (rendered in Jupyter and on the site)."""
    display(Markdown("```python\n" + source(*objects) + "\n```"))
