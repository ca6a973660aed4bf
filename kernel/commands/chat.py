"""``modelloop chat``: talk to a model in the terminal, streaming, with the conversation kept."""

from __future__ import annotations

import click


@click.command("chat")
@click.argument("model")
@click.option("--engine", default="hf", show_default=True, help="Inference engine; auto: the fastest installed here.")
@click.option("--system", help="A system prompt for the conversation.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0, 2))
def chat_command(model: str, engine: str, system: str | None, max_tokens: int, temperature: float) -> None:
    """Chat with MODEL. /reset starts a new conversation; /exit (or Ctrl-D) quits."""
    from modelloop.inference.choice import find_engine
    from modelloop.inference.types import GenerationRequest, SamplingParams

    session = find_engine(engine).start(model, options={})
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    click.echo(f"Chatting with {session.models[0]} ({engine}). /reset for a new conversation, /exit to quit.", err=True)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                messages = list(start)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            click.echo("model> ", nl=False)
            answer = []
            for delta in session.stream(GenerationRequest(messages=messages, params=params)):
                click.echo(delta.text, nl=False)
                answer.append(delta.text)
            click.echo()
            messages.append({"role": "assistant", "content": "".join(answer)})
    finally:
        session.close()
