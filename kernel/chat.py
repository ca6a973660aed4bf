"""Rendering conversations with a chat template, and marking what is trained.

One renderer serves training and inference, so the prompt a model is trained on is
byte-identical to the prompt it is given at generation time. The Jinja environment
matches transformers' ``apply_chat_template`` (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``tojson`` without HTML escaping, ``raise_exception``), so a
tokenizer's own template renders here exactly as an engine reading that tokenizer
renders it.

Which template: the one the user names, else the tokenizer's own ``chat_template``,
else the model family's registered one. The tokens that end an assistant turn come
from the registered template (or the family's), else the tokenizer's EOS token.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from modelloop.errors import ModelloopError
from modelloop.registry import TEMPLATES, get_registry
from modelloop.specs import ModelFamily, ToolCallFormat

Message = Mapping[str, Any]


class TemplateError(ModelloopError):
    """A chat template that cannot render a conversation, or renders it inconsistently."""


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    from jinja2.exceptions import TemplateError as JinjaTemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"chat template: {message}")

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except JinjaTemplateError as error:
        raise TemplateError(f"chat template does not compile: {error}") from None


@dataclass(frozen=True)
class ChatFormat:
    """A resolved chat template: its source, the text that ends an assistant turn, its
    options, and how the model's tool calls read back (the registered template's format)."""

    source: str
    end_of_turn: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    name: str = "tokenizer"
    tool_calls: ToolCallFormat | None = None

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The conversation as text, exactly as ``apply_chat_template(tokenize=False)`` renders it."""
        from jinja2.exceptions import TemplateError as JinjaTemplateError

        try:
            return _compile(self.source).render(
                messages=list(messages),
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
                **self.options,
            )
        except JinjaTemplateError as error:
            raise TemplateError(f"the chat template {self.name!r} cannot render this conversation: {error}") from None

    def segments(
        self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[tuple[str, bool]]:
        """The rendered conversation cut into ``(text, trained)`` pieces.

        Every assistant turn is trained, through its end-of-turn text; everything else
        (system, user and tool turns, the generation prompt, the glue after an end of
        turn) is not. Each untrained piece before an assistant turn is exactly what
        ``render(messages[:i], add_generation_prompt=True)`` adds, so the model is
        trained on the prompt it will be given. A template whose assistant turn holds no
        end-of-turn text, because the next turn's opening token ends it (GLM), has that
        token trained with the turn; after the last turn it is added to the text.
        """
        pieces: list[tuple[str, bool]] = []
        done = full = closing = ""
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True, tools=tools)
            full = self.render(messages[: index + 1], add_generation_prompt=False, tools=tools)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError(
                    f"the chat template {self.name!r} does not render assistant turn {index + 1} after its "
                    "generation prompt (the training prompt would differ from the inference prompt)"
                )
            completion = full[len(prompt) :]
            trained = completion[: self._end_of_turn(completion)]
            if not any(marker in completion for marker in self.end_of_turn):
                marker = self._next_turn_marker(messages, index, full, tools)
                trained += marker
                if index == len(messages) - 1:
                    closing = marker  # nothing follows: the training text ends with the closing token
            pieces.append((prompt[len(done) :], False))
            pieces.append((trained, True))
            done = prompt + trained
        ends_with_answer = bool(messages) and messages[-1].get("role") == "assistant"
        whole = full if ends_with_answer else self.render(messages, add_generation_prompt=False, tools=tools)
        whole += closing
        if not whole.startswith(done):
            raise TemplateError(f"the chat template {self.name!r} renders a conversation differently than its turns")
        pieces.append((whole[len(done) :], False))
        return [(text, trained) for text, trained in pieces if text]

    def _end_of_turn(self, completion: str) -> int:
        """Where the trained part of a rendered assistant turn ends: after its last end-of-turn text."""
        ends = [completion.rfind(marker) + len(marker) for marker in self.end_of_turn if marker in completion]
        return max(ends) if ends else len(completion)

    def _next_turn_marker(
        self, messages: Sequence[Message], index: int, full: str, tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        """The end-of-turn text that opens the turn after assistant turn ``index``, for a
        template whose assistant turn renders none of its own (GLM's ends where ``<|user|>``
        or ``<|observation|>`` begins): the model stops by emitting it, so it is trained. The
        last turn is followed by a user turn to see it. "" when the next turn opens otherwise."""
        following = messages[index + 1] if index + 1 < len(messages) else {"role": "user", "content": "."}
        try:
            after = self.render([*messages[: index + 1], following], add_generation_prompt=False, tools=tools)
        except TemplateError:
            return ""
        rest = after[len(full) :] if after.startswith(full) else ""
        return next((marker for marker in self.end_of_turn if marker and rest.startswith(marker)), "")


def resolve_chat_format(
    tokenizer: Any,
    family: ModelFamily | None = None,
    template: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> ChatFormat:
    """The chat template to use with ``tokenizer``: named > the tokenizer's own > the family's.

    :param template: a registered template name, overriding everything.
    :param options: template switches (e.g. ``enable_thinking=False``) over the template's defaults.
    """
    templates = get_registry(TEMPLATES)
    registered = None
    if template is not None:
        registered = templates.get(template)
    elif family is not None and family.template is not None:
        registered = templates.get(family.template)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    # transformers passes every special token to the template: so do we.
    special_tokens = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    if registered is not None:
        unknown = set(options or ()) - set(registered.options)
    if template is None and own:
        if registered is not None and unknown:
            raise TemplateError(
                f"template {registered.name!r} has no option {sorted(unknown)[0]!r}; "
                f"its options: {', '.join(registered.options) or 'none'}"
            )
        end_of_turn = registered.end_of_turn if registered else (special_tokens.get("eos_token", ""),)
        defaults = dict(registered.options) if registered else {}
        return ChatFormat(
            own,
            tuple(e for e in end_of_turn if e),
            {**defaults, **(options or {})},
            special_tokens,
            tool_calls=registered.tool_calls if registered else None,
        )
    if registered is None:
        raise TemplateError(
            "the tokenizer has no chat template and no template is registered for this model; "
            f"pass one of: {', '.join(templates.names())} (--template)"
        )
    if unknown:
        raise TemplateError(
            f"template {registered.name!r} has no option {sorted(unknown)[0]!r}; "
            f"its options: {', '.join(registered.options) or 'none'}"
        )
    return ChatFormat(
        registered.source,
        registered.end_of_turn,
        {**registered.options, **(options or {})},
        special_tokens,
        registered.name,
        registered.tool_calls,
    )
