"""``modelloop sft``, ``pt`` and ``rlhf``: one set of options, three stages.

The config is built from layers, later ones winning: the config of the run being
resumed (``--resume RUN``), ``--config FILE.yaml``, ``--set key=value``, then the flags.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

#: flag -> click type. Each flag sets the config key of its name (--max-steps: max_steps);
#: a flag left out does not touch the config. Its help is the config field's description.
#: ``MAIN_FLAGS`` are what most runs set and come first in ``--help``.
MAIN_FLAGS: dict[str, Any] = {
    "--model": str,
    "--tuner": str,
    "--max-steps": int,
    "--epochs": float,
    "--batch-size": int,
    "--lr": float,
    "--max-length": int,
}
FLAGS: dict[str, Any] = {
    "--grad-accum": int,
    "--dtype": click.Choice(["auto", "bf16", "fp16", "fp32"]),
    "--attn-impl": click.Choice(["auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"]),
    "--seed": int,
    "--logging-steps": int,
    "--save-steps": int,
    "--save-total-limit": int,
    "--eval-split": float,
    "--eval-steps": int,
    "--sampler": str,
    "--format": str,
    "--template": str,
    "--truncation": click.Choice(["truncate", "drop", "error"]),
    "--report-to": click.Choice(["none", "tensorboard", "wandb"]),
    "--output-dir": click.Path(file_okay=False, path_type=Path),
    "--nproc": int,
    "--nnodes": int,
    "--strategy": str,
    "--sequence-parallel": int,
}

#: flag -> module group whose learning rate it sets (``group_lr``).
GROUP_LR_FLAGS = {"--vision-lr": "vision", "--audio-lr": "audio", "--aligner-lr": "aligner", "--llm-lr": "llm"}

#: How the nodes of a multi-node job meet: per launch, not part of a run's config (each
#: node has its own rank). Left out, they come from SLURM's or torchrun's environment.
RENDEZVOUS = {
    "--node-rank": ("NODE_RANK", int),
    "--master-addr": ("MASTER_ADDR", str),
    "--master-port": ("MASTER_PORT", int),
}


def rendezvous_options(command: Any) -> Any:
    """Add ``--node-rank``, ``--master-addr`` and ``--master-port`` to a click command."""
    for flag, (variable, kind) in RENDEZVOUS.items():
        command = click.option(
            flag,
            type=kind,
            default=None,
            expose_value=False,
            callback=_export,
            help=f"Multi-node rendezvous (default: ${variable}).",
        )(command)
    return command


def _export(context: click.Context, parameter: click.Parameter, value: Any) -> None:
    """Put a rendezvous flag where the launcher (and torchrun's conventions) read it."""
    import os

    if value is not None:
        os.environ[RENDEZVOUS["--" + parameter.name.replace("_", "-")][0]] = str(value)


#: rlhf's own flags: the method and the knobs most runs set (the rest through --set).
RLHF_FLAGS: dict[str, Any] = {
    "--method": click.Choice(["dpo", "kto", "simpo", "orpo", "grpo", "rloo", "online_dpo", "gkd", "rm"]),
    "--beta": float,
    "--loss-type": str,
    "--num-generations": int,
    "--max-completion-length": int,
    "--temperature": float,
    "--rollout-engine": str,
    "--environment": str,
    "--max-turns": int,
    "--max-staleness": int,
    "--teacher": str,
}


def training_command(stage: str, summary: str) -> click.Command:
    def command(
        config: Path | None,
        assignments: tuple[str, ...],
        data: tuple[str, ...],
        eval_data: tuple[str, ...],
        accelerators: tuple[str, ...],
        freeze: tuple[str, ...],
        resume: str | None,
        rewards: tuple[str, ...] = (),
        reward_weights: str | None = None,
        **flags: Any,
    ) -> None:
        from modelloop.artifacts import read_manifest
        from modelloop.config import ConfigError, RLHFConfig, TrainConfig, build_config, parse_assignments, read_yaml
        from modelloop.stages.common import run_to_resume

        layers: list[dict[str, Any]] = []
        if resume is not None:  # the resumed run's own config is the first layer
            output_dir = flags.get("output_dir")
            found = run_to_resume(stage, True if resume == "latest" else resume, output_dir)
            if found is not None:
                layers.append(
                    {key: value for key, value in read_manifest(found[0])["config"].items() if key != "resume"}
                )
        if config is not None:
            layers.append(read_yaml(config))
        layers.append(parse_assignments(assignments))
        rates = {group: flags.pop(flag.lstrip("-").replace("-", "_")) for flag, group in GROUP_LR_FLAGS.items()}
        given = {name: value for name, value in flags.items() if value is not None}
        if any(rate is not None for rate in rates.values()):
            given["group_lr"] = {group: rate for group, rate in rates.items() if rate is not None}
        if freeze:
            given["freeze"] = list(freeze)
        if data:
            given["data"] = list(data)
        if eval_data:
            given["eval_data"] = list(eval_data)
        if accelerators:
            given["accelerators"] = list(accelerators)
        if resume is not None:
            given["resume"] = True if resume == "latest" else resume
        if rewards:
            given["rewards"] = list(rewards)
        if reward_weights is not None:
            try:
                given["reward_weights"] = [float(weight) for weight in reward_weights.split(",")]
            except ValueError:
                raise ConfigError(
                    f"--reward-weights {reward_weights!r}: expected numbers separated by commas"
                ) from None
        layers.append(given)
        source = str(config) if config is not None else "options"
        owns_process = bool((click.get_current_context().obj or {}).get("owns_process"))
        if stage == "rlhf":
            from modelloop.stages.rlhf import rlhf

            rlhf(build_config(RLHFConfig, *layers, source=source), owns_process=owns_process)
        else:
            from modelloop.stages.train import train

            train(stage, build_config(TrainConfig, *layers, source=source), owns_process=owns_process)

    command.__doc__ = summary
    from modelloop.config import RLHFConfig, TrainConfig

    fields = (RLHFConfig if stage == "rlhf" else TrainConfig).model_fields

    def flag(name: str, kind: Any) -> Callable[[Any], Any]:
        field = fields[name.lstrip("-").replace("-", "_")]
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        shown = f" [default: {default}]" if default not in (None, [], {}) else ""
        return click.option(name, type=kind, default=None, help=sentence(f"{field.description or ''}{shown}"))

    # In --help order: what most runs set, the method's own, then the rest.
    options: list[Callable[[Any], Any]] = [flag(name, kind) for name, kind in MAIN_FLAGS.items()]
    options.insert(1, click.option("--data", multiple=True, help="Data file (repeatable; file#0.5 samples half)."))
    if stage == "rlhf":
        options += [flag(name, kind) for name, kind in RLHF_FLAGS.items()]
        options += [
            click.option(
                "--reward",
                "rewards",
                multiple=True,
                help="GRPO reward (repeatable): a name, module:function or file.py:function; NAME=... gives it a short name for --set reward_options.NAME.* and its metrics.",
            ),
            click.option("--reward-weights", help="GRPO: one weight per --reward, comma-separated (default 1 each)."),
        ]
    options += [
        click.option("--eval-data", multiple=True, help="Evaluation data file (repeatable)."),
        click.option(
            "--resume",
            is_flag=False,
            flag_value="latest",
            default=None,
            help="Continue the latest unfinished run (or the run/checkpoint given) from its last complete checkpoint.",
        ),
        click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="YAML config file."),
        click.option("--set", "assignments", multiple=True, help="Override a config key: --set tuner_options.rank=16."),
        *(flag(name, kind) for name, kind in FLAGS.items()),
        click.option(
            "--skip-bad-records", is_flag=True, default=None, help="Train without the records that fail validation."
        ),
    ]
    if stage != "rlhf":
        options += [
            click.option("--packing/--no-packing", default=None, help="Pack examples into full rows [default: on]."),
            click.option(
                "--streaming/--no-streaming", default=None, help=sentence(fields["streaming"].description or "")
            ),
            flag("--stream-buffer", int),
        ]
    options += [
        click.option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            default=None,
            help=sentence(fields["gradient_checkpointing"].description or ""),
        ),
        click.option(
            "--freeze", multiple=True, help="Leave a module group untrained: vision, audio, aligner, llm (repeatable)."
        ),
        *(
            click.option(
                name, type=float, default=None, help=f"Learning rate of the {group} module group (default: --lr)."
            )
            for name, group in GROUP_LR_FLAGS.items()
        ),
        click.option(
            "--accelerator", "accelerators", multiple=True, help="Swap in faster kernels, e.g. liger (repeatable)."
        ),
    ]
    decorated: Any = rendezvous_options(command)  # last in --help: per launch, not per run
    for option in reversed(options):
        decorated = option(decorated)
    return click.command(stage)(decorated)


def sentence(text: str) -> str:
    """A config field's description as a help sentence: capital first, one full stop."""
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


sft_command = training_command("sft", "Supervised fine-tuning on conversations: loss on the assistant turns.")
pt_command = training_command("pt", "Pre-training or continued pre-training on raw text: loss on every token.")
rlhf_command = training_command(
    "rlhf",
    "Align a model with DPO, KTO, SimPO, ORPO (preference data), GRPO, RLOO or online DPO (prompts and rewards), distil a teacher into it (gkd), or train a reward model (rm).",
)
