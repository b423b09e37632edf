"""A pytest plugin, loaded by every pytest run in the project (``addopts`` in pyproject.toml), so
by both runs of `make test` (the unit tests and the chapters under nbval): at the end, the time each
test file or chapter took (set-up, test and tear-down together), slowest first, so that a test or
chapter that became slow shows in every run's output."""

from collections import defaultdict

_SECONDS = defaultdict(float)


def pytest_runtest_logreport(report):
    _SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _SECONDS:
        return
    terminalreporter.section("seconds per file")
    total = sum(_SECONDS.values())
    for path, seconds in sorted(_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {seconds / total:4.0%}  {path}")
    terminalreporter.write_line(f"{total:8.1f} s  total")
