"""Loading a model and its tokenizer through the family that claims it.

``load_model`` reads the config first (cheap), resolves the family by
``config.model_type``, then loads weights with the family's loader or the Auto classes:
safetensors only, ``trust_remote_code`` off unless asked, sdpa attention unless told
otherwise. Each way this can fail for a reason the user can fix is a one-line
``ModelloopError``.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.errors import ModelLoadError, UnknownNameError
from modelloop.log import warn_once
from modelloop.registry import MODELS, TUNERS, get_registry
from modelloop.specs import ModelFamily, Tuner

DTYPES = {
    "auto": "auto",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}

#: attention implementation -> the package it needs, if any (flex attention is torch's own).
ATTENTION = {
    "sdpa": None,
    "eager": None,
    "flex_attention": None,
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn_interface",
}

#: attention implementation -> the model class's flag saying it supports it.
SUPPORT_FLAG = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}

#: the name a run's own adapter is attached under (served as the run's model).
OWN_ADAPTER = "default"


@dataclass(frozen=True)
class ModelSource:
    """Where each part of a model comes from: a model folder, a hub id, or a run folder.

    :param base: the model whose config and family apply (for an adapter run, its base).
    :param tokenizer: where the tokenizer (and the chat template trained with) lives.
    :param adapter: an adapter folder to put on the base, or None.
    :param tuner: the tuner whose adapter that is (it attaches it), or None.
    :param parent: the run this model came from, or None.
    :param hub: where ``base`` came from when a hub id named it (``hub``, ``id`` and the
        ``revision`` resolved, as a run's manifest records it in ``base_model_hub``), or None.
    """

    base: str
    tokenizer: str
    adapter: str | None = None
    tuner: str | None = None
    parent: str | None = None
    hub: dict[str, str | None] | None = None


def resolve_model_source(name_or_path: str | Path, *, weights: bool = True) -> ModelSource:
    """A run folder resolves to its ``model/`` (and, for an adapter, the base it was trained
    on); a hub id to its folder in the hub's cache (``weights``: with the weights, else
    only what a config or tokenizer needs, see ``modelloop.models.hub.resolve``)."""
    from modelloop.artifacts import is_run, read_manifest

    if is_run(name_or_path):
        run = Path(name_or_path)
        manifest = read_manifest(run)
        model_dir = run / "model" if (run / "model").is_dir() else run  # a stage's run, or an export
        if manifest.get("status") != "completed" or not model_dir.is_dir():
            raise ModelLoadError(
                f"{run} is a run that did not finish (status {manifest.get('status')!r}): nothing to load"
            )
        parent = str(manifest.get("id", run.name))
        tuner = saved_adapter(model_dir)
        if tuner is not None:
            base, hub = manifest["base_model"], manifest.get("base_model_hub")
            if not Path(base).is_dir():  # a hub id, or a run from another machine: its base from the hub, pinned
                from modelloop.models.hub import hub_id_of

                base, resolved = _locate(hub_id_of(hub) if hub else base, needs_config=True, weights=weights)
                hub = hub or (resolved.record() if resolved else None)
            return ModelSource(
                base=base,
                tokenizer=str(model_dir),
                adapter=str(model_dir),
                tuner=tuner.name,
                parent=parent,
                hub=hub,
            )
        if not (model_dir / "config.json").is_file():
            trained_with = manifest.get("config", {}).get("tuner")
            raise ModelLoadError(
                f"{run}: {model_dir.name}/ holds neither model weights nor an adapter of an installed tuner"
                + (f" (it was trained with --tuner {trained_with}: is its plugin installed?)" if trained_with else "")
            )
        return ModelSource(base=str(model_dir), tokenizer=str(model_dir), parent=parent)
    location, hub = _locate(name_or_path, needs_config=True, weights=weights)
    return ModelSource(base=location, tokenizer=location, hub=hub.record() if hub else None)


def saved_adapter(folder: str | Path) -> Tuner | None:
    """The installed tuner whose adapter ``folder`` holds, known by its format's marker
    file; None for anything else (model weights, a tokenizer)."""
    for tuner in get_registry(TUNERS):
        if tuner.adapters is not None and (Path(folder) / tuner.adapters.marker).is_file():
            return tuner
    return None


@dataclass
class LoadedModel:
    """A model, its tokenizer, the family that claimed it, and the tuner whose adapter it
    carries (None for plain weights)."""

    model: Any
    tokenizer: Any
    family: ModelFamily
    path: str
    tuner: Tuner | None = None


def merged_model(loaded: LoadedModel) -> Any:
    """The loaded model with the adapter it carries folded into its weights by the tuner
    that made it (the model as it is when it carries none)."""
    if loaded.tuner is None:
        return loaded.model
    if loaded.tuner.merge is None:
        raise ModelLoadError(
            f"tuner {loaded.tuner.name!r} gives no merge: its adapter cannot be folded into the base model"
        )
    return loaded.tuner.merge(loaded.model)


def locate(name_or_path: str | Path, *, needs_config: bool = True, weights: bool = False) -> str:
    """A local folder (checked), or the folder in the hub's cache a hub id resolves to.

    :param needs_config: the folder must hold a model's config.json (a tokenizer-only
        folder, such as a run's adapter folder, need not).
    :param weights: a hub id's weights are needed too (else the config, tokenizer and
        other small files are enough: ``modelloop.models.hub.resolve``).
    """
    return _locate(name_or_path, needs_config=needs_config, weights=weights)[0]


def _locate(name_or_path: str | Path, *, needs_config: bool, weights: bool) -> tuple[str, Any]:
    """``locate``, and the hub id's resolution (``modelloop.models.hub.Resolved``) or None."""
    from modelloop.models.hub import HubId, resolve

    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; give the model's folder")
        if needs_config and not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: it is not a model folder")
        return str(path.resolve()), None  # absolute: run manifests must point at it from anywhere
    hub_id = HubId.parse(text)
    # ``runs/tiny`` with runs/ there is a mistyped folder, not a hub id
    if hub_id is not None and (hub_id.explicit or (not text.startswith("~") and not path.parent.is_dir())):
        resolved = resolve(hub_id, weights=weights)
        if needs_config and not (Path(resolved.folder) / "config.json").is_file():
            raise ModelLoadError(f"{hub_id}: {resolved.folder} has no config.json: it is not a transformers model")
        return resolved.folder, resolved
    raise ModelLoadError(
        f"{text}: no such model folder (and not a hub id like Qwen/Qwen2.5-0.5B or modelscope://Qwen/Qwen2.5-0.5B)"
    )


def read_config(name_or_path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The model's transformers config, with clear errors for the usual mistakes."""
    from transformers import AutoConfig

    location = locate(name_or_path)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ModelLoadError(
                f"{location} needs custom code from its repository; pass --trust-remote-code if you trust it"
            ) from None
        raise ModelLoadError(f"{location}: {error} (installed families: {', '.join(installed_families())})") from None
    except OSError as error:
        raise ModelLoadError(f"{location}: cannot read the config ({str(error).splitlines()[0]})") from None


def installed_families() -> list[str]:
    return [f"{family.name} ({', '.join(family.model_types)})" for family in get_registry(MODELS)]


def resolve_family(model_type: str) -> ModelFamily:
    """The family that claims ``model_type``, or the generic fallback with a warning."""
    models = get_registry(MODELS)
    if model_type in models:
        return models.get(model_type)
    try:
        fallback = models.get("*")
    except UnknownNameError:
        raise ModelLoadError(
            f"no installed plugin handles model type {model_type!r}; installed families: {', '.join(installed_families())}"
        ) from None
    warn_once(f"no installed plugin claims model type {model_type!r}; using the {fallback.name} family")
    return fallback


def model_class(family: ModelFamily | None, *, reward_head: bool = False) -> Any:
    """transformers' Auto class for the family's models: image-text-to-text for vision
    families, multimodal LM for those that hear, causal LM otherwise, sequence
    classification for a reward model."""
    import transformers

    if reward_head:
        return transformers.AutoModelForSequenceClassification
    if family is not None and family.audio is not None:
        return transformers.AutoModelForMultimodalLM
    if family is not None and family.vision is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_image_processor(name_or_path: str | Path) -> Any:
    """The image processor saved beside a vision-language model."""
    from transformers import AutoImageProcessor

    return _load_processor(AutoImageProcessor, name_or_path, "image processor")


def load_feature_extractor(name_or_path: str | Path) -> Any:
    """The audio feature extractor saved beside an audio-language model."""
    from transformers import AutoFeatureExtractor

    return _load_processor(AutoFeatureExtractor, name_or_path, "audio feature extractor")


def _load_processor(auto_class: Any, name_or_path: str | Path, what: str) -> Any:
    location = locate(name_or_path, needs_config=False)
    try:
        return auto_class.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{location}: cannot load the {what} ({error})") from None


#: transformers' video processor settings beside a model (a family's ``VideoSpec.options``
#: are their defaults).
VIDEO_SETTINGS = "video_preprocessor_config.json"
#: Where transformers keeps an image processor's and a feature extractor's settings.
PROCESSOR_SETTINGS = "preprocessor_config.json"


def write_processors(out: Path, *, image_processor: Any = None, feature_extractor: Any = None) -> None:
    """Save a model's image processor and audio feature extractor into ``out``. Both
    write ``preprocessor_config.json``, so a model that sees and hears keeps their
    settings merged in that one file, as Qwen2.5-Omni's release does: their keys are
    disjoint, and each Auto class reads back its own by its ``*_type`` key."""
    import json

    settings: dict[str, Any] = {}
    for processor in (image_processor, feature_extractor):
        if processor is not None:
            processor.save_pretrained(out)
            settings.update(json.loads((out / PROCESSOR_SETTINGS).read_text()))
    if image_processor is not None and feature_extractor is not None:
        (out / PROCESSOR_SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def save_processors(family: ModelFamily, folder: str | Path, out: Path) -> None:
    """Copy a multimodal model's processors (image processor, video settings, feature
    extractor) from ``folder`` into ``out``, so the next stage reads pictures, video and
    sound as this one did."""
    write_processors(
        out,
        image_processor=load_image_processor(folder) if family.vision is not None else None,
        feature_extractor=load_feature_extractor(folder) if family.audio is not None else None,
    )
    settings = Path(locate(folder, needs_config=False)) / VIDEO_SETTINGS
    if family.vision is not None and settings.is_file():
        shutil.copyfile(settings, out / VIDEO_SETTINGS)


def video_options(spec: Any, folder: str | Path) -> dict[str, Any]:
    """A vision family's video options (``VideoSpec.options``), overridden by the model's
    own ``video_preprocessor_config.json`` where it has one."""
    import json

    options = dict(spec.options)
    settings = Path(locate(folder, needs_config=False)) / VIDEO_SETTINGS
    if settings.is_file():
        saved = json.loads(settings.read_text())
        options.update({key: value for key, value in saved.items() if key in spec.options or key == "num_frames"})
    return options


def load_media_tokens(family: ModelFamily, folder: str | Path, model_config: Any, tokenizer: Any) -> Any:
    """A multimodal family's media handling (``MediaTokens``: pictures and video frames
    through the image processor, sound through the feature extractor, both saved in
    ``folder`` beside the tokenizer); None for a text family. Here, not in ``data/``: data is tokenised with
    what it is given, and loading is this module's job."""
    import functools

    from modelloop.data.audio import open_audio
    from modelloop.data.media import AUDIO, IMAGE, KindTokens, MediaTokens

    kinds = []
    shared = {"model_config": model_config, "tokenizer": tokenizer}
    if family.vision is not None:
        vision = family.vision
        image_processor = load_image_processor(folder)
        kinds.append(
            KindTokens(
                IMAGE,
                placeholder=vision.placeholder,
                token=vision.image_token,
                inputs=vision.image_inputs,
                processor=image_processor,
                opener=IMAGE.open,
                **shared,
            )
        )
        if vision.video is not None:
            kinds.append(_video_tokens(vision.video, folder, image_processor, shared))
    if family.audio is not None:
        audio = family.audio
        extractor = load_feature_extractor(folder)
        kinds.append(
            KindTokens(
                AUDIO,
                placeholder=audio.placeholder,
                token=audio.audio_token,
                inputs=audio.audio_inputs,
                processor=extractor,
                opener=functools.partial(open_audio, rate=extractor.sampling_rate),
                **shared,
            )
        )
    if not kinds:
        return None
    vision = family.vision
    return MediaTokens(
        kinds,
        token_types=vision.token_types if vision is not None else None,
        rope_index=vision.rope_index if vision is not None else None,
    )


def _video_tokens(spec: Any, folder: str | Path, image_processor: Any, shared: dict[str, Any]) -> Any:
    """A vision family's video handling: frames sampled by the model's video options and
    processed by its image processor."""
    import functools

    from modelloop.data.media import VIDEO, KindTokens
    from modelloop.data.video import open_video

    options = video_options(spec, folder)
    sampling = {
        "fps": None if options.get("num_frames") else options.get("fps"),
        "count": options.get("num_frames"),
        "min_frames": options.get("min_frames", 1),
        "max_frames": options.get("max_frames"),
        "multiple": options.get("temporal_patch_size", 1),
    }
    return KindTokens(
        VIDEO,
        placeholder=spec.placeholder,
        token=spec.video_token,
        inputs=functools.partial(spec.video_inputs, options=options),
        processor=image_processor,
        opener=functools.partial(open_video, **sampling),
        token_type=spec.token_type,
        **shared,
    )


def load_tokenizer(name_or_path: str | Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    location = locate(name_or_path, needs_config=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{location}: cannot load the tokenizer ({error})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    if DTYPES[dtype] == "auto":
        return "auto"
    import torch

    return getattr(torch, DTYPES[dtype])


def check_attention(attn_implementation: str) -> None:
    if attn_implementation not in ATTENTION:
        raise ModelLoadError(
            f"unknown attention implementation {attn_implementation!r}; use one of: auto, {', '.join(ATTENTION)}"
        )
    package = ATTENTION[attn_implementation]
    if package and importlib.util.find_spec(package) is None:
        raise ModelLoadError(f"{attn_implementation} needs the {package} package (CUDA only); use sdpa on this machine")


def choose_attention(
    requested: str,
    model_config: Any,
    family: ModelFamily | None,
    *,
    gpu: tuple[int, int] | None,
    packing: bool,
    half: bool = True,
) -> str:
    """The attention implementation a training stage loads the model with (``gpu``: the
    CUDA device's compute capability, None on a CPU; ``half``: the products are bf16 or
    fp16, as under mixed precision).

    ``auto`` takes the fastest kernel that is installed, runs on this device and the model
    supports. On a GPU computing in 16 bits: flash attention 3 (Hopper) or 2, which read
    packed rows as variable-length sequences; else, for packed rows, torch's flex attention
    with a document mask (block-sparse: no quadratic mask, no extra package); else sdpa.
    On a CPU, or in fp32, sdpa: torch's flex attention has no backward pass on a CPU and
    compiled no fp32 kernel on an H200, and flash attention computes in 16 bits only. A
    name given is checked the same way, and against what the model supports.
    """
    if requested != "auto":
        check_attention(requested)
        if requested == "flex_attention" and gpu is None:
            raise ModelLoadError(
                "flex_attention trains on CUDA GPUs only (torch has no backward pass for it on a CPU); use sdpa"
            )
        if requested in ("flex_attention", "flash_attention_2", "flash_attention_3") and not half:
            raise ModelLoadError(
                f"{requested} computes in bf16 or fp16, and this run computes in fp32: use sdpa, or dtype bf16"
            )
        if not _model_supports(model_config, family, requested):
            raise ModelLoadError(
                f"{model_config.model_type} models do not support attn_impl {requested}; "
                f"use {plain_attention(model_config, family)}"
            )
        return requested
    if gpu is None or not half:
        return plain_attention(model_config, family)
    candidates = ["flash_attention_3"] if gpu[0] >= 9 else []
    candidates += ["flash_attention_2", "flex_attention"] if packing else ["flash_attention_2"]
    for name in candidates:
        package = ATTENTION[name]
        if (package is None or importlib.util.find_spec(package) is not None) and _model_supports(
            model_config, family, name
        ):
            return name
    return plain_attention(model_config, family)


def plain_attention(model_config: Any, family: ModelFamily | None) -> str:
    """torch's sdpa, or eager attention for a model that takes no sdpa (Gemma 2's
    soft-capped attention scores), as transformers itself chooses when asked nothing."""
    return "sdpa" if _model_supports(model_config, family, "sdpa") else "eager"


def _model_supports(model_config: Any, family: ModelFamily | None, attn_implementation: str) -> bool:
    """What the transformers class of this config declares (True where it cannot be told)."""
    flag = SUPPORT_FLAG.get(attn_implementation)
    if flag is None:
        return True
    import transformers

    names = getattr(model_config, "architectures", None) or []
    found = getattr(transformers, names[0], None) if names else None
    if found is None:
        found = model_class(family)._model_mapping.get(type(model_config))
    return found is None or bool(getattr(found, flag, True))


def inference_device_map() -> dict[str, int] | None:
    """Where a model loaded to answer goes: the first GPU where there is one (a model left
    on the CPU of a GPU machine answers an order of magnitude slower), else the CPU."""
    import torch

    return {"": 0} if torch.cuda.is_available() else None


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str = "auto",
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    reward_head: bool = False,
    **model_options: Any,
) -> LoadedModel:
    """Load a causal LM and its tokenizer through the family that claims it.

    :param name_or_path: a local model folder, a hub id, or a run folder (its trained
        model: full weights, or the base with the run's adapter on it).
    :param dtype: ``auto`` (as saved), ``bf16``, ``fp16`` or ``fp32``.
    :param device_map: passed to transformers (``auto`` spreads over the GPUs).
    :param attn_implementation: ``sdpa`` (eager for a model that has none), ``eager``,
        ``flash_attention_2`` or ``_3``.
    :param trust_remote_code: run code shipped with the checkpoint (off unless asked).
    :param reward_head: load it as a reward model instead: the same body under a
        one-output sequence-classification head (transformers' own, new when the
        checkpoint has none), as ``rlhf --method rm`` trains it; text families only.
    :param model_options: more ``from_pretrained`` arguments (a tuner's quantization config,
        a parallel plan's ``distributed_config``, given as a plain mapping).
    """
    check_attention(attn_implementation)
    if isinstance(model_options.get("distributed_config"), dict):
        from transformers.distributed import DistributedConfig

        model_options["distributed_config"] = DistributedConfig(**model_options["distributed_config"])
    torch_dtype = _torch_dtype(dtype)
    source = resolve_model_source(name_or_path)
    config = read_config(source.base, trust_remote_code=trust_remote_code)
    family = resolve_family(config.model_type)
    if attn_implementation == "sdpa":  # the default: eager where the model has no sdpa
        attn_implementation = plain_attention(config, family)
    options = {
        "dtype": torch_dtype,
        "device_map": device_map,
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
        **model_options,
    }
    if reward_head:
        if family.load is not None or family.multimodal:
            raise ModelLoadError(
                f"the {family.name} family loads its models its own way or takes pictures or sound; "
                "reward models are text models under transformers' sequence-classification head"
            )
        config = copy.deepcopy(config)  # read_config's may be shared
        config.num_labels = 1
    if family.load is not None:
        model, tokenizer = family.load(source.base, config=config, **options)
    else:
        try:
            model = model_class(family, reward_head=reward_head).from_pretrained(source.base, config=config, **options)
        except OSError as error:
            raise ModelLoadError(f"{source.base}: cannot load the weights ({error})") from None
        tokenizer = None
    tuner = None
    if source.adapter is not None:
        tuner = get_registry(TUNERS).get(source.tuner)
        model = tuner.adapters.attach(model, source.adapter, name=OWN_ADAPTER)
    if tokenizer is None or source.tokenizer != source.base:
        tokenizer = load_tokenizer(source.tokenizer, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, path=str(name_or_path), tuner=tuner)
