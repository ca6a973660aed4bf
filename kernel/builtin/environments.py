"""Built-in environments, both offline and cheap enough for a CPU run:

- ``calculator``: the model may call a ``calculator`` tool (an arithmetic expression in,
  its value out) as often as it likes, then answers; the answer earns 1 when it is the
  record's ``solution`` (as the ``accuracy`` reward judges it).
- ``arithmetic``: a quiz over several turns. The record's prompt is the first question;
  each answer is scored and followed by the next question, a sum drawn from a generator
  seeded by the prompt (so every completion of a GRPO group meets the same questions).
  Each right answer earns ``1 / rounds``.
"""

from __future__ import annotations

import ast
import operator
import random
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelloop.builtin.rewards import accuracy
from modelloop.hooks import hookimpl
from modelloop.specs import Environment, Step, ToolCall, Turn

CALCULATOR_TOOL: Mapping[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (12 + 30) * 7"}},
            "required": ["expression"],
        },
    },
}

_OPERATORS: dict[type, Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}

#: Exponents above this are refused: ``9 ** 9 ** 9`` would hold a rollout for minutes.
_LARGEST_EXPONENT = 64


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, without ``eval``: numbers and operators only."""

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > _LARGEST_EXPONENT:
                raise ValueError(f"the exponent {right} is too large")
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError(f"{ast.unparse(node)!r} is not arithmetic")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an expression") from None
    result = value(tree.body)
    return int(result) if isinstance(result, float) and result.is_integer() else result


def _tool_result(call: ToolCall) -> str:
    if call.name != "calculator":
        return f"error: there is no tool {call.name!r}; the tool is calculator"
    if call.arguments is None:
        return f"error: {call.error}"
    try:
        return str(calculate(str(call.arguments.get("expression", ""))))
    except (ValueError, ArithmeticError) as error:
        return f"error: {error}"


def right_answer(text: str, solution: Any) -> bool:
    """Whether ``text`` answers ``solution``, as the ``accuracy`` reward judges it."""
    return accuracy([None], [text], solution=[solution])[0] == 1.0


@dataclass
class CalculatorEpisode:
    solution: Any

    def step(self, turn: Turn) -> Step:
        if turn.tool_calls:
            return Step(observation=tuple({"role": "tool", "content": _tool_result(call)} for call in turn.tool_calls))
        return Step(reward=float(right_answer(turn.text, self.solution)), done=True)


def start_calculator(record: Mapping[str, Any]) -> CalculatorEpisode:
    return CalculatorEpisode(record["solution"])


@dataclass
class QuizEpisode:
    first_solution: Any
    rounds: int
    largest: int
    seed: int
    asked: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.asked.append(self.first_solution)
        self.draw = random.Random(self.seed)

    def step(self, turn: Turn) -> Step:
        reward = float(right_answer(turn.text, self.asked[-1])) / self.rounds
        if len(self.asked) == self.rounds:
            return Step(reward=reward, done=True)
        a, b = self.draw.randint(0, self.largest), self.draw.randint(0, self.largest)
        self.asked.append(a + b)
        return Step(observation=({"role": "user", "content": f"What is {a}+{b}?"},), reward=reward)


def start_quiz(record: Mapping[str, Any], *, rounds: int = 3, largest: int = 9) -> QuizEpisode:
    if rounds < 1 or largest < 0:
        raise ValueError("rounds must be 1 or more and largest 0 or more")
    seed = zlib.crc32(repr(record["prompt"]).encode())
    return QuizEpisode(record["solution"], rounds, largest, seed)


CALCULATOR = Environment(
    name="calculator",
    description="A calculator tool; the final answer earns 1 when it is the record's solution.",
    start=start_calculator,
    tools=(CALCULATOR_TOOL,),
    columns=("solution",),
    max_turns=4,
)

ARITHMETIC = Environment(
    name="arithmetic",
    description="A quiz of sums over several turns, the prompt's question first; each right answer earns 1/rounds.",
    start=start_quiz,
    columns=("solution",),
    max_turns=8,  # the quiz ends itself after its rounds
)


@hookimpl
def register_environments(register):
    register(CALCULATOR)
    register(ARITHMETIC)
