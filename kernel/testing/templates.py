"""Chat templates: each assistant turn is trained through its end of turn, on the very
prompt inference renders, and a tool call is trained while its result is not.

These read the rendered text (``ChatFormat.segments``, what training cuts into trained
and untrained pieces); the model family checks run the same on a family's tokenizer,
then look at the tokens. A template that refuses tool turns is skipped for tools: not
every format has them (Llama 2's has none).
"""

from __future__ import annotations

from typing import Any

from modelloop.specs import ChatTemplate
from modelloop.testing.kit import Broken, Check, Skip
from modelloop.testing.samples import CONVERSATIONS, TOOL_CALL, TOOL_CONVERSATION, TOOL_RESULT, assistant_turns
from modelloop.testing.workspace import Workspace


def checks(template: ChatTemplate) -> list[Check]:
    return [
        Check("template", template, "trains each assistant turn through its end of turn", trains_turns),
        Check("template", template, "trains a tool call and not its result", trains_tool_calls),
        Check("template", template, "reads back the tool calls it writes", reads_tool_calls),
    ]


def chat_format(template: ChatTemplate) -> Any:
    """The template as training renders it. Without a tokenizer, a template that writes
    ``eos_token`` gets its first end of turn there (a family whose end of turn is its EOS)."""
    from modelloop.chat import ChatFormat

    special_tokens = {"bos_token": "<s>", "eos_token": template.end_of_turn[0]}
    return ChatFormat(
        template.source,
        template.end_of_turn,
        dict(template.options),
        special_tokens,
        template.name,
        template.tool_calls,
    )


def trains_turns(template: ChatTemplate, workspace: Workspace) -> None:
    check_turns(chat_format(template))


def trains_tool_calls(template: ChatTemplate, workspace: Workspace) -> None:
    check_tool_calls(chat_format(template))


def reads_tool_calls(template: ChatTemplate, workspace: Workspace) -> None:
    """The template's ``ToolCallFormat`` finds the sample call, name and arguments, in the
    assistant turn the template renders (what a model trained on it generates), and finds
    none in a plain answer."""
    from modelloop.chat import TemplateError

    if template.tool_calls is None:
        raise Skip("the template declares no tool-call format")
    chat = chat_format(template)
    try:
        pieces = chat.segments(TOOL_CONVERSATION["messages"], TOOL_CONVERSATION["tools"])
    except TemplateError as error:
        raise Broken(f"it declares a tool-call format but takes no tool calls: {error}") from None
    call_turn, answer_turn = [text for text, is_trained in pieces if is_trained][:2]
    expected = TOOL_CONVERSATION["messages"][1]["tool_calls"][0]["function"]
    calls = template.tool_calls.parse(call_turn)
    if [(call.name, call.arguments) for call in calls] != [(expected["name"], expected["arguments"])]:
        raise Broken(f"its tool-call format reads {calls} from the call it renders, {call_turn!r}")
    if template.tool_calls.parse(answer_turn):
        raise Broken(f"its tool-call format reads a call in the plain answer {answer_turn!r}")


def check_turns(chat: Any) -> None:
    """Every assistant turn of the sample conversations is a trained piece that ends with
    an end of turn (``segments`` itself refuses a template whose training prompt is not
    its inference prompt)."""
    from modelloop.chat import TemplateError

    ends = " or ".join(map(repr, chat.end_of_turn))
    for record in CONVERSATIONS:
        try:
            pieces = chat.segments(record["messages"])
        except TemplateError as error:
            raise Broken(str(error)) from None
        trained = [text for text, is_trained in pieces if is_trained]
        if len(trained) != assistant_turns(record):
            raise Broken(f"{len(trained)} trained pieces for {assistant_turns(record)} assistant turns")
        for number, text in enumerate(trained, start=1):
            if not text.endswith(chat.end_of_turn):
                raise Broken(
                    f"assistant turn {number} is trained up to {text[-24:]!r}, not through its end of turn {ends}"
                )


def check_tool_calls(chat: Any) -> None:
    """The assistant's tool call is in the trained text, the tool's result is not."""
    from modelloop.chat import TemplateError

    try:
        pieces = chat.segments(TOOL_CONVERSATION["messages"], TOOL_CONVERSATION["tools"])
    except TemplateError as error:
        raise Skip(f"the template takes no tool calls: {error}") from None
    trained = "".join(text for text, is_trained in pieces if is_trained)
    untrained = "".join(text for text, is_trained in pieces if not is_trained)
    if TOOL_CALL not in trained:
        raise Broken(f"the assistant's call of {TOOL_CALL} is not in the trained text (the template drops tool_calls)")
    if TOOL_RESULT in trained:
        raise Broken("the tool's result is trained as if the assistant had said it")
    if TOOL_RESULT not in untrained:
        raise Broken("the tool's result is not in the rendered conversation (the template drops tool turns)")
