"""LoRA, DoRA, QLoRA and LongLoRA through PEFT.

Nothing heavy at import: PEFT (which imports bitsandbytes when it is installed) is
imported when a model is prepared.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from modelloop.plugin import AdapterFormat, Tuner, complete, hookimpl, in_range, positive

PLUGIN_API = ">=1.7,<2"  # the versions of modelloop.plugin this plugin is written against

DEFAULTS = {
    "rank": 8,
    "alpha": 32,
    "dropout": 0.05,
    "targets": "default",
    "modules_to_save": [],
    "loraplus_lr_ratio": None,
    "vision_lora": False,
    "audio_lora": False,
}

#: The options that put adapters on a tower, and the module group of that tower.
TOWER_OPTIONS = {"vision_lora": "vision", "audio_lora": "audio"}


def check(options: Mapping[str, Any], *, quantized: bool = False) -> dict[str, Any]:
    options = complete(options, {**DEFAULTS, **({"bits": 4} if quantized else {})})
    positive(options, "rank")
    positive(options, "alpha", float)
    in_range(options, "dropout", 0.0, 1.0)
    if options["loraplus_lr_ratio"] is not None:
        positive(options, "loraplus_lr_ratio", float)
    if quantized and options["bits"] not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {options['bits']!r}")
    targets = options["targets"]
    if not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError("targets must be 'default', 'all-linear' or a list of module names")
    return options


def check_quantized(options: Mapping[str, Any]) -> dict[str, Any]:
    return check(options, quantized=True)


def quantization(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that load the base model in 4 or 8 bits."""
    import torch
    from transformers import BitsAndBytesConfig

    if options["bits"] == 8:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    }


def multimodal_family_targets(model: Any, family: Any, *, towers: Sequence[str] = ()) -> list[str]:
    """A multimodal model's LoRA targets by full name: the family's projections in the
    language model (a vision or audio tower may reuse their names, as Qwen2.5-VL's MLP and
    Qwen2-Audio's attention do), and every linear layer of each tower named in ``towers``
    (``vision``, ``audio``; never the aligner)."""
    import torch

    from modelloop.plugin import group_of

    suffixes = tuple("." + target for target in family.lora_targets)
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        group = group_of(name, family.module_groups)
        if (group == "llm" and (not suffixes or name.endswith(suffixes))) or group in towers:
            targets.append(name)
    return targets


def lora_config(options: Mapping[str, Any], family: Any, *, dora: bool, model: Any = None) -> Any:
    from peft import LoraConfig

    targets: Any = options["targets"]
    parameters: list[str] = []
    towers = [group for option, group in TOWER_OPTIONS.items() if options[option]]
    for option, group in TOWER_OPTIONS.items():
        if not options[option]:
            continue
        if family is None or group not in family.module_groups:
            raise ValueError(
                f"{option} puts adapters on {'an' if group == 'audio' else 'a'} {group} tower, and this model has none"
            )
        if targets != "default":
            raise ValueError(
                f"{option} chooses the targets itself: leave targets at default, or list the {group} layers in targets"
            )
    if targets == "default" and family is not None and family.multimodal and model is not None:
        targets = multimodal_family_targets(model, family, towers=towers)
    elif targets == "default":
        targets = list(family.lora_targets) if family is not None and family.lora_targets else "all-linear"
        parameters = list(family.lora_target_parameters) if family is not None else []
        if parameters and options["dropout"] > 0:
            raise ValueError(
                f"LoRA on fused MoE expert weights ({', '.join(parameters)}) needs dropout 0 in PEFT: "
                "set tuner_options.dropout=0, or list targets to leave the experts out"
            )
    return LoraConfig(
        r=options["rank"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=targets,
        target_parameters=parameters or None,
        modules_to_save=list(options["modules_to_save"]) or None,
        use_dora=dora,
        # a reward model's head (``score``) is new: PEFT trains and saves it whole
        task_type="SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM",
    )


def prepare(model: Any, options: Mapping[str, Any], family: Any, *, dora: bool = False) -> Any:
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(options, family, dora=dora, model=model))
    if options["dropout"] > 0 and not _trains_on_gpu():
        _use_fast_dropout(model)
    return model


def _trains_on_gpu() -> bool:
    """Where the stage will train, whatever device the weights are on while the tuner
    prepares them (the stage loads them on the CPU; the trainer moves them): on a GPU
    torch's own dropout is one fused kernel, cheaper than drawing 16-bit masks."""
    import torch

    return torch.cuda.is_available()


def _use_fast_dropout(model: Any) -> None:
    """Swap PEFT's LoRA dropout for one that costs a third as much on a CPU.

    torch's CPU dropout draws one 32-bit random number per element, and on a small
    model it takes a fifth of a LoRA training step. Drawing 16-bit numbers (two per
    32-bit draw) keeps each element with probability 1 - p up to 1/65536. Under
    reentrant activation checkpointing (the stage enables it before the tuner prepares
    the model) each layer runs twice: once under ``no_grad``, then again in the backward
    pass from the restored RNG state, which would draw the same mask a second time; the
    mask of the first pass is kept and reused instead.
    """
    import torch

    fast_dropout = fast_dropout_class()
    checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
    for module in list(model.modules()):
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    dropouts[name] = fast_dropout(dropout.p, reuse_checkpointed_mask=checkpointing)


@functools.cache
def fast_dropout_class() -> type:
    """The module class, built on first use so that importing this plugin imports no torch."""
    import torch

    class FastDropout(torch.nn.Dropout):
        """Dropout with a mask drawn as 16-bit integers (see ``_use_fast_dropout``). A
        ``torch.nn.Dropout`` still, so that what turns dropout off finds it: TRL's DPO and
        KTO set every dropout's ``p`` to 0 (``disable_dropout``, their default)."""

        def __init__(self, p: float, *, reuse_checkpointed_mask: bool = False) -> None:
            super().__init__(p)
            self.reuse_checkpointed_mask = reuse_checkpointed_mask
            self._checkpointed_mask: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.p == 0:
                return x
            keep = self._checkpointed_mask
            self._checkpointed_mask = None
            if keep is None or keep.shape != x.shape or not torch.is_grad_enabled():
                keep = self._draw(x)
            if self.reuse_checkpointed_mask and not torch.is_grad_enabled():
                self._checkpointed_mask = keep  # the recompute in the backward pass takes it
            return x * keep * (1.0 / (1.0 - self.p))

        def _draw(self, x: torch.Tensor) -> torch.Tensor:
            count = x.numel()
            draws = torch.randint(-(2**31), 2**31 - 1, ((count + 1) // 2,), dtype=torch.int32, device=x.device)
            return draws.view(torch.int16)[:count].view(x.shape) >= round(self.p * 65536) - 32768

    return FastDropout


def prepare_dora(model: Any, options: Mapping[str, Any], family: Any) -> Any:
    return prepare(model, options, family, dora=True)


#: model types whose attention LongLoRA's shifted sparse attention replaces.
LONGLORA_MODEL_TYPES = ("llama", "qwen2", "qwen3")
#: LongLoRA trains the embeddings and every norm next to the adapters (its "LoRA+" in the paper).
LONGLORA_DEFAULTS = {"group_ratio": 0.25, "modules_to_save": ["embed_tokens", "norm"]}


def check_longlora(options: Mapping[str, Any]) -> dict[str, Any]:
    lora = {key: value for key, value in options.items() if key != "group_ratio"}
    checked = check({"modules_to_save": LONGLORA_DEFAULTS["modules_to_save"], **lora})
    ratio = options.get("group_ratio", LONGLORA_DEFAULTS["group_ratio"])
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"group_ratio must be between 0 and 1 (a group's share of the row), got {ratio!r}")
    return {**checked, "group_ratio": float(ratio)}


def prepare_longlora(model: Any, options: Mapping[str, Any], family: Any) -> Any:
    """LoRA with trainable embeddings and norms, and shifted sparse attention in training
    (``modelloop_tuner_lora_s2attn``) over groups of ``group_ratio`` of each row."""
    import modelloop_tuner_lora_s2attn as s2attn

    if model.config.model_type not in LONGLORA_MODEL_TYPES:
        raise ValueError(
            f"LongLoRA's attention is for {', '.join(LONGLORA_MODEL_TYPES)} models, not {model.config.model_type!r}"
        )
    s2attn.register()
    model.config.longlora_group_ratio = options["group_ratio"]
    model.set_attn_implementation(s2attn.NAME)
    return prepare(model, {key: value for key, value in options.items() if key != "group_ratio"}, family)


def prepare_quantized(model: Any, options: Mapping[str, Any], family: Any) -> Any:
    """LoRA on the quantized base, every base weight frozen as loaded. PEFT's
    ``prepare_model_for_kbit_training`` would also upcast the unquantized 16-bit weights
    (embeddings, output layer, norms) to fp32, for fp16 training without autocast: on a
    7B model 4.4 GB more than the whole 4-bit base. Under the stage's mixed precision they
    stay 16-bit and autocast computes with them."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return prepare(model, options, family)


def parameter_groups(model: Any, options: Mapping[str, Any], family: Any) -> list[dict[str, Any]]:
    """One group, or with LoRA+ a second group for the B matrices at a higher rate."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    ratio = options.get("loraplus_lr_ratio")
    if not ratio:
        return [{"params": [p for _, p in trainable]}]
    b_matrices = [p for name, p in trainable if ".lora_B." in name]
    others = [p for name, p in trainable if ".lora_B." not in name]
    return [{"params": others}, {"params": b_matrices, "lr_scale": float(ratio)}]


def merge(model: Any) -> Any:
    return model.merge_and_unload()


def attach(model: Any, directory: Any, *, name: str) -> Any:
    """A saved PEFT adapter on a base model, or beside the adapters a model carries."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(directory), adapter_name=name)
        return model
    return PeftModel.from_pretrained(model, str(directory), adapter_name=name)


def use(model: Any, name: str | None) -> Any:
    """Compute as adapter ``name``, or as the base alone (``None``)."""
    if name is None:
        return model.disable_adapter()
    model.set_adapter(name)
    return contextlib.nullcontext()


def detach(model: Any, name: str) -> Any:
    """Remove adapter ``name``; with none left, the plain base model. The adapter is
    deleted before PEFT unloads the last one: ``unload`` keeps an active adapter's trained
    copies of its ``modules_to_save`` (LongLoRA's embeddings and norms) in the base."""
    remaining = [adapter for adapter in model.peft_config if adapter != name]
    if remaining and model.active_adapter == name:
        model.set_adapter(remaining[0])
    model.delete_adapter(name)
    return model if remaining else model.unload()


#: PEFT's adapter folders: adapter_config.json beside the adapter's weights.
PEFT_ADAPTERS = AdapterFormat(marker="adapter_config.json", attach=attach, use=use, detach=detach)

COMMON = {"parameter_groups": parameter_groups, "merge": merge, "adapter": True, "adapters": PEFT_ADAPTERS}

TUNERS = (
    Tuner(name="lora", description="LoRA adapters (PEFT)", prepare=prepare, check=check, requires=("peft",), **COMMON),
    Tuner(
        name="dora",
        description="weight-decomposed LoRA (PEFT)",
        prepare=prepare_dora,
        check=check,
        requires=("peft",),
        **COMMON,
    ),
    Tuner(
        name="longlora",
        description="LongLoRA: LoRA with trainable embeddings and norms, shifted sparse attention in training",
        prepare=prepare_longlora,
        check=check_longlora,
        requires=("peft",),
        **COMMON,
    ),
    Tuner(
        name="qlora",
        description="LoRA on a 4-bit (NF4) or 8-bit base (bitsandbytes)",
        prepare=prepare_quantized,
        check=check_quantized,
        load_options=quantization,
        requires=("peft", "bitsandbytes"),
        **COMMON,
    ),
)


@hookimpl
def register_tuners(register):
    for tuner in TUNERS:
        register(tuner)
