"""The onnx package's backend node tests, run through the mirror (tools/onnx_node_tests.py)."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.onnx_node_tests import KNOWN_FAILURES, op_table, run_node_tests  # noqa: E402


@functools.lru_cache(maxsize=1)
def _results():
    return tuple(run_node_tests())


@pytest.mark.slow
def test_no_unexpected_failures():
    results = _results()
    failed = {r.name: r.detail for r in results if r.outcome == "fail"}
    unexpected = {name: detail for name, detail in failed.items() if name not in KNOWN_FAILURES}
    ran = {r.name for r in results}
    # A known failure that passes (or no longer runs) must leave the list, so it stays honest.
    stale = sorted(name for name in KNOWN_FAILURES if name not in failed)
    assert not unexpected, "unexpected failures:\n" + "\n".join(f"{n}: {d}" for n, d in sorted(unexpected.items()))
    assert not stale, f"known failures that no longer fail ({'not run' if not set(stale) & ran else 'passing'}): {stale}"


@pytest.mark.slow  # shares the node-test run above
def test_every_registered_op_with_cases_passes_one():
    without_pass = [op for op, cases, passed, *_ in op_table(list(_results())) if cases and not passed]
    assert not without_pass, f"registered ops whose backend cases never pass: {without_pass}"
