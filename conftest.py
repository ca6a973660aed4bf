"""Hermetic plugin loading for every test.

Tests see the built-ins and the plugins of this repository, never a plugin that
happens to be installed on the machine: ``MODELLOOP_LOAD_PLUGINS`` is set to this
repo's plugin distributions, and the process-wide plugin manager is rebuilt around
every test. Test plugins are written as real installed distributions (a dist-info
folder with entry_points.txt) so they go through the same discovery as any other.
"""

from __future__ import annotations

import os
import sys
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelloop import plugins
from modelloop.threads import settle_threads

REPO = Path(__file__).resolve().parent


def repo_plugin_distributions() -> list[str]:
    """The distribution names of every plugin package under plugins/."""
    names = []
    for pyproject in sorted(REPO.glob("plugins/*/pyproject.toml")):
        names.append(tomllib.loads(pyproject.read_text())["project"]["name"])
    return names


HERMETIC_ENV = {
    "MODELLOOP_LOAD_PLUGINS": ",".join(repo_plugin_distributions()),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MODELSCOPE_OFFLINE": "1",
}
# huggingface_hub reads its offline switch when imported: set it before any test imports it.
os.environ.update({key: value for key, value in HERMETIC_ENV.items() if key.endswith("OFFLINE")})
# The suite runs on two xdist workers (Makefile); each sizes torch's pool and OpenMP's spin
# as a ``modelloop`` command does, before torch is imported: with libgomp's default spin,
# two workers' threads on two cores burn each other's time slices.
settle_threads()


def _hermetic(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    for variable in ("MODELLOOP_BLOCK_PLUGINS", "MODELLOOP_TRACE_PLUGINS", "MODELLOOP_DEBUG", "MODELLOOP_HUB_MODELS"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in HERMETIC_ENV.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("MODELLOOP_CACHE", str(cache))
    monkeypatch.setattr(plugins, "_manager", None)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("modelloop-cache")


@pytest.fixture(scope="session", autouse=True)
def hermetic_session(session_cache: Path) -> Iterator[None]:
    """The same for the whole session: fixtures of a wider scope (an engine session a test
    module shares) are made before any test's own set-up, and would otherwise load the
    machine's plugins and fill the user's cache."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _hermetic(monkeypatch, session_cache)
        yield


@pytest.fixture(autouse=True)
def hermetic_plugins(monkeypatch: pytest.MonkeyPatch, session_cache: Path) -> None:
    _hermetic(monkeypatch, session_cache)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, session_cache: Path) -> Callable[..., Path]:
    """``tiny_models(family, preset="tiny")``: the folder of that family's preset, built once
    per session (``small`` where a test measures memory)."""
    from modelloop.models.new_model import new_model

    root = tmp_path_factory.mktemp("models")
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, preset: str = "tiny") -> Path:
        if (family, preset) not in built:
            with pytest.MonkeyPatch.context() as monkeypatch:
                _hermetic(monkeypatch, session_cache)
                suffix = "" if preset == "tiny" else f"-{preset}"
                built[family, preset] = new_model(family, preset, root / f"{family}{suffix}")
        return built[family, preset]

    return get


@pytest.fixture(scope="session")
def lora_run(
    tiny_models: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory, session_cache: Path
) -> tuple[Path, Path]:
    """A LoRA SFT run of the tiny Qwen2 on 60 additions (``tuned/``), and its data file."""
    import json

    import modelloop

    root = tmp_path_factory.mktemp("lora")
    data = root / "tasks.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(60)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _hermetic(monkeypatch, session_cache)
        modelloop.sft(
            {
                "model": str(tiny_models("qwen2")),
                "data": [str(data)],
                "max_steps": 20,
                "lr": 3e-3,
                "max_length": 64,
                # Adam turns the rounding of near-zero first gradients into whole steps, so
                # the adapter, and how decisively the tiny model picks its greedy tokens
                # (which the engines' tests compare), would change with the library that
                # ``auto`` picks for this processor's products
                "cpu_matmul": "onednn",
                "output_dir": str(root / "tuned"),
            }
        )
    return root / "tuned", data


@pytest.fixture(scope="session")
def varied_lora_run(lora_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lora_run`` with its adapter's B matrices drawn large: twenty steps leave the tiny
    model answering every question alike, and two engines matching one repeated answer
    prove little; this one answers each prompt differently."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path_factory.mktemp("varied") / "run"
    shutil.copytree(lora_run[0], run)
    weights = run / "model" / "adapter_model.safetensors"
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if "lora_B" in name:
            tensors[name] = torch.randn(tensor.shape, generator=generator) * 0.3
    save_file(tensors, weights, metadata={"format": "pt"})
    return run


def decisive_prefix(model: Any, prompt_ids: list[int], token_ids: tuple[int, ...], margin: float = 0.01) -> int:
    """How many of the greedy ``token_ids`` transformers' ``model`` chose by more than
    ``margin`` over its runner-up logit: past a closer call, an engine computing in f16
    may pick the other token and both are right (a random tiny model has many)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + list(token_ids)])).logits[0, len(prompt_ids) - 1 : -1].float()
    top = torch.topk(logits, 2).values
    close = ((top[:, 0] - top[:, 1]) < margin).nonzero()
    return int(close[0]) if len(close) else len(token_ids)


def assert_same_greedy_tokens(
    model: Any, prompts: list[list[int]], expected: list[tuple[int, ...]], got: list[tuple[int, ...]]
) -> None:
    """``got`` (an engine's greedy tokens) equals ``expected`` (transformers') token for
    token up to each answer's first close call (``decisive_prefix``), and those prefixes
    hold at least half the tokens: the comparison is not vacuous."""
    compared = 0
    for prompt, want, have in zip(prompts, expected, got, strict=True):
        length = decisive_prefix(model, prompt, want)
        assert have[:length] == want[:length], (prompt, want, have, length)
        compared += length
    assert compared >= 0.5 * sum(map(len, expected)), f"only {compared} tokens were decisive"


def assert_packed_examples_match_alone(model: Any, packed: dict[str, Any], row: Any, alone: Callable[..., Any]) -> None:
    """Each example of the packed ``row`` (``packed``, its batch) has the logits it has in a
    batch of its own (``alone``: an unpacked collator), to 1e-4: its positions, pictures,
    videos and clips were kept apart from its neighbours'."""
    import torch

    with torch.no_grad():
        logits = model(**packed).logits[0]
        start = 0
        for length, items in zip(row.lengths, row.media, strict=True):
            single = alone([(row.input_ids[start : start + length], row.labels[start : start + length], items)])
            assert torch.allclose(model(**single).logits[0], logits[start : start + length], atol=1e-4)
            start += length


def answer_accuracy(folder: Path, data: Path, answers: tuple[str, ...]) -> float:
    """How often the model at ``folder`` finds the right one of ``answers`` likelier (the
    lower summed loss) for the one-turn questions in ``data``, pictures, videos and clips
    read as training reads them."""
    import torch

    from modelloop.chat import resolve_chat_format
    from modelloop.data.records import Example, read_records
    from modelloop.data.tokenize import Encoder
    from modelloop.models.loading import load_media_tokens, load_model
    from modelloop.training import Collator

    loaded = load_model(folder, dtype="fp32")
    media = load_media_tokens(loaded.family, folder, loaded.model.config, loaded.tokenizer)
    encoder = Encoder(loaded.tokenizer, resolve_chat_format(loaded.tokenizer, loaded.family), media)
    collate = Collator(loaded.tokenizer.pad_token_id, packing=False, media=media)
    examples = read_records([data]).examples
    right = 0
    for example in examples:
        scores = {}
        for answer in answers:
            record = {
                **example.record,
                "messages": [example.record["messages"][0], {"role": "assistant", "content": answer}],
            }
            ((encoded,),) = encoder.encode([Example(example.location, example.kind, record)])
            batch = collate([(encoded.input_ids, encoded.labels, encoded.media)])
            with torch.no_grad():
                loss = loaded.model(**batch).loss
            scores[answer] = -float(loss) * int((batch["labels"][:, 1:] != -100).sum())
        right += max(scores, key=scores.get) == example.record["messages"][1]["content"]
    return right / len(examples)


def accuracy_before_and_after_sft(
    base: Path, held_out: Path, answers: tuple[str, ...], **config: Any
) -> tuple[float, float, Path]:
    """``answer_accuracy`` on ``held_out`` of ``base`` and of the model an SFT run of it
    with ``config`` (full tuning at a constant rate unless told) makes, and that model's folder."""
    import modelloop

    before = answer_accuracy(base, held_out, answers)
    result = modelloop.sft({"model": str(base), "tuner": "full", "scheduler": "constant", **config})
    model = Path(result["run_dir"]) / "model"
    return before, answer_accuracy(model, held_out, answers), model


@pytest.fixture(scope="session")
def subprocess_env(session_cache: Path) -> dict[str, str]:
    """The environment for a ``modelloop`` child process, as hermetic as this one."""
    return {**os.environ, **HERMETIC_ENV, "MODELLOOP_CACHE": str(session_cache)}


InstallPlugin = Callable[..., str]


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InstallPlugin]:
    """Write an installed plugin distribution (module + dist-info) onto sys.path.

    ``install_plugin(dist, source, version="1.0", requires="modelloop>=0.1,<1")`` returns
    the distribution name; the module is named after it, unique to this test.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules = []

    def install(dist: str, source: str, version: str = "1.0", requires: str | None = "modelloop>=0.1,<1") -> str:
        module = f"{dist.replace('-', '_')}_{abs(hash(str(tmp_path))) % 10**8}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        metadata = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        if requires:
            metadata += f"Requires-Dist: {requires}\n"
        (info / "METADATA").write_text(metadata)
        (info / "entry_points.txt").write_text(f"[modelloop]\n{dist} = {module}\n")
        modules.append(module)
        return dist

    install.site = site  # type: ignore[attr-defined]
    yield install
    for module in modules:
        sys.modules.pop(module, None)


def modelloop_serve(
    python: str, model: str, adapters: dict[str, str], options: dict[str, object]
) -> tuple[list[str], dict[str, str]]:
    """``modelloop serve`` as an engine's server command (``launch.start_server``): the
    built-in ``hf-server`` engine's, so that the HTTP engine path runs on a CPU."""
    from modelloop.builtin.hf_engine import serve_command

    return serve_command(python, model, adapters, options)
