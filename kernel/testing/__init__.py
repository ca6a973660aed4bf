"""The conformance kit: checks that a plugin keeps the contract of what it registers.

``modelloop plugins check DIST`` runs it from the command line, and
``conformance(DIST)`` makes it a pytest test for a plugin's own CI. Everything runs on
the CPU against tiny models the kit builds itself (``modelloop new-model``'s code, no
hub). Each kind of spec has its module here, which says what it checks and what it
cannot; docs/plugins.md ("Checking a plugin") sums them up.

Importing this package imports nothing heavy: the checks import torch and transformers
when they run.
"""

from modelloop.testing.conformance import conformance
from modelloop.testing.distributions import UnknownDistributionError, checks_for, loaded_distributions
from modelloop.testing.kit import Broken, Check, Outcome, Skip, run_check
from modelloop.testing.workspace import Workspace, temporary_workspace

__all__ = [
    "Broken",
    "Check",
    "Outcome",
    "Skip",
    "UnknownDistributionError",
    "Workspace",
    "checks_for",
    "conformance",
    "loaded_distributions",
    "run_check",
    "temporary_workspace",
]
