"""Gates: conditions on a recipe stage's metrics that must hold for the recipe to go on.

.. code-block:: yaml

    - stage: eval
      name: eval-new
      data: held_out.jsonl
      gates:
        - accuracy >= eval-base           # no worse than the earlier stage eval-base
        - accuracy >= eval-base - 0.01    # at most one point worse
        - accuracy >= 0.8                 # a bar of its own
    - stage: eval
      name: bench-new
      benchmarks: [gsm8k, mmlu]
      gates:
        - "* >= bench-base - 0.01"        # no benchmark score drops more than one point
    - stage: rlhf
      method: grpo
      gates: ["reward >= 0.8"]

A gate is ``METRIC OP BOUND``: OP one of ``>=``, ``>``, ``<=``, ``<``; BOUND a number, or
an earlier stage's name (its value of the same metric), with ``+ N`` or ``- N`` after it
where a margin is wanted. METRIC may be a pattern (``*``, ``gsm8k.*``): every metric of the
stage it matches must hold, and the first that does not is the one reported (a benchmark
eval's metrics are ``TASK.METRIC``; mind a metric where lower is better, such as
perplexity, which wants ``<=``). A gate that does not hold stops the recipe: the model it judged
(an eval's: the model it evaluated; a training stage's: its own) is held back, in its
manifest and in ``modelloop runs tree``, and ``promote`` never sees it.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_GATE = re.compile(
    rf"(?P<metric>[A-Za-z_*][\w:.*?-]*)\s*(?P<op>>=|<=|>|<)\s*"
    rf"(?:(?P<number>{NUMBER})|(?P<stage>[A-Za-z_][\w.-]*)(?:\s+(?P<sign>[+-])\s*(?P<margin>{NUMBER}))?)"
)
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str
    number: float | None = None  # an absolute bound
    stage: str | None = None  # or the same metric of an earlier stage,
    margin: float = 0.0  # plus this

    @classmethod
    def parse(cls, text: str) -> Gate:
        match = _GATE.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"gate {text!r}: write METRIC OP BOUND, OP one of >=, >, <=, <, BOUND a number or an earlier "
                "stage's name (with + N or - N after it for a margin): 'accuracy >= eval-base - 0.01'"
            )
        margin = float(match["margin"]) * (-1 if match["sign"] == "-" else 1) if match["margin"] else 0.0
        number = float(match["number"]) if match["number"] is not None else None
        return cls(text.strip(), match["metric"], match["op"], number, match["stage"], margin)

    def judge(self, metrics: Mapping[str, Any], earlier: Mapping[str, Mapping[str, Any]]) -> Verdict:
        """Whether ``metrics`` pass, the bound taken from ``earlier`` stages' metrics where
        named; for a pattern, the first metric that fails (else the one nearest its bound)."""
        verdicts = [self._judge(name, metrics, earlier) for name in self._metrics(metrics)]
        failed = [verdict for verdict in verdicts if not verdict.passed]
        return failed[0] if failed else min(verdicts, key=lambda verdict: abs(verdict.value - verdict.bound))

    def _metrics(self, metrics: Mapping[str, Any]) -> list[str]:
        if not any(character in self.metric for character in "*?"):
            return [self.metric]
        matched = [name for name in metrics if fnmatch.fnmatchcase(name, self.metric) and _is_number(metrics[name])]
        if not matched:
            raise ValueError(f"this stage has no metric matching {self.metric!r} (its metrics: {_numeric(metrics)})")
        return matched

    def _judge(self, name: str, metrics: Mapping[str, Any], earlier: Mapping[str, Mapping[str, Any]]) -> Verdict:
        value = _metric(metrics, name, "this stage")
        if self.stage is None:
            assert self.number is not None
            bound = self.number
        else:
            bound = _metric(earlier.get(self.stage) or {}, name, f"stage {self.stage!r}") + self.margin
        return Verdict(self, value, bound, OPERATORS[self.op](value, bound), name)


@dataclass(frozen=True)
class Verdict:
    gate: Gate
    value: float
    bound: float
    passed: bool
    metric: str  # the metric judged (for a pattern, the one reported)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate.text,
            "metric": self.metric,
            "value": self.value,
            "bound": self.bound,
            "passed": self.passed,
        }

    def __str__(self) -> str:
        state = "holds" if self.passed else "fails"
        which = f"{self.metric} " if self.metric != self.gate.metric else ""
        return f"{self.gate.text}: {which}{self.value:.4g} {self.gate.op} {self.bound:.4g} {state}"


def _metric(metrics: Mapping[str, Any], name: str, where: str) -> float:
    value = metrics.get(name)
    if not _is_number(value):
        raise ValueError(f"{where} has no metric {name!r} (its metrics: {_numeric(metrics)})")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric(metrics: Mapping[str, Any]) -> str:
    return ", ".join(sorted(key for key, item in metrics.items() if _is_number(item))) or "none"
