"""The course's own tooling, apart from the techniques: it imports them, they never import it.

* ``sitegen``: the site's generated parts (chapter times, the benchmarks page).
* ``figures``: the ``FIGURE`` line every benchmark ends with, written and parsed in one place.
* ``student``: students' copies of the chapters (solutions replaced by stubs) for grading.
* ``ddp_demo``: the training loop in several processes (``accelerate launch``), for chapter 07.
"""
