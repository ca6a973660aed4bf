"""What ``modelloop new-plugin KIND NAME`` writes: a complete third-party plugin package.

The package is one module plus a pyproject whose ``[project.entry-points.modelloop]``
points at it, a README, a test proving the entry point is wired (once the package is
installed, ``modelloop plugins --json`` lists it with its hook and what it registered),
and a test running the conformance kit on it (``modelloop.testing.conformance``). Each
KIND's example is working code against the current specs, which the kernel's own tests
check by loading every kind and running the kit on it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from modelloop.errors import ModelloopError
from modelloop.version import __version__


@dataclass(frozen=True)
class PluginKind:
    """One choice of ``new-plugin KIND``: the hook it implements and its example body."""

    hook: str
    #: the key under which ``modelloop plugins --json`` lists what it registered, if any.
    registers: str | None
    imports: str  # the standard library's and third parties' (isort's first sections)
    api: tuple[str, ...]  # the names it takes from modelloop.plugin (the plugin API) besides hookimpl
    body: str


KINDS: dict[str, PluginKind] = {
    "model": PluginKind(
        "register_models",
        "model",
        "",
        ("ModelFamily",),
        """
@hookimpl
def register_models(register):
    register(
        ModelFamily(
            name="$name",
            description="The $name model family.",
            model_types=("$name",),  # the config.model_type values this family claims
            template="chatml",
            lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        )
    )
""",
    ),
    "template": PluginKind(
        "register_templates",
        "template",
        "",
        ("ChatTemplate",),
        """
SOURCE = (
    "{% for message in messages %}<|{{ message.role }}|>\\n{{ message.content }}"
    "{% if message.tool_calls %}{{ message.tool_calls | tojson }}{% endif %}<|end|>\\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\\n{% endif %}"
)


@hookimpl
def register_templates(register):
    register(ChatTemplate(name="$name", description="The $name chat template.", source=SOURCE, end_of_turn=("<|end|>",)))
""",
    ),
    "dataset-format": PluginKind(
        "register_dataset_formats",
        "dataset format",
        "",
        ("DatasetFormat",),
        '''
def convert(record):
    """A question/answer record as a two-turn conversation."""
    if not str(record["answer"]).strip():
        raise ValueError("empty answer")
    return {
        "messages": [
            {"role": "user", "content": str(record["question"])},
            {"role": "assistant", "content": str(record["answer"])},
        ]
    }


@hookimpl
def register_dataset_formats(register):
    register(
        DatasetFormat(
            name="$name",
            description="Records with question and answer fields.",
            kind="conversation",
            columns=("question", "answer"),
            convert=convert,
        )
    )
''',
    ),
    "sampler": PluginKind(
        "register_samplers",
        "sampler",
        "",
        ("Sampler",),
        '''
def order(lengths, *, batch_size, seed):
    """Longest examples first, so an out-of-memory batch shows up at the first step."""
    return iter(sorted(range(len(lengths)), key=lambda index: -lengths[index]))


@hookimpl
def register_samplers(register):
    register(Sampler(name="$name", description="Longest examples first.", order=order))
''',
    ),
    "tuner": PluginKind(
        "register_tuners",
        "tuner",
        "",
        ("Tuner",),
        '''
def prepare(model, options, family):
    """BitFit: train only the bias terms."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.endswith(".bias")
    return model


@hookimpl
def register_tuners(register):
    register(Tuner(name="$name", description="Train only bias terms (BitFit).", prepare=prepare))
''',
    ),
    "parallel-strategy": PluginKind(
        "register_parallel_strategies",
        "parallel strategy",
        "",
        ("ParallelPlan", "ParallelStrategy"),
        '''
def plan(request):
    """Data parallel with gradients reduced in 100 MB buckets: a replica on every rank."""
    world = request.world
    return ParallelPlan(
        strategy="$name",
        world=world,
        mesh={"dp": world.size},
        backend=request.backend,
        trainer_arguments={"ddp_backend": request.backend, "ddp_bucket_cap_mb": 100},
    )


@hookimpl
def register_parallel_strategies(register):
    register(ParallelStrategy(name="$name", description="Data parallel with large gradient buckets.", plan=plan))
''',
    ),
    "reward": PluginKind(
        "register_rewards",
        "reward",
        "",
        ("Reward",),
        '''
def score(prompts, completions, **columns):
    """Prefer short answers: 1.0 for an empty completion, towards 0 as it grows.

    A completion is a string, or for chat data a list of messages (the answer is last).
    """
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 / (1.0 + len(text.split())) for text in texts]


@hookimpl
def register_rewards(register):
    register(Reward(name="$name", description="Prefers short completions.", score=score))
''',
    ),
    "environment": PluginKind(
        "register_environments",
        "environment",
        "",
        ("Environment", "Step"),
        '''
class Countdown:
    """An episode: the model counts down from the record's number, one number a turn."""

    def __init__(self, start):
        self.expected = start

    def step(self, turn):
        right = turn.text.strip() == str(self.expected)
        self.expected -= 1
        if not right or self.expected < 0:
            return Step(reward=float(right), done=True)
        return Step(observation=({"role": "user", "content": "Next."},), reward=1.0)


def start(record, *, start_from=3):
    """A countdown from the record's ``start`` column, or ``start_from`` (an option)."""
    return Countdown(int(record.get("start") or start_from))


@hookimpl
def register_environments(register):
    register(Environment(name="$name", description="Count down, one number a turn.", start=start, max_turns=10))
''',
    ),
    "exporter": PluginKind(
        "register_exporters",
        "exporter",
        "",
        ("Exporter",),
        '''
def export(source_dir, out_dir, **options):
    """Copy the run's weights and tokenizer as they are."""
    import shutil

    shutil.copytree(source_dir, out_dir, dirs_exist_ok=True)
    return out_dir


@hookimpl
def register_exporters(register):
    register(Exporter(name="$name", description="Copies the weights unchanged.", export=export, engines=("hf",)))
''',
    ),
    "engine": PluginKind(
        "register_engines",
        "engine",
        "",
        ("Completion", "Delta", "Engine", "EngineError", "Generation"),
        '''
class EchoSession:
    """An engine that answers every request with its last message: replace with a real one."""

    models = ["echo"]
    context_length = 4096

    def check(self, request):
        """The prompt's length in tokens; EngineError for a request this engine cannot serve."""
        if request.model not in (None, *self.models):
            raise EngineError(f"unknown model {request.model!r}; served: {', '.join(self.models)}")
        if request.params.max_tokens > self.context_length:
            raise EngineError(f"max_tokens {request.params.max_tokens} exceeds the context of {self.context_length}")
        return 0

    def generate(self, requests):
        return [Generation(choices=(self._answer(request),), prompt_tokens=self.check(request)) for request in requests]

    def stream(self, request):
        answer = self._answer(request)
        self.check(request)
        yield Delta(index=0, text=answer.text)
        yield Delta(index=0, finish_reason="stop")

    def load_adapter(self, name, path):
        raise ValueError("this engine serves no adapters")

    def unload_adapter(self, name):
        raise ValueError("this engine serves no adapters")

    def close(self):
        pass

    def _answer(self, request):
        text = request.messages[-1]["content"] if request.messages else request.prompt
        return Completion(text=text, token_ids=(), finish_reason="stop")


def start(model_path, *, adapters=None, options=None):
    return EchoSession()


@hookimpl
def register_engines(register):
    register(Engine(name="$name", description="Echoes the last message.", start=start))
''',
    ),
    "command": PluginKind(
        "register_commands",
        "command",
        "import click",
        (),
        '''
@hookimpl
def register_commands(cli):
    @cli.command(name="$name")
    def command():
        """Say hello from $dist."""
        click.echo("hello from $dist")
''',
    ),
    "tracker": PluginKind(
        "on_log",
        None,
        "import json\nfrom pathlib import Path",
        (),
        '''
@hookimpl
def on_log(stage, step, metrics, run_dir):
    """Append every logged metric to $name.jsonl in the run folder."""
    with open(Path(run_dir) / "$name.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps({"stage": stage, "step": step, **metrics}) + "\\n")
''',
    ),
}

MODULE = '''"""$dist: a modelloop $kind plugin."""

${imports}from modelloop.plugin import $api

PLUGIN_API = "$plugin_api"  # the versions of modelloop.plugin this plugin is written against

$body'''

PYPROJECT = """[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A modelloop $kind plugin."
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["$kernel_requirement"]

[project.optional-dependencies]
test = ["pytest"]

[project.entry-points.modelloop]
$entry_name = "$module"

[tool.setuptools]
py-modules = ["$module"]
"""

README = """# $dist

A [modelloop](https://pypi.org/project/modelloop/) $kind plugin: `$module.py` implements `$hook`.

    pip install -e '.[test]'
    modelloop plugins                  # lists $dist
    modelloop plugins check $dist      # checks it keeps the contract, on tiny models
    pytest                             # both of those, as your CI runs them

Keep heavy imports (torch, transformers, ...) inside the functions that use them, so
that `modelloop --help` and `modelloop plugins` stay fast.
"""

CONFORMANCE_TEST = '''"""modelloop's conformance kit on this plugin: the checks `modelloop plugins check $dist` runs."""

from modelloop.testing import conformance

test_conformance = conformance("$dist")
'''

TEST = '''"""Proves the entry point is wired: once installed, modelloop lists this plugin."""

import json
import os
import subprocess
import sys


def test_modelloop_lists_the_plugin():
    listed = subprocess.run(
        [sys.executable, "-m", "modelloop", "plugins", "--json"],
        env={**os.environ, "MODELLOOP_LOAD_PLUGINS": "$dist"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stderr == ""
    (plugin,) = json.loads(listed.stdout)
    assert plugin["name"] == "$dist"
    assert "$hook" in plugin["hooks"]
    $registered_assertion
'''


def plugin_api_range() -> str:
    """The plugin API versions a new plugin is written against: this one's series."""
    from modelloop.plugin import API_VERSION

    return f">={API_VERSION},<{int(API_VERSION.split('.')[0]) + 1}"


def kernel_requirement(version: str = __version__) -> str:
    """The kernel range a new plugin declares: this minor series in 0.x, this major after."""
    major, minor = (int(part) for part in version.split(".")[:2])
    upper = f"{major}.{minor + 1}" if major == 0 else f"{major + 1}"
    return f"modelloop>={major}.{minor},<{upper}"


def scaffold_plugin(kind: str, name: str, directory: Path) -> Path:
    """Write the package ``modelloop-plugin-NAME`` under ``directory``; returns its folder."""
    if kind not in KINDS:
        raise ModelloopError(f"Unknown plugin kind {kind!r}. Choose one of: {', '.join(KINDS)}.")
    if not re.fullmatch(r"[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*", name):
        raise ModelloopError(
            f"Plugin name {name!r} must start with a lowercase letter and use only a-z, 0-9 and single '-' or '_' between them."
        )
    plugin_kind = KINDS[kind]
    dist = f"modelloop-plugin-{name.replace('_', '-')}"
    module = f"modelloop_{name.replace('-', '_')}"
    target = directory / dist
    if target.exists():
        raise ModelloopError(f"{target} already exists; choose another --dir or name.")
    registered_assertion = (
        f'assert plugin["registered"] == {{"{plugin_kind.registers}": ["{name}"]}}'
        if plugin_kind.registers
        else 'assert plugin["registered"] == {}'
    )
    values = {
        "name": name,
        "dist": dist,
        "module": module,
        "entry_name": name.replace("-", "_"),
        "kind": kind,
        "hook": plugin_kind.hook,
        "kernel_requirement": kernel_requirement(),
        "plugin_api": plugin_api_range(),
        "registered_assertion": registered_assertion,
    }
    body = string.Template(plugin_kind.body).substitute(values)
    files = {
        "pyproject.toml": string.Template(PYPROJECT).substitute(values),
        "README.md": string.Template(README).substitute(values),
        f"{module}.py": string.Template(MODULE).substitute(
            values,
            imports=f"{plugin_kind.imports}\n\n" if plugin_kind.imports else "",
            api=", ".join((*plugin_kind.api, "hookimpl")),
            body=body,
        ),
        f"tests/test_{module}.py": string.Template(TEST).substitute(values),
        "tests/test_conformance.py": string.Template(CONFORMANCE_TEST).substitute(values),
    }
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target
