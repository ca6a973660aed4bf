"""The conformance kit (`modelloop plugins check`): every shipped plugin passes it, and a
deliberately broken plugin of each kind fails it with one line naming the broken contract.

The slow check (a training step on two processes) runs once, for ``ddp``; the rest of
every distribution's checks run here, on the session's tiny models."""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner

from conftest import repo_plugin_distributions
from modelloop.cli import build_cli
from modelloop.plugin import (
    TINY,
    Accelerator,
    ChatTemplate,
    Completion,
    DatasetFormat,
    Delta,
    Engine,
    Exporter,
    Generation,
    ModelFamily,
    ParallelStrategy,
    Reward,
    Sampler,
    Tuner,
    chatml_source,
    hookimpl,
)
from modelloop.plugins import PluginInfo, make_plugin_manager, set_plugin_manager
from modelloop.testing import UnknownDistributionError, Workspace, checks_for, run_check

SHIPPED = ["modelloop", *repo_plugin_distributions()]
BROKEN = "modelloop-plugin-broken"


@pytest.fixture(scope="module")
def workspace(tiny_models, tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("conformance"), tiny_models)


def failures(distribution: str, workspace: Workspace, *, slow: bool = False) -> list[str]:
    outcomes = [run_check(check, workspace) for check in checks_for(distribution) if slow or not check.slow]
    return [outcome.line() for outcome in outcomes if outcome.status == "failed"]


@pytest.mark.parametrize("distribution", SHIPPED)
def test_every_shipped_plugin_passes_the_kit(distribution, workspace):
    assert failures(distribution, workspace) == []


def test_a_strategy_takes_a_training_step_on_two_processes(workspace):
    (step,) = [check for check in checks_for("modelloop") if check.slow and check.spec.name == "ddp"]
    outcome = run_check(step, workspace)
    assert outcome.status == "passed", outcome.line()


# --------------------------------------------------------------------------- broken plugins


def registering(hook_name, *specs):
    """A plugin object whose ``hook_name`` registers ``specs``."""

    def implementation(register):
        for spec in specs:
            register(spec)

    implementation.__name__ = hook_name
    return type("Plugin", (), {hook_name: staticmethod(hookimpl(implementation))})()


def install_broken(plugin, environ=None):
    """``plugin`` loaded as the distribution BROKEN, beside the repository's plugins
    (or what ``environ`` loads)."""
    manager = make_plugin_manager(environ)
    assert manager.add_plugin(plugin, PluginInfo(BROKEN, "1.0", builtin=False))
    set_plugin_manager(manager)


def full_prepare(model, options, family):
    return model.requires_grad_(True)


def save_another_model(model, directory):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(model.config).save_pretrained(directory)


def mean_cross_entropy(hidden, weight, bias, labels):
    import torch

    return torch.nn.functional.cross_entropy(hidden @ weight.T, labels)


def one_score_short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def config_only(source, out, **options):
    out.mkdir(parents=True)
    (out / "config.json").write_text((source / "config.json").read_text())
    return out


class StreamsOtherText:
    """A session whose stream disagrees with its generate."""

    models = ["echo"]
    context_length = 64

    def check(self, request):
        from modelloop.plugin import EngineError

        if request.model not in (None, "echo") or request.params.max_tokens > self.context_length:
            raise EngineError("cannot serve that")
        return 3

    def generate(self, requests):
        return [
            Generation(choices=(Completion(text="yes", token_ids=(1,), finish_reason="stop"),), prompt_tokens=3)
            for _ in requests
        ]

    def stream(self, request):
        yield Delta(index=0, text="no")
        yield Delta(index=0, finish_reason="stop")

    def load_adapter(self, name, path):
        raise ValueError("no adapters")

    def unload_adapter(self, name):
        raise ValueError("no adapters")

    def close(self):
        pass


BROKEN_PLUGINS = {
    "template": (
        "register_templates",
        [ChatTemplate(name="broken", source=chatml_source(), end_of_turn=("<|end|>",))],
        [
            "template 'broken': assistant turn 1 is trained up to '5<|im_end|>\\n', "
            "not through its end of turn '<|end|>'"
        ],
    ),
    "dataset format": (
        "register_dataset_formats",
        [
            DatasetFormat(
                name="broken",
                kind="conversation",
                columns=("question", "answer"),
                convert=lambda record: {"messages": [{"role": "user", "content": record["question"]}]},
            )
        ],
        [
            "dataset format 'broken': convert returned no canonical conversation record: "
            "messages must end with an assistant turn (it ends with a user turn)"
        ],
    ),
    "sampler": (
        "register_samplers",
        [
            Sampler(
                name="broken",
                order=lambda lengths, *, batch_size, seed: iter(random.sample(range(len(lengths)), len(lengths))),
            )
        ],
        ["sampler 'broken': the same seed gave another order: a resumed run would see other examples"],
    ),
    "tuner": (
        "register_tuners",
        [
            Tuner(name="broken", prepare=full_prepare, save=save_another_model),
            Tuner(name="adapter-only", prepare=full_prepare, adapter=True),
        ],
        [
            "tuner 'broken': save/reload changed the outputs",
            "tuner 'adapter-only': its adapters cannot be loaded: it saves adapters (adapter=True) "
            "and gives no adapters=AdapterFormat(...) to attach them",
        ],
    ),
    "accelerator": (
        "register_accelerators",
        [
            Accelerator(
                name="broken",
                apply=lambda model, family: model,
                model_types=("qwen2",),
                linear_cross_entropy=mean_cross_entropy,
            )
        ],
        ["accelerator 'broken': linear_cross_entropy gives"],
    ),
    "parallel strategy": (
        "register_parallel_strategies",
        [ParallelStrategy(name="broken", plan=lambda request: {"dp": request.world.size})],
        ["parallel strategy 'broken': the broken strategy returned dict, not a ParallelPlan"],
    ),
    "reward": (
        "register_rewards",
        [Reward(name="broken", score=one_score_short)],
        ["reward 'broken': returned 3 scores for 4 completions; it must return one per completion"],
    ),
    "exporter": (
        "register_exporters",
        [Exporter(name="broken", export=config_only)],
        ["exporter 'broken': its output does not load in transformers"],
    ),
    "engine": (
        "register_engines",
        [Engine(name="broken", start=lambda model_path, *, adapters=None, options=None: StreamsOtherText())],
        ["engine 'broken': stream yielded 'no', and generate answered 'yes'"],
    ),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_PLUGINS))
def test_a_broken_plugin_fails_with_one_line_naming_the_broken_contract(kind, workspace):
    hook, specs, expected = BROKEN_PLUGINS[kind]
    install_broken(registering(hook, *specs))
    failed = failures(BROKEN, workspace, slow=True)
    assert len(failed) == len(expected), failed
    for line, start in zip(failed, expected):
        assert line.startswith(start) and "\n" not in line, line


def test_a_broken_model_family_fails_with_one_line_naming_the_broken_contract(tmp_path):
    """Its tiny model is built by the kit itself: the session's builder sees only the
    repository's plugins."""
    from modelloop_model_qwen import QWEN_TOKENIZER

    family = ModelFamily(
        name="broken",
        model_types=("qwen2",),
        template="chatml",
        lora_targets=("qkv_proj",),
        presets={"tiny": {"model_type": "qwen2", **TINY}},
        tokenizer=QWEN_TOKENIZER,
    )
    install_broken(
        registering("register_models", family), {"MODELLOOP_LOAD_PLUGINS": ""}
    )  # no qwen2 family to claim the model type
    assert failures(BROKEN, Workspace(tmp_path)) == [
        "model 'broken': none of its LoRA targets (qkv_proj) names a module of its tiny model"
    ]


def test_a_plugin_whose_hook_raises_fails_the_registration_check(workspace):
    class Plugin:
        @staticmethod
        @hookimpl
        def register_rewards(register):
            raise RuntimeError("no rewards today")

    install_broken(Plugin())
    (line,) = failures(BROKEN, workspace)
    assert line.startswith(f"plugin '{BROKEN}': plugin {BROKEN} 1.0: register_rewards") and "no rewards today" in line


# --------------------------------------------------------------------------- the command


def test_the_command_prints_a_line_per_check_and_a_summary():
    result = CliRunner().invoke(build_cli(), ["plugins", "check", "modelloop-plugin-reward-safety"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "passed   reward 'safety': scores a sample batch: one finite number per completion",
        "passed   plugin 'modelloop-plugin-reward-safety': registers without problems",
        "modelloop-plugin-reward-safety: 2 passed, 0 failed, 0 skipped",
    ]


def test_the_command_exits_1_on_a_failure():
    install_broken(registering("register_rewards", Reward(name="broken", score=one_score_short)))
    result = CliRunner().invoke(build_cli(), ["plugins", "check", BROKEN])
    assert result.exit_code == 1
    assert "failed   reward 'broken': returned 3 scores for 4 completions" in result.output
    assert result.output.splitlines()[-1] == f"{BROKEN}: 1 passed, 1 failed, 0 skipped"


def test_an_unknown_distribution_exits_2_listing_the_loaded_ones():
    result = CliRunner().invoke(build_cli(), ["plugins", "check", "modelloop-plugin-nope"])
    assert result.exit_code == 2
    assert "no loaded modelloop plugin comes from a distribution named 'modelloop-plugin-nope'" in result.output
    assert "Loaded: modelloop, modelloop-plugin-accel-liger," in result.output
    with pytest.raises(UnknownDistributionError):
        checks_for("modelloop-plugin-nope")
