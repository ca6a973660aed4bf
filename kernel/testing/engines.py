"""Engines: started on the reference tiny model, a session keeps the protocol the
built-in server relies on (``EngineSession``): ``check`` counts a prompt and refuses an
unknown model and a request beyond the context with ``EngineError``; ``generate``
answers each request, within ``max_tokens``, the same way twice when greedy;
``stream`` yields that same text and then a finish reason; ``close`` ends it. An engine
that can ``attach`` to a model in memory is held to the same round trip there.

An engine whose ``start`` stops with a ``ModelloopError`` (its server is not installed,
no GPU) is skipped with that message.
"""

from __future__ import annotations

from typing import Any

from modelloop.specs import Engine
from modelloop.testing.kit import Broken, Check, Skip
from modelloop.testing.samples import load, reference
from modelloop.testing.workspace import Workspace

QUESTIONS = ("What is 2+3?", "Name a fruit.")
MAX_TOKENS = 5
SESSION_PARTS = ("models", "context_length", "check", "generate", "stream", "load_adapter", "unload_adapter", "close")


def checks(engine: Engine) -> list[Check]:
    found = [Check("engine", engine, "a started session checks, generates, streams and closes", started_round_trip)]
    if engine.attach is not None:
        found.append(
            Check(
                "engine", engine, "a session attached to a model in memory generates and streams", attached_round_trip
            )
        )
    return found


def started_round_trip(engine: Engine, workspace: Workspace) -> None:
    from modelloop.errors import ModelloopError

    _, folder = reference(workspace)
    try:
        session = engine.start(str(folder), adapters={}, options={})
    except ModelloopError as error:
        raise Skip(str(error)) from None
    round_trip(session)


def attached_round_trip(engine: Engine, workspace: Workspace) -> None:
    from modelloop.chat import resolve_chat_format

    assert engine.attach is not None
    _, folder = reference(workspace)
    loaded = load(folder)
    round_trip(
        engine.attach(loaded.model, loaded.tokenizer, resolve_chat_format(loaded.tokenizer, loaded.family), options={})
    )


def request(question: str, **settings: Any) -> Any:
    from modelloop.plugin import GenerationRequest, SamplingParams

    model = settings.pop("model", None)
    return GenerationRequest(
        messages=[{"role": "user", "content": question}],
        model=model,
        params=SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 0, **settings}),
    )


def round_trip(session: Any) -> None:
    from modelloop.plugin import EngineSession

    missing = [part for part in SESSION_PARTS if not hasattr(session, part)]
    if missing or not isinstance(session, EngineSession):
        raise Broken(
            f"it returned a {type(session).__name__}, which has no {', '.join(missing) or 'EngineSession protocol'}"
        )
    try:
        check_session(session)
    finally:
        session.close()


def check_session(session: Any) -> None:
    from modelloop.plugin import EngineError

    models = list(session.models)
    if not models or not all(isinstance(name, str) for name in models):
        raise Broken(f"models is {models!r}, not the served model names")
    prompt_tokens = session.check(request(QUESTIONS[0]))
    if not isinstance(prompt_tokens, int) or prompt_tokens < 0:
        raise Broken(f"check returned {prompt_tokens!r}, not the prompt's length in tokens")
    for refused, why in (
        (request(QUESTIONS[0], model="no-such-model"), "an unknown model"),
        (request(QUESTIONS[0], max_tokens=session.context_length + 1), "max_tokens beyond the context length"),
    ):
        try:
            session.check(refused)
        except EngineError:
            continue
        raise Broken(f"check accepts a request for {why}; it must raise EngineError")
    requests = [request(question) for question in QUESTIONS]
    generations = session.generate(requests)
    if len(generations) != len(requests):
        raise Broken(f"generate returned {len(generations)} results for {len(requests)} requests")
    for generation in generations:
        check_generation(generation)
    if [g.choices[0].text for g in session.generate(requests)] != [g.choices[0].text for g in generations]:
        raise Broken("greedy generation (temperature 0) gave another text the second time")
    deltas = list(session.stream(requests[0]))
    streamed = "".join(delta.text for delta in deltas)
    if streamed != generations[0].choices[0].text:
        raise Broken(f"stream yielded {streamed!r}, and generate answered {generations[0].choices[0].text!r}")
    if not deltas or deltas[-1].finish_reason not in ("stop", "length"):
        raise Broken("stream did not end with a finish reason (stop or length)")


def check_generation(generation: Any) -> None:
    choices = getattr(generation, "choices", ())
    if len(choices) != 1:
        raise Broken(f"a request for one choice got {len(choices)}")
    choice = choices[0]
    if not isinstance(choice.text, str) or choice.finish_reason not in ("stop", "length"):
        raise Broken(f"a choice has text {choice.text!r} and finish reason {choice.finish_reason!r}")
    if len(choice.token_ids) > MAX_TOKENS:
        raise Broken(f"a choice has {len(choice.token_ids)} tokens for max_tokens {MAX_TOKENS}")
