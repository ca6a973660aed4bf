"""``rlhf``: DPO, KTO, SimPO, ORPO, GRPO, RLOO, distillation and reward models on any
tuner, through TRL's trainers.

The losses are TRL's; this stage brings what ``sft`` has — the tuner hook (LoRA by
default, whose frozen base is the reference model: no second copy), modelloop's data
formats and chat templates, the run folder, the lifecycle hooks, progress and plots —
and, for GRPO, rewards from the registry, an import path or a file (checked on a sample
batch before any model loads), rollouts through an engine of the registry (with
``max_staleness``, generated while the trainer steps and weighed by importance), and
environments: each completion an episode of several turns (tools, games), its reward
one more of the run's rewards. RLOO and online DPO take GRPO's rewards and rollout
engines; ``gkd`` distils a teacher into the model on its own generations. ``rm`` trains a
reward model (TRL's ``RewardTrainer``: the model's body under a one-output head) whose
run folder is the ``reward-model`` reward's ``path``.

Checks, in order, before the weights load: the config (including which knobs belong to
which method), the tuner, TRL's own config for the method, the model's config, every
data record (of the kind the method takes), the environment, the rewards and the
rollout engine (a distillation's teacher: its vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelloop.config import ConfigError, RLHFConfig, build_config
from modelloop.parallel.memory import PeakMemory
from modelloop.parallel.world import is_main_process, rank
from modelloop.registry import ENGINES, get_registry
from modelloop.stages.checks import Checked, check_training
from modelloop.stages.common import (
    advise_schedule,
    finish_run,
    load_trainable,
    media_tokens,
    merged_base,
    record_compute,
    record_module_groups,
    run_stage,
    run_trainer,
    settle_owned_process,
    trainer_arguments,
    tuner_optimizer,
)


@dataclass(frozen=True)
class Method:
    """How a method maps onto TRL: its trainer and config, and the data kind it takes."""

    kind: str
    module: str
    trainer: str
    config: str
    loss_types: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "dpo": Method(
        "preference",
        "trl",
        "DPOTrainer",
        "DPOConfig",
        loss_types=(
            "sigmoid",
            "hinge",
            "ipo",
            "exo_pair",
            "nca_pair",
            "robust",
            "bco_pair",
            "sppo_hard",
            "aot",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "discopop",
            "sigmoid_norm",
        ),
    ),
    "kto": Method("kto", "trl", "KTOTrainer", "KTOConfig", loss_types=("kto", "apo_zero_unpaired")),
    "simpo": Method(
        "preference", "trl.experimental.cpo", "CPOTrainer", "CPOConfig", fixed={"loss_type": "simpo", "cpo_alpha": 0.0}
    ),
    "orpo": Method("preference", "trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
    "grpo": Method(
        "prompt",
        "trl",
        "GRPOTrainer",
        "GRPOConfig",
        loss_types=("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
    ),
    "rloo": Method("prompt", "trl", "RLOOTrainer", "RLOOConfig"),
    "online_dpo": Method(
        "prompt", "trl.experimental.online_dpo", "OnlineDPOTrainer", "OnlineDPOConfig", loss_types=("sigmoid", "ipo")
    ),
    "gkd": Method("prompt", "trl.trainer.distillation_trainer", "DistillationTrainer", "DistillationConfig"),
    "rm": Method("preference", "trl", "RewardTrainer", "RewardConfig"),
}

#: The methods that sample completions and score them with rewards (``rewards``)...
REWARDED = ("grpo", "rloo", "online_dpo")
#: ... and of those, the ones that sample a group of ``num_generations`` per prompt
#: (online DPO samples a pair).
GROUPED = ("grpo", "rloo")


#: ``rollout_engine`` for TRL's own generation (transformers' ``generate`` inside the
#: trainer) instead of an engine of the registry: the baseline of bench/grpo_rollouts.py.
TRL_GENERATE = "trl"


def rlhf(config: RLHFConfig | Mapping[str, Any], *, owns_process: bool = False) -> dict[str, Any]:
    """Run an alignment stage; returns the run's final metrics and folder. ``owns_process``:
    nothing runs in this process after the stage (``settle_owned_process``)."""
    if not isinstance(config, RLHFConfig):
        config = build_config(RLHFConfig, config)
    method = METHODS[config.method]
    check_method(config)
    # the memory plan models sft's and pt's steps, not a reference model or rollouts: an
    # unset checkpointing is off here, and the batch stays as given (GRPO's must divide
    # into generations)
    config = config.model_copy(update={"gradient_checkpointing": bool(config.gradient_checkpointing)})
    checked = check_training(config)
    if owns_process:
        settle_owned_process(config, checked)
    if checked.strategy.train is not None:
        raise ConfigError(
            f"the {checked.strategy.name} strategy trains with its own loop, for sft and pt; rlhf runs TRL's trainers (ddp, fsdp, deepspeed)"
        )
    sharing = shares_prompts(config, checked)
    # TRL's own checks, before loading
    trl_arguments(config, CHECK_DIR, evaluating=bool(config.eval_data or config.eval_split))
    records = read_data(config.data, config, method.kind)
    eval_records = read_data(config.eval_data, config, method.kind) if config.eval_data else None
    if any(record.get("images") for record in [*records, *(eval_records or [])]):
        if checked.family.vision is None:
            raise ConfigError(f"the data has pictures, and {config.model} (family {checked.family.name}) takes none")
        if checked.family.vision.processor is None:
            raise ConfigError(
                f"the {checked.family.name} family gives TRL no processor, which its trainers need for pictures"
            )
    rewards: list[Any] = []
    environment = None
    if config.method in REWARDED:
        rewards, environment = check_scoring(config, [*records, *(eval_records or [])])
        if config.rollout_engine != TRL_GENERATE:
            get_registry(ENGINES).get(config.rollout_engine)
        check_asynchronous(config, [*records, *(eval_records or [])])
    if config.method == "gkd":
        check_teacher(config, checked)
    return run_stage(
        "rlhf",
        config,
        checked,
        lambda run_dir, context, continuing: _run(
            config,
            method,
            checked,
            (records, eval_records),
            (rewards, environment),
            run_dir,
            context,
            continuing,
            sharing_prompts=sharing,
        ),
    )


def check_method(config: RLHFConfig) -> None:
    """The loss type is one the method has; ``method_options`` are fields of TRL's config
    for the method (TRL is imported only to check those)."""
    from dataclasses import fields

    method = METHODS[config.method]
    if config.loss_type is not None and config.loss_type not in method.loss_types:
        raise ConfigError(
            f"loss_type {config.loss_type!r} is not one of {config.method}'s: {', '.join(method.loss_types) or 'none'}"
        )
    if config.method_options:
        trl_config = _trl_class(method, method.config)
        known = {f.name for f in fields(trl_config)}
        for key in config.method_options:
            if key not in known:
                raise ConfigError(f"method_options.{key}: not a field of TRL's {trl_config.__name__}")


#: The output folder TRL's config is built with to check it (nothing is written there).
CHECK_DIR = Path("modelloop-config-check")


#: The methods whose TRL collator pads a batch to a multiple of a width: on a CPU their
#: linear layers multiply with oneDNN as sft's do (``modelloop.models.cpu_linear``), the
#: batches padded to a multiple of ``ROW_MULTIPLE`` tokens so that they come in few shapes.
ONEDNN_METHODS = ("dpo", "kto")


def multiplies_with_onednn(config: RLHFConfig, checked: Checked) -> bool:
    """sft's rule (``modelloop.stages.train.multiplies_with_onednn``), for the methods of
    ``ONEDNN_METHODS`` on text: TRL's collators do not pad pictures' batches to a multiple."""
    from modelloop.stages.train import multiplies_with_onednn as sft_multiplies_with_onednn

    text = checked.family.vision is None
    return config.method in ONEDNN_METHODS and text and sft_multiplies_with_onednn(config, checked.plan)


def prompt_sharing_refusal(config: RLHFConfig, checked: Checked) -> str | None:
    """Why a run cannot batch its pairs in shared-prompt rows (``modelloop.data.shared_prompts``),
    or None where it can: DPO on text, an attention kernel that takes the rows' 4-D mask,
    TRL's ``keep_start`` truncation (keeping the end would cut each pair's prompt its own
    way), no router loss (it would weigh the rows' tokens, not TRL's) and no sliding window
    a sequence can outgrow (the mask is the full one)."""
    from modelloop.data.shared_prompts import MASKED_ATTENTION

    text = checked.model_config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or ["sliding_attention"]
    sliding = bool(window) and getattr(text, "use_sliding_window", True) and "sliding_attention" in layer_types
    if config.method != "dpo":
        return f"{config.method} batches its examples as TRL does; dpo packs pairs"
    if checked.family.vision is not None:
        return f"the {checked.family.name} family reads pictures: its pairs go as TRL batches them"
    if checked.attention not in MASKED_ATTENTION:
        return f"attention {checked.attention} takes no 4-D mask (sdpa and eager do)"
    if config.method_options.get("truncation_mode", "keep_start") != "keep_start":
        return "truncation_mode keep_end cuts each pair's prompt its own way"
    coefficient = config.method_options.get("router_aux_loss_coef")
    if coefficient is None:
        coefficient = getattr(text, "router_aux_loss_coef", 0.0)
    if hasattr(text, "output_router_logits") and coefficient:  # TRL's rule for adding the router loss
        return "the router's balancing loss would count the packed rows' tokens (router_aux_loss_coef 0 drops it)"
    if sliding and (config.max_length is None or config.max_length > window):
        return f"a sequence can outgrow the model's sliding window ({window} tokens)"
    return None


def shares_prompts(config: RLHFConfig, checked: Checked) -> bool:
    """Whether the pairs go in shared-prompt rows: by default wherever they can; ``packing``
    true insists (a run that cannot stops with the reason), false keeps TRL's batches."""
    if config.packing is False:
        return False
    refusal = prompt_sharing_refusal(config, checked)
    if refusal is not None and config.packing:
        raise ConfigError(f"packing: {refusal}")
    return refusal is None


def leaner(config: RLHFConfig, trainer_class: Any, *, sharing_prompts: bool) -> Any:
    """The method's TRL trainer, with DPO's prompts shared and SimPO's, ORPO's and online
    DPO's log-probabilities from TRL's fused head (``modelloop.stages.preference_trainers``)."""
    from modelloop.stages.preference_trainers import fused_completion_log_probs, fused_log_probs, prompts_shared

    if sharing_prompts:
        return prompts_shared(trainer_class)
    if config.method in ("simpo", "orpo"):
        return fused_log_probs(trainer_class, orpo=config.method == "orpo")
    if config.method == "online_dpo":
        return fused_completion_log_probs(trainer_class)
    return trainer_class


#: The methods whose TRL trainers project onto the whole vocabulary, given TRL's fused
#: LM head by modelloop (TRL's DPO, KTO, GRPO and RLOO trainers have it already; gkd's
#: loss compares whole distributions, and rm scores with a one-output head).
FUSED_BY_MODELLOOP = ("simpo", "orpo", "online_dpo")


def loss_description(config: RLHFConfig, *, sharing_prompts: bool) -> str:
    """How the run computes its loss, for the manifest."""
    if sharing_prompts:
        return f"TRL's {config.method} loss, pairs in shared-prompt rows"
    if config.method in FUSED_BY_MODELLOOP:
        return f"TRL's {config.method} loss, log-probabilities from TRL's fused LM head"
    return f"TRL's {config.method} loss"


def trl_arguments(
    config: RLHFConfig, run_dir: Path, *, evaluating: bool, plan: Any = None, onednn: bool = False
) -> Any:
    """TRL's config for the method: the arguments every stage shares, the method's knobs,
    then ``method_options``. Building it runs TRL's own checks (GRPO's batch size must be a
    multiple of num_generations, ...), so it is done once before the model loads. With
    ``onednn``, batches are padded to a multiple of ``ROW_MULTIPLE`` tokens."""
    method = METHODS[config.method]
    shared = {
        **trainer_arguments(config, run_dir, evaluating=evaluating, plan=plan),
        "activation_checkpointing": False,
    }  # the stage set it up
    if onednn and "pad_to_multiple_of" not in config.method_options:
        from modelloop.models.cpu_linear import ROW_MULTIPLE

        shared["pad_to_multiple_of"] = ROW_MULTIPLE
    clash = sorted(set(config.method_options) & set(shared))
    if clash:
        raise ConfigError(
            f"method_options.{clash[0]}: modelloop sets it from its own keys (lr, max_steps, batch_size, ...)"
        )
    try:
        return _trl_class(method, method.config)(**shared, **method_arguments(config))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"TRL's {method.config}: {error}") from None


def method_arguments(config: RLHFConfig) -> dict[str, Any]:
    """modelloop's knobs as TRL's config fields for the method, then ``method_options``."""
    arguments: dict[str, Any] = {}
    if config.beta is not None:
        arguments["beta"] = config.beta
    if config.method == "dpo":
        arguments.update(
            loss_type=[config.loss_type or "sigmoid"],
            label_smoothing=config.label_smoothing,
            max_length=config.max_length,
        )
    elif config.method == "kto":
        arguments.update(
            desirable_weight=config.desirable_weight,
            undesirable_weight=config.undesirable_weight,
            max_length=config.max_length,
        )
        if config.loss_type:
            arguments["loss_type"] = config.loss_type
    elif config.method == "rm":
        arguments["max_length"] = config.max_length
    elif config.method == "gkd":
        arguments.update(
            max_completion_length=config.max_completion_length, temperature=config.temperature, top_p=config.top_p
        )
    elif config.method in ("simpo", "orpo"):
        arguments.update(max_length=config.max_length, max_completion_length=config.max_length)
        if config.method == "simpo":
            arguments.update(simpo_gamma=config.simpo_gamma, label_smoothing=config.label_smoothing)
    elif config.method == "online_dpo":
        arguments.update(
            max_new_tokens=config.max_completion_length,
            max_length=config.max_length,
            temperature=config.temperature,
            top_p=config.top_p,
            reward_weights=scoring_weights(config),
        )
        if config.loss_type:
            arguments["loss_type"] = config.loss_type
    elif config.method in GROUPED:
        arguments.update(
            num_generations=config.num_generations,
            max_completion_length=config.max_completion_length,
            temperature=config.temperature,
            top_p=config.top_p,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high,
            num_iterations=config.num_iterations,
            reward_weights=scoring_weights(config),
            log_completions=False,
        )
        if config.method == "grpo":
            arguments["scale_rewards"] = config.scale_rewards
        if config.loss_type:
            arguments["loss_type"] = config.loss_type
    arguments.update(METHODS[config.method].fixed)
    return {**arguments, **config.method_options}


def read_data(files: list[str], config: RLHFConfig, kind: str) -> list[dict[str, Any]]:
    """Every record of the method's kind, validated; bad ones stop the run with file:line."""
    from modelloop.data.records import read_records
    from modelloop.data.tokenize import problems_error

    records = read_records(files, format=config.format, kinds=(kind,), seed=config.seed)
    if records.problems and not config.skip_bad_records:
        raise problems_error(records.problems, "Fix them, or pass --skip-bad-records to train without them.")
    if not records.examples:
        raise ConfigError(
            f"no usable examples in {', '.join(files)} ({len(records.problems)} bad records skipped)"
            if records.problems
            else f"no records in {', '.join(files)}"
        )
    for column, what in (("audios", "sound"), ("videos", "video")):
        holding = next((example for example in records.examples if example.record.get(column)), None)
        if holding is not None:
            raise ConfigError(
                f"{holding.location}: {config.method} does not take {what}: TRL {_trl_version()}'s trainers take "
                f"text and pictures (sft, serve, infer and eval take {what})"
            )
    pictured = next((example for example in records.examples if example.record.get("images")), None)
    if pictured is not None and config.method not in ("dpo", "grpo"):
        raise ConfigError(
            f"{pictured.location}: {config.method} does not take pictures yet (dpo, grpo, sft, serve, infer and eval do)"
        )
    keys = {key: None for example in records.examples for key in example.record}  # every column in every row
    return [{**keys, **example.record} for example in records.examples]


def _trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def check_scoring(config: RLHFConfig, records: list[dict[str, Any]]) -> tuple[list[Any], Any]:
    """The rewards of a method that samples (GRPO, RLOO, online DPO) and GRPO's environment
    (or None), each proven on the data before any model loads. With an environment, its
    episode reward comes first (weight 1, ``scoring_weights``) and the run may name no
    other reward."""
    if config.environment is None:
        return check_rewards(config, records), None
    from modelloop.environments import REWARD_NAME, check_environment, environment_reward
    from modelloop.rewards import BoundReward

    if config.rollout_engine == TRL_GENERATE:
        raise ConfigError(
            f"environment {config.environment!r}: episodes are played through modelloop's engines; "
            f"rollout_engine {TRL_GENERATE!r} generates one turn only"
        )
    pictured = next((number for number, record in enumerate(records, start=1) if record.get("images")), None)
    if pictured is not None:
        raise ConfigError(f"environment {config.environment!r}: record {pictured} has pictures; episodes take text")
    from modelloop.stages.episodes import records_by_prompt

    environment = resolve_environment(config)
    check_environment(environment, records)
    records_by_prompt(environment.name, records)
    played = BoundReward(name=REWARD_NAME, score=environment_reward, needs_model=False, columns=())
    return [played, *(check_rewards(config, records) if config.rewards else [])], environment


def scoring_weights(config: RLHFConfig) -> list[float] | None:
    """The weights TRL gets, one per reward function: with an environment, its episode
    reward's 1 before those of the rewards named (the config keeps the user's, so that a
    resumed run reads them as given)."""
    if config.environment is not None and config.reward_weights:
        return [1.0, *config.reward_weights]
    return config.reward_weights


def check_asynchronous(config: RLHFConfig, records: list[dict[str, Any]]) -> None:
    """Rollouts generated while the trainer steps (``max_staleness``) need an engine of
    their own, out of this process, and prompts as text."""
    if config.max_staleness is None:
        return
    engine = config.rollout_engine
    if engine == TRL_GENERATE or get_registry(ENGINES).get(engine).attach is not None:
        raise ConfigError(
            f"max_staleness: the {engine} rollouts generate with the policy being trained, in this process; "
            "rollouts that overlap training need an engine of their own (rollout_engine: hf-server, vllm, sglang)"
        )
    if any(record.get("images") for record in records):
        raise ConfigError("max_staleness: rollouts generated ahead take prompts as text; this data has pictures")


def check_teacher(config: RLHFConfig, checked: Checked) -> None:
    """The teacher's config is found and speaks the student's vocabulary (the distillation
    loss compares their distributions token by token), before either model loads."""
    from modelloop.models.loading import read_config, resolve_model_source

    teacher = read_config(
        resolve_model_source(config.teacher, weights=False).base, trust_remote_code=config.trust_remote_code
    )
    sizes = (teacher.get_text_config().vocab_size, checked.model_config.get_text_config().vocab_size)
    if sizes[0] != sizes[1]:
        raise ConfigError(
            f"teacher {config.teacher}: a vocabulary of {sizes[0]} tokens, the model's has {sizes[1]}; "
            "distillation needs the student's tokenizer"
        )


def resolve_environment(config: RLHFConfig) -> Any:
    """The run's environment with its options checked (no data read): recipes' fast checks."""
    from modelloop.environments import REWARD_NAME, bind_environment

    if REWARD_NAME in config.rewards or REWARD_NAME in config.reward_options:
        raise ConfigError(f"the reward name {REWARD_NAME!r} is the environment's; give that reward another name")
    if config.reward_weights and not config.rewards:
        raise ConfigError("reward_weights weigh the rewards named besides the environment, and none is named")
    return bind_environment(config.environment, config.environment_options, config.max_turns)


def check_rewards(config: RLHFConfig, records: list[dict[str, Any]]) -> list[Any]:
    """Resolve every reward and call it on a sample of the data: cheap rewards before any
    model loads; rewards that need a model right after (they load their own)."""
    from modelloop.rewards import check_columns, check_on_sample, resolve_rewards, sample_batch

    rewards = resolve_rewards(config.rewards, config.reward_weights, config.reward_options)
    check_columns(rewards, records)
    prompts, completions, columns = sample_batch(records)
    for reward in sorted(rewards, key=lambda r: r.needs_model):
        check_on_sample(reward, prompts, completions, columns)
    return rewards


def _trl_class(method: Method, name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(method.module), name)


def _run(
    config: RLHFConfig,
    method: Method,
    checked: Checked,
    data: tuple[list[dict[str, Any]], list[dict[str, Any]] | None],
    scoring: tuple[list[Any], Any],
    run_dir: Path,
    context: Any,
    resume: Any,
    *,
    sharing_prompts: bool,
) -> dict[str, Any]:
    from datasets import Dataset

    from modelloop.chat import resolve_chat_format
    from modelloop.models.loading import load_tokenizer
    from modelloop.training import MeasureFromFirstStep, ReportCallback, modelloop_trainer_class, plot_metrics

    rewards, environment = scoring
    tokenizer = load_tokenizer(checked.source.tokenizer, trust_remote_code=config.trust_remote_code)
    chat = resolve_chat_format(tokenizer, checked.family, config.template, config.template_options)
    tokenizer.chat_template = chat.source  # TRL renders with the template the model is trained with
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    records, eval_records = data
    processing_class: Any = tokenizer
    padding_side = tokenizer.padding_side
    if any(
        record.get("images") for record in [*records, *(eval_records or [])]
    ):  # TRL's vision trainers take the family's processor
        from modelloop.models.loading import load_image_processor

        processing_class = checked.family.vision.processor(
            tokenizer, load_image_processor(checked.source.tokenizer), checked.model_config
        )
        tokenizer.padding_side = "left"  # GRPO lines the processor's prompts up with the rollouts' left-padded ids
        records = [with_pictures(record) for record in records]
        eval_records = [with_pictures(record) for record in eval_records] if eval_records else None
    dataset = Dataset.from_list(records)
    eval_dataset = Dataset.from_list(eval_records) if eval_records else None
    if config.eval_split:
        split = dataset.train_test_split(test_size=config.eval_split, seed=config.seed)
        dataset, eval_dataset = split["train"], split["test"]
    if is_main_process():
        print(f"modelloop: data: {len(dataset)} {method.kind} examples")
    advise_schedule(
        config,
        checked.plan,
        rows=len(dataset),
        examples=len(dataset),
        rows_a_batch_row=config.num_generations if config.method in GROUPED else 1,
    )

    memory = PeakMemory()
    onednn = multiplies_with_onednn(config, checked)
    model = load_trainable(config, checked, run_dir, onednn=onednn, reward_head=config.method == "rm")
    if config.method == "rm":  # the head scores the last token that is not padding
        model.config.pad_token_id = tokenizer.pad_token_id
    record_module_groups(model, config, checked, run_dir)
    record_compute(run_dir, checked, loss_description(config, sharing_prompts=sharing_prompts))
    arguments = trl_arguments(config, run_dir, evaluating=eval_dataset is not None, plan=checked.plan, onednn=onednn)
    report = ReportCallback(run_dir / "metrics.jsonl", context.log)
    extra: dict[str, Any] = {}
    rollouts = None
    trainer_class = leaner(config, _trl_class(method, method.trainer), sharing_prompts=sharing_prompts)
    if config.method in REWARDED:
        extra = {"reward_funcs": [reward.score for reward in rewards]}
    if config.method in REWARDED and config.rollout_engine != TRL_GENERATE:
        episodes = None
        if environment is not None:
            from modelloop.stages.episodes import Episodes

            episodes = Episodes(environment, [*records, *(eval_records or [])], tokenizer=tokenizer, chat=chat)
        rollouts = _rollouts(config, tokenizer, chat, checked, run_dir, episodes)
        if config.method == "grpo":
            extra["rollout_func"] = rollouts
            if config.max_staleness:
                trainer_class = off_policy(trainer_class)
        elif config.method == "rloo":
            trainer_class = generating_through(trainer_class, rollouts)
        else:
            trainer_class = pairs_through(trainer_class, rollouts)
    if config.method == "gkd":
        extra["teacher_model"] = load_teacher(config, checked)
    trainer = modelloop_trainer_class(trainer_class)(
        model=model,
        args=arguments,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        optimizer_factory=tuner_optimizer(config, checked),
        callbacks=[report, MeasureFromFirstStep(memory)],
        **extra,
    )
    try:
        metrics, seconds = run_trainer(trainer, resume, run_dir)
    finally:
        if rollouts is not None:
            rollouts.close()
        tokenizer.padding_side = padding_side  # model/ keeps the tokenizer as it came
    metrics["train_seconds"] = seconds
    metrics.update(memory.measured())
    if config.method in REWARDED:
        metrics.update(
            reward_summary(run_dir / "metrics.jsonl", "objective/scores" if config.method == "online_dpo" else "reward")
        )
    series = reward_series(config, rewards)
    if is_main_process() and series:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "rewards.png", series, ylabel="reward / margin")
    return finish_run(
        run_dir,
        "rlhf",
        config,
        checked,
        trainer,
        tokenizer,
        chat,
        stats={"examples": len(dataset), "kind": method.kind},
        metrics=metrics,
        merged=config.method == "rm",
    )


def generating_through(trainer_class: Any, rollouts: Any) -> Any:
    """RLOO's trainer with its completions from an engine of the registry: TRL's RLOO has no
    ``rollout_func`` as GRPO has, so its one-turn generation (``_generate_single_turn``, over
    the prompts as TRL tokenised them with the run's template) is the rollouts' instead.
    Prompts with pictures stay with TRL's own generation."""

    class EngineGenerating(trainer_class):  # type: ignore[misc, valid-type]
        def _generate_single_turn(self, prompt_ids: Any, images: Any, multimodal_fields: Any) -> Any:
            if images is not None and any(images):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
            return rollouts.complete(prompt_ids, self)

    EngineGenerating.__name__ = EngineGenerating.__qualname__ = trainer_class.__name__
    return EngineGenerating


def off_policy(trainer_class: Any) -> Any:
    """GRPO's trainer for completions sampled by another policy than the one it trains
    (the weights of up to ``max_staleness`` steps ago): each token's loss is weighed by
    the ratio of the trained policy's probability to the sampler's, truncated or masked as
    TRL's ``vllm_importance_sampling_mode`` and ``_clip_min``/``_clip_max`` say (TRL applies
    that correction to vLLM's samples only).

    TRL computes the trained policy's log-probabilities for it in an extra forward pass
    before the loss; when generation and optimisation are aligned (one pass over each
    generation batch, the usual setting) they are the loss's own forward pass's, detached,
    so the weights are computed there: the correction costs no forward pass (measured on a
    CPU: a third of a step)."""

    class OffPolicy(trainer_class):  # type: ignore[misc, valid-type]
        _weighed: dict[str, Any] | None = None  # the batch whose loss is being computed

        def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
            if "sampling_per_token_logps" not in inputs:
                return super()._compute_loss(model, inputs)
            self._weighed, self.use_vllm = inputs, True  # TRL multiplies by the weights only for vLLM's samples
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._weighed, self.use_vllm = None, False

        def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if self._weighed is not None:  # the loss's forward pass
                inputs, self._weighed = self._weighed, None
                trained = inputs.get("old_per_token_logps", logps.detach())
                inputs["importance_sampling_ratio"] = importance_weights(self, trained, inputs)
            return logps, entropies, aux

    OffPolicy.__name__ = OffPolicy.__qualname__ = trainer_class.__name__
    return OffPolicy


def importance_weights(trainer: Any, trained: Any, inputs: Mapping[str, Any]) -> Any:
    """Each completion token's weight: the trained policy's probability over the sampler's
    (per token, or per sequence for the ``sequence_*`` modes), truncated to the clip bounds
    (``*_truncate``) or zeroed outside them (``*_mask``); tokens the sampler did not choose
    (observations, padding) weigh 1. Logged as TRL logs vLLM's."""
    import torch

    arguments = trainer.args
    mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
    difference = torch.nan_to_num((trained - inputs["sampling_per_token_logps"]) * mask, nan=0.0)
    mode = arguments.vllm_importance_sampling_mode
    ratio = (difference.sum(-1, keepdim=True) if mode.startswith("sequence") else difference).exp()
    low = arguments.vllm_importance_sampling_clip_min
    high = arguments.vllm_importance_sampling_clip_max
    if mode.endswith("truncate"):
        ratio = ratio.clamp(min=low, max=high)
    else:
        ratio = ratio.masked_fill(
            (ratio < (low if low is not None else -math.inf)) | (ratio > (high if high is not None else math.inf)), 0.0
        )
    counted = ratio.expand_as(mask)[mask.bool()]
    if counted.numel():
        metrics = trainer._metrics["train" if trainer.model.training else "eval"]
        metrics["sampling/importance_sampling_ratio/min"].append(counted.min().item())
        metrics["sampling/importance_sampling_ratio/mean"].append(counted.mean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(counted.max().item())
    return ratio


def pairs_through(trainer_class: Any, rollouts: Any) -> Any:
    """Online DPO's trainer with each prompt's two completions from an engine of the
    registry (one request with ``n`` = 2), in the padded tensors TRL's own ``_generate``
    gives: the prompts left-padded, twice over, then the first and the second completion of
    each, right-padded, their masks through the end of turn."""

    class EnginePairs(trainer_class):  # type: ignore[misc, valid-type]
        def _generate(self, model: Any, prompts: Any, images: Any = None) -> Any:
            if images is not None:
                return super()._generate(model, prompts, images)
            from modelloop.stages.rollouts import padded

            prompt_ids = [rollouts.prompt_ids(prompt) for prompt in prompts]
            pairs = rollouts.complete([ids for ids in prompt_ids for _ in range(2)], self)
            device, pad = self.accelerator.device, self._tokenizer.pad_token_id
            prompt_rows, prompt_mask = padded(prompt_ids * 2, pad, left=True)
            completion_rows, completion_mask = padded(pairs[0::2] + pairs[1::2], pad, left=False)
            return (
                prompt_rows.to(device),
                prompt_mask.to(device),
                completion_rows.to(device),
                completion_mask.to(device),
                None,
            )

    EnginePairs.__name__ = EnginePairs.__qualname__ = trainer_class.__name__
    return EnginePairs


def load_teacher(config: RLHFConfig, checked: Checked) -> Any:
    """The teacher for distillation, frozen and in eval mode, in the student's precision; a
    run with an adapter is merged into its base first."""
    from modelloop.models.loading import load_model, merged_model

    loaded = load_model(
        config.teacher,
        dtype=checked.precision.load_dtype(trains_base_weights=False),
        attn_implementation=checked.attention,
        trust_remote_code=config.trust_remote_code,
    )
    teacher = merged_model(loaded) if loaded.tuner is not None else loaded.model
    teacher.requires_grad_(False)
    return teacher.eval()


def with_pictures(record: dict[str, Any]) -> dict[str, Any]:
    """A record as TRL's vision trainers take it: the prompt's content as parts, each image
    mark an image part, and the pictures themselves (``[]`` for a record without; every
    row has the same columns)."""
    from modelloop.data.images import open_image
    from modelloop.data.media import as_content_parts

    images = record.get("images") or []
    prompt = []
    for message in as_content_parts(record["prompt"], record):
        content = message["content"]
        parts = (
            [{"type": "image"} if part["type"] == "image_url" else part for part in content]
            if isinstance(content, list)
            else [{"type": "text", "text": content}]
        )
        prompt.append({**message, "content": parts})
    return {**record, "prompt": prompt, "images": [open_image(image) for image in images]}


def reward_summary(metrics_path: Path, key: str = "reward", window: int = 5) -> dict[str, float]:
    """The mean total reward (logged as ``key``) over the first and the last ``window`` logged steps."""
    from modelloop.jsonl import read_jsonl

    logged = [record[key] for record in read_jsonl(metrics_path) if record.get(key) is not None]
    if not logged:
        return {}
    return {
        "reward_first": sum(logged[:window]) / len(logged[:window]),
        "reward": sum(logged[-window:]) / len(logged[-window:]),
    }


def reward_series(config: RLHFConfig, rewards: list[Any]) -> dict[str, str]:
    """What ``rewards.png`` shows: each reward and their weighted total for GRPO; the
    chosen-rejected margin (and accuracy) for the preference methods and reward models,
    KTO's rewards; nothing for distillation (its loss is ``loss.png``'s)."""
    if config.method == "online_dpo":
        return {"objective/scores": "mean reward", "objective/scores_margin": "chosen - rejected reward"}
    if config.method in REWARDED:
        weights = scoring_weights(config) or [1.0] * len(rewards)
        total = "weighted sum: " + " + ".join(
            f"{weight:g} x {reward.name}" for weight, reward in zip(weights, rewards, strict=True)
        )
        return {"reward": total, **{f"rewards/{r.name}/mean": r.name for r in rewards}}
    if config.method == "kto":
        return {"rewards/chosen": "desirable", "rewards/rejected": "undesirable", "rewards/margins": "margin"}
    if config.method == "rm":
        return {"margin": "chosen - rejected score", "accuracy": "accuracy"}
    if config.method == "gkd":
        return {}
    return {"rewards/margins": "chosen - rejected margin", "rewards/accuracies": "accuracy"}


def _rollouts(
    config: RLHFConfig, tokenizer: Any, chat: Any, checked: Checked, run_dir: Path, episodes: Any = None
) -> Any:
    from modelloop.inference.types import SamplingParams
    from modelloop.stages.rollouts import EngineRollouts

    sampling = SamplingParams(
        max_tokens=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        logprobs=bool(config.max_staleness),  # stale completions are weighed by them
    )
    options, trainer_threads = dict(config.rollout_options), None
    if config.max_staleness:
        options, trainer_threads = sharing_cpus(options)
    rollouts = EngineRollouts(
        get_registry(ENGINES).get(config.rollout_engine),
        tokenizer=tokenizer,
        chat=chat,
        sampling=sampling,
        base_model=str(merged_base(run_dir)) if merged_base(run_dir).is_dir() else checked.source.base,
        tuner=checked.tuner,
        sync_dir=run_dir
        / "rollout-weights"
        / (f"rank{rank()}" if checked.plan.world.size > 1 else ""),  # each rank's engine its own copy
        sync_steps=config.sync_steps,
        seed=config.seed,
        options=options,
        media=media_tokens(checked, tokenizer),
        episodes=episodes,
    )
    if config.max_staleness is None:
        return rollouts
    from modelloop.stages.async_rollouts import AsyncRollouts

    return AsyncRollouts(rollouts, max_staleness=config.max_staleness, trainer_threads=trainer_threads)


def sharing_cpus(options: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """The engine's options and the trainer's CPU threads for rollouts that overlap training
    on a machine without a GPU: half the CPUs each. Each process sizes its pool by every CPU
    otherwise, and two such pools made the overlap worthless (``bench/grpo_rollouts.py``
    on 2 cores: 0.97x the synchronous run's steps per minute, 1.47x split). Threads the
    user gave the engine (``rollout_options.threads``) are left as they are."""
    import torch

    from modelloop.threads import available_cpus

    cpus = available_cpus()
    if "threads" in options or torch.cuda.is_available() or cpus < 2:
        return options, None
    return {**options, "threads": cpus // 2}, cpus - cpus // 2
