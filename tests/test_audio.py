"""Audio-language models: sound clips in data, their validation, training, packing and serving.

Every clip is generated here: tones of a chosen pitch and length, written as WAV."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

import modelloop
from conftest import accuracy_before_and_after_sft, assert_packed_examples_match_alone
from modelloop.config import ConfigError
from modelloop.data.records import read_records
from modelloop.errors import ModelloopError

RATE = 16000
REPO = Path(__file__).resolve().parent.parent
PICTURE = REPO / "examples" / "data" / "images" / "red-square-64.png"


def tone(path: Path, hz: float = 440.0, seconds: float = 1.0, amplitude: float = 0.5, seed: int = 0) -> Path:
    """A sine tone with a little noise, as a 16 kHz WAV file."""
    import numpy

    from modelloop.data.audio import wav_bytes

    rng = numpy.random.default_rng(seed)
    t = numpy.arange(int(RATE * seconds)) / RATE
    samples = amplitude * numpy.sin(2 * numpy.pi * hz * t + rng.uniform(0, 6.28)) + rng.normal(0, 0.02, len(t))
    path.write_bytes(wav_bytes(samples.astype(numpy.float32), RATE))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def clip_turn(clip: str, question: str = "Low or high?", answer: str = "low") -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ]
    }


def tones(folder: Path, count: int, seed: int) -> Path:
    """``count`` clips alternating low (200-350 Hz) and high (1.2-2 kHz) tones of 0.5 to
    1.5 s at random loudness, each asked "low or high?", answered; written as JSONL."""
    import numpy

    rng = numpy.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for number in range(count):
        high = number % 2 == 1
        clip = tone(
            folder / f"tone-{seed}-{number}.wav",
            rng.uniform(1200, 2000) if high else rng.uniform(200, 350),
            rng.uniform(0.5, 1.5),
            rng.uniform(0.3, 0.8),
            seed=seed * 1000 + number,
        )
        rows.append(clip_turn(clip.name, answer="high" if high else "low"))
    return write_jsonl(folder / f"tones-{seed}.jsonl", rows)


def data_url(path: Path) -> str:
    return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()


# --------------------------------------------------------------------------- data


def test_audio_parts_markers_and_input_audio_become_one_canonical_form(tmp_path):
    clip = tone(tmp_path / "a440.wav")
    encoded = base64.b64encode(clip.read_bytes()).decode()
    data = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            clip_turn("a440.wav"),
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": encoded, "format": "wav"}},
                            {"type": "image", "image": str(PICTURE)},
                            {"type": "audio_url", "audio_url": {"url": data_url(clip)}},
                        ],
                    },
                    {"role": "assistant", "content": "two tones and a square"},
                ]
            },
        ],
    )
    first, second = (example.record for example in read_records([data]).examples)
    assert first["messages"][0]["content"] == "<audio>Low or high?" and first["audios"] == [str(clip.resolve())]
    assert second["messages"][0]["content"] == "<audio><image><audio>"
    assert second["audios"] == [f"data:audio/wav;base64,{encoded}"] * 2 and second["images"] == [str(PICTURE)]
    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [{"from": "human", "value": "<audio>Pitch?"}, {"from": "gpt", "value": "A"}],
                "audios": "a440.wav",
            }
        ],
    )
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "<audio>Pitch?", "output": "A", "audios": ["a440.wav"]}]
    )
    for path in (sharegpt, alpaca):
        (example,) = read_records([path]).examples
        assert example.record["messages"][-2]["content"] == "<audio>Pitch?"
        assert example.record["audios"] == [str(clip.resolve())]


def test_bad_clips_are_named_by_file_and_line(tmp_path):
    tone(tmp_path / "ok.wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF but not really a wave file")
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            clip_turn("missing.wav"),
            clip_turn("broken.wav"),
            {**clip_turn("ok.wav"), "messages": [{"role": "user", "content": "<audio><audio>?"}, {"role": "assistant", "content": "a"}], "audios": ["ok.wav"]},
            clip_turn("https://example.com/a.wav"),
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]}, {"role": "assistant", "content": "a"}]},
        ],
    )  # fmt: skip
    problems = [str(problem) for problem in read_records([data]).problems]
    assert problems[0] == f"{data}:1: audio clip missing.wav: no such file"
    assert problems[1].startswith(f"{data}:2: cannot read audio {(tmp_path / 'broken.wav').resolve()}")
    assert problems[2] == f"{data}:3: 2 <audio> placeholder(s) but 1 audio clip(s)"
    assert problems[3].startswith(f"{data}:4: audio clip https://example.com/a.wav: remote URLs are not fetched")
    assert problems[4] == (
        f"{data}:5: messages[1].content[1]: an input_audio part needs input_audio.data (base64) and input_audio.format"
    )
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "Pitch?"}],
                "chosen": "<audio>",
                "rejected": "no",
                "audios": ["ok.wav"],
            }
        ],
    )
    assert [str(problem) for problem in read_records([pairs]).problems] == [
        f"{pairs}:1: audios go in the prompt, not in the answers"
    ]


def test_data_check_measures_each_clip_and_names_those_the_model_cannot_hear(tiny_models, tmp_path):
    from click.testing import CliRunner

    from modelloop.cli import build_cli

    tone(tmp_path / "one.wav", seconds=1.0)
    tone(tmp_path / "half.wav", seconds=0.5)
    tone(tmp_path / "long.wav", seconds=3.0)  # the tiny model hears 2 s
    tone(tmp_path / "blip.wav", seconds=0.02)
    good = write_jsonl(tmp_path / "good.jsonl", [clip_turn("one.wav"), clip_turn("half.wav")])
    model = str(tiny_models("qwen2_audio"))
    checked = CliRunner().invoke(build_cli(), ["data", "check", str(good), "--model", model])
    assert checked.exit_code == 0, checked.output
    # 100 and 50 mel frames; the encoder's convolution (n - 1) // 2 + 1 and its pooling
    # (n - 2) // 2 + 1 leave 25 and 12 tokens
    assert "audio: 2 audios, 0.5-1.0 s a clip, 1.5 s in all, 12-25 tokens each, 37 in all" in checked.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [clip_turn("one.wav"), clip_turn("long.wav"), clip_turn("blip.wav")])
    refused = CliRunner().invoke(build_cli(), ["data", "check", str(bad), "--model", model])
    assert refused.exit_code == 1
    assert f"{bad}:2: a clip of 3.0 s is longer than the 2 s this model hears" in refused.output
    assert f"{bad}:3: a clip of 0.02 s is too short (at least 0.1 s)" in refused.output
    preview = CliRunner().invoke(build_cli(), ["data", "preview", str(good), "--model", model])
    assert preview.exit_code == 0, preview.output
    assert "<|audio_bos|><|AUDIO|>×25 [one.wav, 1.0 s]<|audio_eos|>Low or high?" in preview.output
    assert ", 25 audio tokens" in preview.output


def test_a_text_model_and_alignment_refuse_clips(tiny_models, tmp_path):
    tone(tmp_path / "a.wav")
    data = write_jsonl(tmp_path / "clips.jsonl", [clip_turn("a.wav")])
    with pytest.raises(ModelloopError, match=r"clips.jsonl:1: the record has audios, and this model takes none"):
        modelloop.sft({"model": str(tiny_models("qwen2")), "data": [str(data)], "output_dir": str(tmp_path / "run")})
    question = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Pitch?"}]}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": question, "chosen": "A", "rejected": "B"}])
    with pytest.raises(ConfigError, match=r"pairs.jsonl:1: dpo does not take sound: TRL .*'s trainers take text"):
        modelloop.rlhf(
            {
                "method": "dpo",
                "model": str(tiny_models("qwen2_audio")),
                "data": [str(pairs)],
                "output_dir": str(tmp_path / "dpo"),
            }
        )


# --------------------------------------------------------------------------- training


def test_sft_learns_to_tell_a_low_tone_from_a_high_one(tiny_models, tmp_path):
    base = tiny_models("qwen2_audio")
    train, held_out = tones(tmp_path / "data", 64, seed=1), tones(tmp_path / "data", 16, seed=2)
    before, after, model = accuracy_before_and_after_sft(
        base,
        held_out,
        ("low", "high"),
        data=[str(train)],
        max_steps=20,
        batch_size=8,
        lr=1e-3,
        max_length=128,
        output_dir=str(tmp_path / "run"),
    )
    assert (model / "preprocessor_config.json").is_file()  # the next stage hears clips the same way
    assert before <= 0.75 and after >= 0.9, (before, after)


def test_a_frozen_audio_tower_stays_as_it_was_while_the_rest_trains(tiny_models, tmp_path):
    from transformers import AutoModelForMultimodalLM

    base = tiny_models("qwen2_audio")
    result = modelloop.sft(
        {
            "model": str(base),
            "data": [str(tones(tmp_path / "data", 8, seed=3))],
            "tuner": "full",
            "freeze": ["audio"],
            "group_lr": {"aligner": 1e-3, "llm": 1e-4},
            "max_steps": 2,
            "batch_size": 4,
            "output_dir": str(tmp_path / "run"),
        }
    )
    run = Path(result["run_dir"])
    groups = json.loads((run / "manifest.json").read_text())["module_groups"]
    assert groups["audio"]["trainable"] == 0 and groups["aligner"]["lr"] == 1e-3 and groups["llm"]["lr"] == 1e-4
    before = AutoModelForMultimodalLM.from_pretrained(base).state_dict()
    after = AutoModelForMultimodalLM.from_pretrained(run / "model").state_dict()
    changed = {name for name in before if not before[name].equal(after[name])}
    assert any(name.startswith("model.multi_modal_projector.") for name in changed)
    assert any(name.startswith("model.language_model.") for name in changed)
    assert not any(name.startswith("model.audio_tower.") for name in changed)


@pytest.mark.parametrize("audio_lora", [False, True], ids=["llm-only", "llm-and-audio"])
def test_lora_goes_on_the_language_model_and_on_request_on_the_audio_tower(tiny_models, tmp_path, audio_lora):
    result = modelloop.sft(
        {
            "model": str(tiny_models("qwen2_audio")),
            "data": [str(tones(tmp_path / "data", 4, seed=4))],
            "tuner": "lora",
            "tuner_options": {"audio_lora": audio_lora},
            "max_steps": 1,
            "batch_size": 4,
            "output_dir": str(tmp_path / "run"),
        }
    )
    groups = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["module_groups"]
    assert groups["llm"]["trainable"] > 0 and groups["aligner"]["trainable"] == 0
    assert (groups["audio"]["trainable"] > 0) == audio_lora  # its attention shares the LLM's layer names


def test_packed_clip_examples_give_each_example_the_logits_it_has_alone(tiny_models, tmp_path):

    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_media_tokens, load_model
    from modelloop.training import Collator, TrainingData

    folder = tiny_models("qwen2_audio")
    loaded = load_model(folder, dtype="fp32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    media = load_media_tokens(loaded.family, folder, model.config, tokenizer)
    data = tones(tmp_path / "data", 6, seed=5)
    text = write_jsonl(
        tmp_path / "text.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 2,
    )
    tokenized = prepare_data(
        [data, text], tokenizer, resolve_chat_format(tokenizer, loaded.family), max_length=512, media=media
    )
    (row,) = TrainingData.build(tokenized, max_length=512, packing=True).items
    assert sum(bool(example) for example in row.media) == 6 and len(row.lengths) == 8
    packed = Collator(tokenizer.pad_token_id, packing=True, media=media)([row])
    assert packed["input_features"].shape[0] == 6
    alone = Collator(tokenizer.pad_token_id, packing=False, media=media)
    assert_packed_examples_match_alone(model, packed, row, alone)


def test_batches_hold_their_share_of_clips_pictures_and_text():
    from modelloop.builtin.samplers import modality_balanced_order

    modalities = ["audio"] * 6 + ["image"] * 10 + ["text"] * 32
    order = list(
        modality_balanced_order(
            [1] * len(modalities), batch_size=8, seed=0, modalities=modalities, audio_share=0.25, image_share=0.25
        )
    )
    batches = [order[start : start + 8] for start in range(0, len(order), 8)]
    for batch in batches:
        kinds = [modalities[index] for index in batch]
        assert (kinds.count("audio"), kinds.count("image"), kinds.count("text")) == (2, 2, 4)
    assert len(batches) == 8  # the 32 texts, four to a batch, run out last
    even = list(modality_balanced_order([1] * 48, batch_size=6, seed=0, modalities=modalities))
    kinds = [modalities[index] for index in even[:6]]
    assert (kinds.count("audio"), kinds.count("image"), kinds.count("text")) == (2, 2, 2)  # no share given: even


# --------------------------------------------------------------------------- serving


def test_the_openai_client_sends_a_clip_to_modelloop_serve(tiny_models, subprocess_env, tmp_path):
    import openai
    from test_serve import free_port, start_server

    one, two = tone(tmp_path / "one.wav", seconds=1.0), tone(tmp_path / "two.wav", seconds=2.0)

    def ask(part: dict) -> list[dict]:
        return [{"role": "user", "content": [{"type": "text", "text": "Pitch?"}, part]}]

    def input_audio(path: Path) -> dict:
        return {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"},
        }

    port = free_port()
    process = start_server(tiny_models("qwen2_audio"), port, subprocess_env, "--served-name", "audio")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        short = client.chat.completions.create(
            model="audio", messages=ask(input_audio(one)), max_tokens=4, temperature=0
        )
        long = client.chat.completions.create(
            model="audio", messages=ask(input_audio(two)), max_tokens=4, temperature=0
        )
        assert short.choices[0].message.content is not None and short.usage.completion_tokens > 0
        assert long.usage.prompt_tokens - short.usage.prompt_tokens == 50 - 25  # a second more: 25 tokens more
        by_url = client.chat.completions.create(
            model="audio",
            messages=ask({"type": "audio_url", "audio_url": {"url": data_url(one)}}),
            max_tokens=4,
            temperature=0,
        )
        assert by_url.usage.prompt_tokens == short.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError, match="send clips as base64 data URLs"):
            client.chat.completions.create(
                model="audio", messages=ask({"type": "audio_url", "audio_url": {"url": str(one)}}), max_tokens=2
            )
        with pytest.raises(openai.BadRequestError, match="remote URLs are not fetched"):
            client.chat.completions.create(
                model="audio",
                messages=ask({"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}),
                max_tokens=2,
            )
        with pytest.raises(openai.BadRequestError, match="longer than the 2 s this model hears"):
            client.chat.completions.create(
                model="audio", messages=ask(input_audio(tone(tmp_path / "long.wav", seconds=3.0))), max_tokens=2
            )
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_engine_batches_clips_with_text_and_a_text_model_refuses_them(tiny_models, tmp_path):
    from modelloop.errors import EngineError
    from modelloop.inference.hf import HFSession
    from modelloop.inference.types import GenerationRequest, SamplingParams

    clip = tone(tmp_path / "a.wav")
    question = [
        {
            "role": "user",
            "content": [
                {"type": "audio_url", "audio_url": {"url": data_url(clip)}},
                {"type": "text", "text": "Pitch?"},
            ],
        }
    ]
    greedy = SamplingParams(max_tokens=3, temperature=0)
    session = HFSession.load(tiny_models("qwen2_audio"), options={"inline": True})
    try:
        requests = [
            GenerationRequest(messages=question, params=greedy),
            GenerationRequest(messages=[{"role": "user", "content": "Hi"}], params=greedy),
        ]
        together = session.generate(requests)
        alone = [session.generate([request])[0] for request in requests]
        assert [g.choices[0].token_ids for g in together] == [g.choices[0].token_ids for g in alone]
        with pytest.raises(EngineError, match="takes no images"):
            session.generate(
                [
                    GenerationRequest(
                        messages=[
                            {
                                "role": "user",
                                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}],
                            }
                        ],
                        params=greedy,
                    )
                ]
            )
    finally:
        session.close()
    text = HFSession.load(tiny_models("qwen2"), options={"inline": True})
    try:
        with pytest.raises(EngineError, match="takes no audios"):
            text.generate([GenerationRequest(messages=question, params=greedy)])
    finally:
        text.close()
