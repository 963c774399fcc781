"""The closing note of torch's optimizer suite (test_torch_suite.py): optimizers covered, tests run, passed, failed,
and what was skipped by design (BY_DESIGN there: whole tests, and configurations inside tests that ran)."""

import sys

_outcomes = {}


def pytest_runtest_logreport(report):
    if "test_torch_suite.py" not in report.nodeid:
        return
    if report.when == "call" or report.outcome != "passed":
        _outcomes[report.outcome] = _outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    suite = next((m for n, m in list(sys.modules.items()) if n.endswith("test_torch_suite")), None)
    if not _outcomes or suite is None:
        return
    skipped = ", ".join(f"{n} configurations ({suite.BY_DESIGN[why]})" for why, n in sorted(suite.design_skips.items()))
    terminalreporter.write_line(
        f"torch's optimizer suite over nnopt.optim ({', '.join(suite.NAMES)}): "
        f"{sum(_outcomes.values())} tests run, {_outcomes.get('passed', 0)} passed, {_outcomes.get('failed', 0)} "
        f"failed, {_outcomes.get('skipped', 0)} skipped; skipped by design inside them: {skipped or 'none'}")
