"""The plugin API: the one module a ``modelloop`` plugin imports.

Everything a plugin may use is named here, under names meant to last: the ``hookimpl``
marker, every spec type, option checking, and the helpers plugins need (chat template
building blocks, architecture presets, the label that masks a token out of the loss,
answer extraction for rewards, server launch for engines, the parallel plan's types and
process-group helpers, one-line warnings, the cache folder). The rest of the kernel is
private and may change in any release; this module changes only as ``API_VERSION`` says
(docs/plugins.md, "The plugin API"). ``tests/test_plugin_api.py`` fails when a shipped
plugin imports anything else from the kernel.

Names resolve on first use, so importing this module costs nothing: a plugin that only
registers specs never imports the modules behind the helpers it does not touch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The plugin API's version: the minor number grows with each addition, the major number
#: with a removal (after one release of deprecation warnings).
API_VERSION = "1.7"

#: public name -> "module:attribute" where it lives in the kernel.
EXPORTS: dict[str, str] = {
    # The hook marker and the contract's types.
    "hookimpl": "modelloop.hooks:hookimpl",
    **{
        name: f"modelloop.specs:{name}"
        for name in (
            "Accelerator",
            "AdapterFormat",
            "AudioSpec",
            "ChatTemplate",
            "DatasetFormat",
            "Engine",
            "EngineSession",
            "Environment",
            "Episode",
            "EvalBackend",
            "Exporter",
            "ModelFamily",
            "ParallelStrategy",
            "Reward",
            "Sampler",
            "Step",
            "TokenizerRecipe",
            "ToolCall",
            "ToolCallFormat",
            "Tuner",
            "Turn",
            "VideoSpec",
            "VisionSpec",
        )
    },  # fmt: skip
    "EngineError": "modelloop.errors:EngineError",
    "ModelloopError": "modelloop.errors:ModelloopError",
    # Options: a spec's ``check`` fills defaults and refuses bad values in one line.
    "complete": "modelloop.options:complete",
    "positive": "modelloop.options:positive",
    "in_range": "modelloop.options:in_range",
    "merge": "modelloop.config:merge",
    # Model families: chat template building blocks, architecture presets, module groups.
    "IM_END": "modelloop.builtin.templates:IM_END",
    "HERMES_TOOL_CALLS": "modelloop.builtin.templates:HERMES_TOOL_CALLS",
    "chatml_source": "modelloop.builtin.templates:chatml_source",
    "content_text_macro": "modelloop.builtin.templates:content_text_macro",
    # Audio- and video-language families: the decoded clip their ``audio_inputs`` and
    # ``video_inputs`` receive.
    "Clip": "modelloop.data.audio:Clip",
    "Video": "modelloop.data.video:Video",
    "TINY": "modelloop.models.presets:TINY",
    "SMALL": "modelloop.models.presets:SMALL",
    "group_of": "modelloop.models.groups:group_of",
    # Training: the label of a token left out of the loss.
    "IGNORE": "modelloop.data.labels:IGNORE",
    # Rewards: the answer in a completion.
    "answer_text": "modelloop.rewards:answer_text",
    # Engines: what a session takes and gives, and a server process to talk to as one.
    **{
        name: f"modelloop.inference.types:{name}"
        for name in ("Completion", "Delta", "Generation", "GenerationRequest", "SamplingParams")
    },
    "start_server": "modelloop.inference.launch:start_server",
    "check_prompt_ids": "modelloop.inference.limits:check_prompt_ids",
    **{name: f"modelloop.inference.jobs:{name}" for name in ("EngineJob", "job_results", "job_deltas")},
    # Engines that render prompts themselves: the renderer training uses, over any template.
    "ChatFormat": "modelloop.chat:ChatFormat",
    # Exporters and engines that read a run's files: where its base, adapter and tokenizer
    # are, the chat format it was trained with, the run merged into a folder, and an export
    # folder written whole or not at all.
    "resolve_model_source": "modelloop.models.loading:resolve_model_source",
    "trained_chat_format": "modelloop.export:trained_chat_format",
    "save_merged": "modelloop.export:save_merged",
    "write_export": "modelloop.export:write_export",
    # Evaluation back ends: the job they run and the scores they give back.
    **{
        name: f"modelloop.benchmarks:{name}"
        for name in ("BenchmarkJob", "Endpoint", "InProcess", "TaskScores", "metric_key")
    },
    # Parallel strategies: the plan and the process group.
    "ParallelPlan": "modelloop.parallel.plan:ParallelPlan",
    "PlanRequest": "modelloop.parallel.plan:PlanRequest",
    "parallelism_environment": "modelloop.parallel.plan:parallelism_environment",
    "sequence_parallel_mesh": "modelloop.parallel.plan:sequence_parallel_mesh",
    "free_port": "modelloop.parallel.world:free_port",
    "join_process_group": "modelloop.parallel.world:join_process_group",
    # Telling the user, and keeping files.
    "warn_once": "modelloop.log:warn_once",
    "cache_home": "modelloop.paths:cache_home",
}

__all__ = ["API_VERSION", *EXPORTS]


def __getattr__(name: str) -> Any:
    """Resolve a public name from where it lives, once (PEP 562)."""
    if name not in EXPORTS:
        raise AttributeError(f"modelloop.plugin has no {name!r}: the plugin API names {', '.join(sorted(EXPORTS))}")
    module, attribute = EXPORTS[name].split(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
