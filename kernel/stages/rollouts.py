"""GRPO's rollouts through the engine protocol: any registered engine generates the completions.

TRL's ``GRPOTrainer`` takes a ``rollout_func(prompts, trainer)``; this is one that sends
the prompts to an engine session instead of calling ``generate`` itself:

- an engine that can ``attach`` (the built-in ``hf``) runs in this process on the policy
  being trained, batched, with nothing to synchronise;
- any other engine (vLLM, SGLang, or ``hf`` behind HTTP) is started from files: the
  current LoRA adapter (or, for full fine-tuning, the whole model) is saved every
  ``sync_steps`` optimizer steps and handed over, the adapter through the engine's runtime
  adapter loading, full weights by restarting the engine on the new folder.

Prompts are rendered with the chat format the model is trained with and sent as token
ids, so the policy scores exactly the tokens the engine saw; identical prompts (GRPO
repeats each ``num_generations`` times) become one request with ``n`` choices. A prompt
with pictures (a vision-language policy) goes as messages with the pictures as data
URLs; its ids are rendered here with the template and image processor the engine uses
too (held equal to the built-in engine's by a test).

With an environment (``episodes``), each completion is an episode of several turns,
played by ``modelloop.stages.episodes``: the first turn is the request above, the next
ones batches of one request per live episode, as token ids.

RLOO's and online DPO's trainers have no ``rollout_func``; ``complete`` serves them the
same way from prompts TRL has already tokenised (``modelloop.stages.rlhf``).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from modelloop.inference.types import Completion, GenerationRequest, SamplingParams
from modelloop.specs import Engine, EngineSession, Tuner
from modelloop.stages.common import save_trained
from modelloop.stages.episodes import Episodes


class EngineRollouts:
    """A ``rollout_func`` for TRL's GRPO trainer over an engine of the registry."""

    def __init__(
        self,
        engine: Engine,
        *,
        tokenizer: Any,
        chat: Any,
        sampling: SamplingParams,
        base_model: str,
        tuner: Tuner,
        sync_dir: Path,
        sync_steps: int = 1,
        options: Mapping[str, Any] | None = None,
        images: Any = None,
        episodes: Episodes | None = None,
    ) -> None:
        self.engine = engine
        self.episodes = episodes
        self.images = images  # a vision-language policy's ImageTokens
        self.tokenizer = tokenizer
        self.chat = chat
        self.sampling = sampling
        self.base_model = base_model
        self.tuner = tuner
        self.sync_dir = sync_dir
        self.sync_steps = sync_steps
        self.options = dict(options or {})
        self.session: EngineSession | None = None
        self.served: str | None = None  # the adapter name the requests go to (files mode)
        self.synced_step: int | None = None
        self.eos_id = _end_of_turn_id(tokenizer, chat)

    def __call__(self, prompts: Sequence[Any], trainer: Any) -> dict[str, Any]:
        session = self._session(trainer)
        groups = [(prompt, self.prompt_ids(prompt), count) for prompt, count in runs_of(prompts)]
        requests = [self._request(prompt, ids, count) for prompt, ids, count in groups]
        if self.episodes is not None:
            played = self.episodes.play(
                groups,
                session.generate(requests),
                lambda prompts: [generation.choices[0] for generation in session.generate(self._next_turns(prompts))],
                self.completion_ids,
            )
            return {**played, "logprobs": None}
        prompt_ids: list[list[int]] = []
        completion_ids: list[list[int]] = []
        for (_, ids, _), generation in zip(groups, session.generate(requests)):
            for choice in generation.choices:
                prompt_ids.append(ids)
                completion_ids.append(self.completion_ids(choice))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    def complete(self, prompt_ids: Sequence[Sequence[int]], trainer: Any) -> list[list[int]]:
        """One completion's ids per prompt given as ids (RLOO's, tokenised by TRL), the
        repeats of a prompt one request with ``n`` choices."""
        session = self._session(trainer)
        requests = [
            GenerationRequest(prompt=ids, model=self.served, params=replace(self.sampling, n=count))
            for ids, count in runs_of([list(ids) for ids in prompt_ids])
        ]
        return [
            self.completion_ids(choice) for generation in session.generate(requests) for choice in generation.choices
        ]

    def prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        tools = self.episodes.tools if self.episodes is not None else None
        ids = self.tokenizer(
            self.chat.render(prompt, add_generation_prompt=True, tools=tools), add_special_tokens=False
        )["input_ids"]
        pictures = _pictures(prompt)
        if pictures:
            ids = self.images.expand_ids(ids, self.images.counts(pictures))
        return ids

    def _request(self, prompt: Any, ids: list[int], count: int) -> GenerationRequest:
        params = replace(self.sampling, n=count)
        if isinstance(prompt, str) or not _pictures(prompt):
            return GenerationRequest(prompt=ids, model=self.served, params=params)
        return GenerationRequest(messages=_with_data_urls(prompt), model=self.served, params=params)

    def _next_turns(self, prompts: list[list[int]]) -> list[GenerationRequest]:
        params = replace(self.sampling, n=1)
        return [GenerationRequest(prompt=ids, model=self.served, params=params) for ids in prompts]

    def completion_ids(self, choice: Completion) -> list[int]:
        """The generated ids with the end-of-turn token that ended them; from the text when an
        engine over HTTP did not return ids."""
        if choice.token_ids:
            return list(choice.token_ids)
        ids = self.tokenizer(choice.text, add_special_tokens=False)["input_ids"]
        return ids + [self.eos_id] if choice.finish_reason == "stop" else ids

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    # ------------------------------------------------------------------ sessions

    def _session(self, trainer: Any) -> EngineSession:
        if self.engine.attach is not None:
            if self.session is None:
                policy = trainer.accelerator.unwrap_model(trainer.model)
                options = {
                    **self.options,
                    **({"images": self.images} if self.images is not None else {}),
                }  # in this process only
                self.session = self.engine.attach(policy, self.tokenizer, self.chat, options=options)
            return self.session
        step = trainer.state.global_step
        if self.session is None or step - (self.synced_step or 0) >= self.sync_steps:
            self._hand_over(trainer, step)
        return self.session  # type: ignore[return-value]

    def _hand_over(self, trainer: Any, step: int) -> None:
        """Save the policy as it is now and make the engine generate with it."""
        folder = self.sync_dir / f"step-{step}"
        shutil.rmtree(folder, ignore_errors=True)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        save_trained(self.tuner, policy, folder)
        previous = (self.served, self.sync_dir / f"step-{self.synced_step}") if self.synced_step is not None else None
        if self.tuner.adapter:
            name = f"policy-step-{step}"
            if self.session is None:
                self.session = self.engine.start(self.base_model, adapters={name: str(folder)}, options=self.options)
            else:
                self.session.load_adapter(name, str(folder))
                if previous is not None and previous[0] is not None:
                    self.session.unload_adapter(previous[0])
            self.served = name
        else:
            self.tokenizer.save_pretrained(folder)
            self.close()
            self.session = self.engine.start(str(folder), adapters={}, options=self.options)
        if previous is not None and previous[1] != folder:
            shutil.rmtree(previous[1], ignore_errors=True)
        self.synced_step = step


def padded(rows: Sequence[Sequence[int]], pad: int, *, left: bool) -> tuple[Any, Any]:
    """Token-id rows as one tensor padded on the ``left`` (prompts) or right, and its mask."""
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[index, span] = torch.tensor(row, dtype=torch.long)
        mask[index, span] = 1
    return ids, mask


def runs_of(items: Sequence[Any]) -> list[tuple[Any, int]]:
    """Consecutive equal items as (item, how many): GRPO and RLOO repeat each prompt once
    per completion of its group."""
    runs: list[tuple[Any, int]] = []
    for item in items:
        if runs and runs[-1][0] == item:
            runs[-1] = (item, runs[-1][1] + 1)
        else:
            runs.append((item, 1))
    return runs


def _pictures(prompt: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The opened images of a prompt's image parts (TRL puts them there), in order."""
    return [
        part["image"]
        for message in prompt
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image"
    ]


def _with_data_urls(prompt: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    from modelloop.data.images import data_url

    def part(item: Mapping[str, Any]) -> Mapping[str, Any]:
        return (
            {"type": "image_url", "image_url": {"url": data_url(item["image"])}}
            if item.get("type") == "image"
            else item
        )

    return [
        {**message, "content": [part(item) for item in message["content"]]}
        if isinstance(message.get("content"), list)
        else dict(message)
        for message in prompt
    ]


def _end_of_turn_id(tokenizer: Any, chat: Any) -> int:
    tokens = list(getattr(chat, "end_of_turn", ()) or ())
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id >= 0 and token_id != tokenizer.unk_token_id:
            return token_id
    return tokenizer.eos_token_id
