"""Vision-language models: image data, its validation, per-module training and packing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

import modelloop
from conftest import assert_packed_examples_match_alone
from modelloop.builtin.full_tuner import FULL
from modelloop.config import ConfigError
from modelloop.data.records import read_records

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "examples" / "data" / "shapes.jsonl"
PICTURE = REPO / "examples" / "data" / "images" / "red-square-64.png"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def turn(content, answer: str = "red") -> dict:
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


# --------------------------------------------------------------------------- data


def test_image_parts_placeholders_and_data_urls_become_one_canonical_form(tmp_path):
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "red.png").write_bytes(PICTURE.read_bytes())
    data_url = "data:image/png;base64," + base64.b64encode(PICTURE.read_bytes()).decode()
    write_jsonl(tmp_path / "parts.jsonl", [
        turn([{"type": "text", "text": "Color? "}, {"type": "image_url", "image_url": {"url": "pictures/red.png"}}]),
        turn([{"type": "image", "image": data_url}, {"type": "text", "text": "Color?"}]),
    ])  # fmt: skip
    write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [{"from": "human", "value": "<image>Color?"}, {"from": "gpt", "value": "red"}],
                "images": ["pictures/red.png"],
            }
        ],
    )
    write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "<image>Color?", "output": "red", "images": "pictures/red.png"}]
    )
    records = read_records([tmp_path / "parts.jsonl", tmp_path / "sharegpt.jsonl", tmp_path / "alpaca.jsonl"])
    assert records.problems == []
    first, second, shared, alpaca = (example.record for example in records.examples)
    picture = str((tmp_path / "pictures" / "red.png").resolve())  # relative to the data file, wherever the run starts
    assert first["messages"][0]["content"] == "Color? <image>" and first["images"] == [picture]
    assert second["messages"][0]["content"] == "<image>Color?" and second["images"] == [data_url]
    assert shared["images"] == alpaca["images"] == [picture]


def test_bad_images_are_named_by_file_and_line(tmp_path):
    (tmp_path / "broken.png").write_text("not a picture")
    data = write_jsonl(tmp_path / "bad.jsonl", [
        turn([{"type": "image", "image": "missing.png"}, {"type": "text", "text": "?"}]),
        turn([{"type": "image", "image": "broken.png"}, {"type": "text", "text": "?"}]),
        {**turn("<image><image>?"), "images": [str(PICTURE)]},
        turn([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]),
        turn([{"type": "file", "file": "a.pdf"}]),
        {"messages": turn([{"type": "image", "image": str(PICTURE)}])["messages"], "images": [str(PICTURE)]},
    ])  # fmt: skip
    problems = [str(problem) for problem in read_records([data], format=None).problems]
    assert problems[0] == f"{data}:1: image missing.png: no such file"
    assert problems[1].startswith(f"{data}:2: cannot read image {(tmp_path / 'broken.png').resolve()}")
    assert problems[2] == f"{data}:3: 2 <image> placeholder(s) but 1 image(s)"
    assert problems[3].startswith(f"{data}:4: image https://example.com/a.png: remote URLs are not fetched")
    assert (
        problems[4] == f"{data}:5: messages[1].content[1]: unknown content part type 'file' "
        "(expected text, image_url, image, input_audio, audio_url, audio, video_url, video)"
    )
    assert problems[5] == f"{data}:6: give images as content parts or in the images column, not both"


def test_image_tokens_are_expanded_to_each_pictures_features(tiny_models):
    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import IGNORE, prepare_data
    from modelloop.models.loading import load_media_tokens, load_tokenizer, read_config, resolve_family

    model = tiny_models("qwen2_vl")
    tokenizer, family = load_tokenizer(model), resolve_family("qwen2_vl")
    images = load_media_tokens(family, model, read_config(model), tokenizer)
    data = prepare_data([SHAPES], tokenizer, resolve_chat_format(tokenizer, family), max_length=256, media=images)
    assert data.stats.media == {"image": 32} and "32 images" in data.stats.summary()
    for ids, labels, pictures in zip(data.input_ids, data.labels, data.media):
        image_positions = ids == images.kinds["image"].token_id
        # a 64 px picture becomes a 56 x 56 grid of 14 px patches, 2 x 2 of them per token: 4; 96 px (84 x 84): 9
        assert image_positions.sum() == sum(4 if picture.source.endswith("-64.png") else 9 for picture in pictures)
        assert (labels[image_positions] == IGNORE).all()


def test_data_preview_shows_where_each_pictures_tokens_go(tiny_models, tmp_path):
    from click.testing import CliRunner

    from modelloop.cli import build_cli

    data = write_jsonl(
        tmp_path / "one.jsonl", [turn([{"type": "text", "text": "Color? "}, {"type": "image", "image": str(PICTURE)}])]
    )
    result = CliRunner().invoke(build_cli(), ["data", "preview", str(data), "--model", str(tiny_models("qwen2_vl"))])
    assert result.exit_code == 0, result.output
    assert "Color? <|vision_start|><|image_pad|>×4 [red-square-64.png]<|vision_end|>" in result.output
    assert ", 4 image tokens" in result.output
    checked = CliRunner().invoke(
        build_cli(), ["data", "check", str(data), "--model", str(tiny_models("qwen2_vl")), "--max-length", "64"]
    )
    assert checked.exit_code == 0, checked.output


def test_a_text_model_refuses_image_records(tiny_models, tmp_path):
    with pytest.raises(
        modelloop.errors.ModelloopError, match=r"shapes.jsonl:\d+: the record has images, and this model takes none"
    ):
        modelloop.sft(
            {
                "model": str(tiny_models("qwen2")),
                "data": [str(SHAPES)],
                "max_steps": 1,
                "output_dir": str(tmp_path / "run"),
            }
        )


# --------------------------------------------------------------------------- per-module training


def weights(folder: Path) -> dict:
    """The parameters as the loaded model names them (files keep the checkpoint's names)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def data_loss(model_folder: Path, data: Path) -> float:
    """The model's mean loss over every example of ``data`` (one fixed set of batches)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_media_tokens, load_tokenizer, read_config, resolve_family
    from modelloop.training import Collator, TrainingData

    config, tokenizer = read_config(model_folder), load_tokenizer(model_folder)
    family = resolve_family(config.model_type)
    images = load_media_tokens(family, model_folder, config, tokenizer)
    tokenized = prepare_data([data], tokenizer, resolve_chat_format(tokenizer, family), max_length=256, media=images)
    items = TrainingData.build(tokenized, max_length=256, packing=False)
    collate = Collator(tokenizer.pad_token_id, packing=False, media=images)
    model = AutoModelForImageTextToText.from_pretrained(model_folder).eval()
    with torch.no_grad():
        losses = [
            model(**collate([items[i] for i in range(start, min(start + 8, len(items)))])).loss.item()
            for start in range(0, len(items), 8)
        ]
    return sum(losses) / len(losses)


def test_vision_frozen_aligner_and_llm_at_their_own_rates_move_only_what_they_should(tiny_models, tmp_path):
    base = tiny_models("qwen2_vl")
    settings = {
        "model": str(base),
        "data": [str(SHAPES)],
        "tuner": "full",
        "max_steps": 12,
        "batch_size": 8,
        "max_length": 256,
        "packing": False,
    }
    result = modelloop.sft(
        {
            **settings,
            "freeze": ["vision"],
            "group_lr": {"aligner": 1e-5, "llm": 2e-5},
            "scheduler": "constant",
            "output_dir": str(tmp_path / "run"),
        }
    )
    run = Path(result["run_dir"])
    groups = json.loads((run / "manifest.json").read_text())["module_groups"]
    assert groups["vision"]["trainable"] == 0 and groups["aligner"]["lr"] == 1e-5 and groups["llm"]["lr"] == 2e-5
    assert groups["aligner"]["trainable"] == groups["aligner"]["parameters"] > 0
    before, after = weights(base), weights(run / "model")
    changed = {name for name in before if not before[name].equal(after[name])}
    assert changed and all(
        name.startswith(("model.visual.merger.", "model.language_model.", "lm_head.")) for name in changed
    )
    assert any(name.startswith("model.visual.merger.") for name in changed)
    assert not any(
        name.startswith("model.visual.blocks.") or name.startswith("model.visual.patch_embed.") for name in changed
    )
    assert data_loss(run / "model", SHAPES) < data_loss(base, SHAPES)
    assert (run / "model" / "preprocessor_config.json").is_file()  # the next stage reads pictures the same way


def test_unknown_groups_are_refused_before_loading(tiny_models, tmp_path):
    with pytest.raises(
        ConfigError, match="the qwen2_vl family has no module group 'vison'; groups: vision, aligner, llm"
    ):
        modelloop.sft(
            {
                "model": str(tiny_models("qwen2_vl")),
                "data": [str(SHAPES)],
                "freeze": ["vison"],
                "output_dir": str(tmp_path / "run"),
            }
        )


@pytest.mark.parametrize("vision_lora", [False, True], ids=["llm-only", "llm-and-vision"])
def test_lora_goes_on_the_language_model_and_on_request_on_the_vision_tower(tiny_models, tmp_path, vision_lora):
    settings = {
        "model": str(tiny_models("qwen2_5_vl")),
        "data": [str(SHAPES)],
        "tuner": "lora",
        "max_steps": 1,
        "batch_size": 4,
        "max_length": 256,
    }
    result = modelloop.sft(
        {**settings, "tuner_options": {"vision_lora": vision_lora}, "output_dir": str(tmp_path / "run")}
    )
    groups = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["module_groups"]
    assert groups["llm"]["trainable"] > 0 and groups["aligner"]["trainable"] == 0
    assert (groups["vision"]["trainable"] > 0) == vision_lora  # Qwen2.5-VL's vision MLP shares the LLM's layer names


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_packed_image_examples_give_each_example_the_logits_it_has_alone(tiny_models, family):
    from transformers import AutoModelForImageTextToText

    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_media_tokens, load_tokenizer, read_config, resolve_family
    from modelloop.training import Collator, TrainingData

    folder = tiny_models(family)
    config, tokenizer = read_config(folder), load_tokenizer(folder)
    spec = resolve_family(family).vision
    images = load_media_tokens(resolve_family(family), folder, config, tokenizer)
    tokenized = prepare_data(
        [SHAPES], tokenizer, resolve_chat_format(tokenizer, resolve_family(family)), max_length=256, media=images
    )
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    packed_rows = TrainingData.build(tokenized, max_length=120, packing=True)
    row = max(packed_rows.items, key=lambda row: sum(bool(pictures) for pictures in row.media))
    assert sum(bool(pictures) for pictures in row.media) >= 2  # several pictured examples share the row
    packed = Collator(
        tokenizer.pad_token_id, packing=True, media=images, rope_index=lambda *args: spec.rope_index(model, *args)
    )([row])
    assert packed["position_ids"].shape[0] == 4  # the plain positions first, then the multimodal ones
    alone = Collator(tokenizer.pad_token_id, packing=False, media=images)
    assert_packed_examples_match_alone(model, packed, row, alone)


# --------------------------------------------------------------------------- modality-balanced sampling


def batches_of(modalities: list[str], batch_size: int, **options) -> list[list[int]]:
    from modelloop.builtin.samplers import modality_balanced_order

    order = list(
        modality_balanced_order([1] * len(modalities), batch_size=batch_size, seed=3, modalities=modalities, **options)
    )
    assert len(order) % batch_size == 0
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@pytest.mark.parametrize(("share", "images_per_batch"), [(0.5, 2), (0.25, 1)])
def test_every_batch_holds_its_share_of_pictures_even_when_the_data_is_skewed(share, images_per_batch):
    modalities = ["image"] * 6 + ["text"] * 42  # one example in eight has a picture
    batches = batches_of(modalities, 4, image_share=share)
    assert all(sum(modalities[i] == "image" for i in batch) == images_per_batch for batch in batches)
    texts = [i for batch in batches for i in batch if modalities[i] == "text"]
    assert (
        sorted(set(texts)) == list(range(6, 48)) and len(texts) - len(set(texts)) < 4 - images_per_batch
    )  # each text once (the last batch may top up)
    images = [i for batch in batches for i in batch if modalities[i] == "image"]
    assert (
        set(images) == set(range(6))
        and max(images.count(i) for i in range(6)) - min(images.count(i) for i in range(6)) <= 1
    )  # drawn in rounds


def test_a_share_a_batch_cannot_hold_exactly_is_kept_on_average():
    modalities = ["image"] * 20 + ["text"] * 20
    batches = batches_of(modalities, 1, image_share=0.3)
    pictured = sum(modalities[batch[0]] == "image" for batch in batches)
    assert abs(pictured / len(batches) - 0.3) < 0.02


def test_the_training_set_tells_the_sampler_which_rows_have_pictures(tiny_models):
    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_media_tokens, load_tokenizer, read_config, resolve_family
    from modelloop.registry import SAMPLERS, get_registry
    from modelloop.training import RegistrySampler, TrainingData

    folder = tiny_models("qwen2_vl")
    tokenizer, family = load_tokenizer(folder), resolve_family("qwen2_vl")
    images = load_media_tokens(family, folder, read_config(folder), tokenizer)
    data = TrainingData.build(
        prepare_data([SHAPES], tokenizer, resolve_chat_format(tokenizer, family), max_length=256, media=images),
        max_length=256,
        packing=False,
    )
    assert data.modalities.count("image") == 32 and data.modalities.count("text") == 16
    sampler = RegistrySampler(
        get_registry(SAMPLERS).get("modality_balanced"),
        data.lengths,
        batch_size=4,
        seed=0,
        options={"image_share": 0.75},
        modalities=data.modalities,
    )
    order = list(sampler)
    assert len(sampler) == len(order) == 64  # the 16 texts, one to a batch, last longest: 16 batches
    assert all(sum(data.modalities[i] == "image" for i in order[start : start + 4]) == 3 for start in range(0, 64, 4))


def test_the_sampler_checks_its_options_before_loading(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="sampler_options.share: the modality_balanced sampler takes image_share"):
        modelloop.sft(
            {
                "model": str(tiny_models("qwen2_vl")),
                "data": [str(SHAPES)],
                "sampler": "modality_balanced",
                "sampler_options": {"share": 0.5},
            }
        )
    with pytest.raises(ConfigError, match="image_share must be between 0 and 1"):
        modelloop.sft(
            {
                "model": str(tiny_models("qwen2_vl")),
                "data": [str(SHAPES)],
                "sampler": "modality_balanced",
                "sampler_options": {"image_share": 1.5},
            }
        )
    settings = {
        "model": str(tiny_models("qwen2_vl")),
        "data": [str(SHAPES)],
        "tuner": "lora",
        "max_steps": 2,
        "batch_size": 4,
        "max_length": 256,
        "packing": False,
    }
    result = modelloop.sft(
        {
            **settings,
            "sampler": "modality_balanced",
            "sampler_options": {"image_share": 0.75},
            "output_dir": str(tmp_path / "run"),
        }
    )
    assert json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["status"] == "completed"


# --------------------------------------------------------------------------- serving


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def picture_question(path: Path | str) -> list[dict]:
    url = path if isinstance(path, str) else data_url(path)
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What color is the shape?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def test_the_openai_client_sends_a_picture_to_modelloop_serve(tiny_models, subprocess_env):
    import openai
    from test_serve import free_port, start_server

    port = free_port()
    process = start_server(tiny_models("qwen2_vl"), port, subprocess_env, "--served-name", "vl")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        small = client.chat.completions.create(
            model="vl", messages=picture_question(PICTURE), max_tokens=4, temperature=0
        )
        large = client.chat.completions.create(
            model="vl", messages=picture_question(PICTURE.with_name("red-square-96.png")), max_tokens=4, temperature=0
        )
        assert small.choices[0].message.content is not None and small.usage.completion_tokens > 0
        assert (
            large.usage.prompt_tokens - small.usage.prompt_tokens == 9 - 4
        )  # the 96 px picture's tokens against the 64 px one's
        with pytest.raises(openai.BadRequestError, match="remote URLs are not fetched"):
            client.chat.completions.create(
                model="vl", messages=picture_question("https://example.com/a.png"), max_tokens=2
            )
        with pytest.raises(openai.BadRequestError, match="send pictures as base64 data URLs"):
            client.chat.completions.create(model="vl", messages=picture_question(str(PICTURE)), max_tokens=2)
        assert client.chat.completions.create(
            model="vl", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        ).choices  # text still works
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_engine_batches_pictures_with_text_and_refuses_them_for_a_text_model(tiny_models):
    from modelloop.errors import EngineError
    from modelloop.inference.hf import HFSession
    from modelloop.inference.types import GenerationRequest, SamplingParams

    greedy = SamplingParams(max_tokens=3, temperature=0)
    session = HFSession.load(tiny_models("qwen2_vl"), options={"inline": True})
    try:
        requests = [
            GenerationRequest(messages=picture_question(PICTURE), params=greedy),
            GenerationRequest(messages=[{"role": "user", "content": "Hi"}], params=greedy),
        ]
        together = session.generate(requests)
        alone = [session.generate([request])[0] for request in requests]
        assert [g.choices[0].token_ids for g in together] == [
            g.choices[0].token_ids for g in alone
        ]  # left padding moves no picture
    finally:
        session.close()
    text = HFSession.load(tiny_models("qwen2"), options={"inline": True})
    try:
        with pytest.raises(EngineError, match="takes no images"):
            text.generate([GenerationRequest(messages=picture_question(PICTURE), params=greedy)])
    finally:
        text.close()


# --------------------------------------------------------------------------- infer and eval


def test_eval_asks_about_each_picture_and_keeps_the_paths_in_its_results(tiny_models, tmp_path):
    from modelloop.stages.evaluate import evaluate

    summary = evaluate(
        str(tiny_models("qwen2_vl")), SHAPES, metrics=["exact"], max_tokens=3, output_dir=tmp_path / "eval"
    )
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 48
    pictured = [row for row in rows if isinstance(row["prompt"][-1]["content"], list)]
    assert len(pictured) == 32
    part = next(part for part in pictured[0]["prompt"][-1]["content"] if part["type"] == "image_url")
    assert Path(part["image_url"]["url"]).is_file()  # the results name the picture; the engine got it inline


def test_alignment_other_than_dpo_and_grpo_and_text_models_refuse_pictures(tiny_models, tmp_path):
    question = [
        {"role": "user", "content": [{"type": "image", "image": str(PICTURE)}, {"type": "text", "text": "Color?"}]}
    ]
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": question, "completion": "red", "label": True}])
    with pytest.raises(ConfigError, match=r"kto.jsonl:1: kto does not take pictures yet"):
        modelloop.rlhf(
            {
                "method": "kto",
                "model": str(tiny_models("qwen2_vl")),
                "data": [str(kto)],
                "output_dir": str(tmp_path / "kto"),
            }
        )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": question, "chosen": "red", "rejected": "blue"}])
    with pytest.raises(ConfigError, match=r"the data has pictures, and .* \(family qwen2\) takes none"):
        modelloop.rlhf(
            {
                "method": "dpo",
                "model": str(tiny_models("qwen2")),
                "data": [str(pairs)],
                "output_dir": str(tmp_path / "dpo"),
            }
        )


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_dpo_on_pictures_trains_a_vision_language_model(tiny_models, tmp_path, family):
    color = [
        {
            "role": "user",
            "content": [{"type": "image", "image": str(PICTURE)}, {"type": "text", "text": "What color is the shape?"}],
        }
    ]
    rows = [
        {"prompt": color, "chosen": "red", "rejected": "blue"},
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    ] * 4
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    settings = {
        "method": "dpo",
        "model": str(tiny_models(family)),
        "data": [str(pairs)],
        "tuner": "lora",
        "max_steps": 2,
        "batch_size": 2,
        "max_length": 128,
    }
    result = modelloop.rlhf({**settings, "output_dir": str(tmp_path / "dpo")})
    manifest = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())
    assert (
        manifest["status"] == "completed"
        and (Path(result["run_dir"]) / "model" / "adapter_model.safetensors").is_file()
    )
    logged = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in record or "loss" in record for record in logged)


def test_dpo_batches_carry_the_pictures_as_the_model_counts_them(tiny_models):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from modelloop.chat import resolve_chat_format
    from modelloop.models.loading import load_image_processor, load_tokenizer, read_config, resolve_family
    from modelloop.stages.rlhf import with_pictures

    folder = tiny_models("qwen2_vl")
    tokenizer, family = load_tokenizer(folder), resolve_family("qwen2_vl")
    tokenizer.chat_template = resolve_chat_format(tokenizer, family).source
    processor = family.vision.processor(tokenizer, load_image_processor(folder), read_config(folder))
    pictured = {
        "prompt": [{"role": "user", "content": "What color? <image>"}],
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "blue"}],
        "images": [str(PICTURE)],
    }
    plain = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    batch = DataCollatorForVisionPreference(processor)([with_pictures(pictured), with_pictures(plain)])
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_token).sum(-1).tolist() == [4, 0, 4, 0]  # chosen and rejected rows of each pair
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]


def test_grpo_rolls_out_on_pictures_through_the_engine_and_trains(tiny_models, tmp_path):
    question = [
        {
            "role": "user",
            "content": [{"type": "image", "image": str(PICTURE)}, {"type": "text", "text": "What color is the shape?"}],
        }
    ]
    rows = [{"prompt": question, "solution": "red"}, {"prompt": "What is 2+2?", "solution": "4"}] * 2
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    settings = {
        "method": "grpo",
        "model": str(tiny_models("qwen2_vl")),
        "data": [str(prompts)],
        "rewards": ["exact"],
        "tuner": "lora",
    }
    settings.update(max_steps=2, batch_size=4, num_generations=2, max_completion_length=4, max_length=128)
    result = modelloop.rlhf({**settings, "output_dir": str(tmp_path / "grpo")})
    run = Path(result["run_dir"])
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    assert (run / "model" / "adapter_model.safetensors").is_file()


def test_rollout_prompts_with_pictures_get_the_engines_ids(tiny_models):
    from PIL import Image

    from modelloop.chat import resolve_chat_format
    from modelloop.inference.hf import HFSession
    from modelloop.inference.types import SamplingParams
    from modelloop.models.loading import load_media_tokens, load_tokenizer, read_config, resolve_family
    from modelloop.registry import ENGINES, get_registry
    from modelloop.stages.rollouts import EngineRollouts

    folder = tiny_models("qwen2_vl")
    tokenizer, family = load_tokenizer(folder), resolve_family("qwen2_vl")
    chat = resolve_chat_format(tokenizer, family)
    images = load_media_tokens(family, folder, read_config(folder), tokenizer)
    rollouts = EngineRollouts(
        get_registry(ENGINES).get("hf"),
        tokenizer=tokenizer,
        chat=chat,
        sampling=SamplingParams(max_tokens=2),
        base_model=str(folder),
        tuner=FULL,
        sync_dir=Path("unused"),
        media=images,
    )
    with Image.open(PICTURE) as opened:
        prompt = [
            {
                "role": "user",
                "content": [{"type": "image", "image": opened.convert("RGB")}, {"type": "text", "text": "Color?"}],
            }
        ]
    ids = rollouts.prompt_ids(prompt)
    assert ids.count(images.kinds["image"].token_id) == 4
    session = HFSession.load(folder, options={"inline": True})
    try:
        request = rollouts._request(prompt, ids, SamplingParams(max_tokens=2, n=2))
        assert request.prompt is None and request.messages[0]["content"][0]["image_url"]["url"].startswith(
            "data:image/png;base64,"
        )
        assert session.prompt_ids(request) == ids  # what the engine renders is what the policy is scored on
    finally:
        session.close()


def test_two_processes_train_a_vision_model_when_some_batches_have_no_picture(tiny_models, subprocess_env, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ddp"
    argv = [
        sys.executable,
        "-m",
        "modelloop",
        "sft",
        "--model",
        str(tiny_models("qwen2_vl")),
        "--data",
        str(SHAPES),
        "--tuner",
        "full",
    ]
    argv += [
        "--no-packing",
        "--batch-size",
        "1",
        "--max-steps",
        "4",
        "--max-length",
        "256",
        "--nproc",
        "2",
        "--output-dir",
        str(out),
    ]
    done = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # a text-only batch leaves the vision tower without gradients
    parallel = json.loads((out / "manifest.json").read_text())["parallel"]
    assert (
        parallel["wrapped_as"] == "DistributedDataParallel"
        and parallel["trainer_arguments"]["ddp_find_unused_parameters"] is True
    )


def test_text_without_pictures_keeps_a_literal_mark_but_a_stray_image_token_is_refused(tiny_models, tmp_path):
    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import Encoder
    from modelloop.models.loading import load_media_tokens, load_tokenizer, read_config, resolve_family

    data = write_jsonl(
        tmp_path / "text.jsonl", [turn("Render <image> in HTML?", "use <img>"), turn("Say <|image_pad|>", "no")]
    )
    records = read_records([data])
    assert records.problems == [] and records.examples[0].record["messages"][0]["content"] == "Render <image> in HTML?"
    folder = tiny_models("qwen2_vl")
    tokenizer, family = load_tokenizer(folder), resolve_family("qwen2_vl")
    encoder = Encoder(
        tokenizer,
        resolve_chat_format(tokenizer, family),
        load_media_tokens(family, folder, read_config(folder), tokenizer),
    )
    literal, stray = encoder.encode(records.examples)
    assert isinstance(literal, list) and len(literal) == 1  # encoded: "<image>" in text is text
    assert str(stray) == f"{data}:2: the rendered text holds 1 image token(s) for 0 image(s)"  # it would have no pixels


def test_pictures_belong_in_the_prompt_and_data_check_counts_them_there(tiny_models, tmp_path):
    from click.testing import CliRunner

    from modelloop.cli import build_cli

    question = [
        {"role": "user", "content": [{"type": "image", "image": str(PICTURE)}, {"type": "text", "text": "Color?"}]}
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": question, "chosen": "red", "rejected": "blue"}])
    checked = CliRunner().invoke(
        build_cli(), ["data", "check", str(pairs), "--model", str(tiny_models("qwen2_vl")), "--max-length", "64"]
    )
    assert checked.exit_code == 0, checked.output
    answers = write_jsonl(
        tmp_path / "answers.jsonl",
        [{"prompt": "Which?", "chosen": "this <image>", "rejected": "no", "images": [str(PICTURE)]}],
    )
    assert [problem.reason for problem in read_records([answers]).problems] == [
        "images go in the prompt, not in the answers"
    ]


def test_the_full_tuner_points_an_old_freeze_option_at_the_stage_setting(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="freeze is a stage setting now: --freeze GROUP"):
        modelloop.sft(
            {
                "model": str(tiny_models("qwen2_vl")),
                "data": [str(SHAPES)],
                "tuner": "full",
                "tuner_options": {"freeze": ["vision"]},
            }
        )
