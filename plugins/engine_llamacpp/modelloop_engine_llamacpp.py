"""llama.cpp as a modelloop engine, in this process through llama-cpp-python.

It serves a GGUF file (``modelloop export RUN --quant gguf-*``), or a run or model folder,
converted once to an f16 GGUF (cached by the files' sizes and times; a LoRA run as its
base plus a GGUF adapter). Prompts are rendered with the chat template in the GGUF by the
renderer training uses, and tokenised by llama.cpp; token-id prompts go in as they are
and completions come back as token ids (GRPO's rollouts). Generation stops at the GGUF's
end-of-generation tokens (the end of turn the export wrote), a stop string or
``max_tokens``. LoRA adapters (GGUF, or PEFT folders converted on load) are applied per
request, loaded and unloaded while serving.

Requests are batched as they arrive (continuous batching, as llama.cpp's own server does):
one worker thread owns a llama.cpp context with a sequence per answer being generated
(``max_batch_size`` of them) sharing one pool of KV cells (``kv_tokens``); each step
decodes every answer's next token and the new prompts' tokens in one ``llama_decode``, and
a finished answer frees its sequence for the next request at once. A prompt is decoded
once for a request's ``n`` choices, and a freed sequence keeps its KV, so a prompt that
starts the same (a chat's next turn, a shared system prompt) decodes only what follows.
The answers in a step share the adapter on the context, so requests for another wait
until those finish. On a CPU llama.cpp uses every core but one; on a GPU build, all
layers go to the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelloop.plugin import (
    ChatFormat,
    Completion,
    Delta,
    Engine,
    EngineError,
    EngineJob,
    Generation,
    GenerationRequest,
    check_prompt_ids,
    complete,
    hookimpl,
    job_deltas,
    job_results,
)
from modelloop_export_gguf import convert_model

PLUGIN_API = ">=1.5,<2"

#: The name a LoRA run's own adapter is kept under: requests for the served name get it.
OWN_ADAPTER = "\x00own"

_DONE = object()  # the worker's queue: closed

DEFAULTS: dict[str, Any] = {
    "served_name": None,
    "n_ctx": 0,  # the longest prompt and answer of one request (0: the length the model was trained for)
    "kv_tokens": 0,  # the KV cells all answers share (0: 16,384, or n_ctx where longer)
    "threads": None,  # default: every core but one, left to the server and its callers
    "n_gpu_layers": -1,  # all (a CPU build keeps them on the CPU)
    "pre_tokenizer": None,  # for converting a folder whose tokenizer llama.cpp does not know
    "max_batch_size": None,  # the answers decoded together (default 32)
}


@dataclass(frozen=True)
class Served:
    """What a session loads: the GGUF, the adapter that comes with it (a LoRA run's own,
    applied to requests for the served name), and the transformers folder it was converted
    from (None for a GGUF given as it is), for which PEFT adapters are converted too."""

    gguf: Path
    own_adapter: Path | None = None
    converted_from: Path | None = None


def served(model_path: str | Path, pre_tokenizer: str | None = None) -> Served:
    """A ``.gguf`` file, an export folder holding one (a ``gguf-lora`` export: its base and
    adapter), else a run or model folder converted once into the cache."""
    from modelloop.plugin import resolve_model_source, trained_chat_format

    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return Served(path)
    if path.is_dir() and (path / "adapter.gguf").is_file():
        return Served(path / "base.gguf", path / "adapter.gguf")
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) > 1:
        raise EngineError(f"{path} holds several GGUF files; name the one to serve")
    if found:
        return Served(found[0])
    try:
        source = resolve_model_source(model_path)
        chat = trained_chat_format(model_path)
    except Exception as error:  # noqa: BLE001 - the kernel's own one-line reason
        raise EngineError(f"llamacpp engine: {error}") from None
    gguf = cached(
        [Path(source.base), Path(source.tokenizer)],
        "model.gguf",
        lambda folder, target: convert_model(
            _with_tokenizer(source, folder), target, chat, pre_tokenizer=pre_tokenizer
        ),
    )
    return Served(gguf, Path(source.adapter) if source.adapter is not None else None, Path(source.base))


def _with_tokenizer(source: Any, folder: Path) -> Path:
    """A folder of links: the base's weights and config, the tokenizer the model trained with."""
    from modelloop_export_gguf import TOKENIZER_FILES

    for directory, tokenizer in ((Path(source.base), False), (Path(source.tokenizer), True)):
        for path in directory.iterdir():
            if path.is_file() and path.name.startswith(TOKENIZER_FILES) == tokenizer:
                (folder / path.name).unlink(missing_ok=True)
                (folder / path.name).symlink_to(path.resolve())
    return folder


def cached(inputs: list[Path], name: str, convert: Callable[[Path, Path], Any]) -> Path:
    """``convert(scratch_folder, target)`` once per state of the ``inputs`` folders' files
    (paths, sizes, times), kept under modelloop's cache; a failed conversion leaves nothing."""
    import shutil
    import tempfile

    from modelloop.plugin import cache_home

    files = sorted({p.resolve() for folder in inputs for p in folder.iterdir() if p.is_file()})
    key = hashlib.sha256(repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    target = cache_home() / "gguf" / key.hexdigest()[:24] / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            (Path(scratch) / "in").mkdir()
            convert(Path(scratch) / "in", Path(scratch) / name)
            shutil.move(Path(scratch) / name, target)
    return target


@dataclass(eq=False)
class _Job(EngineJob):
    """A request with the adapter its answers are generated with (None: the bare base)."""

    adapter: str | None = None
    completions: dict[int, Completion] = field(default_factory=dict)

    def answer(self, choice: int, completion: Completion) -> None:
        self.completions[choice] = completion
        if len(self.completions) == self.request.params.n:
            ordered = tuple(self.completions[index] for index in range(self.request.params.n))
            self.finish(Generation(choices=ordered, prompt_tokens=len(self.prompt_ids)))


@dataclass(eq=False)
class _Sequence:
    """One choice of a job, decoded as the llama.cpp sequence ``slot`` of the shared context."""

    job: _Job
    choice: int
    slot: int
    sampler: Any  # its own llama.cpp sampler chain (its seed, its penalty history)
    reserved: int  # the KV cells it may fill: its prompt and max_tokens
    decoded: list[int]  # the tokens whose KV it holds, from position 0
    feed: list[int]  # the tokens to decode next: the prompt's rest (in chunks), then each sampled token
    source: _Sequence | None = None  # the sequence whose KV of the prompt's start it will copy
    shared: int = 0  # how many of the prompt's tokens it copies from ``source``
    output: int = -1  # the batch row whose logits it samples from after this step (-1: none)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    end: list[int] = field(default_factory=list)  # the end-of-generation token that ended it
    reason: str = "length"
    text: str | None = None  # set when cut at a stop string
    shown: str = ""  # the text streamed so far

    @property
    def answering(self) -> bool:
        return len(self.decoded) >= len(self.job.prompt_ids)


@dataclass
class _Kept:
    """What a free slot's sequence still holds in the KV cells: the tokens, and the adapter
    they were decoded under (a prompt starting with them reuses them)."""

    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit`` (list slices compare in C)."""
    low, high = 0, min(len(a), len(b), limit)
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


@contextlib.contextmanager
def _llama_cpp_warnings_muted() -> Iterator[None]:
    """llama-cpp-python prints llama.cpp's warnings through this logger; mute it meanwhile."""
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


class LlamaCppSession:
    """An engine session over one llama.cpp model and context (see the module docstring)."""

    def __init__(self, model: Served, *, served_name: str, options: Mapping[str, Any]) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.model = model
        self.gguf = model.gguf
        # llama.cpp's threads spin while they wait: on every core they starve the server's own
        # threads (on 2 cores, 32-token answers took 9 ms with one and 9-80 ms with two)
        threads = int(options["threads"] or max(1, (os.cpu_count() or 2) - 1))
        # the vocabulary and metadata; the weights are loaded apart (_load_weights) and answers
        # decoded on a context of this session's own (below), so the one Llama makes is kept at its smallest
        with _llama_cpp_warnings_muted():  # its context outgrows a vocabulary's trained context (0)
            self.llm = llama_cpp.Llama(
                model_path=str(model.gguf), vocab_only=True, n_ctx=256, n_batch=32, n_ubatch=32, verbose=False
            )
        self._weights = self._load_weights(int(options["n_gpu_layers"]))
        trained = int(self.llm.metadata.get(f"{self.llm.metadata.get('general.architecture')}.context_length", 0))
        self.context_length = min(int(options["n_ctx"]) or trained or 4096, trained or 1 << 30)
        self.kv_tokens = max(int(options["kv_tokens"]) or 16384, self.context_length)
        self.max_batch_size = min(int(options["max_batch_size"] or 32), llama_cpp.llama_max_parallel_sequences())
        self.n_batch = max(self.max_batch_size, min(self.kv_tokens, 2048))
        self.ctx = self._context(threads)
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.base_name = served_name
        self._vocab = llama_cpp.llama_model_get_vocab(self._weights)
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.chat = ChatFormat(template, (), special_tokens=self._special_tokens(), name="gguf") if template else None
        self._adapters: dict[str, Any] = {}
        self._active: str | None = None  # the adapter on the context
        self._lock = threading.Lock()  # the context and adapters: the worker's steps, adapter loads
        self._queue: queue.Queue = queue.Queue()
        self._waiting: deque[tuple[_Job, int]] = deque()  # choices not yet given a sequence
        self._running: list[_Sequence] = []
        # the free slots, longest idle first, with the KV each still holds
        self._idle: dict[int, _Kept] = {slot: _Kept() for slot in range(self.max_batch_size)}
        self._reserved = 0  # the KV cells the running sequences may fill
        self._closed = False
        self.requests = 0
        self.steps = 0  # llama_decode calls, every sequence's tokens together
        self.decoded_tokens = 0  # the tokens they decoded (prompt tokens whose KV was there already are not)
        self._worker = threading.Thread(target=self._work, name="modelloop-llamacpp-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ protocol

    @property
    def models(self) -> list[str]:
        return [self.base_name, *(name for name in self._adapters if name != OWN_ADAPTER)]

    def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter (a GGUF adapter, or a PEFT folder converted for this base)."""
        if name in self.models:
            raise EngineError(f"a model named {name!r} is already served")
        gguf = Path(path)
        if gguf.is_dir():
            gguf = self._converted_adapter(gguf)
        with self._lock:
            adapter = self._llama_cpp.llama_adapter_lora_init(self._weights, str(gguf).encode())
            if not adapter:
                raise EngineError(f"llama.cpp could not load the adapter {path} on {self.gguf.name}")
            self._adapters[name] = adapter

    def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter; the answers being generated with it fail."""
        if name not in self._adapters:
            raise EngineError(f"no adapter {name!r} is served; adapters: {', '.join(self._adapters) or 'none'}")
        with self._lock:
            adapter = self._adapters.pop(name)
            if self._active == name:
                self._fail_running(EngineError(f"the adapter {name!r} was unloaded"))
                self._use(None)
            for slot in [slot for slot, kept in self._idle.items() if kept.adapter == name]:
                self._forget(slot)  # an adapter loaded again under the name must not meet them
            self._llama_cpp.llama_adapter_lora_free(adapter)

    def check(self, request: GenerationRequest) -> int:
        return len(self.prompt_ids(request))

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.model is not None and request.model not in self.models:
            raise EngineError(f"unknown model {request.model!r}; served: {', '.join(self.models)}")
        vocabulary = None  # checked for token-id prompts: text tokenised here cannot leave it
        if request.messages is not None:
            if self.chat is None:
                raise EngineError(f"{self.gguf.name} has no chat template: send a prompt, not messages")
            if any(isinstance(message.get("content"), list) for message in request.messages):
                raise EngineError("the llamacpp engine takes text messages only (no image or audio parts)")
            text = self.chat.render(request.messages, add_generation_prompt=True)
            ids = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        elif isinstance(request.prompt, str):
            ids = self.llm.tokenize(request.prompt.encode(), add_bos=self._adds_bos(), special=False)
        elif request.prompt is not None:
            ids = list(request.prompt)
            vocabulary = self.llm.n_vocab()
        else:
            raise EngineError("a request needs messages or a prompt")
        limits = {"max_tokens": request.params.max_tokens, "context_length": self.context_length}
        return check_prompt_ids(ids, **limits, vocabulary=vocabulary)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Generate for many requests, decoded together with whatever else is running."""
        return job_results(self._submit(requests))

    def stream(self, request: GenerationRequest) -> Iterator[Delta]:
        """Yield text as it is generated, then one Delta per choice with its finish reason;
        closing the iterator early ends the request's sequences at the next step."""
        (job,) = self._submit([request], streamed=True)
        yield from job_deltas(job)

    def close(self) -> None:
        """Stop the worker after the step in hand; requests still waiting fail."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_DONE)
        self._worker.join(timeout=60)
        llama_cpp = self._llama_cpp
        closed = EngineError("the engine was closed")
        with self._lock:
            self._fail_running(closed)
            for job, _ in self._waiting:
                job.fail(closed)
            while not self._queue.empty():  # submitted as it closed
                item = self._queue.get_nowait()
                for job in () if item is _DONE else item:
                    job.fail(closed)
            for adapter in self._adapters.values():
                llama_cpp.llama_adapter_lora_free(adapter)
            self._adapters.clear()
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self._weights)
            self.llm.close()

    # ------------------------------------------------------------------ the worker

    def _load_weights(self, gpu_layers: int) -> Any:
        """The model's weights, which this session's context and adapters use.

        Where llama.cpp's CPU backend has AMX-INT8 kernels (built for a CPU that has them),
        it keeps quantised weights in AMX buffers, and decoding with them segfaults in the
        build llama-cpp-python 0.3.36 makes (a Xeon with AMX, q8_0 and q4_K_M models of
        hidden size 256 and 512, the first batch): there the weights stay in plain CPU
        buffers (no AMX, no repacking), which decode correctly."""
        llama_cpp = self._llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
            params.use_extra_bufts = False
        weights = llama_cpp.llama_model_load_from_file(str(self.gguf).encode(), params)
        if not weights:
            self.llm.close()
            raise EngineError(f"llama.cpp could not load the weights of {self.gguf}")
        return weights

    def _context(self, threads: int) -> Any:
        """A context with a sequence per answer in the batch, sharing one pool of KV cells."""
        llama_cpp = self._llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.kv_tokens
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, 512)
        params.n_seq_max = self.max_batch_size
        # one pool, which answers of any length share (see _admit); per-sequence streams would
        # each need the longest context, and on the tiny Qwen2 served 32 clients no faster
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        # llama.cpp warns that the pool outgrows the trained context (one sequence's, under a
        # unified pool; no sequence here does)
        with _llama_cpp_warnings_muted():
            ctx = llama_cpp.llama_init_from_model(self._weights, params)
        if not ctx:
            llama_cpp.llama_model_free(self._weights)
            self.llm.close()
            raise EngineError(f"llama.cpp could not make a context of {self.kv_tokens} tokens for {self.gguf.name}")
        return ctx

    def _submit(self, requests: Sequence[GenerationRequest], *, streamed: bool = False) -> list[_Job]:
        """Queue the requests together, so that the worker never starts on part of them."""
        if self._closed:
            raise EngineError("the engine was closed")
        own = OWN_ADAPTER if OWN_ADAPTER in self._adapters else None
        jobs = [
            _Job(
                request,
                self.prompt_ids(request),
                streamed=streamed,
                adapter=request.model if request.model not in (None, self.base_name) else own,
            )
            for request in requests
        ]
        self._queue.put(jobs)
        return jobs

    def _work(self) -> None:
        while self._collect(wait=not (self._running or self._waiting)):
            with self._lock:
                self._admit()
                if not self._running:
                    continue
                try:
                    self._step()
                except Exception as error:  # noqa: BLE001 - handed to every request it stopped
                    self._fail_running(error)

    def _collect(self, *, wait: bool) -> bool:
        """Move the submitted requests' choices to the waiting line; False once closed."""
        while True:
            try:
                jobs = self._queue.get(block=wait)
            except queue.Empty:
                return True
            if jobs is _DONE:
                return False
            self.requests += len(jobs)
            self._waiting.extend((job, choice) for job in jobs for choice in range(job.request.params.n))
            wait = False

    def _admit(self) -> None:
        """Give waiting choices, first come first served, a sequence of their own while a slot
        is free, their prompt and max_tokens fit in the KV cells left (kept prompts of free
        slots are dropped, longest idle first, to make room), and they want the adapter on the
        context (it is switched when nothing runs)."""
        while self._waiting and self._idle:
            job, choice = self._waiting[0]
            if job.done.is_set() or job.cancelled.is_set():
                self._waiting.popleft()
                continue
            if self._running and job.adapter != self._active:
                return
            reserved = len(job.prompt_ids) + job.request.params.max_tokens
            kept = [slot for slot, cells in self._idle.items() if cells.tokens]
            while kept and self._reserved + reserved + sum(len(self._idle[s].tokens) for s in kept) > self.kv_tokens:
                self._forget(kept.pop(0))
            if self._running and self._reserved + reserved > self.kv_tokens:
                return
            self._waiting.popleft()
            try:
                self._use(job.adapter)
            except EngineError as error:
                job.fail(error)
                continue
            self._running.append(self._sequence(job, choice, reserved))
            self._reserved += reserved

    def _sequence(self, job: _Job, choice: int, reserved: int) -> _Sequence:
        """A sequence for one choice, starting from the longest start of its prompt whose KV
        is there already: a free slot's kept tokens (taken over at once), or a running
        sequence's prompt (copied once decoded: a request's n choices, a shared system
        prompt). At least the prompt's last token is decoded again, for its logits."""
        prompt, limit = job.prompt_ids, len(job.prompt_ids) - 1
        slot, shared = next(iter(self._idle)), 0  # the slot idle longest, else the best match
        for candidate, kept in self._idle.items():
            common = _common_prefix(kept.tokens, prompt, limit) if kept.adapter == job.adapter else 0
            if common > shared:
                slot, shared = candidate, common
        source, copied = None, shared
        for running in self._running:
            common = _common_prefix(running.job.prompt_ids, prompt, limit)
            if common > copied:
                source, copied = running, common
        if source is not None:
            slot, shared = next(iter(self._idle)), 0
        self._idle.pop(slot)
        self._llama_cpp.llama_memory_seq_rm(self._memory, slot, shared, -1)
        sequence = _Sequence(
            job, choice, slot, self._sampler(job, choice), reserved, list(prompt[:shared]), list(prompt[shared:])
        )
        if source is not None:  # it feeds nothing until the copy
            sequence.source, sequence.shared, sequence.feed = source, copied, list(prompt[copied:])
        return sequence

    def _copy_from_source(self, sequence: _Sequence) -> None:
        """Take the KV of the prompt's start from the source sequence once it is decoded (or
        decode the whole prompt, if the source stopped before)."""
        source, prompt = sequence.source, sequence.job.prompt_ids
        if source is None or len(source.decoded) < sequence.shared and source in self._running:
            return
        if len(source.decoded) >= sequence.shared:
            self._llama_cpp.llama_memory_seq_cp(self._memory, source.slot, sequence.slot, 0, sequence.shared)
            sequence.decoded, sequence.feed = list(prompt[: sequence.shared]), list(prompt[sequence.shared :])
        else:
            sequence.decoded, sequence.feed = [], list(prompt)
        sequence.source = None

    def _step(self) -> None:
        """One llama_decode over every running sequence: each answer's last token first, then
        prompts in chunks, up to n_batch tokens (a sequence waiting for the start of its prompt
        to be copied first takes it if it is decoded); then each sequence that reached its
        next token samples it."""
        llama_cpp, batch, rows = self._llama_cpp, self._batch, 0
        for sequence in [s for s in self._running if s.job.cancelled.is_set() or s.job.done.is_set()]:
            self._release(sequence)
        for sequence in [s for s in self._running if s.source is not None]:
            self._copy_from_source(sequence)  # every token batched before was decoded by now
        for sequence in sorted(self._running, key=lambda s: not s.answering):
            chunk = [] if sequence.source is not None else sequence.feed[: self.n_batch - rows]
            for offset, token in enumerate(chunk):
                batch.token[rows] = token
                batch.pos[rows] = len(sequence.decoded) + offset
                batch.n_seq_id[rows] = 1
                batch.seq_id[rows][0] = sequence.slot
                batch.logits[rows] = False
                rows += 1
            sequence.decoded += chunk
            del sequence.feed[: len(chunk)]
            sequence.output = rows - 1 if chunk and not sequence.feed else -1
            if sequence.output >= 0:
                batch.logits[rows - 1] = True
        if not rows:
            return
        batch.n_tokens = rows
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            raise EngineError(f"llama.cpp failed to decode a batch of {rows} tokens (status {status})")
        self.steps += 1
        self.decoded_tokens += rows
        for sequence in [s for s in self._running if s.output >= 0]:
            token = llama_cpp.llama_sampler_sample(sequence.sampler, self.ctx, sequence.output)
            if sequence.job.request.params.logprobs:
                sequence.logprobs.append(self._logprob(sequence.output, token))
            if self._advance(sequence, token):
                self._release(sequence)
                sequence.job.answer(sequence.choice, self._completion(sequence))
            else:
                sequence.feed.append(token)

    def _advance(self, sequence: _Sequence, token: int) -> bool:
        """Add a sampled token to its answer (streaming the text that cannot be a stop
        string's start); True when the answer is finished. The text is decoded per token only
        where it is needed: to stream it or to find a stop string."""
        job, params = sequence.job, sequence.job.request.params
        if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
            sequence.end, sequence.reason = [token], "stop"
            return True
        sequence.tokens.append(token)
        if not (job.streamed or params.stop):
            return len(sequence.tokens) >= params.max_tokens
        text = self._text(sequence.tokens)
        cut = min((text.find(stop) for stop in params.stop if stop and stop in text), default=-1)
        if cut >= 0:
            sequence.text, sequence.reason = text[:cut], "stop"
            sequence.tokens = self._tokens_for(sequence.tokens, sequence.text)
            return True
        if len(sequence.tokens) >= params.max_tokens:
            return True
        safe = text[: len(text) - max((len(stop) - 1 for stop in params.stop), default=0)]
        if job.streamed and len(safe) > len(sequence.shown) and not safe.endswith("\ufffd"):
            job.deltas.put(Delta(index=sequence.choice, text=safe[len(sequence.shown) :]))
            sequence.shown = safe
        return False

    def _completion(self, sequence: _Sequence) -> Completion:
        """The finished answer; a streamed one also gets its last text and its finish reason."""
        job = sequence.job
        text = sequence.text if sequence.text is not None else self._text(sequence.tokens)
        kept = tuple(sequence.tokens + sequence.end)
        if job.streamed:
            if text[len(sequence.shown) :]:
                job.deltas.put(Delta(index=sequence.choice, text=text[len(sequence.shown) :]))
            first = sequence.choice == 0
            job.deltas.put(
                Delta(
                    index=sequence.choice,
                    finish_reason=sequence.reason,  # type: ignore[arg-type]
                    tokens=len(kept),
                    prompt_tokens=len(job.prompt_ids) if first else 0,
                )
            )
        if not job.request.params.logprobs:
            return Completion(text=text, token_ids=kept, finish_reason=sequence.reason)  # type: ignore[arg-type]
        pieces = tuple(self.llm.detokenize([token], special=True).decode(errors="replace") for token in kept)
        return Completion(
            text=text,
            token_ids=kept,
            finish_reason=sequence.reason,  # type: ignore[arg-type]
            logprobs=tuple(sequence.logprobs[: len(kept)]),
            tokens=pieces,
        )

    def _release(self, sequence: _Sequence) -> None:
        """Free a sequence's slot and sampler; its KV is kept for a prompt that starts the same."""
        self._running.remove(sequence)
        for follower in [s for s in self._running if s.source is sequence]:
            self._copy_from_source(follower)
        self._llama_cpp.llama_sampler_free(sequence.sampler)
        self._idle[sequence.slot] = _Kept(self._active, sequence.decoded)
        self._reserved -= sequence.reserved

    def _forget(self, slot: int) -> None:
        """Drop what a free slot keeps in the KV cells."""
        self._llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._idle[slot] = _Kept()

    def _fail_running(self, error: BaseException) -> None:
        """Fail every running answer; what the free slots keep is dropped too (a failed
        decode leaves the cells in doubt)."""
        for sequence in list(self._running):
            sequence.job.fail(error)
            self._release(sequence)
        for slot in self._idle:
            self._forget(slot)

    def _sampler(self, job: _Job, choice: int) -> Any:
        """A choice's sampler chain, in transformers' order (penalty, temperature, top-k,
        top-p), seeded with the request's seed plus the choice's index; a request without a
        seed draws afresh."""
        llama_cpp, params = self._llama_cpp, job.request.params
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if params.repetition_penalty != 1.0:  # over the prompt and the answer, as transformers applies it
            penalty = llama_cpp.llama_sampler_init_penalties(
                self.llm.n_vocab(), self.context_length, params.repetition_penalty, 0.0, 0.0
            )
            llama_cpp.llama_sampler_chain_add(chain, penalty)
            for token in job.prompt_ids:
                llama_cpp.llama_sampler_accept(chain, token)
        if params.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        if params.top_k:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        seed = params.seed + choice if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def _tokens_for(self, tokens: list[int], text: str) -> list[int]:
        """The shortest prefix of ``tokens`` that still decodes to ``text`` (cut at a stop string)."""
        return next((tokens[:n] for n in range(len(tokens) + 1) if len(self._text(tokens[:n])) >= len(text)), tokens)

    def _logprob(self, row: int, token: int) -> float:
        """The log-probability of ``token`` under the logits of batch row ``row`` it was sampled from."""
        import numpy as np

        size = self.llm.n_vocab()
        logits = np.ctypeslib.as_array(self._llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(size,))
        top = float(logits.max())
        return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))

    def _use(self, name: str | None) -> None:
        """Put the adapter ``name`` (None: none) on the context; only while nothing runs on
        another, whose answers it would change."""
        if name == self._active:
            return
        if name is not None and name not in self._adapters:
            raise EngineError(f"the adapter {name!r} is no longer served")
        llama_cpp = self._llama_cpp
        if name is None:
            llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        self._active = name

    def _converted_adapter(self, folder: Path) -> Path:
        from modelloop_export_gguf import convert_adapter

        base = self.model.converted_from
        if base is None:
            raise EngineError(
                f"{folder} is a PEFT adapter and {self.gguf.name} is a GGUF given as it is: "
                "export the run with --quant gguf-lora and load its adapter.gguf"
            )
        return cached([folder], "adapter.gguf", lambda _, target: convert_adapter(folder, base, target))

    def _adds_bos(self) -> bool:
        return self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"

    def _special_tokens(self) -> dict[str, str]:
        """The BOS and EOS tokens' text, which chat templates may use (as transformers passes them)."""
        named = {"bos_token": self.llm.token_bos(), "eos_token": self.llm.token_eos()}
        return {
            name: self._llama_cpp.llama_vocab_get_text(self._vocab, token).decode()
            for name, token in named.items()
            if token is not None and token >= 0
        }


def start(model_path: Any, *, adapters: Any = None, options: Any = None) -> LlamaCppSession:
    try:
        options = complete(dict(options or {}), DEFAULTS)
    except ValueError as error:
        raise EngineError(f"llamacpp engine: {error}") from None
    model = served(model_path, options["pre_tokenizer"])
    session = LlamaCppSession(model, served_name=options["served_name"] or Path(str(model_path)).name, options=options)
    named = {OWN_ADAPTER: model.own_adapter} if model.own_adapter is not None else {}
    try:
        for name, path in {**named, **(adapters or {})}.items():
            session.load_adapter(name, str(path))
    except BaseException:
        session.close()
        raise
    return session


def preference() -> int | None:
    """Ahead of the built-in engine (``--engine auto``) on a CPU, or where llama.cpp was
    built for the GPU; left out where a GPU would sit idle under a CPU-only build."""
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return 1
    import torch

    return None if torch.cuda.is_available() else 1


LLAMACPP = Engine(
    name="llamacpp",
    description="llama.cpp in-process (llama-cpp-python): GGUF exports or runs converted once, LoRA at run time, batched",
    start=start,
    preference=preference,
)


@hookimpl
def register_engines(register):
    register(LLAMACPP)
