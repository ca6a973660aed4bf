"""The objects plugins register: one frozen dataclass per ``register_*`` hook.

They are plain data plus callables, free of torch and every other heavy import, so
that listing plugins and resolving names costs nothing. Callables that need torch,
transformers or PEFT import them inside their own body, when a stage calls them.

Each spec validates itself in ``__post_init__``: a plugin that registers a reward whose
``score`` cannot take ``(prompts, completions, **columns)`` is told so when it
registers, not an hour into training.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import InitVar, dataclass, field, fields
from typing import Any, Literal, Protocol, runtime_checkable

from modelloop.errors import PluginError
from modelloop.inference.types import Delta, Generation, GenerationRequest


def _require_callable(spec: Spec, attribute: str, *, optional: bool = False) -> None:
    value = getattr(spec, attribute)
    if value is None and optional:
        return
    if not callable(value):
        raise PluginError(f"{type(spec).__name__} {spec.name!r}: {attribute} must be callable, got {value!r}")


def _deprecated(spec: Spec, field_name: str, value: Any) -> None:
    """Accept a field the API no longer has for one more release, and say so (the
    compatibility promise in docs/plugins.md)."""
    if value:
        warnings.warn(
            f"{type(spec).__name__} {spec.name!r}: {field_name} is deprecated and ignored; it goes in plugin API 2.0",
            DeprecationWarning,
            stacklevel=4,
        )


def _accepts_var_keywords(function: Callable[..., Any]) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@dataclass(frozen=True, kw_only=True)
class Spec:
    """Fields every registered object has.

    :param name: the name users type (``--tuner lora``); unique within its registry.
    :param description: one line shown by ``modelloop plugins``.
    :param aliases: other names that resolve to this object.
    """

    name: str
    description: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise PluginError(f"{type(self).__name__} needs a non-empty name, got {self.name!r}")
        for spec_field in fields(self):
            if "tuple[" in str(spec_field.type) and isinstance(getattr(self, spec_field.name), str):
                raise PluginError(
                    f"{type(self).__name__} {self.name!r}: {spec_field.name} must be a tuple, not a string "
                    "(a one-item tuple needs a trailing comma)"
                )

    def keys(self) -> tuple[str, ...]:
        """Every name this object is found under in its registry."""
        return tuple(dict.fromkeys((self.name, *self.aliases)))


# --------------------------------------------------------------------------- models


@dataclass(frozen=True, kw_only=True)
class ChatTemplate(Spec):
    """A chat template and the tokens around an assistant turn.

    :param source: the Jinja source, in the format of a tokenizer's ``chat_template``.
    :param end_of_turn: the text that closes an assistant turn; it is trained and it
        stops generation.
    :param options: the template's switches and their defaults (e.g.
        ``{"enable_thinking": True}``), passed to Jinja as variables; users override them.
    """

    source: str
    end_of_turn: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    tool_calls: ToolCallFormat | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.end_of_turn:
            raise PluginError(f"ChatTemplate {self.name!r}: end_of_turn must name at least one token")
        if self.tool_calls is not None and not isinstance(self.tool_calls, ToolCallFormat):
            raise PluginError(f"ChatTemplate {self.name!r}: tool_calls must be a ToolCallFormat")


@dataclass(frozen=True)
class ToolCall:
    """A tool call read back from the model's turn.

    :param name: the tool's name as the model wrote it.
    :param arguments: the arguments, decoded from JSON; None when they did not decode
        (``error`` says why), so that an environment can answer the model's mistake.
    """

    name: str
    arguments: Mapping[str, Any] | None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class ToolCallFormat:
    """How a chat template writes a tool call, to read calls back from generated text.

    One regular expression (matched with ``re.DOTALL``) finds each call. Its named groups
    are ``name`` and ``arguments`` (a JSON object), or ``call``: one JSON object holding
    both, under ``name_key`` and ``arguments_key`` (Hermes' ``{"name": ..., "arguments":
    ...}``, Llama 3's ``"parameters"``). The conformance checks hold each template's format
    to what the template itself renders (since API 1.6).
    """

    pattern: str
    name_key: str = "name"
    arguments_key: str = "arguments"

    def __post_init__(self) -> None:
        import re

        try:
            groups = set(re.compile(self.pattern, re.DOTALL).groupindex)
        except re.error as error:
            raise PluginError(f"ToolCallFormat {self.pattern!r}: not a regular expression: {error}") from None
        if not ({"name", "arguments"} <= groups or "call" in groups):
            raise PluginError(
                f"ToolCallFormat {self.pattern!r}: needs the named groups 'name' and 'arguments', or 'call'"
            )

    def parse(self, text: str) -> tuple[ToolCall, ...]:
        """Every call in ``text``, in order; none for a turn that calls no tool."""
        import json
        import re

        calls = []
        for found in re.finditer(self.pattern, text, re.DOTALL):
            groups = found.groupdict()
            try:
                if groups.get("call") is not None:
                    whole = json.loads(groups["call"])
                    if not isinstance(whole, dict) or not isinstance(whole.get(self.name_key), str):
                        calls.append(ToolCall("", None, f"no {self.name_key!r} in the call {groups['call']!r}"))
                        continue
                    name, arguments = whole[self.name_key], whole.get(self.arguments_key, {})
                else:
                    name, arguments = groups["name"].strip(), json.loads(groups["arguments"] or "{}")
            except json.JSONDecodeError as error:
                calls.append(ToolCall(groups.get("name") or "", None, f"the call is not JSON: {error}"))
                continue
            if isinstance(arguments, str):  # some formats write the arguments as a JSON string
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass
            if not isinstance(arguments, dict):
                calls.append(ToolCall(name, None, f"the arguments are not a JSON object: {arguments!r}"))
            else:
                calls.append(ToolCall(name, arguments))
        return tuple(calls)


@dataclass(frozen=True, kw_only=True)
class TokenizerRecipe:
    """How ``modelloop new-model`` trains a small tokenizer that behaves like the family's own.

    The pre-tokenizer must be the family's: transformers may rebuild a known family's
    tokenizer from its own class (Qwen2Tokenizer re-applies NFC and Qwen's regex), and a
    BPE trained with another pre-tokenizer would then encode differently than its
    tokenizer.json says.

    :param split_regex: the pre-tokenizer's split pattern (isolated), before byte-level.
    :param nfc: apply NFC normalisation first.
    :param special_tokens: added first, in this order, so their ids are stable.
    :param eos_token: ends a sequence (and, for chat models, usually an assistant turn).
    :param pad_token: padding; None means "same as eos".
    :param bos_token: prepended by the chat template, or None.
    :param named_tokens: attribute name -> one of ``special_tokens``, saved as the
        tokenizer's named extra special tokens (Gemma 3's ``image_token``, ``boi_token``),
        which the family's processor reads from the tokenizer (``tokenizer.image_token``)
        as it does from the released tokenizer's config.
    """

    split_regex: str
    nfc: bool
    special_tokens: tuple[str, ...]
    eos_token: str
    pad_token: str | None = None
    bos_token: str | None = None
    named_tokens: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [token for token in self.named_tokens.values() if token not in self.special_tokens]
        if unknown:
            raise PluginError(f"TokenizerRecipe: named token {unknown[0]!r} is not one of its special_tokens")


@dataclass(frozen=True, kw_only=True)
class VideoSpec:
    """What a vision family adds for video: how a clip's frames enter the text and the
    model (through the family's image processor, frame by frame).

    Data and chat requests mark a video's place with ``<video>``; the family's
    ``placeholder`` replaces it in the rendered chat, and its ``video_token`` there stands
    for the clip's features.

    :param placeholder: the chat text for one video (``<|vision_start|><|video_pad|><|vision_end|>``).
    :param video_token: the token that stands for a video's features (``<|video_pad|>``).
    :param video_inputs: ``video_inputs(image_processor, videos, model_config, options) ->
        (model inputs, expansions)``: the inputs of a list of videos (each a ``Video``: its
        sampled frames and their times) and, for each, how many times its token is
        repeated, or the text that replaces the token (Qwen3-VL writes each frame's time).
    :param options: the defaults of how frames are sampled and sized: ``fps`` (frames a
        second of video) or ``num_frames`` (a count), ``min_frames``, ``max_frames``,
        ``temporal_patch_size`` (frames come in multiples of it), ``size`` (a frame's pixel
        budget, as the image processor's). A model folder's ``video_preprocessor_config.json``
        (transformers' video processor settings) overrides them.
    :param token_type: the value of its tokens in the family's ``token_types`` input
        (Qwen-VL: 2).
    """

    placeholder: str
    video_token: str
    video_inputs: Callable[..., tuple[Mapping[str, Any], list[Any]]]
    options: Mapping[str, Any] = field(default_factory=dict)
    token_type: int = 2


@dataclass(frozen=True, kw_only=True)
class VisionSpec:
    """What a vision-language family adds to a text family: how an image enters the
    text and the model.

    Data and chat requests mark an image's place with ``IMAGE_MARK`` (``<image>``); the
    family's ``placeholder`` replaces it in the rendered chat, and its ``image_token``
    there is repeated once per image feature, as the model's processor would.

    :param placeholder: the chat text for one image (``<|vision_start|><|image_pad|><|vision_end|>``).
    :param image_token: the token repeated per image feature (``<|image_pad|>``).
    :param image_inputs: ``image_inputs(image_processor, images, model_config) ->
        (model inputs, tokens per image)``: the pixel tensors for a list of PIL images and
        how many image tokens each one takes.
    :param token_types: the model input that marks image tokens with 1 (Qwen-VL's
        ``mm_token_type_ids``), or None.
    :param config_tokens: config field -> token, filled with the token's id by
        ``new-model`` (``image_token_id``: ``<|image_pad|>``).
    :param image_processor: ``image_processor(**options) -> image processor``, for
        ``new-model`` presets (their ``image_processor`` field holds the options).
    :param rope_index: ``rope_index(model, input_ids, token_types, image_inputs) ->
        position ids`` for models whose positions are not 0..n-1 (Qwen-VL's multimodal
        rotary positions), so that packed examples can each start at 0; None otherwise.
    :param processor: ``processor(tokenizer, image_processor, model_config) -> transformers
        processor`` (its chat template the tokenizer's), for trainers that take one (TRL's
        DPO on pictures); None when the family has none.
    :param video: what the family adds for video (``VideoSpec``); None when it takes none.
    """

    placeholder: str
    image_token: str
    image_inputs: Callable[..., tuple[Mapping[str, Any], list[int]]]
    token_types: str | None = None
    config_tokens: Mapping[str, str] = field(default_factory=dict)
    image_processor: Callable[..., Any] | None = None
    rope_index: Callable[..., Any] | None = None
    processor: Callable[..., Any] | None = None
    video: VideoSpec | None = None


@dataclass(frozen=True, kw_only=True)
class AudioSpec:
    """What an audio-language family adds to a text family: how a sound clip enters the
    text and the model.

    Data and chat requests mark a clip's place with ``<audio>``; the family's
    ``placeholder`` replaces it in the rendered chat, and its ``audio_token`` there is
    repeated once per audio feature, as the model's processor would.

    :param placeholder: the chat text for one clip (``<|audio_bos|><|AUDIO|><|audio_eos|>``).
    :param audio_token: the token repeated per audio feature (``<|AUDIO|>``).
    :param audio_inputs: ``audio_inputs(feature_extractor, clips, model_config) ->
        (model inputs, tokens per clip)``: the features of a list of clips (each a
        ``Clip``: mono float samples at the feature extractor's ``sampling_rate``) and how
        many audio tokens each takes. It raises ValueError for a clip the model cannot
        hear whole (longer than its window).
    :param config_tokens: config field -> token, filled with the token's id by
        ``new-model`` (``audio_token_id``: ``<|AUDIO|>``).
    :param feature_extractor: ``feature_extractor(**options) -> feature extractor``, for
        ``new-model`` presets (their ``feature_extractor`` field holds the options); saved
        beside the weights and loaded with ``AutoFeatureExtractor``.
    """

    placeholder: str
    audio_token: str
    audio_inputs: Callable[..., tuple[Mapping[str, Any], list[int]]]
    config_tokens: Mapping[str, str] = field(default_factory=dict)
    feature_extractor: Callable[..., Any] | None = None


@dataclass(frozen=True, kw_only=True)
class ModelFamily(Spec):
    """A model family: which checkpoints it claims and what the stages need to know.

    :param model_types: the ``config.model_type`` values it claims (``qwen2``, ``llama``);
        ``("*",)`` claims every type no other family claims (the built-in fallback).
    :param template: name of the ChatTemplate for models whose tokenizer has none; None
        means "the tokenizer's own chat_template only".
    :param lora_targets: module-name suffixes LoRA targets by default (all linear
        projections of attention and MLP); empty means every linear layer.
    :param lora_target_parameters: parameter names LoRA targets directly, for fused MoE
        experts that are parameters rather than modules (``mlp.experts.gate_up_proj``).
    :param module_groups: group name -> module-name prefixes (``vision_tower``,
        ``aligner``, ``language_model``), for freezing and per-group learning rates.
    :param tp_plan: module pattern -> tensor-parallel style; None means "use the plan
        in the transformers config" (``base_model_tp_plan``).
    :param presets: preset name -> config fields for ``modelloop new-model`` (including
        ``model_type``); ``tokenizer_vocab`` there sets the size of the trained tokenizer.
    :param tokenizer: how ``new-model`` trains this family's tokenizer.
    :param load: ``load(path, **options) -> (model, tokenizer)`` for families that need
        more than the Auto classes; None means the kernel's default loader.
    :param vision: what a vision-language family adds (``VisionSpec``); None for text
        families. Its models load as image-text-to-text models.
    :param audio: what an audio-language family adds (``AudioSpec``); None for families
        that hear nothing. Its models load as multimodal language models.
    """

    model_types: tuple[str, ...]
    template: str | None = None
    lora_targets: tuple[str, ...] = ()
    lora_target_parameters: tuple[str, ...] = ()
    module_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tp_plan: Mapping[str, str] | None = None
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tokenizer: TokenizerRecipe | None = None
    load: Callable[..., tuple[Any, Any]] | None = None
    vision: VisionSpec | None = None
    audio: AudioSpec | None = None
    moe_experts: InitVar[tuple[str, ...]] = ()  # deprecated in API 1.1: nothing read it

    def __post_init__(self, moe_experts: tuple[str, ...]) -> None:
        super().__post_init__()
        _deprecated(self, "moe_experts", moe_experts)
        if not self.model_types or isinstance(self.model_types, str):
            raise PluginError(f"ModelFamily {self.name!r}: model_types must be a non-empty tuple")
        for preset, preset_fields in self.presets.items():
            if "model_type" not in preset_fields:
                raise PluginError(f"ModelFamily {self.name!r}: preset {preset!r} must set model_type")
        _require_callable(self, "load", optional=True)

    def keys(self) -> tuple[str, ...]:
        """A family is found by its name, its aliases and every model_type it claims."""
        return tuple(dict.fromkeys((*super().keys(), *self.model_types)))

    @property
    def multimodal(self) -> bool:
        """Whether its models take anything but text (pictures, sound)."""
        return self.vision is not None or self.audio is not None


# --------------------------------------------------------------------------- data

DatasetKind = Literal["conversation", "preference", "kto", "prompt", "text"]


@dataclass(frozen=True, kw_only=True)
class DatasetFormat(Spec):
    """A record format and how it becomes modelloop's canonical record.

    :param kind: what the canonical record is: a ``conversation`` (messages), a
        ``preference`` pair, a ``kto`` example, a GRPO ``prompt`` or raw ``text``.
    :param columns: the fields a record must have; used to auto-detect the format and
        to name the missing one in errors.
    :param convert: ``convert(record) -> canonical record``; raises ValueError with a
        readable reason for a bad record.
    :param detect: ``detect(record) -> bool`` when the columns alone cannot tell
        this format from another; None means "all columns present".
    """

    kind: DatasetKind
    columns: tuple[str, ...]
    convert: Callable[[Mapping[str, Any]], Any]
    detect: Callable[[Mapping[str, Any]], bool] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_callable(self, "convert")
        _require_callable(self, "detect", optional=True)

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether a record looks like this format."""
        if self.detect is not None:
            return bool(self.detect(record))
        return all(column in record for column in self.columns)


@dataclass(frozen=True, kw_only=True)
class Sampler(Spec):
    """The order in which examples are drawn.

    :param order: ``order(lengths, *, batch_size, seed) -> iterator of indices`` over one
        epoch (which may visit some examples more than once); ``lengths`` are token
        counts, so a sampler can group by length. An ``order`` that takes ``modalities``
        also gets each example's (``image`` or ``text``). Its other keyword-only
        parameters with defaults are its options (``sampler_options``).
    """

    order: Callable[..., Iterator[int]]

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_callable(self, "order")

    @property
    def option_names(self) -> tuple[str, ...]:
        parameters = inspect.signature(self.order).parameters.values()
        return tuple(
            parameter.name
            for parameter in parameters
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
            and parameter.default is not inspect.Parameter.empty
            and parameter.name not in ("batch_size", "seed")
        )

    @property
    def reads_modalities(self) -> bool:
        return "modalities" in inspect.signature(self.order).parameters


# --------------------------------------------------------------------------- training


@dataclass(frozen=True, kw_only=True)
class AdapterFormat:
    """How a tuner's saved adapters are recognised, attached to their base model and
    served, so that the kernel loads, serves and merges adapters without knowing the
    library that made them (PEFT's tuners own PEFT).

    :param marker: a file every adapter folder of this format holds
        (``adapter_config.json``): a bare folder (``serve --adapter``) is recognised by it.
    :param attach: ``attach(model, directory, *, name) -> model``: add the adapter saved
        in ``directory`` to a base model, or to one already carrying adapters, under ``name``.
    :param use: ``use(model, name) -> context manager`` within which the model computes as
        adapter ``name``, or as its base alone when ``name`` is None.
    :param detach: ``detach(model, name) -> model``: remove adapter ``name``; without
        adapters left, the base model alone.
    """

    marker: str
    attach: Callable[..., Any]
    use: Callable[..., Any]
    detach: Callable[..., Any]

    def __post_init__(self) -> None:
        for attribute in ("attach", "use", "detach"):
            if not callable(getattr(self, attribute)):
                raise PluginError(f"AdapterFormat {self.marker!r}: {attribute} must be callable")


@dataclass(frozen=True, kw_only=True)
class Tuner(Spec):
    """How a model's parameters are trained.

    :param prepare: ``prepare(model, options, family) -> model``: freeze, wrap with
        adapters.
    :param check: ``check(options) -> options``: validate and complete the user's
        options (raising ValueError with the reason) before anything is loaded.
    :param load_options: ``load_options(options) -> dict`` of extra ``from_pretrained``
        arguments, e.g. a 4-bit ``quantization_config``; None means none.
    :param parameter_groups: ``parameter_groups(model, options, family) -> list of optimizer
        groups`` (dicts with ``params`` and optionally ``lr`` (absolute), ``lr_scale``
        (times the configured rate) and optimizer-specific keys); None means one group of
        every trainable parameter. The kernel keeps each group's rate and takes weight
        decay off biases and norms.
    :param optimizer: ``optimizer(groups, lr=, weight_decay=, betas=, eps=) -> torch
        optimizer``; None means AdamW.
    :param save: ``save(model, directory)``; None means ``model.save_pretrained``.
    :param merge: ``merge(model) -> model`` folding the attached adapters into the base;
        None if the tuner has nothing to merge.
    :param adapter: whether ``save`` writes an adapter that needs the base model to load.
    :param adapters: how its saved adapters are attached and served (``AdapterFormat``);
        an adapter tuner without one saves adapters that modelloop cannot load.
    :param trains_all_weights: whether every weight of the model is trained, as by
        ``full`` and GaLore: strategies that split or rebuild the layers themselves (tensor
        parallelism, megatron-core) train only such tuners.
    :param requires: import names the tuner needs (``peft``, ``bitsandbytes``): checked
        before a model is loaded, so a missing library fails in the first second.
    """

    prepare: Callable[..., Any]
    check: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    load_options: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    parameter_groups: Callable[..., list[dict[str, Any]]] | None = None
    optimizer: Callable[..., Any] | None = None
    save: Callable[..., None] | None = None
    merge: Callable[..., Any] | None = None
    adapter: bool = False
    adapters: AdapterFormat | None = None
    trains_all_weights: bool = False
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_callable(self, "prepare")
        for attribute in ("check", "load_options", "parameter_groups", "optimizer", "save", "merge"):
            _require_callable(self, attribute, optional=True)
        if self.adapter and self.trains_all_weights:
            raise PluginError(f"Tuner {self.name!r}: a tuner that saves an adapter does not train all weights")
        if self.adapters is not None and not self.adapter:
            raise PluginError(f"Tuner {self.name!r}: adapters describes saved adapters, and adapter is False")


@dataclass(frozen=True, kw_only=True)
class Accelerator(Spec):
    """Faster kernels swapped into a loaded model (Liger, fused attention, ...).

    :param apply: ``apply(model, family) -> model``, called after loading and before
        the tuner prepares the model.
    :param model_types: the ``config.model_type`` values it supports.
    :param requires: import names it needs, checked before anything loads.
    :param needs_cuda: refuse to run, with a clear message, on a machine without a GPU.
    :param linear_cross_entropy: a fused output projection and cross-entropy,
        ``(hidden (rows, hidden size), weight (vocabulary, hidden size), bias or None,
        labels (rows)) -> the summed loss`` (differentiable), used by sft and pt in place
        of the built-in chunked one (``modelloop.models.output_loss``); None if it has none.
    """

    apply: Callable[..., Any]
    model_types: tuple[str, ...]
    requires: tuple[str, ...] = ()
    needs_cuda: bool = False
    linear_cross_entropy: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_callable(self, "apply")


@dataclass(frozen=True, kw_only=True)
class ParallelStrategy(Spec):
    """A way to spread training over processes (``--strategy``).

    :param plan: ``plan(request) -> ParallelPlan`` (``modelloop.parallel.plan``): cheap,
        no weights loaded; the launcher and ``modelloop plan`` call it before any worker
        starts. It raises ValueError for ``strategy_options`` it cannot take or a model
        it cannot spread.
    :param apply: ``apply(model, plan) -> model`` in every worker, after the tuner has
        prepared the model and before the trainer wraps it, for strategies that wrap the
        model themselves; None when the plan's trainer arguments say it all.
    :param train: ``train(job) -> metrics`` for strategies that bring their own training
        loop instead of transformers' Trainer (megatron-core): it gets a
        ``modelloop.training.TrainingJob`` (the data, the plan, the base weights' folder)
        in every worker, and writes the trained weights to ``job.run_dir / "model"`` as a
        transformers folder. ``sft`` and ``pt`` only.
    :param min_world_size: the fewest processes it makes sense on.
    :param requires: import names it needs (``deepspeed``), checked before anything starts.
    :param needs_cuda: whether it runs on CUDA GPUs only (NCCL-only engines, megatron-core).
    """

    plan: Callable[..., Any]
    apply: Callable[..., Any] | None = None
    train: Callable[..., Any] | None = None
    min_world_size: int = 1
    requires: tuple[str, ...] = ()
    needs_cuda: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_callable(self, "plan")
        _require_callable(self, "apply", optional=True)
        _require_callable(self, "train", optional=True)


@dataclass(frozen=True, kw_only=True)
class Reward(Spec):
    """A reward function or reward model; rewards double as evaluation metrics.

    :param score: ``score(prompts, completions, **columns) -> list of floats``, one
        per completion. ``columns`` carries the dataset's extra fields (``solution``).
    :param columns: dataset fields the reward needs; recipes check them up front.
    :param needs_model: whether scoring loads a model (a reward model), so that a run
        can tell the cheap rewards from the ones that take memory and time.

    ``score``'s keyword-only parameters with defaults are the reward's options, set per
    run (``reward_options``); ``score`` may be ``async``.
    """

    score: Callable[..., Sequence[float]]
    columns: tuple[str, ...] = ()
    needs_model: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_callable(self, "score")
        try:
            inspect.signature(self.score).bind("prompts", "completions")
        except TypeError:
            raise PluginError(f"Reward {self.name!r}: score must accept (prompts, completions, **columns)") from None
        if not _accepts_var_keywords(self.score):
            raise PluginError(f"Reward {self.name!r}: score must accept **columns (extra dataset fields)")


@dataclass(frozen=True)
class Turn:
    """The model's turn in an episode, as its environment sees it.

    :param text: what the model wrote, without special tokens and its end of turn.
    :param tool_calls: the tool calls in it, read with the chat template's ``ToolCallFormat``.
    :param finished: whether the model ended the turn itself (False: cut at the length
        limit; the episode still goes on unless the step says done).
    :param number: the turn's number in its episode, from 1.
    """

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    finished: bool = True
    number: int = 1


@dataclass(frozen=True)
class Step:
    """What an environment answers to one of the model's turns.

    :param observation: the messages the model reads next: tool results
        (``{"role": "tool", "content": ...}``) or a user turn; unused when ``done``.
    :param reward: this turn's reward; an episode's reward is the sum of its turns'.
    :param done: whether the episode ends with this turn.
    """

    observation: tuple[Mapping[str, Any], ...] = ()
    reward: float = 0.0
    done: bool = False


@runtime_checkable
class Episode(Protocol):
    """One episode of an environment, started from a data record."""

    def step(self, turn: Turn) -> Step:
        """Take the model's turn; say what it sees next, its reward and whether it is over."""


@dataclass(frozen=True, kw_only=True)
class Environment(Spec):
    """A world the model acts in over several turns, with tools: GRPO's ``--environment``.

    :param start: ``start(record, **options) -> Episode``: an episode from a data record
        (its ``prompt`` and other columns). ``start``'s keyword-only parameters with
        defaults are the environment's options (``environment_options``).
    :param tools: the tools offered to the model, as OpenAI function schemas; the chat
        template renders them into the prompt, and the model's calls come back parsed in
        ``Turn.tool_calls``.
    :param columns: data fields ``start`` reads; checked in every record before any model loads.
    :param max_turns: the model's turns per episode at most (a run's ``max_turns`` overrides it).

    Since API 1.6.
    """

    start: Callable[..., Episode]
    tools: tuple[Mapping[str, Any], ...] = ()
    columns: tuple[str, ...] = ()
    max_turns: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_callable(self, "start")
        try:
            inspect.signature(self.start).bind("record")
        except TypeError:
            raise PluginError(f"Environment {self.name!r}: start must accept (record, **options)") from None
        if not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise PluginError(f"Environment {self.name!r}: max_turns must be a whole number of 1 or more")


# --------------------------------------------------------------------------- export and serving


@dataclass(frozen=True, kw_only=True)
class Exporter(Spec):
    """Turns a run's weights into a deployable form.

    :param export: ``export(source_dir, out_dir, **options) -> out_dir``.
    :param engines: engine names that can load what it writes.
    :param requires: import names it needs, checked before any work starts.
    :param options: the option names ``export`` reads (``--export-option KEY=VALUE``, a
        recipe's ``options``); any other is refused before any work starts, where it would
        do nothing. None leaves them unchecked (since API 1.5).
    """

    export: Callable[..., Any]
    engines: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    options: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_callable(self, "export")


@runtime_checkable
class EngineSession(Protocol):
    """A started engine, whatever runs behind it (in-process, or a server over HTTP).

    Requests and results are the torch-free types of ``modelloop.inference.types``.
    """

    @property
    def models(self) -> list[str]:
        """The served model names: the base model, then each adapter."""

    context_length: int

    def check(self, request: GenerationRequest) -> int:
        """The prompt's length in tokens; raise ``EngineError`` for a request that cannot
        be served (unknown model, prompt plus max_tokens beyond the context)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Generate for chat (``messages``) or text (``prompt``) requests, one result each."""

    def stream(self, request: GenerationRequest) -> Iterable[Delta]:
        """Yield one request's text as it is generated, then each choice's finish reason."""

    def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter as model ``name``."""

    def unload_adapter(self, name: str) -> None:
        """Stop serving the adapter ``name`` and free it."""

    def close(self) -> None:
        """Stop the engine and free what it holds."""


@dataclass(frozen=True, kw_only=True)
class Engine(Spec):
    """An inference engine behind one protocol.

    :param start: ``start(model_path, *, adapters, options) -> EngineSession``;
        ``adapters`` maps served names to LoRA adapter folders.
    :param attach: ``attach(model, tokenizer, chat, *, options) -> EngineSession`` over a
        model already in this process, for engines that can (GRPO generates with the
        policy being trained this way, with no weights to hand over); None otherwise.
    :param check_export: ``check_export(config, exporter, chat_template) -> reason or None``:
        why the engine cannot load an export (``config``: the model's config.json as it
        will be written, ``quantization_config`` included; ``exporter``: the exporter's
        name; ``chat_template``: whether the tokenizer carries one), asked by ``export
        --for`` before anything is written; None when ``Exporter.engines`` says it all.
    :param preference: ``preference() -> int or None``: how ``--engine auto`` ranks the
        engine on this machine, higher first (the built-in ``hf`` is 0); None, or no
        callable, leaves it out. For engines that start in this process with nothing set
        up (since API 1.5).
    """

    start: Callable[..., EngineSession]
    attach: Callable[..., EngineSession] | None = None
    check_export: Callable[..., str | None] | None = None
    preference: Callable[[], int | None] | None = None
    runtime_lora: InitVar[bool] = False  # deprecated in API 1.1: nothing read it

    def __post_init__(self, runtime_lora: bool) -> None:
        super().__post_init__()
        _deprecated(self, "runtime_lora", runtime_lora)
        _require_callable(self, "start")
        _require_callable(self, "attach", optional=True)
        _require_callable(self, "check_export", optional=True)
        _require_callable(self, "preference", optional=True)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, kw_only=True)
class EvalBackend(Spec):
    """A benchmark harness (``modelloop eval --benchmark``): standard tasks, their own metrics.

    :param evaluate: ``evaluate(job) -> list of TaskScores`` (``modelloop.benchmarks``): run
        ``job.tasks`` against ``job.target``, keeping per-example answers under
        ``job.output_dir``. A task that cannot run here (its data needs the network, an
        unknown name) raises ``ModelloopError`` in one line, naming the task.
    :param check: ``check(options) -> options``: fill defaults and refuse a bad option
        (ValueError) before any model loads.
    :param in_process: whether it can take a model loaded in this process; when False the
        kernel serves the model over the OpenAI API (the ``hf`` engine) and hands it an
        ``Endpoint``, so a harness that lives in its own Python environment still runs.
    :param requires: import names it needs in this environment, checked before any work.
    """

    evaluate: Callable[..., Sequence[Any]]
    check: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    in_process: bool = True
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_callable(self, "evaluate")
        _require_callable(self, "check", optional=True)
