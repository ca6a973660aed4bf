"""The built-in ``hf`` engine: transformers' ``generate``, with requests batched as they arrive.

One worker thread owns the model. Whatever requests are waiting when it is free (up to
``max_batch_size`` rows; with ``batch_window`` > 0 it also waits that long for more) are
generated together, grouped by the served model (base or adapter) and sampling settings,
left-padded, with the KV cache on. Under load, the requests that arrive while one batch
generates form the next; a lone request is not delayed.
Tokens are streamed to each request as the batch produces them. Several LoRA adapters
can be served on one base, and more loaded while serving.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modelloop.data.media import BY_NAME, REMOTE, Media, resolve_source, take_media_parts
from modelloop.errors import EngineError
from modelloop.inference.jobs import EngineJob, job_deltas, job_results
from modelloop.inference.limits import check_prompt_ids
from modelloop.inference.types import Completion, Delta, Generation, GenerationRequest, SamplingParams
from modelloop.models.loading import OWN_ADAPTER, saved_adapter
from modelloop.registry import TUNERS, get_registry

_DONE = object()  # the worker's queue: closed


@dataclass(eq=False)
class _Job(EngineJob):
    """A request with the media its prompt holds (opened), in the order of their tokens."""

    media: tuple[Any, ...] = ()  # the prompt's media items, opened


class HFSession:
    """An engine session over a transformers model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        chat: Any,
        *,
        served_name: str,
        adapters: Mapping[str, str | Path] | None = None,
        options: Mapping[str, Any] | None = None,
        tuner: Any = None,
    ) -> None:
        """A session over a model in memory; it may be a model being trained (GRPO's policy):
        it generates in eval mode and puts the model back in the mode it found it in.

        ``tuner`` is the tuner whose adapter the model carries as its own (a LoRA run loads
        as its base plus that adapter, and that is the served model), or None.

        With ``options["inline"]`` there is no worker thread: each call generates in the
        caller's thread. That is for a single caller that waits anyway (GRPO's rollouts):
        on a CPU, torch's OpenMP threads of an idle caller still spin, and a worker thread
        generating meanwhile runs about a third slower.
        """
        options = dict(options or {})
        self.media = options.get("media")  # a multimodal model's MediaTokens
        self.allow_remote_images = bool(options.get("allow_remote_images", False))
        self.max_batch_size = int(options.get("max_batch_size", 32))
        self.batch_window = float(options.get("batch_window", 0.0))
        self.inline = bool(options.get("inline", False))
        self.model = model
        self.tokenizer = tokenizer
        self.chat = chat
        self.base_name = served_name
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.adapters: list[str] = []
        # how adapters attach to this model and are switched: the format of its own
        # adapter, else of the first adapter loaded
        self._format = tuner.adapters if tuner is not None else None
        self._own_adapter = OWN_ADAPTER if tuner is not None else None
        self._closed = False
        self.eos_ids = self._eos_ids()
        self.requests = 0
        self.batches = 0
        self.steps = 0  # decoding steps run, all batches together
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # the model is used by one generate() or adapter load at a time
        for name, path in (adapters or {}).items():
            self.load_adapter(name, str(path))
        self._worker: threading.Thread | None = None
        if not self.inline:
            self._worker = threading.Thread(target=self._work, name="modelloop-hf-engine", daemon=True)
            self._worker.start()

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        *,
        adapters: Mapping[str, str | Path] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> HFSession:
        """A session over a model folder or run folder, loaded for inference."""
        from modelloop.chat import resolve_chat_format
        from modelloop.models.loading import inference_device_map, load_model

        options = dict(options or {})
        device_map = options.get("device_map", inference_device_map())
        loaded = load_model(model_path, dtype=options.get("dtype", "auto"), device_map=device_map)
        chat = resolve_chat_format(loaded.tokenizer, loaded.family, options.get("template"))
        if loaded.family.multimodal:
            from modelloop.models.loading import load_media_tokens, resolve_model_source

            folder = resolve_model_source(model_path).tokenizer
            options["media"] = load_media_tokens(loaded.family, folder, loaded.model.config, loaded.tokenizer)
        served_name = str(options.get("served_name") or Path(str(model_path)).name)
        return cls(
            loaded.model.eval(),
            loaded.tokenizer,
            chat,
            served_name=served_name,
            adapters=adapters,
            options=options,
            tuner=loaded.tuner,
        )

    # ------------------------------------------------------------------ protocol

    @property
    def models(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the adapter at ``path`` as model ``name``, attached by the tuner that wrote it."""
        if name in self.models:
            raise EngineError(f"a model named {name!r} is already served")
        tuner = saved_adapter(path)
        if tuner is None:
            markers = sorted({spec.adapters.marker for spec in get_registry(TUNERS) if spec.adapters is not None})
            raise EngineError(
                f"{path} is not an adapter folder of an installed tuner (it has no {' or '.join(markers) or 'adapter marker file'})"
            )
        if self._format is not None and tuner.adapters is not self._format:
            raise EngineError(
                f"{path} is an adapter of tuner {tuner.name!r}, which does not attach beside the adapters served"
            )
        with self._lock:
            self.model = tuner.adapters.attach(self.model, path, name=name).eval()
            self._format = tuner.adapters
        self.adapters.append(name)

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name`` (requests already queued for it fail)."""
        if name not in self.adapters:
            raise EngineError(f"no adapter {name!r} is served; adapters: {', '.join(self.adapters) or 'none'}")
        with self._lock:
            self.adapters.remove(name)
            self.model = self._format.detach(self.model, name)
            if not self.adapters and self._own_adapter is None:
                self._format = None  # back to the plain base model

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, rendered with the chat template the model was trained with."""
        return self.prompt(request)[0]

    def prompt(self, request: GenerationRequest) -> tuple[list[int], tuple[Media, ...]]:
        """The prompt's token ids and its media, opened (OpenAI image and audio parts in
        the messages).

        For a multimodal model the media tokens are checked against the items even when
        there are none: a media token typed into the text would have no features."""
        if request.model is not None and request.model not in self.models:
            raise EngineError(f"unknown model {request.model!r}; served: {', '.join(self.models)}")
        media: tuple[Media, ...] = ()
        vocabulary = None  # checked for token-id prompts: text tokenised here cannot leave it
        if request.messages is not None:
            messages, media = self._take_media(request.messages)
            text = self.chat.render(messages, add_generation_prompt=True)
            if media:
                text = self.media.place(text)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.media is not None:
                try:
                    ids = self.media.expand_ids(ids, media)
                except ValueError as error:
                    raise EngineError(str(error)) from None
        elif isinstance(request.prompt, str):
            ids = self.tokenizer(request.prompt)["input_ids"]
        elif request.prompt is not None:
            ids, vocabulary = list(request.prompt), len(self.tokenizer)
        else:
            raise EngineError("a request needs messages or a prompt")
        limits = {"max_tokens": request.params.max_tokens, "context_length": self.context_length}
        return check_prompt_ids(ids, **limits, vocabulary=vocabulary), media

    def _take_media(self, messages: Any) -> tuple[list[Any], tuple[Media, ...]]:
        """Messages with media parts as text with marks, and the items, each read once:
        base64 data URLs always, remote URLs where the session allows, local paths never
        (a request must not read the server's files)."""
        try:
            flattened, taken = take_media_parts(messages)
            opened = []
            for column, sources in taken.items():
                kind = next(kind for kind in BY_NAME.values() if kind.column == column)
                if self.media is None or not self.media.takes(kind.name):
                    raise ValueError(f"the model {self.base_name!r} takes no {kind.column}")
                for source in sources:
                    urls = source if isinstance(source, list) else [source]  # a video's frames, or one item
                    if not all(url.startswith(("data:", *REMOTE)) for url in urls):
                        raise ValueError(f"{kind.column} are sent as base64 data URLs (local paths are not read)")
                    resolved = [
                        resolve_source(url, None, allow_remote=self.allow_remote_images, noun=kind.noun) for url in urls
                    ]
                    opened.append(
                        self.media.open(Media(kind.name, resolved if isinstance(source, list) else resolved[0]))
                    )
        except ValueError as error:
            raise EngineError(str(error)) from None
        return flattened, tuple(opened)

    def check(self, request: GenerationRequest) -> int:
        """The request's prompt length in tokens; EngineError if it cannot be served."""
        return len(self.prompt_ids(request))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Generate for many requests; they are batched with whatever else is arriving."""
        return job_results(self._submit(requests))

    def stream(self, request: GenerationRequest) -> Iterator[Delta]:
        """Yield text as it is generated, then one Delta per choice with its finish reason.

        Closing the iterator early (a client that went away) ends the request's rows at
        the next token, freeing the batch for the others.
        """
        (job,) = self._submit([request], streamed=True)
        yield from job_deltas(job)

    def close(self) -> None:
        """Stop the worker after the batch in hand; requests still waiting fail."""
        self._closed = True
        if self._worker is None:
            return
        self._queue.put(_DONE)
        self._worker.join(timeout=30)
        while True:
            try:
                waiting = self._queue.get_nowait()
            except queue.Empty:
                return
            for job in [] if waiting is _DONE else waiting:
                job.fail(EngineError("the engine was closed"))

    # ------------------------------------------------------------------ the worker

    def _submit(self, requests: Sequence[GenerationRequest], *, streamed: bool = False) -> list[_Job]:
        """Queue the requests together, so that the worker never starts on part of them."""
        if self._closed:
            raise EngineError("the engine was closed")
        jobs = []
        for request in requests:
            ids, media = self.prompt(request)
            jobs.append(_Job(request, ids, streamed=streamed, media=media))
        if self.inline:  # generate now, in this thread, up to max_batch_size rows at a time
            batch: list[_Job] = []
            for job in jobs:
                batch.append(job)
                if sum(queued.request.params.n for queued in batch) >= self.max_batch_size or job is jobs[-1]:
                    for group in _groups(batch):
                        self._run(group)
                    batch = []
        else:
            self._queue.put(jobs)
        return jobs

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is _DONE:
                return
            batch = list(first)
            rows = sum(job.request.params.n for job in batch)
            while rows < self.max_batch_size:
                try:
                    more = self._queue.get(timeout=self.batch_window) if self.batch_window else self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _DONE:
                    self._queue.put(_DONE)
                    break
                batch += more
                rows += sum(job.request.params.n for job in more)
            for group in _groups(batch):
                self._run(group)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            with self._lock:
                self._generate(jobs)
        except BaseException as error:  # hand the failure to every waiting request
            for job in jobs:
                job.fail(error)

    def _generate(self, jobs: list[_Job]) -> None:
        import torch

        params = jobs[0].request.params
        rows = [(job, choice) for job in jobs for choice in range(job.request.params.n)]
        width = max(len(job.prompt_ids) for job, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(job.prompt_ids)) + job.prompt_ids for job, _ in rows])
        attention_mask = torch.tensor(
            [[0] * (width - len(job.prompt_ids)) + [1] * len(job.prompt_ids) for job, _ in rows]
        )
        media = self._media_inputs(input_ids, [job.media for job, _ in rows])
        streamer = _BatchStreamer(self, rows)
        options: dict[str, Any] = {
            "stopping_criteria": [_rows_closed(streamer)],
            "max_new_tokens": max(job.request.params.max_tokens for job in jobs),
            "do_sample": params.temperature > 0,
            "eos_token_id": self.eos_ids,
            "pad_token_id": pad,
            "repetition_penalty": params.repetition_penalty,
            "streamer": streamer,
            "return_dict_in_generate": True,
            "output_scores": params.logprobs,  # the sampling distribution's: temperature, top-k, top-p applied
        }
        if params.temperature > 0:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        self.batches += 1
        self.requests += len(jobs)
        device = next(self.model.parameters()).device
        training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad(), self._adapter(jobs[0].request.model):
                output = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    use_cache=True,
                    **{key: value.to(device) for key, value in media.items()},
                    **options,
                )
        finally:
            self.model.train(training)
        scores = None
        if params.logprobs:
            scores = self.model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
        finished: dict[int, list[Completion]] = {}
        for row, (job, _) in enumerate(rows):
            generated = output.sequences[row, width:].tolist()
            logprobs = scores[row].tolist() if scores is not None else None
            finished.setdefault(id(job), []).append(self._complete(generated, job.request.params, logprobs))
        for job in jobs:
            if not job.done.is_set():  # answered early by the streamer unless it needed logprobs
                streamer.answer(job, finished[id(job)])

    def _media_inputs(self, input_ids: Any, media: list[tuple[Media, ...]]) -> dict[str, Any]:
        """The model inputs of every row's media, in row order (a row per choice)."""
        items = [item for row in media for item in row]
        if not items:
            return {}
        return {**self.media.inputs(items), **self.media.token_type_ids(input_ids)}

    def _complete(self, generated: list[int], params: SamplingParams, logprobs: list[float] | None) -> Completion:
        """Cut one generated row at its end of turn, its stop strings or its max_tokens."""
        reason = "length"
        kept = generated[: params.max_tokens]
        end: list[int] = []  # the end-of-turn token, kept in token_ids but not in the text
        for position, token in enumerate(kept):
            if token in self.eos_ids:
                kept, end, reason = kept[:position], [token], "stop"
                break
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cut = _stop_at(text, params.stop)
        if cut is not None:
            text, reason, end = text[:cut], "stop", []
            # the shortest prefix of the tokens that still decodes to the kept text
            length = next(
                (
                    n
                    for n in range(len(kept) + 1)
                    if len(self.tokenizer.decode(kept[:n], skip_special_tokens=True)) >= len(text)
                ),
                len(kept),
            )
            kept = kept[:length]
        kept += end
        if logprobs is None:
            return Completion(text=text, token_ids=tuple(kept), finish_reason=reason)
        tokens = tuple(self.tokenizer.decode([token]) for token in kept)
        return Completion(
            text=text, token_ids=tuple(kept), finish_reason=reason, logprobs=tuple(logprobs[: len(kept)]), tokens=tokens
        )

    def _adapter(self, name: str | None) -> Any:
        """A context in which the model generates as ``name`` (an adapter, or the served base)."""
        import contextlib

        if name is not None and name != self.base_name and name not in self.adapters:
            raise EngineError(f"the adapter {name!r} is no longer served")
        if self._format is None:
            return contextlib.nullcontext()
        return self._format.use(self.model, name if name in self.adapters else self._own_adapter)

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.convert_tokens_to_ids(token) for token in self.chat.end_of_turn}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def _groups(jobs: list[_Job]) -> list[list[_Job]]:
    """Jobs that can share one ``generate`` call: same served model, same sampling settings."""
    grouped: dict[Any, list[_Job]] = {}
    for job in jobs:
        key = (job.request.model, replace(job.request.params, max_tokens=0))
        grouped.setdefault(key, []).append(job)
    return list(grouped.values())


def _stop_at(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(stop) for stop in stops if stop and stop in text]
    return min(found) if found else None


class _BatchStreamer:
    """Receives each step's new tokens from ``generate`` and sends each row its new text.

    Text that could be the start of a stop string is held back until it is not, so a
    stop string is never streamed. A row closes at its end of turn, its own max_tokens or
    a stop string; a request whose rows are all closed is answered at once, while the
    batch goes on for the others (requests that asked for logprobs wait for the batch,
    whose scores they need). Generation stops when every row is closed.
    """

    def __init__(self, session: HFSession, rows: list[tuple[_Job, int]]) -> None:
        self.session = session
        self.rows = rows
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.sent = [""] * len(rows)
        self.open = [True] * len(rows)
        self.end_token: list[int | None] = [None] * len(rows)
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        self.session.steps += 1
        for row, token in enumerate(value.reshape(-1).tolist()):
            if not self.open[row]:
                continue
            job, choice = self.rows[row]
            if job.cancelled.is_set():
                self._close(row)
                continue
            params = job.request.params
            if token in self.session.eos_ids:
                self.end_token[row] = token
                self._close(row)
                continue
            self.tokens[row].append(token)
            if job.streamed or params.stop:  # the text is only needed to stream it or to find a stop string
                text = self.session.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
                if _stop_at(text, params.stop) is not None:
                    self._close(row)
                    continue
                hold = max((len(stop) - 1 for stop in params.stop), default=0)
                safe = len(text) - hold
                if job.streamed and safe > len(self.sent[row]) and not text[:safe].endswith("\ufffd"):
                    job.deltas.put(Delta(index=choice, text=text[len(self.sent[row]) : safe]))
                    self.sent[row] = text[:safe]
            if len(self.tokens[row]) >= params.max_tokens:
                self._close(row)

    def end(self) -> None:
        pass

    def _close(self, row: int) -> None:
        self.open[row] = False
        job = self.rows[row][0]
        mine = [i for i, (other, _) in enumerate(self.rows) if other is job]
        if job.request.params.logprobs or any(self.open[i] for i in mine):
            return
        completions = [
            self.session._complete(
                self.tokens[i] + ([self.end_token[i]] if self.end_token[i] is not None else []),
                job.request.params,
                None,
            )
            for i in mine
        ]
        self.answer(job, completions)

    def answer(self, job: _Job, completions: Sequence[Completion]) -> None:
        """Send what is left of each of ``job``'s choices, its finish reasons, and its result."""
        for row, (other, choice) in enumerate(self.rows):
            if other is not job:
                continue
            final = completions[choice]
            rest = final.text[len(self.sent[row]) :] if final.text.startswith(self.sent[row]) else ""
            if rest:
                job.deltas.put(Delta(index=choice, text=rest))
            prompt_tokens = len(job.prompt_ids) if choice == 0 else 0
            job.deltas.put(
                Delta(
                    index=choice,
                    finish_reason=final.finish_reason,
                    tokens=len(final.token_ids),
                    prompt_tokens=prompt_tokens,
                )
            )
        job.finish(Generation(choices=tuple(completions), prompt_tokens=len(job.prompt_ids)))


def _rows_closed(streamer: _BatchStreamer) -> Any:
    """A stopping criterion that ends each row when the streamer has closed it."""
    import torch
    from transformers import StoppingCriteria

    class RowsClosed(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.tensor([not is_open for is_open in streamer.open], device=input_ids.device)

    return RowsClosed()
