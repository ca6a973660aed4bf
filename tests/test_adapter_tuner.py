"""An adapter tuner that is not PEFT goes around the loop: it trains, its run loads, the
built-in engine serves it beside another adapter, and export folds it into the base.

The kernel never imports an adapter library; it calls the tuner's ``save``, ``merge``
and ``adapters`` (``AdapterFormat``). The tuner here learns a shift of the final norm's
scale: small enough to write in a test, and exactly mergeable into the norm's weight.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

import modelloop
from modelloop import hookimpl
from modelloop.export import export_merged
from modelloop.inference.hf import HFSession
from modelloop.inference.types import GenerationRequest, SamplingParams
from modelloop.models.loading import load_model
from modelloop.plugins import PluginInfo, get_plugin_manager
from modelloop.specs import AdapterFormat, Tuner

MARKER = "norm_shift.json"
WEIGHTS = "norm_shift.safetensors"


def final_norm(model):
    return model.get_decoder().norm


def _shifted(norm, inputs, output):
    if norm.active is None:
        return output
    return output * (1 + norm.shifts[norm.active] / norm.weight)


def _install(model):
    norm = final_norm(model)
    if not hasattr(norm, "shifts"):
        norm.shifts = torch.nn.ParameterDict()
        norm.active = None
        norm.hook = norm.register_forward_hook(_shifted)
    return norm


def prepare(model, options, family):
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    norm = _install(model)
    norm.shifts["default"] = torch.nn.Parameter(torch.zeros_like(norm.weight))
    norm.active = "default"
    return model


def save(model, directory):
    from safetensors.torch import save_file

    norm = final_norm(model)
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file({"shift": norm.shifts[norm.active].detach().contiguous()}, str(Path(directory) / WEIGHTS))
    (Path(directory) / MARKER).write_text(json.dumps({"adapter": "norm-shift"}))


def attach(model, directory, *, name):
    from safetensors.torch import load_file

    norm = _install(model)
    shift = load_file(str(Path(directory) / WEIGHTS))["shift"].to(norm.weight.dtype)
    norm.shifts[name] = torch.nn.Parameter(shift, requires_grad=False)
    norm.active = name
    return model


@contextlib.contextmanager
def use(model, name):
    norm = final_norm(model)
    previous, norm.active = norm.active, name
    try:
        yield
    finally:
        norm.active = previous


def detach(model, name):
    norm = final_norm(model)
    del norm.shifts[name]
    if norm.active == name:
        norm.active = next(iter(norm.shifts), None)
    return model


def merge(model):
    norm = final_norm(model)
    with torch.no_grad():
        norm.weight += norm.shifts[norm.active]
    norm.hook.remove()
    del norm.shifts, norm.active, norm.hook
    return model


NORM_SHIFT = Tuner(
    name="norm-shift",
    prepare=prepare,
    save=save,
    merge=merge,
    adapter=True,
    adapters=AdapterFormat(marker=MARKER, attach=attach, use=use, detach=detach),
)


class NormShiftPlugin:
    @hookimpl
    def register_tuners(self, register):
        register(NORM_SHIFT)


@pytest.fixture
def norm_shift_run(tiny_models, tmp_path):
    get_plugin_manager().add_plugin(NormShiftPlugin(), PluginInfo("modelloop-plugin-norm-shift", "1.0", builtin=False))
    data = tmp_path / "data.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"say {n}"}, {"role": "assistant", "content": f"{n} {n} {n}"}]}
        for n in range(32)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = tiny_models("qwen2")
    settings = {
        "model": str(base),
        "data": [str(data)],
        "tuner": "norm-shift",
        "max_length": 32,
        "batch_size": 8,
        "lr": 5e-2,
        "max_steps": 8,
        "logging_steps": 1,
    }
    result = modelloop.sft({**settings, "output_dir": str(tmp_path / "run")})
    return base, Path(result["run_dir"])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_an_adapter_tuner_that_is_not_peft_trains_loads_serves_and_merges(norm_shift_run, tmp_path):
    base, run = norm_shift_run
    assert (run / "model" / MARKER).is_file() and not (run / "model" / "config.json").exists()
    ids = torch.tensor([[1, 2, 3, 4, 5]])

    loaded = load_model(run)  # the base, with the run's adapter attached by its tuner
    assert loaded.tuner is NORM_SHIFT
    plain = load_model(base).model
    tuned = logits(loaded.model, ids)
    assert not torch.allclose(tuned, logits(plain, ids), atol=1e-4), "the adapter learned nothing"

    session = HFSession(
        loaded.model.eval(),
        loaded.tokenizer,
        _chat(loaded),
        served_name="run",
        options={"inline": True},
        tuner=loaded.tuner,
    )
    session.load_adapter("again", str(run / "model"))
    session.load_adapter("zero", str(zero_shift(tmp_path / "zero", final_norm(plain).weight)))
    assert session.models == ["run", "again", "zero"]
    scored = session.generate([first_token(name) for name in ("run", "again", "zero")])
    plain_session = HFSession(
        plain.eval(), loaded.tokenizer, _chat(loaded), served_name="base", options={"inline": True}
    )
    (as_base,) = plain_session.generate([first_token("base")])
    as_run, as_again, as_zero = (generation.choices[0].logprobs[0] for generation in scored)
    assert as_run == pytest.approx(as_again)  # the same adapter, attached twice
    assert as_zero == pytest.approx(
        as_base.choices[0].logprobs[0], abs=1e-5
    )  # each request computed as its own adapter
    assert as_run != pytest.approx(as_zero, abs=1e-4)
    session.unload_adapter("again")
    session.unload_adapter("zero")
    assert session.models == ["run"] and set(final_norm(loaded.model).shifts) == {"default"}
    session.close()
    plain_session.close()

    merged = export_merged(run, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    folded = AutoModelForCausalLM.from_pretrained(merged)  # plain transformers: no adapter left
    assert torch.allclose(logits(folded, ids), tuned, atol=1e-5)


def test_serving_a_folder_no_installed_tuner_wrote_is_one_clear_error(tiny_models, tmp_path):
    from modelloop.errors import EngineError

    loaded = load_model(tiny_models("qwen2"))
    session = HFSession(
        loaded.model.eval(), loaded.tokenizer, _chat(loaded), served_name="base", options={"inline": True}
    )
    with pytest.raises(EngineError, match="is not an adapter folder of an installed tuner .*adapter_config.json"):
        session.load_adapter("stray", str(tmp_path))
    session.close()


def first_token(model: str) -> GenerationRequest:
    return GenerationRequest(
        prompt="say 3", model=model, params=SamplingParams(max_tokens=1, temperature=0.0, logprobs=True)
    )


def zero_shift(folder: Path, like: torch.Tensor) -> Path:
    """An adapter folder of this format that changes nothing."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"shift": torch.zeros_like(like)}, str(folder / WEIGHTS))
    (folder / MARKER).write_text("{}")
    return folder


def _chat(loaded):
    from modelloop.chat import resolve_chat_format

    return resolve_chat_format(loaded.tokenizer, loaded.family, None)
