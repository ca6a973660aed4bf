"""llama.cpp as a modelloop engine, in this process through llama-cpp-python.

It serves a GGUF file (``modelloop export RUN --quant gguf-*``), or a run or model folder,
converted once to an f16 GGUF (cached by the files' sizes and times; a LoRA run as its
base plus a GGUF adapter). Prompts are rendered with the chat template in the GGUF by the
renderer training uses, and tokenised by llama.cpp; token-id prompts go in as they are
and completions come back as token ids (GRPO's rollouts). Generation stops at the GGUF's
end-of-generation tokens (the end of turn the export wrote), a stop string or
``max_tokens``. LoRA adapters (GGUF, or PEFT folders converted on load) are applied per
request, loaded and unloaded while serving.

llama-cpp-python's ``Llama`` decodes one sequence at a time, so requests take turns on one
context (its prompt cache reuses a shared prefix); on a CPU each uses every core but one. All layers go to the GPU where the build has one.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.plugin import (
    ChatFormat,
    Completion,
    Delta,
    Engine,
    EngineError,
    Generation,
    GenerationRequest,
    check_prompt_ids,
    complete,
    hookimpl,
)
from modelloop_export_gguf import convert_model

PLUGIN_API = ">=1.4,<2"

#: The name a LoRA run's own adapter is kept under: requests for the served name get it.
OWN_ADAPTER = "\x00own"

DEFAULTS: dict[str, Any] = {
    "served_name": None,
    "n_ctx": 0,  # the context to allocate (0: the length the model was trained for)
    "threads": None,  # default: every core but one, left to the server and its callers
    "n_gpu_layers": -1,  # all (a CPU build keeps them on the CPU)
    "pre_tokenizer": None,  # for converting a folder whose tokenizer llama.cpp does not know
    "max_batch_size": None,  # accepted as for every engine; requests take turns here
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


class LlamaCppSession:
    """An engine session over one llama.cpp model and context (see the module docstring)."""

    def __init__(self, model: Served, *, served_name: str, options: Mapping[str, Any]) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.model = model
        self.gguf = model.gguf
        self.llm = llama_cpp.Llama(
            model_path=str(model.gguf),
            n_ctx=int(options["n_ctx"]),
            # llama.cpp's threads spin while they wait: on every core they starve the server's own
            # threads (on 2 cores, 32-token answers took 9 ms with one and 9-80 ms with two)
            n_threads=int(options["threads"] or max(1, (os.cpu_count() or 2) - 1)),
            n_gpu_layers=int(options["n_gpu_layers"]),
            verbose=False,
        )
        trained = int(self.llm.metadata.get(f"{self.llm.metadata.get('general.architecture')}.context_length", 0))
        self.context_length = min(self.llm.n_ctx(), trained or self.llm.n_ctx())
        self.base_name = served_name
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.chat = ChatFormat(template, (), special_tokens=self._special_tokens(), name="gguf") if template else None
        self._adapters: dict[str, Any] = {}
        self._active: str | None = None
        self._lock = threading.Lock()  # one sequence at a time on the context
        self.requests = 0

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
        adapter = self._llama_cpp.llama_adapter_lora_init(self.llm.model, str(gguf).encode())
        if not adapter:
            raise EngineError(f"llama.cpp could not load the adapter {path} on {self.gguf.name}")
        with self._lock:
            self._adapters[name] = adapter

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise EngineError(f"no adapter {name!r} is served; adapters: {', '.join(self._adapters) or 'none'}")
        with self._lock:
            adapter = self._adapters.pop(name)
            if self._active == name:
                self._use(None)
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
        results = []
        for request in requests:
            ids = self.prompt_ids(request)
            choices = tuple(
                _last(self._choice(request, ids, choice, streamed=False)) for choice in range(request.params.n)
            )
            results.append(Generation(choices=choices, prompt_tokens=len(ids)))
        return results

    def stream(self, request: GenerationRequest) -> Iterator[Delta]:
        ids = self.prompt_ids(request)
        for choice in range(request.params.n):
            sent = ""
            for item in self._choice(request, ids, choice, streamed=True):
                if isinstance(item, str):
                    yield Delta(index=choice, text=item[len(sent) :])
                    sent = item
                else:
                    if item.text[len(sent) :]:
                        yield Delta(index=choice, text=item.text[len(sent) :])
                    yield Delta(
                        index=choice,
                        finish_reason=item.finish_reason,
                        tokens=len(item.token_ids),
                        prompt_tokens=len(ids) if choice == 0 else 0,
                    )

    def close(self) -> None:
        with self._lock:
            for adapter in self._adapters.values():
                self._llama_cpp.llama_adapter_lora_free(adapter)
            self._adapters.clear()
            self.llm.close()

    # ------------------------------------------------------------------ generation

    def _choice(
        self, request: GenerationRequest, prompt: list[int], choice: int, *, streamed: bool
    ) -> Iterator[str | Completion]:
        """Yield the choice's text so far as it grows (when ``streamed``; never a stop string's
        start), then its Completion. The text is decoded per token only where it is needed:
        to stream it or to find a stop string."""
        params = request.params
        hold = max((len(stop) - 1 for stop in params.stop), default=0)
        with self._lock:
            self.requests += 1
            own = OWN_ADAPTER if OWN_ADAPTER in self._adapters else None
            self._use(request.model if request.model not in (None, self.base_name) else own)
            # a request without a seed samples afresh (llama.cpp's default seed draws one), not
            # with the seed an earlier request set on the shared model
            seeded = params.seed is not None
            self.llm.set_seed(params.seed + choice if seeded else self._llama_cpp.LLAMA_DEFAULT_SEED)
            tokens: list[int] = []
            logprobs: list[float] = []
            reason, end, text, shown = "length", [], "", ""
            sampling = {"temp": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
            for token in self.llm.generate(prompt, min_p=0.0, repeat_penalty=params.repetition_penalty, **sampling):
                if params.logprobs:
                    logprobs.append(self._logprob(token))
                if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    reason, end = "stop", [token]
                    break
                tokens.append(token)
                if not (streamed or params.stop):
                    if len(tokens) >= params.max_tokens:
                        break
                    continue
                text = self._text(tokens)
                cut = min((text.find(stop) for stop in params.stop if stop and stop in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                    tokens = self._tokens_for(tokens, text)
                    break
                if len(tokens) >= params.max_tokens:
                    break
                safe = text[: len(text) - hold]
                if len(safe) > len(shown) and not safe.endswith("\ufffd"):
                    shown = safe
                    yield shown
            if reason != "stop" or end:  # not cut at a stop string: the text of every kept token
                text = self._text(tokens)
        kept = tuple(tokens + end)
        if not params.logprobs:
            yield Completion(text=text, token_ids=kept, finish_reason=reason)
            return
        pieces = tuple(self.llm.detokenize([token], special=True).decode(errors="replace") for token in kept)
        yield Completion(
            text=text, token_ids=kept, finish_reason=reason, logprobs=tuple(logprobs[: len(kept)]), tokens=pieces
        )

    def _text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def _tokens_for(self, tokens: list[int], text: str) -> list[int]:
        """The shortest prefix of ``tokens`` that still decodes to ``text`` (cut at a stop string)."""
        return next((tokens[:n] for n in range(len(tokens) + 1) if len(self._text(tokens[:n])) >= len(text)), tokens)

    def _logprob(self, token: int) -> float:
        """The log-probability of ``token`` under the logits it was sampled from (the last row)."""
        import numpy as np

        size = self.llm.n_vocab()
        row = np.ctypeslib.as_array(self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(size,))
        top = float(row.max())
        return float(row[token]) - top - math.log(float(np.exp(row - top).sum()))

    def _use(self, name: str | None) -> None:
        """Put the adapter ``name`` (None: none) on the context; the prompt cache was made
        under another, so it is dropped."""
        if name == self._active:
            return
        if name is not None and name not in self._adapters:
            raise EngineError(f"the adapter {name!r} is no longer served")
        llama_cpp = self._llama_cpp
        if name is None:
            llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            llama_cpp.llama_set_adapters_lora(self.llm.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        self.llm.reset()
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


def _last(items: Iterator[str | Completion]) -> Completion:
    for item in items:
        last = item
    return last  # type: ignore[return-value]


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


LLAMACPP = Engine(
    name="llamacpp",
    description="llama.cpp in-process (llama-cpp-python): GGUF exports or runs converted once, LoRA at run time",
    start=start,
)


@hookimpl
def register_engines(register):
    register(LLAMACPP)
