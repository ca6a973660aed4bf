"""The kit as a pytest test, for a plugin's own CI: one test per check.

    from modelloop.testing import conformance

    test_conformance = conformance("modelloop-plugin-brevity")

A failed check fails its test with the check's one line; a skipped one is skipped with
its reason. Tiny models are built once per pytest session, in pytest's temporary folder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelloop.testing.distributions import checks_for
from modelloop.testing.kit import Check, run_check
from modelloop.testing.workspace import Workspace

#: id(tmp_path_factory) -> the session's workspace.
_workspaces: dict[int, Workspace] = {}


def conformance(distribution: str) -> Callable[..., None]:
    """A test function, parametrized over every check of ``distribution``."""
    import pytest

    checks = checks_for(distribution)

    @pytest.mark.parametrize("check", checks, ids=[check.id for check in checks])
    def test_conformance(check: Check, tmp_path_factory: Any) -> None:
        key = id(tmp_path_factory)
        if key not in _workspaces:
            _workspaces[key] = Workspace(tmp_path_factory.mktemp("modelloop-conformance"))
        outcome = run_check(check, _workspaces[key])
        if outcome.status == "skipped":
            pytest.skip(outcome.reason)
        if outcome.status == "failed":
            pytest.fail(outcome.line(), pytrace=False)

    return test_conformance
