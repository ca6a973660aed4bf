"""Recipes: a base model and a list of stages, checked as a whole, then run in order.

.. code-block:: yaml

    name: demo
    vars: {steps: 200}
    model: Qwen/Qwen2.5-0.5B            # the base (or build one with a new-model stage)
    stages:
      - {stage: eval, name: eval-base, data: "${here}/held_out.jsonl"}
      - {stage: sft, data: ["${here}/train.jsonl"], max_steps: "${steps}"}
      - {stage: rlhf, method: grpo, data: ["${here}/prompts.jsonl"], rewards: [accuracy]}
      - {stage: export, quant: merged}
      - {stage: serve-check}
      - {stage: eval, from: rlhf, data: "${here}/held_out.jsonl", gates: ["accuracy >= eval-base"]}
      - {stage: promote, from: export}

A stage starts from the model of the stage before it that made one (new-model, pt, sft,
rlhf, export), or of the stage named by ``from:``. ``${name}`` takes a value from
``vars`` (``${here}`` is the recipe's folder); a value that is only ``${name}`` keeps the
variable's type. ``modelloop run recipe.yaml --set sft.lr=1e-4`` overrides a stage's key
(``--set vars.steps=50`` a variable).

Everything is checked before anything runs, the fast checks of every stage first (config
fields, plugin names, rewards found, ``from:`` references), then data files and a sample
call of every reward; a mistake in the last stage is reported in the first second and
writes nothing. Each stage runs in its own run folder inside the recipe's run
(``runs/<time>-recipe-<name>/03-sft``); ``modelloop run --resume`` continues after the
last finished stage, and inside a training stage from its last checkpoint.

A stage may carry ``gates`` on its metrics (``modelloop.gates``): one that fails stops the
recipe and holds the judged model back. ``promote`` points the alias ``current:NAME`` (the
recipe's name unless ``alias:`` says otherwise) at the model of the stage before it, which
``modelloop serve current:NAME`` serves (``modelloop.aliases``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelloop.config import (
    ConfigError,
    RLHFConfig,
    TrainConfig,
    build_config,
    check_tuner,
    parse_assignments,
    read_yaml,
)
from modelloop.errors import ModelloopError
from modelloop.gates import Gate, Verdict

STAGE_KINDS = ("new-model", "pt", "sft", "rlhf", "export", "serve-check", "eval", "feedback", "promote")
#: The stages whose result is a model the next stage starts from.
MODEL_STAGES = ("new-model", "pt", "sft", "rlhf", "export")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RecipeError(ModelloopError):
    """A recipe that cannot run: one line naming the stage and the key."""


class HeldBack(RecipeError):
    """A stage's gate failed: the recipe stopped, and the model it judged is held back."""


class NewModelStage(BaseModel):
    """A random-weight model of a family's architecture, with a tokenizer trained here."""

    model_config = ConfigDict(extra="forbid")
    family: str
    preset: str = "tiny"
    seed: int = 0
    corpus: list[str] = Field(
        default_factory=list, description="text files the tokenizer also learns from (the task's data)"
    )


class ExportStage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quant: str = Field("merged", description="a registered exporter: merged, bnb-nf4, fp8, ...")
    options: dict[str, Any] = Field(default_factory=dict, description="the exporter's options (python, calibration)")


class ServeCheckStage(BaseModel):
    """The model served through the OpenAI API by a real server process, asked one question."""

    model_config = ConfigDict(extra="forbid")
    engine: str = "hf"
    prompt: str = "What is 2+2?"
    max_tokens: int = Field(16, gt=0)
    startup_timeout: float = Field(300.0, gt=0)


class EvalStage(BaseModel):
    """Your own prompts and answers scored by ``metrics`` (``data``), or standard tasks
    through an evaluation back end (``benchmarks``; their metrics are ``TASK.METRIC``)."""

    model_config = ConfigDict(extra="forbid")
    data: str | None = None
    metrics: list[str] = Field(default_factory=lambda: ["accuracy"])
    benchmarks: list[str] | None = Field(None, min_length=1)
    backend: str = "lm-eval"
    limit: int | None = Field(None, gt=0, description="the first N examples of each benchmark task")
    tasks_dir: list[str] = Field(default_factory=list, description="folders of task definitions, the back end's format")
    backend_options: dict[str, Any] = Field(default_factory=dict)
    engine: str | None = Field(None, description="data: hf; benchmarks: the model in this process")
    max_tokens: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _one_kind(self) -> EvalStage:
        if (self.data is None) == (self.benchmarks is None):
            raise ValueError("give data (your own prompts and answers) or benchmarks (standard tasks), not both")
        return self


class FeedbackStage(BaseModel):
    """The model served with a request log and asked every prompt of ``data`` by simulated
    users, who rate each answer by ``metrics``; the log becomes ``as`` data that a later
    stage trains on with ``data_from:`` (``modelloop.stages.simulated_users``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    data: str
    metrics: list[str] = Field(default_factory=lambda: ["accuracy"])
    threshold: float = Field(0.5, description="an answer every metric scores at least this is liked")
    as_: Literal["sft", "kto", "preference"] = Field("kto", alias="as")
    samples: int = Field(2, ge=1, le=16, description="answers asked for each prompt")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    max_tokens: int = Field(16, gt=0)
    engine: str = "hf"
    seed: int = Field(0, description="answers to prompt i are sampled with the seed seed + i")
    startup_timeout: float = Field(300.0, gt=0)


class PromoteStage(BaseModel):
    """The model of the stage before it becomes the one to serve: ``current:ALIAS``."""

    model_config = ConfigDict(extra="forbid")
    alias: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="the alias (default: the recipe's name)")


CONFIGS: dict[str, type[BaseModel]] = {
    "new-model": NewModelStage,
    "pt": TrainConfig,
    "sft": TrainConfig,
    "rlhf": RLHFConfig,
    "export": ExportStage,
    "serve-check": ServeCheckStage,
    "eval": EvalStage,
    "feedback": FeedbackStage,
    "promote": PromoteStage,
}
#: A stand-in for the model of a stage that has not run yet, while checking.
PENDING = "<the model of stage {}>"
#: A stand-in for the data a feedback stage will make.
PENDING_DATA = "<the data of stage {}>"


@dataclass(frozen=True)
class Step:
    """One stage of a recipe: its name, kind, the stage its model comes from, its config."""

    number: int
    name: str
    kind: str
    source: str | None  # the name of the stage whose model this one starts from; None: the recipe's model
    config: BaseModel
    gates: tuple[Gate, ...] = ()
    data_from: str | None = None  # the feedback stage whose data this one trains on

    @property
    def folder(self) -> str:
        """Its run folder's name inside the recipe's run: ``03-sft``."""
        return f"{self.number:02d}-{_slug(self.name)}"


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str | None
    steps: tuple[Step, ...]
    source: dict[str, Any]  # the recipe with its variables filled in: what a resumed run re-reads
    origin: str  # where it came from, for messages

    def fail(self, step: Step, message: str) -> RecipeError:
        return RecipeError(f"{self.origin}: stage {step.number} {step.name!r} ({step.kind}): {message}")


# ---------------------------------------------------------------------------- reading


def load_recipe(path: Path, assignments: Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply ``--set`` overrides, fill in the variables, validate each stage."""
    raw = read_yaml(path)
    overrides = parse_assignments(assignments)
    variables: dict[str, Any] = {"here": str(path.resolve().parent)}
    for name, value in {**(raw.get("vars") or {}), **overrides.pop("vars", {})}.items():
        variables[name] = _fill(value, variables, str(path))  # a variable may use the ones before it
    return parse_recipe(_fill(raw, variables, str(path)), origin=str(path), overrides=overrides)


def parse_recipe(raw: Mapping[str, Any], *, origin: str, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """A recipe from its (variable-free) mapping; every stage's config is validated here."""
    unknown = sorted(set(raw) - {"name", "vars", "model", "stages"})
    if unknown:
        raise RecipeError(f"{origin}: unknown key {unknown[0]!r} (a recipe has name, vars, model, stages)")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{origin}: stages must be a non-empty list")
    overrides = dict(overrides or {})
    model = overrides.pop("model", raw.get("model"))
    steps: list[Step] = []
    stored: list[dict[str, Any]] = []  # the stages with their overrides: what a resumed run reads
    current: str | None = None  # the stage whose model the next stage starts from
    names: set[str] = set()
    feedback: set[str] = set()  # the feedback stages so far: what data_from may name
    for number, entry in enumerate(stages, start=1):
        if not isinstance(entry, Mapping) or entry.get("stage") not in STAGE_KINDS:
            found = entry.get("stage") if isinstance(entry, Mapping) else entry
            raise RecipeError(
                f"{origin}: stage {number}: 'stage' must be one of {', '.join(STAGE_KINDS)}, got {found!r}"
            )
        kind = entry["stage"]
        name = str(entry.get("name") or kind)
        if name in names:
            raise RecipeError(f"{origin}: stage {number}: the name {name!r} is taken; give it another `name:`")
        names.add(name)
        source = entry.get("from", current)
        if source is not None and source not in names - {name}:
            raise RecipeError(f"{origin}: stage {number} {name!r}: from: {source!r} is not an earlier stage")
        fields = {key: value for key, value in entry.items() if key not in ("stage", "name", "from")}
        fields.update(overrides.pop(name, {}))
        gates = _gates(fields.pop("gates", []), names - {name}, f"{origin}: stage {number} {name!r}")
        data_from = fields.pop("data_from", None)
        if data_from is not None:
            if kind not in ("sft", "rlhf") or data_from not in feedback or "data" in fields:
                raise RecipeError(
                    f"{origin}: stage {number} {name!r}: data_from: {data_from!r} is not an earlier feedback stage "
                    "(an sft or rlhf stage takes the data a feedback stage made, instead of data:)"
                )
            fields["data"] = [PENDING_DATA.format(data_from)]
        set_by_the_recipe = sorted({"model", "output_dir", "resume"} & set(fields))
        if set_by_the_recipe:
            raise RecipeError(
                f"{origin}: stage {number} {name!r}: {set_by_the_recipe[0]} is set by the recipe (use `from:` or the recipe's `model:`)"
            )
        stored.append({**entry, **fields})
        if kind in ("pt", "sft", "rlhf"):
            if source is None and model is None:
                raise RecipeError(
                    f"{origin}: stage {number} {name!r}: no model to start from (set the recipe's `model:` or add a new-model stage)"
                )
            fields.setdefault("model", PENDING.format(source) if source else str(model))
        elif kind == "promote" and source is None:
            raise RecipeError(f"{origin}: stage {number} {name!r}: promote needs a stage before it that made a model")
        elif kind != "new-model" and source is None and model is None:
            raise RecipeError(
                f"{origin}: stage {number} {name!r}: no model to work on (set the recipe's `model:`, give --set model=PATH, or add a new-model stage)"
            )
        try:
            config = build_config(CONFIGS[kind], fields, source=f"{origin}: stage {number} {name!r} ({kind})")
        except ConfigError as error:
            raise RecipeError(str(error)) from None
        steps.append(Step(number, name, kind, source, config, gates, data_from))
        if kind == "feedback":
            feedback.add(name)
        if kind in MODEL_STAGES:
            current = name
    if overrides:
        raise RecipeError(
            f"{origin}: --set {next(iter(overrides))}.…: no stage or key of that name (stages: {', '.join(names)})"
        )
    source = {**raw, "stages": stored, **({"model": model} if model is not None else {})}
    return Recipe(
        name=str(raw.get("name") or Path(origin).stem),
        model=None if model is None else str(model),
        steps=tuple(steps),
        source=source,
        origin=origin,
    )


def _gates(texts: Any, earlier: set[str], where: str) -> tuple[Gate, ...]:
    """A stage's gates, each naming only stages before it."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise RecipeError(f"{where}: gates must be a list of conditions like 'accuracy >= eval-base'")
    gates = []
    for text in texts:
        try:
            gate = Gate.parse(text)
        except ValueError as error:
            raise RecipeError(f"{where}: {error}") from None
        if gate.stage is not None and gate.stage not in earlier:
            raise RecipeError(f"{where}: gate {text!r}: {gate.stage!r} is not an earlier stage")
        gates.append(gate)
    return tuple(gates)


def _fill(value: Any, variables: Mapping[str, Any], origin: str) -> Any:
    """``${name}`` replaced from ``variables`` everywhere but in ``vars`` itself."""
    if isinstance(value, Mapping):
        return {key: item if key == "vars" else _fill(item, variables, origin) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, variables, origin) for item in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match[str]) -> Any:
        if match.group(1) not in variables:
            raise RecipeError(f"{origin}: ${{{match.group(1)}}} is not a variable (vars: {', '.join(variables)})")
        return variables[match.group(1)]

    whole = _VARIABLE.fullmatch(value)
    if whole:
        return lookup(whole)
    return _VARIABLE.sub(lambda match: str(lookup(match)), value)


# ---------------------------------------------------------------------------- checking


def check_recipe(recipe: Recipe) -> None:
    """Every stage checked before anything runs: names first (fast), then the base model
    (a folder, or a hub id that is reachable or cached), then data and rewards."""
    for step in recipe.steps:
        _guard(recipe, step, _check_names)
    first = recipe.steps[0]
    if recipe.model is not None and first.source is None and first.kind != "new-model":
        from modelloop.models.loading import read_config, resolve_model_source

        _guard(recipe, first, lambda step: read_config(resolve_model_source(recipe.model, weights=False).base))
    for step in recipe.steps:
        _guard(recipe, step, _check_inputs)


def _guard(recipe: Recipe, step: Step, check: Callable[[Step], Any]) -> None:
    try:
        check(step)
    except RecipeError:
        raise
    except (ModelloopError, ValueError) as error:
        raise recipe.fail(step, str(error)) from None


def _check_names(step: Step) -> None:
    """Plugin names and options: no file, no model, no heavy import."""
    from modelloop.inference.choice import check_engine_name
    from modelloop.registry import ENGINES, EXPORTERS, MODELS, PARALLEL_STRATEGIES, get_registry

    config: Any = step.config
    if step.kind == "new-model":
        family = next((f for f in get_registry(MODELS) if f.name == config.family), None)
        if family is None:
            get_registry(MODELS).get(config.family)  # the registry's "did you mean"
        elif config.preset not in family.presets:
            raise ValueError(
                f"preset: the {family.name} family has no preset {config.preset!r}; presets: {', '.join(family.presets)}"
            )
    elif step.kind in ("pt", "sft", "rlhf"):
        from modelloop.stages.checks import check_names

        check_tuner(config)
        check_names(config)
        if config.strategy:
            get_registry(PARALLEL_STRATEGIES).get(config.strategy)
        if step.kind == "rlhf":
            from modelloop.rewards import resolve_rewards
            from modelloop.stages.rlhf import REWARDED, TRL_GENERATE, check_method

            check_method(config)
            if config.method in REWARDED:
                if config.environment is not None:
                    from modelloop.stages.rlhf import resolve_environment

                    resolve_environment(config)
                if config.rewards or config.environment is None:
                    resolve_rewards(config.rewards, config.reward_weights, config.reward_options)
                if config.rollout_engine != TRL_GENERATE:
                    get_registry(ENGINES).get(config.rollout_engine)
    elif step.kind == "export":
        from modelloop.export import check_export_options

        check_export_options(get_registry(EXPORTERS).get(config.quant), config.options)
    elif step.kind == "serve-check":
        check_engine_name(config.engine)
    elif step.kind == "eval" and config.benchmarks:
        from modelloop.stages.benchmark import resolve_backend

        resolve_backend(config.backend, config.backend_options)
        if config.engine:
            check_engine_name(config.engine)
    elif step.kind in ("eval", "feedback"):
        from modelloop.stages.evaluate import resolve_metrics

        check_engine_name(config.engine or "hf")
        resolve_metrics(config.metrics)


def _check_inputs(step: Step) -> None:
    """Every data file read and every record validated; every reward called on a sample."""
    from modelloop.data.records import read_records
    from modelloop.data.tokenize import problems_error

    config: Any = step.config
    if step.kind == "new-model":
        missing = [f for f in config.corpus if not Path(f).is_file()]
        if missing:
            raise ValueError(f"corpus: {missing[0]}: no such file")
    elif step.kind in ("pt", "sft") and step.data_from is None:
        kind = "text" if step.kind == "pt" else "conversation"
        if config.streaming:  # read as training goes: checked up to each source's first good record here
            from modelloop.data.streaming import check_sources

            check_sources(config.data, kind=kind, format=config.format, skip_bad_records=config.skip_bad_records)
        for files in (config.eval_data,) if config.streaming else (config.data, config.eval_data):
            if files:
                records = read_records(files, format=config.format, kinds=(kind,), seed=config.seed)
                if records.problems and not config.skip_bad_records:
                    raise problems_error(records.problems, "Fix them, or set skip_bad_records.")
    elif step.kind == "rlhf" and step.data_from is not None:  # its data is made by an earlier stage
        from modelloop.stages.rlhf import CHECK_DIR, trl_arguments

        trl_arguments(config, CHECK_DIR, evaluating=bool(config.eval_data or config.eval_split))
    elif step.kind == "rlhf":
        from modelloop.stages.rlhf import CHECK_DIR, METHODS, REWARDED, check_scoring, read_data, trl_arguments

        trl_arguments(config, CHECK_DIR, evaluating=bool(config.eval_data or config.eval_split))
        records = read_data(config.data, config, METHODS[config.method].kind)
        if config.eval_data:
            read_data(config.eval_data, config, METHODS[config.method].kind)
        if config.method in REWARDED:
            check_scoring(config, records)
    elif step.kind == "eval" and config.benchmarks:
        missing = [folder for folder in config.tasks_dir if not Path(folder).is_dir()]
        if missing:
            raise ValueError(f"tasks_dir: {missing[0]}: no such folder")
    elif step.kind in ("eval", "feedback"):
        records = read_records([config.data])
        if records.problems:
            raise problems_error(records.problems, "Fix them before asking the model.")


# ---------------------------------------------------------------------------- running


def run_recipe(recipe: Recipe, *, output_dir: Path | None = None, resume: Path | None = None) -> dict[str, Any]:
    """Run the stages in order (after checking them all), or continue a recipe run."""
    from modelloop.artifacts import environment, new_run_dir, read_manifest, run_id, update_manifest
    from modelloop.plugins import get_plugin_manager

    if resume is None:
        check_recipe(recipe)
        if output_dir is not None and output_dir.exists() and any(output_dir.iterdir()):
            raise RecipeError(
                f"{output_dir} is not empty: give another --output-dir, or continue it with --resume {output_dir}"
            )
        run_dir = new_run_dir(f"recipe-{_slug(recipe.name)}", output_dir)
        manager = get_plugin_manager()
        update_manifest(
            run_dir,
            id=run_id(run_dir),
            stage="recipe",
            status="running",
            base_model=recipe.model,
            config=recipe.source,
            steps={},
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            **environment({name: info.version for name, info in manager.info.items()}),
        )
    else:
        run_dir = resume
        update_manifest(run_dir, status="running")
    done: dict[str, Any] = read_manifest(run_dir).get("steps", {})
    models: dict[str, str] = {step.name: str(run_dir / step.folder) for step in recipe.steps}
    for step in recipe.steps:
        step_dir = run_dir / step.folder
        if done.get(step.name, {}).get("status") == "completed":
            print(
                f"modelloop: recipe {recipe.name}: stage {step.number}/{len(recipe.steps)} {step.name}: done already ({done[step.name]['run']})"
            )
            continue
        model = models[step.source] if step.source else str(recipe.model)
        origin = "" if step.kind == "new-model" else f" from {model}"
        print(
            f"modelloop: recipe {recipe.name}: stage {step.number}/{len(recipe.steps)} {step.name} ({step.kind}){origin}"
        )
        done[step.name] = {"run": run_id(step_dir), "status": "running"}
        update_manifest(run_dir, steps=done)
        started = time.perf_counter()
        try:
            metrics = RUNNERS[step.kind](step, model, step_dir, recipe=recipe, run_dir=run_dir)
        except BaseException as error:
            done[step.name]["status"] = "failed"
            update_manifest(
                run_dir, steps=done, status="failed", error=f"stage {step.name}: {type(error).__name__}: {error}"
            )
            raise
        done[step.name] = {
            "run": run_id(step_dir),
            "status": "completed",
            "seconds": round(time.perf_counter() - started, 1),
            "metrics": metrics,
        }
        if step.gates:
            verdicts = _judge(recipe, step, metrics, done)
            done[step.name]["gates"] = [verdict.to_dict() for verdict in verdicts]
            failed = [verdict for verdict in verdicts if not verdict.passed]
            if failed:
                _hold_back(
                    recipe, step, failed, done, run_dir, model if step.kind not in MODEL_STAGES else str(step_dir)
                )
        update_manifest(run_dir, steps=done)
    update_manifest(run_dir, status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    from modelloop.report import write_report

    report = write_report(run_dir, recipe, done)
    return {"run_dir": str(run_dir), "steps": done, "report": str(report)}


def _judge(recipe: Recipe, step: Step, metrics: Mapping[str, Any], done: Mapping[str, Any]) -> list[Verdict]:
    earlier = {name: state.get("metrics") or {} for name, state in done.items()}
    try:
        return [gate.judge(metrics, earlier) for gate in step.gates]
    except ValueError as error:
        raise recipe.fail(step, f"gates: {error}") from None


def _hold_back(
    recipe: Recipe, step: Step, failed: Sequence[Verdict], done: dict[str, Any], run_dir: Path, judged: str
) -> None:
    """Mark the judged model's run (when it is one) and the recipe run held back, write the
    report, and stop the recipe. The stage is left unfinished: a resumed recipe judges again."""
    from modelloop.artifacts import is_run, update_manifest
    from modelloop.report import write_report

    reason = "; ".join(str(verdict) for verdict in failed)
    held = {"stage": step.name, "reason": reason, "gates": [verdict.to_dict() for verdict in failed]}
    done[step.name]["status"] = "held back"
    if is_run(judged):
        update_manifest(Path(judged), held_back=held)
    update_manifest(run_dir, steps=done, status="held back", held_back=held)
    write_report(run_dir, recipe, done)
    raise HeldBack(f"{recipe.origin}: stage {step.number} {step.name!r}: held back: {reason}")


def resume_recipe(reference: str | Path | None) -> dict[str, Any]:
    """Continue the recipe run given (or the latest unfinished one) after its last finished stage."""
    from modelloop.artifacts import is_run, read_manifest
    from modelloop.lineage import find_run, find_runs

    if reference is None:
        unfinished = [run for run in find_runs() if run.stage == "recipe" and run.manifest.get("status") != "completed"]
        if not unfinished:
            raise RecipeError("--resume: no unfinished recipe run (see modelloop runs --stage recipe)")
        run_dir = unfinished[-1].path
    else:
        run_dir = Path(reference) if is_run(reference) else find_run(str(reference)).path
    manifest = read_manifest(run_dir)
    if manifest.get("stage") != "recipe":
        raise RecipeError(f"--resume {reference}: {run_dir} is a {manifest.get('stage')} run, not a recipe run")
    recipe = parse_recipe(manifest["config"], origin=str(run_dir))
    return run_recipe(recipe, resume=run_dir)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "stage"


def _new_model(step: Step, model: str, out: Path, **_: Any) -> dict[str, Any]:
    from modelloop.artifacts import hashed_files, run_id, update_manifest
    from modelloop.models.new_model import new_model

    config: Any = step.config
    new_model(
        config.family,
        config.preset,
        out / "model",
        corpus_files=[Path(f) for f in config.corpus],
        seed=config.seed,
        overwrite=True,
    )
    update_manifest(
        out,
        id=run_id(out),
        stage="new-model",
        status="completed",
        base_model=None,
        parent=None,
        config=config.model_dump(),
        files=hashed_files(out / "model"),
    )
    return {}


def _train(step: Step, model: str, out: Path, *, recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    from modelloop.stages.rlhf import rlhf
    from modelloop.stages.simulated_users import DATA_FILE
    from modelloop.stages.train import train

    update: dict[str, Any] = {"model": model, "output_dir": out, "resume": True}
    if step.data_from is not None:
        made = next(other for other in recipe.steps if other.name == step.data_from)
        update["data"] = [str(run_dir / made.folder / DATA_FILE)]
    config = step.config.model_copy(update=update)
    run = rlhf(config) if step.kind == "rlhf" else train(step.kind, config)
    kept = (
        "train_loss",
        "train_loss_last",
        "train_tokens_per_second",
        "train_runtime",
        "eval_loss",
        "reward_first",
        "reward",
    )
    return {key: value for key, value in run["metrics"].items() if key in kept}


def _export(step: Step, model: str, out: Path, **_: Any) -> dict[str, Any]:
    import shutil

    from modelloop.registry import EXPORTERS, get_registry

    config: Any = step.config
    shutil.rmtree(out, ignore_errors=True)  # an export appears whole or not at all; a leftover is empty
    get_registry(EXPORTERS).get(config.quant).export(model, out, **config.options)
    return {}


def _serve_check(step: Step, model: str, out: Path, **_: Any) -> dict[str, Any]:
    """Start ``modelloop serve`` on the model, ask one chat question through the OpenAI API."""
    import sys

    import httpx

    from modelloop.artifacts import run_id, update_manifest
    from modelloop.inference.choice import find_engine
    from modelloop.inference.remote import ServerProcess
    from modelloop.parallel.world import free_port

    config: Any = step.config
    engine = find_engine(config.engine).name  # auto: the one chosen, recorded
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "modelloop",
        "serve",
        model,
        "--engine",
        engine,
        "--port",
        str(port),
        "--served-name",
        "model",
    ]
    server = ServerProcess(command, url=f"http://127.0.0.1:{port}", name=f"modelloop serve ({engine})")
    try:
        server.wait_healthy(config.startup_timeout)
        started = time.perf_counter()
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": "model",
                "messages": [{"role": "user", "content": config.prompt}],
                "max_tokens": config.max_tokens,
                "temperature": 0,
            },
            timeout=config.startup_timeout,
        )
        latency = time.perf_counter() - started
    finally:
        server.stop(grace=30)
    if response.status_code != 200:
        raise RecipeError(f"the served model answered {response.status_code}: {response.text[:300]}")
    answer = response.json()["choices"][0]["message"]["content"]
    metrics = {"latency_s": round(latency, 3), "completion_tokens": response.json()["usage"]["completion_tokens"]}
    out.mkdir(parents=True, exist_ok=True)
    update_manifest(
        out,
        id=run_id(out),
        stage="serve-check",
        status="completed",
        parent=_parent(model),
        config={**config.model_dump(), "model": model, "engine": engine},
        answer=answer,
        metrics=metrics,
    )
    return metrics


def _evaluate(step: Step, model: str, out: Path, **_: Any) -> dict[str, Any]:
    import shutil

    from modelloop.stages.evaluate import evaluate

    config: Any = step.config
    shutil.rmtree(out, ignore_errors=True)  # an interrupted eval starts again
    if config.benchmarks:
        from modelloop.stages.benchmark import AnswersFrom, benchmark

        return benchmark(
            model,
            config.benchmarks,
            backend=config.backend,
            answers=AnswersFrom(engine=config.engine),
            limit=config.limit,
            task_dirs=config.tasks_dir,
            options=config.backend_options,
            output_dir=out,
        )["summary"]
    result = evaluate(
        model,
        config.data,
        metrics=config.metrics,
        engine=config.engine or "hf",
        output_dir=out,
        max_tokens=config.max_tokens,
        batch_size=config.batch_size,
    )
    return result["summary"]


def _feedback(step: Step, model: str, out: Path, **_: Any) -> dict[str, Any]:
    import shutil

    from modelloop.stages.simulated_users import simulate_users

    config: Any = step.config
    shutil.rmtree(out, ignore_errors=True)  # an interrupted round of questions starts again
    return simulate_users(
        model,
        config.data,
        out,
        metrics=config.metrics,
        threshold=config.threshold,
        kind=config.as_,
        samples=config.samples,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
        engine=config.engine,
        seed=config.seed,
        startup_timeout=config.startup_timeout,
    )


def _parent(model: str) -> str | None:
    from modelloop.artifacts import is_run, read_manifest

    return read_manifest(model).get("id") if is_run(model) else None


def _promote(step: Step, model: str, out: Path, *, recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """Point ``current:ALIAS`` at the model of the stage before it."""
    from modelloop.aliases import PREFIX, promote
    from modelloop.artifacts import run_id, update_manifest

    config: Any = step.config
    alias = config.alias or _slug(recipe.name)
    entry = promote(alias, Path(model), by=run_id(run_dir))
    out.mkdir(parents=True, exist_ok=True)
    update_manifest(
        out,
        id=run_id(out),
        stage="promote",
        status="completed",
        parent=_parent(model),
        config={**config.model_dump(), "model": model},
        alias=f"{PREFIX}{alias}",
    )
    print(f"modelloop: {PREFIX}{alias} is now {entry['run']}")
    return {}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "new-model": _new_model,
    "pt": _train,
    "sft": _train,
    "rlhf": _train,
    "export": _export,
    "serve-check": _serve_check,
    "eval": _evaluate,
    "feedback": _feedback,
    "promote": _promote,
}
