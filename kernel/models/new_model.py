"""``modelloop new-model``: a random-weight model of a real architecture, built locally.

The family supplies the architecture presets (``tiny`` for tests, released models'
shapes for benchmarks and pretraining from scratch), the tokenizer recipe and the chat
template. The tokenizer is a byte-level BPE trained on the spot with the family's own
normaliser and pre-tokenizer, on a generated corpus plus any files given, so it can
encode any text and transformers loads it exactly as its tokenizer.json says (checked
before the folder is declared done). No network.
"""

from __future__ import annotations

import json
import random
import shutil
import string
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from modelloop.chat import resolve_chat_format
from modelloop.errors import ModelloopError
from modelloop.registry import MODELS, get_registry
from modelloop.specs import ModelFamily, TokenizerRecipe

WORDS = (
    "the a of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find long down day did get come "
    "made may part apple banana cherry river tiger violet zebra answer question reverse string sum add subtract "
    "please thanks hello assistant user system model helpful"
).split()


def generated_corpus(lines: int = 4000, seed: int = 0) -> Iterator[str]:
    """Deterministic English-like text, arithmetic and random letters: enough BPE merges
    for small vocabularies, and every character class a test will meet."""
    rng = random.Random(seed)
    yield string.printable
    for number in range(lines):
        kind = number % 4
        if kind == 0:
            yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
        elif kind == 1:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            yield f"What is {a}+{b}? {a + b}. What is {a}-{b}? {a - b}."
        elif kind == 2:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10)))
            yield f"Reverse the string: {word} -> {word[::-1]}"
        else:
            yield json.dumps({"name": rng.choice(WORDS), "value": rng.randint(0, 10_000)})


def corpus_from_files(paths: Iterable[Path]) -> Iterator[str]:
    """Every string in JSONL records (any format), or every line of a text file."""

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    for path in paths:
        if not path.exists():
            raise ModelloopError(f"{path}: no such corpus file")
        with path.open(encoding="utf-8") as lines:
            number = 0
            try:
                for number, line in enumerate(lines, start=1):  # noqa: B007 - the error below names the line
                    if path.suffix == ".jsonl" and line.strip():
                        yield from strings(json.loads(line))
                    else:
                        yield line.rstrip("\n")
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ModelloopError(f"{path}:{number or 1}: cannot read the corpus ({error})") from None


def train_tokenizer(recipe: TokenizerRecipe, corpus: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE with the family's normaliser and pre-tokenizer, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    if recipe.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(recipe.split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(recipe.special_tokens),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=recipe.eos_token,
        pad_token=recipe.pad_token or recipe.eos_token,
        bos_token=recipe.bos_token,
        model_max_length=1 << 30,
        extra_special_tokens=dict(recipe.named_tokens),
    )
    others = [
        token for token in recipe.special_tokens if token not in (recipe.eos_token, recipe.pad_token, recipe.bos_token)
    ]
    wrapped.add_special_tokens({"additional_special_tokens": others})
    return wrapped


def _check_tokenizer_round_trip(folder: Path, probe: list[str]) -> None:
    """The class transformers picks for this folder must encode exactly like tokenizer.json."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(folder)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in probe:
        if loaded(text, add_special_tokens=False)["input_ids"] != raw.encode(text, add_special_tokens=False).ids:
            raise ModelloopError(
                f"{type(loaded).__name__} encodes {text!r} differently than tokenizer.json: "
                "the family's tokenizer recipe does not match what transformers rebuilds"
            )


def _family(name: str) -> ModelFamily:
    family = get_registry(MODELS).get(name)
    if not family.presets or family.tokenizer is None:
        raise ModelloopError(f"the {family.name} family has no presets for new-model")
    return family


def _built(factory: Any, options: dict[str, Any] | None) -> Any:
    """A processor from a family's factory and a preset's options; None without a factory."""
    return factory(**(options or {})) if factory else None


def new_model(
    family_name: str,
    preset: str,
    out: Path,
    *,
    corpus_files: Iterable[Path] = (),
    seed: int = 0,
    overwrite: bool = False,
    dtype: str = "fp32",
    device: str = "cpu",
) -> Path:
    """Build and save a random-weight model and its tokenizer; returns ``out``.

    ``dtype`` (``fp32`` or ``bf16``) is what the weights are saved in; ``device`` where
    they are drawn (``cuda`` draws a released model's shape in seconds rather than
    minutes; the numbers differ from the CPU's for the same seed). The folder appears
    only when complete (built in a temporary folder, then renamed).
    """
    family = _family(family_name)
    if preset not in family.presets:
        raise ModelloopError(f"the {family.name} family has no preset {preset!r}; presets: {', '.join(family.presets)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelloopError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    assert family.tokenizer is not None
    fields = dict(family.presets[preset])
    model_type = fields.pop("model_type")
    tokenizer_vocab = fields.pop("tokenizer_vocab", 2000)
    image_processor_options = fields.pop("image_processor", None)
    feature_extractor_options = fields.pop("feature_extractor", None)
    video_settings = fields.pop("video_processor", None)

    import torch
    from transformers import AutoConfig, GenerationConfig

    from modelloop.models.loading import VIDEO_SETTINGS, model_class, write_processors

    corpus = [*generated_corpus(seed=seed), *corpus_from_files(corpus_files)]
    tokenizer = train_tokenizer(family.tokenizer, corpus, tokenizer_vocab)
    chat = resolve_chat_format(tokenizer, family)
    tokenizer.chat_template = chat.source
    eos_ids = [
        tokenizer.convert_tokens_to_ids(token) for token in dict.fromkeys((*chat.end_of_turn, tokenizer.eos_token))
    ]
    if (
        family.multimodal
    ):  # a multimodal family's language model has the vocabulary (a copy: the preset stays as registered)
        text = fields["text_config"] = dict(fields.get("text_config", {}))
    else:
        text = fields
    text.update(
        vocab_size=max(text.get("vocab_size", 0), len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    for spec in (family.vision, family.audio):
        if spec is not None:
            fields.update(
                {field: tokenizer.convert_tokens_to_ids(token) for field, token in spec.config_tokens.items()}
            )
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(family).from_config(config, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        write_processors(
            building,
            image_processor=_built(family.vision and family.vision.image_processor, image_processor_options),
            feature_extractor=_built(family.audio and family.audio.feature_extractor, feature_extractor_options),
        )
        if video_settings is not None:  # transformers' video processor settings, as a released model has them
            (building / VIDEO_SETTINGS).write_text(json.dumps(video_settings, indent=2) + "\n")
        sample = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
        _check_tokenizer_round_trip(building, [*corpus[:200], chat.render(sample, add_generation_prompt=False)])
        if out.exists():
            shutil.rmtree(out)
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out
