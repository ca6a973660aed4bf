"""GGUF exports for llama.cpp and Ollama: a run merged (adapters folded in), converted by
llama.cpp's own converter and quantised by llama.cpp's own quantiser, with the chat
template and the end-of-turn token it was trained with in the GGUF's metadata and an
Ollama ``Modelfile`` beside it; a LoRA run also as a GGUF adapter on its base.

Where llama.cpp comes from, from the package registry alone: ``llama-cpp-python`` (a
dependency, built from its source distribution by pip) carries the compiled library, so
the quantiser; its source distribution also vendors llama.cpp's converter scripts, which
the wheel leaves out, so the first export fetches that same version's source with ``pip
download`` and keeps the converter under modelloop's cache. ``MODELLOOP_LLAMA_CPP`` names
a llama.cpp checkout to use instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.plugin import Exporter, ModelloopError, hookimpl

PLUGIN_API = ">=1.5,<2"

#: exporter -> llama.cpp's file type for the quantiser (None: the converter's f16 as it is)
QUANTS: dict[str, str | None] = {"gguf-f16": None, "gguf-q8_0": "Q8_0", "gguf-q4_k_m": "Q4_K_M"}

#: A tokenizer's split rule (tokenizer.json) -> the name llama.cpp gives that pre-tokenizer
#: (llama.cpp's src/llama-vocab.cpp quotes each rule beside its own rewrite of it). Used
#: only for a vocabulary llama.cpp does not recognise by its hash (see modelloop_gguf_convert).
PRE_TOKENIZERS = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "qwen2",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "llama-bpe",
}  # fmt: skip

#: What the converters need from llama.cpp's source tree.
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")

MODEL_FILE = "model.gguf"

#: The files of a saved tokenizer (and its chat template).
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "added_tokens", "vocab", "merges")


class GGUFError(ModelloopError):
    """A GGUF export or conversion that cannot be done as asked."""


# --------------------------------------------------------------------------- llama.cpp


def llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise GGUFError("GGUF export needs llama-cpp-python: pip install modelloop-plugin-export-gguf") from None


def llama_cpp_folder() -> Path:
    """A llama.cpp source folder with the converters: ``$MODELLOOP_LLAMA_CPP``, else the
    one fetched once for the installed llama-cpp-python."""
    from modelloop.plugin import cache_home

    if os.environ.get("MODELLOOP_LLAMA_CPP"):
        folder = Path(os.environ["MODELLOOP_LLAMA_CPP"])
        if not (folder / CONVERTER_FILES[0]).is_file():
            raise GGUFError(
                f"MODELLOOP_LLAMA_CPP={folder} holds no {CONVERTER_FILES[0]}: point it at a llama.cpp checkout"
            )
        return folder
    version = llama_cpp_version()
    folder = cache_home() / "llama.cpp" / version
    if not all((folder / name).exists() for name in CONVERTER_FILES):
        fetch_converter(version, folder)
    return folder


def download_source(version: str, folder: Path) -> Path:
    """llama-cpp-python's source distribution of ``version`` (it vendors llama.cpp's whole
    tree), downloaded from the package index into ``folder``; the archive's path."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    done = subprocess.run(
        [*command, "--dest", str(folder), f"llama-cpp-python=={version}"], capture_output=True, text=True
    )
    archives = list(folder.glob("*.tar.gz"))
    if done.returncode != 0 or not archives:
        tail = "\n".join(done.stderr.strip().splitlines()[-3:])
        raise GGUFError(f"could not fetch llama-cpp-python=={version}'s source from the package index:\n{tail}")
    return archives[0]


def fetch_converter(version: str, folder: Path) -> None:
    """Take llama.cpp's converters from llama-cpp-python's source distribution (PyPI)."""
    print(
        f"modelloop: fetching llama.cpp's converter (llama-cpp-python=={version} source) into {folder}", file=sys.stderr
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        unpacked = Path(scratch) / "llama.cpp"
        with tarfile.open(download_source(version, Path(scratch))) as archive:
            for member in archive.getmembers():
                _, _, inside = member.name.partition("/vendor/llama.cpp/")
                if inside and inside.split("/")[0] in CONVERTER_FILES and (member.isfile() or member.isdir()):
                    member.name = inside
                    archive.extract(member, unpacked, filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        unpacked.rename(folder)


def pre_tokenizer_of(model_folder: Path) -> str | None:
    """llama.cpp's name for the tokenizer's split rule, if it is one of the known ones."""
    try:
        pre = json.loads((model_folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except FileNotFoundError:
        return None
    for step in pre.get("pretokenizers", [pre]):
        rule = (step.get("pattern") or {}).get("Regex")
        if step.get("type") == "Split" and rule in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[rule]
    return None


def _run_converter(script: str, settings: dict[str, Any], arguments: list[str]) -> None:
    folder = llama_cpp_folder()
    with tempfile.NamedTemporaryFile("w", suffix=".json") as written:
        json.dump(settings, written)
        written.flush()
        done = subprocess.run(
            [sys.executable, "-m", "modelloop_gguf_convert", str(folder), script, written.name, *arguments],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        if "pre-tokenizer was not recognized" in reason:
            reason = "llama.cpp does not know this tokenizer's pre-tokenizer: pass --export-option pre_tokenizer=NAME (a name from llama.cpp's get_vocab_base_pre)"
        raise GGUFError(f"llama.cpp's {script} failed: {reason}")


def convert_model(model_folder: Path, gguf: Path, chat: Any, *, pre_tokenizer: str | None = None) -> Path:
    """A transformers model folder as an f16 GGUF, with ``chat``'s template and end of turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    settings = {
        "pre_tokenizer": pre_tokenizer or pre_tokenizer_of(model_folder),
        "chat_template": chat.source,
        "end_of_turn_id": _token_id(tokenizer, chat.end_of_turn),
    }
    _run_converter(CONVERTER_FILES[0], settings, [str(model_folder), "--outfile", str(gguf), "--outtype", "f16"])
    return gguf


def convert_adapter(adapter_folder: Path, base_folder: Path, gguf: Path) -> Path:
    """A PEFT LoRA adapter as a GGUF adapter for the GGUF of ``base_folder``.

    In this process: GRPO with llama.cpp rollouts converts the policy's adapter at every
    sync, and a process of its own (Python starting, torch imported) took 2.1 s where the
    conversion itself takes 0.01-0.35 s (the tiny Qwen2; the same bytes either way). It
    needs none of the patches a model's conversion does."""
    arguments = ["--base", str(base_folder), "--outfile", str(gguf), "--outtype", "f16", str(adapter_folder)]
    folder = llama_cpp_folder()
    imported = sys.modules.get("gguf")
    if imported is not None and not Path(str(imported.__file__)).is_relative_to(folder):
        _run_converter(CONVERTER_FILES[1], {}, arguments)  # another gguf package is loaded here
    else:
        _run_in_this_process(folder, CONVERTER_FILES[1], arguments)
    return gguf


def _run_in_this_process(folder: Path, script: str, arguments: list[str]) -> None:
    """Run a converter as its own ``__main__`` here, its output kept from the terminal and
    the process's argv, logging and import path as they were."""
    import contextlib
    import io
    import logging
    import runpy

    for path in (str(folder), str(folder / "gguf-py")):  # the converter's own imports
        if path not in sys.path:
            sys.path.insert(0, path)
    saved = sys.argv, os.environ.get("NO_LOCAL_GGUF"), logging.root.handlers[:], logging.root.level
    sys.argv = [script, *arguments]
    os.environ["NO_LOCAL_GGUF"] = "1"  # gguf-py is on the path already: not once more per call
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            runpy.run_path(str(folder / script), run_name="__main__")
    except (Exception, SystemExit) as error:  # noqa: BLE001 - the converter's reason, in one line
        lines = output.getvalue().strip().splitlines()
        reason = f"{type(error).__name__}: {error}" if isinstance(error, Exception) else (lines or ["no output"])[-1]
        raise GGUFError(f"llama.cpp's {script} failed: {reason}") from None
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            os.environ.pop("NO_LOCAL_GGUF", None)
        else:
            os.environ["NO_LOCAL_GGUF"] = saved[1]
        logging.root.handlers[:] = saved[2]
        logging.root.setLevel(saved[3])


def quantize(source: Path, out: Path, file_type: str) -> Path:
    """llama.cpp's quantiser (``llama_model_quantize``), as ``llama-quantize`` runs it."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise GGUFError(f"llama.cpp could not quantise {source} to {file_type}")
    return out


def _token_id(tokenizer: Any, tokens: tuple[str, ...]) -> int | None:
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id >= 0 and token_id != tokenizer.unk_token_id:
            return token_id
    return None


# --------------------------------------------------------------------------- Ollama


@dataclass(frozen=True)
class Turns:
    """A chat template as the text around each message of a plain conversation (system,
    then alternating user and assistant turns): what an Ollama template can say.

    ``first[role]`` opens a conversation starting with ``role``; ``between[(a, b)]`` joins
    a message of role ``a`` to the next, of role ``b``; ``prompt`` follows a last user
    message, opening the assistant's turn.
    """

    first: dict[str, str]
    between: dict[tuple[str, str], str]
    prompt: str

    @classmethod
    def of(cls, chat: Any) -> Turns | None:
        """Cut the template's renderings of marked conversations into those pieces; None
        when the pieces do not reproduce it (a template that treats some turn apart)."""
        marks = {"system": "\x01S\x01", "user": "\x01U\x01", "assistant": "\x01A\x01", "again": "\x01V\x01"}
        full = [("system", marks["system"]), ("user", marks["user"]), ("assistant", marks["assistant"])]
        full.append(("user", marks["again"]))
        try:
            pieces = _split(chat.render(_messages(full), add_generation_prompt=True), list(marks.values()))
            alone = _split(chat.render(_messages(full[1:2]), add_generation_prompt=True), [marks["user"]])
        except Exception:  # noqa: BLE001 - a template that refuses these conversations has no such pieces
            return None
        if pieces is None or alone is None:
            return None
        turns = cls(
            first={"system": pieces[0], "user": alone[0]},
            between={("system", "user"): pieces[1], ("user", "assistant"): pieces[2], ("assistant", "user"): pieces[3]},
            prompt=pieces[4],
        )
        checked = [full[:2], full[1:2], full[1:], full, [*full, ("assistant", "B"), ("user", "C")]]
        if turns.prompt != alone[1] or any(
            turns.render(_messages(c)) != chat.render(_messages(c), add_generation_prompt=True) for c in checked
        ):
            return None
        return turns

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the Ollama template below renders it: after a last user
        message, the assistant's turn opened; after a last assistant message, nothing (Ollama
        continues it)."""
        text, previous = "", ""
        for message in messages:
            role = message["role"]
            text += self.first.get(role, "") if not previous else self.between.get((previous, role), "")
            text += message["content"]
            previous = role
        return text + (self.prompt if previous == "user" else "")

    def go_template(self) -> str:
        """The same, in Ollama's template language (Go's text/template)."""
        first = "".join(
            f'{"{{ if" if i == 0 else "{{ else if"} eq .Role "{role}" }}}}{_go_text(text)}'
            for i, (role, text) in enumerate(self.first.items())
        )
        between = "".join(
            f'{{{{ else if and (eq $previous "{a}") (eq .Role "{b}") }}}}{_go_text(text)}'
            for (a, b), text in self.between.items()
        )
        return (
            '{{ $previous := "" }}{{ range .Messages }}'
            f'{{{{ if eq $previous "" }}}}{first}{{{{ end }}}}{between}{{{{ end }}}}'
            "{{ .Content }}{{ $previous = .Role }}{{ end }}"
            f'{{{{ if eq $previous "user" }}}}{_go_text(self.prompt)}{{{{ end }}}}'
        )


def _messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def _split(text: str, marks: list[str]) -> list[str] | None:
    pieces = []
    for mark in marks:
        before, found, text = text.partition(mark)
        if not found:
            return None
        pieces.append(before)
    return [*pieces, text]


def _go_text(text: str) -> str:
    """Literal text in a Go template: as it is, unless it holds template delimiters."""
    return text if "{{" not in text and "}}" not in text else "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def modelfile(chat: Any, weights: str, adapter: str | None = None) -> str:
    """An Ollama Modelfile: the weights, the chat template and the stops the model was trained with."""
    lines = [f"FROM ./{weights}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter}")
    turns = Turns.of(chat)
    if turns is not None:
        lines.append(f'TEMPLATE """{turns.go_template()}"""')
    else:
        lines.append(f"# the chat template ({chat.name}) has no plain per-turn form: Ollama reads it from the GGUF")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in chat.end_of_turn]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- exporters


def export_gguf(name: str, source: Any, out: Any, *, pre_tokenizer: str | None = None) -> Path:
    """``source`` merged, as one GGUF file (``model.gguf``) in ``out``, with its Modelfile."""
    from modelloop.plugin import save_merged, trained_chat_format, write_export

    file_type = QUANTS[name]
    chat = trained_chat_format(source)

    def write(folder: Path) -> None:
        merged = folder / "merged"
        save_merged(source, merged)
        converted = convert_model(
            merged, folder / ("model-f16.gguf" if file_type else MODEL_FILE), chat, pre_tokenizer=pre_tokenizer
        )
        shutil.rmtree(merged)
        if file_type:
            quantize(converted, folder / MODEL_FILE, file_type)
            converted.unlink()
        (folder / "Modelfile").write_text(modelfile(chat, MODEL_FILE))

    return write_export(Path(out), write, source, name)


def export_gguf_lora(source: Any, out: Any, *, pre_tokenizer: str | None = None) -> Path:
    """A LoRA run as ``adapter.gguf`` beside its base as ``base.gguf`` (f16), with a Modelfile
    that loads both."""
    from modelloop.plugin import resolve_model_source, trained_chat_format, write_export

    model = resolve_model_source(source)
    if model.adapter is None:
        raise GGUFError(f"{source} is not a LoRA run: export it with --quant gguf-f16 (or another gguf-* format)")
    chat = trained_chat_format(source)

    def write(folder: Path) -> None:
        base = folder / "base"  # the base's weights (linked) with the tokenizer the run trained with
        base.mkdir()
        for path in Path(model.base).iterdir():
            if path.is_file() and not path.name.startswith(TOKENIZER_FILES):
                (base / path.name).symlink_to(path.resolve())
        for path in Path(model.tokenizer).iterdir():
            if path.is_file() and path.name.startswith(TOKENIZER_FILES):
                shutil.copy2(path, base / path.name)
        convert_model(base, folder / "base.gguf", chat, pre_tokenizer=pre_tokenizer)
        convert_adapter(Path(model.adapter), base, folder / "adapter.gguf")
        shutil.rmtree(base)
        (folder / "Modelfile").write_text(modelfile(chat, "base.gguf", adapter="adapter.gguf"))

    return write_export(Path(out), write, source, "gguf-lora")


def _exporter(name: str) -> Any:
    def export(source: Any, out: Any, **options: Any) -> Path:
        return export_gguf(name, source, out, **options)

    return export


EXPORTERS = (
    *(
        Exporter(
            name=name,
            description=f"one GGUF file, {'f16' if not file_type else file_type}, for llama.cpp and Ollama (with a Modelfile)",
            export=_exporter(name),
            engines=("llamacpp",),
            requires=("llama_cpp",),
            options=("pre_tokenizer",),
        )
        for name, file_type in QUANTS.items()
    ),
    Exporter(
        name="gguf-lora",
        description="a LoRA run as a GGUF adapter beside its f16 base, for llama.cpp and Ollama",
        export=export_gguf_lora,
        engines=("llamacpp",),
        requires=("llama_cpp",),
        options=("pre_tokenizer",),
    ),
)


@hookimpl
def register_exporters(register):
    for exporter in EXPORTERS:
        register(exporter)
