"""Loading models: the family resolved from the config, clear errors, the generic fallback, new-model."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

from modelloop.cli import build_cli
from modelloop.errors import ModelloopError
from modelloop.models.loading import ModelLoadError, load_model, read_config
from modelloop.models.new_model import new_model


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(tmp_path / "absent")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)


def test_unknown_model_type_lists_installed_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ModelLoadError) as raised:
        read_config(tmp_path)
    assert "no-such-arch" in str(raised.value)
    assert "qwen2 (qwen2)" in str(raised.value) and "llama (llama)" in str(raised.value)


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(
        ModelLoadError,
        match=r"^Qwen/Qwen2.5-0.5B: HF_HUB_OFFLINE is set and the model is not in the hub cache \(.*\); set HF_HUB_OFFLINE=0 to download it, set HF_HUB_CACHE to a cache that holds it \(hf download Qwen/Qwen2.5-0.5B where there is a network\), or give a model folder instead of the id$",
    ):
        read_config("Qwen/Qwen2.5-0.5B")


@pytest.mark.parametrize(
    "dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("auto", torch.float32)]
)
def test_dtype(dtype, expected, tiny_models):
    assert load_model(tiny_models("qwen2"), dtype=dtype).model.dtype == expected


def test_bad_dtype_and_missing_flash_attention_fail_before_loading(tiny_models):
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        load_model(tiny_models("qwen2"), dtype="fp8")
    with pytest.raises(ModelLoadError, match="flash_attention_2 needs the flash_attn package"):
        load_model(tiny_models("qwen2"), attn_implementation="flash_attention_2")


def test_attention_implementation_is_applied(tiny_models):
    assert load_model(tiny_models("llama")).model.config._attn_implementation == "sdpa"
    assert load_model(tiny_models("llama"), attn_implementation="eager").model.config._attn_implementation == "eager"


def test_unclaimed_model_type_uses_the_generic_family_with_one_warning(tmp_path, tiny_models, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_models("qwen2"), folder)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (folder / name).unlink()
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=2000)).save_pretrained(folder)
    first = load_model(folder)
    load_model(folder)
    assert first.family.name == "generic"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["modelloop: warning: no installed plugin claims model type 'gpt2'; using the generic family"]


def test_remote_code_is_refused_unless_asked(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "custom", "auto_map": {"AutoConfig": "code.Config"}})
    )
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        read_config(tmp_path)


def test_new_model_writes_a_complete_folder_whose_tokenizer_matches_its_json(tmp_path):
    out = new_model("qwen3", "tiny", tmp_path / "m", seed=1)
    loaded = load_model(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "Reverse the string: Ünïcode 12345 -> 54321"
    assert (
        loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    )
    assert loaded.tokenizer.decode(raw.encode(text).ids) == text
    assert loaded.model.config.vocab_size == len(loaded.tokenizer)
    assert loaded.model.generation_config.eos_token_id == [loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left


def test_new_model_is_deterministic_and_seeded(tmp_path):
    a = load_model(new_model("llama", "tiny", tmp_path / "a", seed=0)).model.state_dict()
    b = load_model(new_model("llama", "tiny", tmp_path / "b", seed=0)).model.state_dict()
    c = load_model(new_model("llama", "tiny", tmp_path / "c", seed=1)).model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_new_model_trains_the_tokenizer_on_a_corpus_too(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "zyzzyva quokka " * 5}) + "\n" for _ in range(50)))
    tokenizer = load_model(new_model("qwen2", "tiny", tmp_path / "m", corpus_files=[corpus])).tokenizer
    assert len(tokenizer.tokenize(" quokka")) == 1


def test_new_model_refuses_unknown_presets_and_existing_folders(tmp_path):
    with pytest.raises(ModelloopError, match="no preset 'huge'; presets: tiny, small, qwen2.5-0.5b"):
        new_model("qwen2", "huge", tmp_path / "m")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(ModelloopError, match="already exists"):
        new_model("qwen2", "tiny", tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


def test_new_model_command(tmp_path):
    result = CliRunner().invoke(build_cli(), ["new-model", "--family", "mistral", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "mistral tiny, 3.41 M parameters" in result.stdout
    unknown = CliRunner().invoke(build_cli(), ["new-model", "--family", "mistrall", "--out", str(tmp_path / "n")])
    assert unknown.exit_code == 2
    assert "Did you mean 'mistral'?" in unknown.output


def test_a_preset_with_the_released_vocabulary_size_builds(tmp_path):
    from modelloop import hookimpl
    from modelloop.plugins import PluginInfo, make_plugin_manager, set_plugin_manager
    from modelloop.registry import MODELS, get_registry

    qwen = get_registry(MODELS).get("qwen2")
    manager = make_plugin_manager()
    set_plugin_manager(manager)
    preset = {**qwen.presets["tiny"], "num_hidden_layers": 1, "vocab_size": 4096}

    class Family:
        @hookimpl
        def register_models(self, register):
            register(
                type(qwen)(
                    name="toy",
                    model_types=("toy",),
                    template="qwen2",
                    presets={"released": preset},
                    tokenizer=qwen.tokenizer,
                )
            )

    manager.add_plugin(Family(), PluginInfo("toy", "1.0", builtin=False))
    loaded = load_model(new_model("toy", "released", tmp_path / "m"))
    assert loaded.model.config.vocab_size == 4096 > len(loaded.tokenizer)


def test_a_mistyped_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelLoadError, match="runs/tiny-qwen: no such model folder"):
        load_model("runs/tiny-qwen")


def test_attention_auto_takes_the_fastest_kernel_installed_for_the_device(tiny_models, monkeypatch):
    from modelloop.models import loading
    from modelloop.models.loading import choose_attention, read_config, resolve_family

    text, vision = read_config(tiny_models("qwen2")), read_config(tiny_models("qwen2_vl"))
    family, vision_family = resolve_family("qwen2"), resolve_family("qwen2_vl")
    hopper = (9, 0)
    assert choose_attention("auto", text, family, gpu=None, packing=True) == "sdpa"  # a CPU
    if importlib.util.find_spec("flash_attn") is None:
        assert (
            choose_attention("auto", text, family, gpu=hopper, packing=True) == "flex_attention"
        )  # packed rows, no quadratic mask
        assert choose_attention("auto", text, family, gpu=hopper, packing=False) == "sdpa"
        assert (
            choose_attention("auto", vision, vision_family, gpu=hopper, packing=True) == "sdpa"
        )  # Qwen2-VL has no flex attention
        assert (
            choose_attention("auto", text, family, gpu=hopper, packing=True, half=False) == "sdpa"
        )  # fp32: no flex kernel compiled
    installed = {"flash_attn_interface", "flash_attn"}
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert choose_attention("auto", text, family, gpu=hopper, packing=True) == "flash_attention_3"
    assert choose_attention("auto", text, family, gpu=(8, 0), packing=False) == "flash_attention_2"


def test_attention_asked_for_is_checked_before_loading(tiny_models):
    from modelloop.models.loading import choose_attention, read_config, resolve_family

    text, vision = read_config(tiny_models("qwen2")), read_config(tiny_models("qwen2_vl"))
    with pytest.raises(ModelLoadError, match="flex_attention trains on CUDA GPUs only"):
        choose_attention("flex_attention", text, resolve_family("qwen2"), gpu=None, packing=True)
    with pytest.raises(ModelLoadError, match="qwen2_vl models do not support attn_impl flex_attention"):
        choose_attention("flex_attention", vision, resolve_family("qwen2_vl"), gpu=(9, 0), packing=True)
    with pytest.raises(ModelLoadError, match="flex_attention computes in bf16 or fp16, and this run computes in fp32"):
        choose_attention("flex_attention", text, resolve_family("qwen2"), gpu=(9, 0), packing=True, half=False)
    assert choose_attention("eager", text, resolve_family("qwen2"), gpu=None, packing=False) == "eager"


def test_a_cached_hub_id_loads_without_network_and_without_retries(tmp_path, tiny_models, subprocess_env):
    """With the hub out of reach and HF_HUB_OFFLINE not set, a hub id in the cache is read from
    there at once (the hub's client alone retries for about 25 s before it looks there)."""
    import subprocess
    import sys

    from modelloop.parallel.world import free_port

    repo = tmp_path / "hf" / "hub" / "models--acme--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_models("qwen2"), repo / "snapshots" / commit)
    data = tmp_path / "chats.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}) + "\n"
    )
    env = {key: value for key, value in subprocess_env.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    command = [sys.executable, "-m", "modelloop", "data", "check", str(data), "--model"]
    cached = subprocess.run([*command, "acme/tiny"], env=env, capture_output=True, text=True, timeout=120)
    assert cached.returncode == 0, cached.stderr
    assert "1 records" in cached.stdout or "1 record" in cached.stdout
    assert "Retry" not in cached.stderr
    missing = subprocess.run([*command, "acme/other"], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"Error: acme/other: the hub ({env['HF_ENDPOINT']}) cannot be reached and the model is not in the hub cache "
        f"({tmp_path / 'hf' / 'hub'}); set HF_ENDPOINT to a mirror that answers, set HF_HUB_CACHE to a cache that holds it "
        "(hf download acme/other where there is a network), or give a model folder instead of the id"
    )
