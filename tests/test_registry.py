"""Registries: every provider hook fills its registry; names, clashes and mistakes are reported."""

from __future__ import annotations

import dataclasses

import pytest

from modelloop import hookimpl
from modelloop.errors import EngineError, PluginError, UnknownNameError
from modelloop.plugins import PluginInfo, make_plugin_manager, set_plugin_manager
from modelloop.registry import (
    ACCELERATORS,
    DATASET_FORMATS,
    ENGINES,
    EXPORTERS,
    MODELS,
    PARALLEL_STRATEGIES,
    REWARDS,
    SAMPLERS,
    TEMPLATES,
    TUNERS,
    get_registry,
)
from modelloop.specs import (
    Accelerator,
    ChatTemplate,
    DatasetFormat,
    Engine,
    Exporter,
    ModelFamily,
    ParallelStrategy,
    Reward,
    Sampler,
    Tuner,
)


def constant_score(prompts, completions, **columns):
    return [0.5] * len(completions)


@pytest.fixture
def manager():
    """A process-wide manager with the built-ins and nothing installed."""
    manager = make_plugin_manager({"MODELLOOP_LOAD_PLUGINS": ""})
    set_plugin_manager(manager)
    return manager


def add(manager, name, plugin, version="1.0"):
    assert manager.add_plugin(plugin, PluginInfo(name, version, builtin=False))
    return plugin


def registering(hook_name, *specs):
    """A plugin object whose ``hook_name`` registers ``specs``."""

    def implementation(register):
        for spec in specs:
            register(spec)

    implementation.__name__ = hook_name
    return type("Plugin", (), {hook_name: staticmethod(hookimpl(implementation))})()


def test_hook_register_models(manager):
    family = ModelFamily(name="toy", model_types=("toy", "toy_moe"), template="chatml", aliases=("toy-family",))
    add(manager, "p", registering("register_models", family))
    models = get_registry(MODELS)
    assert models.get("toy_moe") is family
    assert models.get("toy-family") is family
    assert models.registered_by("p") == ["toy"]


def test_hook_register_templates(manager):
    template = ChatTemplate(name="plain", source="{{ messages }}", end_of_turn=("</s>",))
    add(manager, "p", registering("register_templates", template))
    assert get_registry(TEMPLATES).get("plain").end_of_turn == ("</s>",)


def test_hook_register_dataset_formats(manager):
    qa = DatasetFormat(name="qa", kind="conversation", columns=("q", "a"), convert=dict)
    add(manager, "p", registering("register_dataset_formats", qa))
    found = get_registry(DATASET_FORMATS).get("qa")
    assert found.matches({"q": 1, "a": 2}) and not found.matches({"q": 1})


def test_hook_register_samplers(manager):
    sampler = Sampler(name="reverse", order=lambda lengths, **_: iter(reversed(range(len(lengths)))))
    add(manager, "p", registering("register_samplers", sampler))
    assert list(get_registry(SAMPLERS).get("reverse").order([3, 1, 2], batch_size=1, seed=0)) == [2, 1, 0]


def test_hook_register_tuners(manager):
    tuner = Tuner(name="bitfit", prepare=lambda model, options, family: model, requires=("torch",))
    add(manager, "tuners", registering("register_tuners", tuner))
    tuners = get_registry(TUNERS)
    assert tuners.get("bitfit").requires == ("torch",)
    assert tuners.provider("bitfit") == "tuners"
    assert tuners.registered_by("tuners") == ["bitfit"]


def test_hook_register_accelerators(manager):
    accelerator = Accelerator(name="fused", apply=lambda model, family: model, model_types=("llama",), needs_cuda=True)
    add(manager, "p", registering("register_accelerators", accelerator))
    assert get_registry(ACCELERATORS).get("fused").needs_cuda


def test_hook_register_parallel_strategies(manager):
    strategy = ParallelStrategy(name="replicate", plan=lambda *a: {}, apply=lambda model, plan: model, min_world_size=2)
    add(manager, "p", registering("register_parallel_strategies", strategy))
    assert get_registry(PARALLEL_STRATEGIES).get("replicate").min_world_size == 2


def test_hook_register_rewards(manager):
    add(manager, "p", registering("register_rewards", Reward(name="half", score=constant_score)))
    assert get_registry(REWARDS).get("half").score(["p"], ["c1"], solution=["x"]) == [0.5]


def test_hook_register_exporters(manager):
    exporter = Exporter(name="copy", export=lambda source, out, **options: out, engines=("hf",))
    add(manager, "p", registering("register_exporters", exporter))
    assert get_registry(EXPORTERS).get("copy").engines == ("hf",)


def test_hook_register_engines(manager):
    engine = Engine(name="echo", start=lambda model_path, **options: None)
    add(manager, "p", registering("register_engines", engine))
    assert get_registry(ENGINES).get("echo") is engine


def test_engine_auto_takes_the_engine_that_ranks_highest_here(manager):
    from modelloop.inference.choice import find_engine

    never = Engine(name="gpu-only", start=lambda model_path, **options: None, preference=lambda: None)
    unranked = Engine(name="server", start=lambda model_path, **options: None)
    faster = Engine(name="fast", start=lambda model_path, **options: None, preference=lambda: 1)
    add(manager, "p", registering("register_engines", never, unranked, faster))
    assert find_engine("auto") is faster and find_engine("server") is unranked
    set_plugin_manager(make_plugin_manager({"MODELLOOP_LOAD_PLUGINS": ""}))
    assert find_engine("auto").name == "hf"  # nothing installed: the built-in, which runs anywhere
    set_plugin_manager(make_plugin_manager({"MODELLOOP_LOAD_PLUGINS": "", "MODELLOOP_BLOCK_PLUGINS": "hf_engine"}))
    with pytest.raises(EngineError, match="name one with --engine"):
        find_engine("auto")


def test_a_deprecated_spec_field_is_accepted_with_a_warning_for_one_more_api_version():
    with pytest.warns(DeprecationWarning, match="runtime_lora is deprecated"):
        engine = Engine(name="old", start=lambda model_path, **options: None, runtime_lora=True)
    assert "runtime_lora" not in {spec_field.name for spec_field in dataclasses.fields(engine)}


def test_unknown_name_lists_installed_and_closest(manager):
    add(manager, "p", registering("register_rewards", Reward(name="similarity", score=constant_score)))
    with pytest.raises(UnknownNameError) as raised:
        get_registry(REWARDS).get("similarty")
    assert (
        str(raised.value)
        == "Unknown reward 'similarty'. Did you mean 'similarity'? Installed: exact, accuracy, format, length, repetition, reward-model, similarity."
    )


def test_unknown_first_party_name_says_what_to_install(manager):
    with pytest.raises(UnknownNameError, match="pip install modelloop-plugin-tuner-lora"):
        get_registry(TUNERS).get("lora")


def test_a_third_party_clash_gives_the_name_to_neither_and_keeps_their_other_names(manager, capsys):
    add(manager, "first-plugin", registering("register_rewards", Reward(name="similarity", score=constant_score)))
    add(
        manager,
        "second-plugin",
        registering(
            "register_rewards",
            Reward(name="brevity", score=constant_score),
            Reward(name="similarity", score=constant_score),
        ),
        version="0.2",
    )
    rewards = get_registry(REWARDS)
    assert rewards.registered_by("second-plugin") == ["brevity"]
    assert "similarity" not in rewards.names()
    with pytest.raises(PluginError) as raised:
        rewards.get("similarity")
    assert str(raised.value) == (
        "reward 'similarity' is registered by both first-plugin and second-plugin, so neither is used; "
        "uninstall one or set MODELLOOP_BLOCK_PLUGINS=first-plugin or MODELLOOP_BLOCK_PLUGINS=second-plugin"
    )
    assert capsys.readouterr().err == ""  # nothing to say until the name is needed


def first_party(manager, name, plugin):
    """Add ``plugin`` as the first-party distribution ``name`` (which must be one)."""
    assert PluginInfo(name, "1.0", builtin=False).origin == "first-party"
    return add(manager, name, plugin)


@pytest.mark.parametrize("hijacker_loads_first", [True, False])
def test_a_first_party_name_cannot_be_taken_over_whatever_the_load_order(manager, capsys, hijacker_loads_first):
    lora = Tuner(name="lora", prepare=lambda *a: None, aliases=("low-rank",))
    dora = Tuner(name="dora", prepare=lambda *a: None)
    evil = Tuner(name="lora", prepare=lambda *a: None)
    other = Tuner(name="bitfit", prepare=lambda *a: None)
    hijacker = registering("register_tuners", evil, other)
    if hijacker_loads_first:
        add(manager, "aaa-hijack", hijacker)
    first_party(manager, "modelloop-plugin-tuner-lora", registering("register_tuners", lora, dora))
    if not hijacker_loads_first:
        add(manager, "aaa-hijack", hijacker)
    tuners = get_registry(TUNERS)
    assert tuners.get("lora") is lora and tuners.get("low-rank") is lora and tuners.get("dora") is dora
    assert tuners.provider("lora") == "modelloop-plugin-tuner-lora"
    assert tuners.registered_by("aaa-hijack") == ["bitfit"]  # its other names stay
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        "plugin aaa-hijack 1.0: its tuner 'lora' is ignored: the name belongs to modelloop-plugin-tuner-lora (first-party)"
        in line
    )
    (clash,) = tuners.clashes()
    assert clash.kept == "modelloop-plugin-tuner-lora"


def test_a_builtin_name_cannot_be_taken_over(manager, capsys):
    add(manager, "aaa", registering("register_rewards", Reward(name="exact", score=constant_score, description="mine")))
    assert get_registry(REWARDS).get("exact").description != "mine"
    assert "the name belongs to modelloop.builtin.rewards (built-in)" in capsys.readouterr().err


def test_a_family_claiming_a_first_party_model_type_keeps_its_own_name(manager):
    mine = ModelFamily(name="myqwen", model_types=("myqwen", "qwen2"), template="chatml")
    qwen = ModelFamily(name="qwen2", model_types=("qwen2",), template="chatml")
    add(manager, "aaa", registering("register_models", mine))
    first_party(manager, "modelloop-plugin-model-qwen", registering("register_models", qwen))
    models = get_registry(MODELS)
    assert models.get("qwen2") is qwen and models.get("myqwen") is mine


def test_every_shipped_plugin_is_first_party():
    import tomllib
    from pathlib import Path

    from modelloop.plugins import FIRST_PARTY_PLUGINS

    shipped = {tomllib.loads(path.read_text())["project"]["name"] for path in Path("plugins").glob("*/pyproject.toml")}
    assert shipped == FIRST_PARTY_PLUGINS


def test_registering_the_wrong_type_is_reported(manager, capsys):
    add(manager, "confused", registering("register_rewards", Tuner(name="x", prepare=lambda *a: None)))
    add(manager, "fine", registering("register_rewards", Reward(name="ok", score=constant_score)))
    assert get_registry(REWARDS).registered_by("fine") == ["ok"] and "x" not in get_registry(REWARDS)
    assert "expected a Reward" in capsys.readouterr().err


def test_hook_that_raises_is_reported_and_others_kept(manager, capsys):
    class Raising:
        @hookimpl
        def register_rewards(self, register):
            raise KeyError("boom")

    add(manager, "raising", Raising())
    add(manager, "fine", registering("register_rewards", Reward(name="ok", score=constant_score)))
    assert get_registry(REWARDS).registered_by("fine") == ["ok"]
    assert "raising 1.0: register_rewards ignored: it raised KeyError: 'boom'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "score, reason",
    [
        (lambda completions: [], "must accept \\(prompts, completions"),
        (lambda prompts, completions: [], "must accept \\*\\*columns"),
        ("not callable", "score must be callable"),
    ],
)
def test_reward_signature_is_checked_when_registered(score, reason):
    with pytest.raises(PluginError, match=reason):
        Reward(name="bad", score=score)


def test_specs_reject_empty_names_and_string_tuples():
    with pytest.raises(PluginError, match="non-empty name"):
        Reward(name=" ", score=constant_score)
    with pytest.raises(PluginError, match="model_types must be a tuple, not a string"):
        ModelFamily(name="toy", model_types=("toy"), template="chatml")
    with pytest.raises(PluginError, match="columns must be a tuple, not a string .*trailing comma"):
        DatasetFormat(name="body", kind="text", columns=("body"), convert=dict)
    with pytest.raises(PluginError, match="model_types must be a non-empty tuple"):
        ModelFamily(name="toy", model_types=(), template="chatml")


def test_neither_load_order_nor_hook_order_settles_a_third_party_clash(manager):
    class Late:
        @hookimpl(trylast=True)
        def register_rewards(self, register):
            register(Reward(name="similarity", score=constant_score, description="late"))

    add(
        manager,
        "first",
        registering("register_rewards", Reward(name="similarity", score=constant_score, description="first")),
    )
    add(manager, "late", Late())
    with pytest.raises(PluginError, match="registered by both first and late"):
        get_registry(REWARDS).get("similarity")


def test_a_wrapper_cannot_provide(manager, capsys):
    class Wrapper:
        @hookimpl(wrapper=True)
        def register_rewards(self, register):
            register(Reward(name="wrapped", score=constant_score))
            return (yield)

    add(manager, "wrapper", Wrapper())
    assert "wrapped" not in get_registry(REWARDS)
    assert "a provider hook cannot be a wrapper" in capsys.readouterr().err


def test_registering_a_name_twice_in_one_plugin(manager, capsys):
    twice = Reward(name="same", score=constant_score)
    add(manager, "twice", registering("register_rewards", twice, twice))
    assert "same" not in get_registry(REWARDS)
    assert "registers reward 'same' twice" in capsys.readouterr().err


def test_offering_one_module_twice_keeps_the_first(manager, capsys):
    plugin = registering("register_rewards", Reward(name="kept", score=constant_score))
    add(manager, "original", plugin)
    assert not manager.add_plugin(plugin, PluginInfo("copy", "1.0", builtin=False))
    assert get_registry(REWARDS).provider("kept") == "original"
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("modelloop: plugin copy 1.0: not loaded:")
