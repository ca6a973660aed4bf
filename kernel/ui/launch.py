"""Launching a stage from the UI: its form built from the stage's own config schema, the
checks a user would run first (the config, the data, the memory plan), and the run's
process, which can be stopped and stays resumable.

The form knows no field by hand: each comes from the config class's JSON schema (type,
default, choices, description), so a field a release adds appears by itself; the names
of registered plugins (tuners, samplers, strategies, rewards, ...) become choices. The
checks are the command line's own commands (``data check``, ``data preview``, ``plan``)
run as the user would run them, so the page says exactly what the terminal would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.artifacts import new_run_dir, run_id

#: The stages a form launches (and recipes), and the fields shown first (the rest under "more settings").
STAGES: dict[str, tuple[str, ...]] = {
    "sft": ("model", "data", "tuner", "lr", "max_steps", "epochs", "batch_size", "max_length", "eval_data"),
    "pt": ("model", "data", "tuner", "lr", "max_steps", "epochs", "batch_size", "max_length"),
    "rlhf": ("model", "method", "data", "rewards", "tuner", "lr", "max_steps", "batch_size", "beta"),
}

#: Fields the launcher sets itself.
OWN = ("output_dir", "resume")

#: Fields whose choices are the names a registry holds, and the choices it does not.
REGISTERED = {
    "tuner": ("TUNERS", ()),
    "sampler": ("SAMPLERS", ()),
    "strategy": ("PARALLEL_STRATEGIES", ("",)),  # none: chosen from the plan
    "rollout_engine": ("ENGINES", ("trl",)),  # TRL's own generate
}


#: A recipe's form: its file and ``--set`` overrides (the recipe holds the rest).
RECIPE = "recipe"
RECIPE_FIELDS = (
    {"name": "recipe", "kind": "text", "choices": [], "default": "", "required": True, "main": True,
     "help": "the recipe file (YAML): a base model and its stages"},
    {"name": "set", "kind": "list", "choices": [], "default": "", "required": False, "main": True,
     "help": "overrides, as --set takes them: sft.lr=1e-4, vars.NAME=VALUE"},
)  # fmt: skip


def config_class(stage: str) -> Any:
    from modelloop.config import RLHFConfig, TrainConfig

    return RLHFConfig if stage == "rlhf" else TrainConfig


def form_fields(stage: str) -> list[dict[str, Any]]:
    """The stage's config fields as form inputs, the first ones first."""
    from modelloop import registry

    if stage == RECIPE:
        return [dict(spec) for spec in RECIPE_FIELDS]
    schema = config_class(stage).model_json_schema()
    first = STAGES[stage]
    fields = []
    for name, spec in schema["properties"].items():
        if name in OWN:
            continue
        kind, choices = _kind(spec)
        if name in REGISTERED:
            kind_name, more = REGISTERED[name]
            kind, choices = "select", [*more, *registry.get_registry(getattr(registry, kind_name)).names()]
        fields.append(
            {
                "name": name,
                "kind": kind,
                "choices": choices,
                "default": _shown(spec.get("default"), kind),
                "required": name in schema.get("required", ()),
                "help": spec.get("description", ""),
                "main": name in first,
            }
        )
    return sorted(fields, key=lambda item: first.index(item["name"]) if item["main"] else len(first))


def _kind(spec: Mapping[str, Any]) -> tuple[str, list[str]]:
    """An input for a JSON-schema property: text, integer, number, checkbox, select (with its
    choices), list (comma-separated) or json."""
    options = [option for option in spec.get("anyOf", [spec]) if option.get("type") != "null"]
    option = options[0] if len(options) == 1 else {}
    if "enum" in option:
        return "select", [str(choice) for choice in option["enum"]]
    kind = option.get("type")
    if kind == "boolean":
        return "checkbox", []
    if kind in ("integer", "number"):
        return kind, []
    if kind == "array":
        return "list", []
    if kind == "object":
        return "json", []
    return "text", []


def _shown(default: Any, kind: str) -> Any:
    if default is None:
        return ""
    if kind == "list":
        return ", ".join(map(str, default))
    if kind == "json":
        return json.dumps(default) if default else ""
    return default


def read_form(stage: str, form: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The config the form says (fields left empty take their defaults), and what is wrong
    with it, by field ("" for the config as a whole): types, ranges, the data files and the
    model, before anything runs."""
    from pydantic import ValidationError

    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for spec in form_fields(stage):
        name, raw = spec["name"], form.get(spec["name"])
        if spec["kind"] == "checkbox":
            if raw is not None and bool(raw) != bool(spec["default"]):
                values[name] = bool(raw)
            continue
        if raw is None or str(raw).strip() == "":
            continue
        text = str(raw).strip()
        if text == str(spec["default"]):  # as the form showed it: the config's own default
            continue
        try:
            values[name] = _value(spec["kind"], text)
        except ValueError as error:
            errors[name] = str(error)
    if stage == RECIPE:
        problem = (
            _recipe_problem(values["recipe"], values.get("set", []))
            if "recipe" in values
            else "the recipe file is missing"
        )
        if problem and "recipe" not in errors:
            errors["recipe"] = problem
        return values, errors
    try:
        config_class(stage).model_validate(values)
    except ValidationError as invalid:
        for problem in invalid.errors():
            place = str(problem["loc"][0]) if problem["loc"] else ""
            errors.setdefault(place, problem["msg"].removeprefix("Value error, "))
    for file in [*values.get("data", []), *values.get("eval_data", [])]:
        path = Path(file.split("#", 1)[0])
        if "://" not in file and not path.is_file():  # a hub dataset (hf://...) is read as the run streams
            errors.setdefault("data" if file in values.get("data", []) else "eval_data", f"no such file: {path}")
    if "model" in values and "model" not in errors:
        problem = _model_problem(values["model"])
        if problem:
            errors["model"] = problem
    return values, errors


def _value(kind: str, text: str) -> Any:
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"not a whole number: {text!r}") from None
    if kind == "number":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"not a number: {text!r}") from None
    if kind == "list":
        return [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]
    if kind == "json":
        try:
            return json.loads(text)
        except ValueError as error:
            raise ValueError(f"not JSON: {error}") from None
    return text


def _model_problem(model: str) -> str | None:
    """Why ``model`` cannot be trained from, in a line (None if it can)."""
    from modelloop.errors import ModelloopError
    from modelloop.models.loading import read_config, resolve_model_source

    try:
        read_config(resolve_model_source(model, weights=False).base)
    except ModelloopError as error:
        return str(error)
    except OSError as error:
        return f"cannot read a model from {model}: {error}"
    return None


def _recipe_problem(path: str, assignments: list[str]) -> str | None:
    """Why the recipe at ``path`` cannot be read, in a line (its stages are checked by
    ``modelloop run --check``, which the check button runs)."""
    from modelloop.errors import ModelloopError
    from modelloop.recipes import load_recipe

    if not Path(path).is_file():
        return f"no such file: {path}"
    try:
        load_recipe(Path(path), assignments)
    except ModelloopError as error:
        return str(error)
    return None


def arguments(stage: str, values: Mapping[str, Any], config: Path) -> list[str]:
    """The command line that runs the form's values: a recipe with its overrides, or a
    stage on the config file written from them."""
    if stage == RECIPE:
        return ["run", values["recipe"], *[f"--set={item}" for item in values.get("set", [])]]
    return [stage, "--config", str(config)]


def checks(stage: str, values: Mapping[str, Any]) -> dict[str, str]:
    """What ``modelloop data check``, ``data preview`` and ``plan`` say about the config,
    run at once as the user would run them; for a recipe, ``modelloop run --check``."""
    if stage == RECIPE:
        return {"data_check": _modelloop([*arguments(stage, values, Path()), "--check"])}
    data = list(values.get("data", []))
    model = str(values["model"])
    max_length = str(values.get("max_length", config_class(stage).model_fields["max_length"].default))
    plan_flags = [
        f"--{name.replace('_', '-')}={values[name]}"
        for name in ("tuner", "max_length", "batch_size", "grad_accum", "nproc", "strategy", "dtype")
        if values.get(name) not in (None, "")
    ]
    commands = {
        "data_check": ["data", "check", *data, "--model", model, "--max-length", max_length],
        "preview": ["data", "preview", data[0].split("#", 1)[0], "--model", model, "-n", "2"],
        "plan": ["plan", "--model", model, *plan_flags],
    }
    with ThreadPoolExecutor(len(commands)) as pool:
        outputs = pool.map(_modelloop, commands.values())
        return dict(zip(commands, outputs))


def _modelloop(arguments: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "modelloop", *arguments], capture_output=True, text=True, timeout=600, check=False
    )
    return (done.stdout + done.stderr).strip()


@dataclass
class Launched:
    """A stage or recipe this UI started: its run folder, its process, its console output
    (kept beside the runs, in ``.ui/``: a recipe's folder must start empty)."""

    stage: str
    folder: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def id(self) -> str:
        return run_id(self.folder)

    @property
    def running(self) -> bool:
        return self.process.poll() is None


class Launcher:
    """The stages launched from this UI, by run id."""

    def __init__(self) -> None:
        self.launched: dict[str, Launched] = {}

    def launch(self, stage: str, values: Mapping[str, Any]) -> Launched:
        """Start ``modelloop STAGE`` on the form's config (or ``modelloop run RECIPE``) in a
        new run folder, its console output kept in ``.ui/RUN/console.log`` under the runs."""
        import yaml

        folder = new_run_dir(stage)
        config = _own_folder(folder) / "launch.yaml"
        config.write_text(yaml.safe_dump({**values, "output_dir": str(folder)}, sort_keys=False))
        extra = ["--output-dir", str(folder)] if stage == RECIPE else []
        return self._start(stage, folder, [*arguments(stage, values, config), *extra], mode="wb")

    def resume(self, stage: str, folder: Path) -> Launched:
        """Continue a stopped or failed run from its last checkpoint, as
        ``modelloop STAGE --resume FOLDER`` does, its output added to the same console log."""
        return self._start(stage, folder, [stage, "--resume", str(folder)], mode="ab")

    def _start(self, stage: str, folder: Path, argv: list[str], *, mode: str) -> Launched:
        log_path = _own_folder(folder) / "console.log"
        with log_path.open(mode) as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "modelloop", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a stop reaches its workers too
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        launched = Launched(stage, folder, process, log_path)
        self.launched[launched.id] = launched
        return launched

    def stop(self, run: str) -> bool:
        """Interrupt a run launched here as Ctrl-C would: it ends as a failed run that
        ``--resume`` continues from its last checkpoint. False if it is not running."""
        launched = self.launched.get(run)
        if launched is None or not launched.running:
            return False
        os.killpg(launched.process.pid, signal.SIGINT)
        return True

    def close(self) -> None:
        """Stop every run still going (the UI is shutting down) and wait for them."""
        for run, launched in self.launched.items():
            if self.stop(run):
                try:
                    launched.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(launched.process.pid, signal.SIGKILL)


def _own_folder(run: Path) -> Path:
    """Where the ui keeps a run's launch config and console log: ``<runs>/.ui/RUN``."""
    from modelloop.artifacts import runs_root

    own = runs_root() / ".ui" / run.name
    own.mkdir(parents=True, exist_ok=True)
    return own
