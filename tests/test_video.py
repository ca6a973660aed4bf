"""Video for the Qwen vision-language families: clips as files or frames, sampled by a rate
or a count, their tokens and 3-D positions, packing, training and serving.

Every clip is generated here: a square crossing the frame one way or the other."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

import modelloop
from conftest import accuracy_before_and_after_sft, assert_packed_examples_match_alone
from modelloop.config import ConfigError
from modelloop.data.records import read_records

REPO = Path(__file__).resolve().parent.parent
PICTURE = REPO / "examples" / "data" / "images" / "red-square-64.png"


def square_video(path: Path, direction: str = "right", frames: int = 8, fps: int = 4, seed: int = 0) -> Path:
    """A yellow square of 32 pixels crossing a dark 64 x 64 frame left to right (or right
    to left) at a random height, as MPEG-4 at ``fps`` frames a second."""
    import av
    import numpy

    rng = numpy.random.default_rng(seed)
    top = int(rng.integers(0, 32))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for number in range(frames):
            left = number * 32 // (frames - 1)
            if direction == "left":
                left = 32 - left
            picture = numpy.full((64, 64, 3), 30, numpy.uint8)
            picture[top : top + 32, left : left + 32] = (230, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def frame_files(folder: Path, count: int = 4) -> list[str]:
    """``count`` PNG frames of a square moving right."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for number in range(count):
        picture = Image.new("RGB", (64, 64), (30, 30, 30))
        picture.paste((230, 200, 40), (4 + number * 12, 20, 20 + number * 12, 36))
        picture.save(folder / f"frame-{number}.png")
        names.append(str(folder / f"frame-{number}.png"))
    return names


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def video_turn(video, question: str = "Which way does the square move?", answer: str = "right") -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ]
    }


def squares(folder: Path, count: int, seed: int) -> Path:
    """``count`` clips alternating a square moving right and one moving left, at random
    heights, each asked which way it moves, answered; written as JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for number in range(count):
        direction = "left" if number % 2 else "right"
        clip = square_video(folder / f"square-{seed}-{number}.mp4", direction, seed=seed * 1000 + number)
        rows.append(video_turn(clip.name, answer=direction))
    return write_jsonl(folder / f"squares-{seed}.jsonl", rows)


def data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


# --------------------------------------------------------------------------- data


def test_video_files_frames_and_urls_become_one_canonical_form(tmp_path):
    clip = square_video(tmp_path / "square.mp4")
    frames = frame_files(tmp_path / "frames")
    data = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            video_turn("square.mp4"),
            video_turn(frames),
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": data_url(clip)}},
                            {"type": "image", "image": str(PICTURE)},
                        ],
                    },
                    {"role": "assistant", "content": "right"},
                ]
            },
        ],
    )
    first, second, third = (example.record for example in read_records([data]).examples)
    assert first["messages"][0]["content"] == "<video>Which way does the square move?"
    assert first["videos"] == [str(clip.resolve())]
    assert second["videos"] == [frames]  # a video given as its frames stays a list
    assert third["messages"][0]["content"] == "<video><image>" and third["videos"] == [data_url(clip)]
    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [{"conversations": [{"from": "human", "value": "<video>Which way?"}, {"from": "gpt", "value": "right"}], "videos": "square.mp4"}],
    )  # fmt: skip
    (example,) = read_records([sharegpt]).examples
    assert example.record["messages"][-2]["content"] == "<video>Which way?" and example.record["videos"] == [
        str(clip.resolve())
    ]


def test_bad_videos_are_named_by_file_and_line(tmp_path):
    square_video(tmp_path / "ok.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing more")
    frames = frame_files(tmp_path / "frames", 2)
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            video_turn("missing.mp4"),
            video_turn("broken.mp4"),
            {"messages": [{"role": "user", "content": "<video><video>?"}, {"role": "assistant", "content": "a"}], "videos": ["ok.mp4"]},
            video_turn([*frames, str(tmp_path / "frames" / "gone.png")]),
            video_turn("https://example.com/a.mp4"),
            video_turn([]),
        ],
    )  # fmt: skip
    problems = [str(problem) for problem in read_records([data]).problems]
    assert problems[0] == f"{data}:1: video missing.mp4: no such file"
    assert problems[1].startswith(f"{data}:2: cannot read video {(tmp_path / 'broken.mp4').resolve()}")
    assert problems[2] == f"{data}:3: 2 <video> placeholder(s) but 1 video(s)"
    assert problems[3] == f"{data}:4: video frame {tmp_path / 'frames' / 'gone.png'}: no such file"
    assert problems[4].startswith(f"{data}:5: video https://example.com/a.mp4: remote URLs are not fetched")
    assert (
        problems[5] == f"{data}:6: messages[1].content[1]: a video part's frames are a non-empty list of paths or URLs"
    )


def test_frames_are_sampled_by_a_rate_or_a_count_in_whole_time_steps(tmp_path):
    from modelloop.data.video import open_video, sampled_indices

    assert sampled_indices(40, 20.0, fps=2.0, multiple=2) == [0, 10, 20, 30]  # 2 s at 2 a second
    assert sampled_indices(40, 20.0, fps=2.0, min_frames=6, multiple=2) == [0, 6, 13, 20, 26, 33]
    assert sampled_indices(40, 20.0, fps=10.0, max_frames=8, multiple=2) == [0, 5, 10, 15, 20, 25, 30, 35]
    assert sampled_indices(40, 20.0, count=5, multiple=2) == [0, 10, 20, 30]  # a count rounds down to whole steps
    assert sampled_indices(1, 20.0, fps=2.0, multiple=2) == [0]  # the processor repeats the last frame
    video = open_video(str(square_video(tmp_path / "square.mp4", frames=8, fps=4)), fps=2.0, multiple=2)
    assert video.timestamps == [0.0, 0.5, 1.0, 1.5] and video.seconds == 2.0 and video.total_frames == 8
    assert video.fps == 2.0 and all(frame.size == (64, 64) for frame in video.frames)
    listed = open_video(frame_files(tmp_path / "frames", 4))  # frames as pictures are taken 2 a second
    assert listed.timestamps == [0.0, 0.5, 1.0, 1.5] and len(listed.frames) == 4


def test_checking_a_video_reads_every_frame_and_keeps_one(tmp_path):
    """A data check decodes each video whole (a broken frame is named) without holding
    its frames: a long video would not fit in memory."""
    from modelloop.data.media import VIDEO

    checked = VIDEO.open(str(square_video(tmp_path / "square.mp4", frames=8, fps=4)))
    assert len(checked.frames) == 1 and checked.total_frames == 8 and checked.seconds == 2.0
    frames = frame_files(tmp_path / "frames", 3)
    Path(frames[2]).write_bytes(b"not a picture")
    with pytest.raises(ValueError, match="frame-2.png"):
        VIDEO.open(frames)  # the last frame, which the check keeps none of, is still read


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_a_time_step_holds_consecutive_frames_laid_out_as_a_picture_is(tiny_models, family):
    import numpy
    from PIL import Image

    from modelloop.data.video import Video
    from modelloop.models.loading import load_image_processor, read_config, resolve_family, video_options

    folder = tiny_models(family)
    spec, processor = resolve_family(family).vision.video, load_image_processor(folder)
    options = video_options(spec, folder)
    rng = numpy.random.default_rng(0)
    a, b, c = (Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=numpy.uint8)) for _ in range(3))

    def alone(picture):  # a picture's patches: each holds the picture twice over, once per frame of a step
        pixels = processor(images=[picture], size=dict(options["size"]), return_tensors="pt")["pixel_values"]
        return pixels.view(pixels.shape[0], 3, 2, -1)

    still, _ = spec.video_inputs(processor, [Video([a, a], [0.0, 0.5], 1.0, 2)], read_config(folder), options=options)
    assert still["pixel_values_videos"].equal(alone(a).reshape(alone(a).shape[0], -1))  # a still video is the picture
    moving, _ = spec.video_inputs(
        processor, [Video([a, b, c], [0.0, 0.5, 1.0], 1.5, 3)], read_config(folder), options=options
    )
    patches = moving["pixel_values_videos"].view(2, alone(a).shape[0], 3, 2, -1)
    assert moving["video_grid_thw"].tolist()[0][0] == 2  # three frames fill two steps, the last repeated
    assert patches[0, :, :, 0].equal(alone(a)[:, :, 0]) and patches[0, :, :, 1].equal(alone(b)[:, :, 0])
    assert patches[1, :, :, 0].equal(alone(c)[:, :, 0]) and patches[1, :, :, 1].equal(alone(c)[:, :, 0])


def test_each_version_tells_the_model_when_its_frames_were_taken(tiny_models, tmp_path):
    from modelloop.chat import resolve_chat_format
    from modelloop.data.media import Media
    from modelloop.data.records import Example
    from modelloop.data.tokenize import Encoder
    from modelloop.models.loading import load_media_tokens, load_tokenizer, read_config, resolve_family

    clip = str(square_video(tmp_path / "square.mp4"))  # 2 s, sampled at 2 frames a second: two steps of 0.5 s
    for family, expected in (("qwen2_vl", set()), ("qwen2_5_vl", {"second_per_grid_ts"}), ("qwen3_vl", set())):
        folder = tiny_models(family)
        tokenizer, spec = load_tokenizer(folder), resolve_family(family)
        media = load_media_tokens(spec, folder, read_config(folder), tokenizer)
        inputs = media.inputs([Media("video", clip)])
        assert set(inputs) - {"pixel_values_videos", "video_grid_thw"} == expected
        assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
        if expected:
            assert inputs["second_per_grid_ts"].tolist() == [1.0]  # a step spans two frames half a second apart
        record = {**video_turn(clip), "videos": [clip]}
        record["messages"][0]["content"] = "<video>Which way?"
        ((encoded,),) = Encoder(tokenizer, resolve_chat_format(tokenizer, spec), media).encode(
            [Example("clip:1", "conversation", record)]
        )
        text = tokenizer.decode(encoded.input_ids)
        if family == "qwen3_vl":  # each step's time, then its tokens between vision marks, as its processor writes
            step = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
            assert f"<|vision_start|><0.2 seconds>{step}<1.2 seconds>{step}<|vision_end|>Which way?" in text
        else:
            assert "<|vision_start|>" + "<|video_pad|>" * 8 + "<|vision_end|>Which way?" in text


def test_data_check_and_preview_show_each_videos_frames_and_tokens(tiny_models, tmp_path):
    from click.testing import CliRunner

    from modelloop.cli import build_cli

    square_video(tmp_path / "square.mp4")
    data = write_jsonl(
        tmp_path / "videos.jsonl", [video_turn("square.mp4"), video_turn(frame_files(tmp_path / "f", 4))]
    )
    model = str(tiny_models("qwen2_vl"))
    checked = CliRunner().invoke(build_cli(), ["data", "check", str(data), "--model", model])
    assert checked.exit_code == 0, checked.output
    assert "video: 2 videos, 2.0-2.0 s a clip, 4.0 s in all, 8-8 tokens each, 16 in all" in checked.output
    preview = CliRunner().invoke(build_cli(), ["data", "preview", str(data), "--model", model])
    assert preview.exit_code == 0, preview.output
    assert "<|vision_start|><|video_pad|>×8 [square.mp4, 2.0 s, 4 frames]<|vision_end|>Which way" in preview.output
    assert "<|video_pad|>×8 [4 frames from frame-0.png]" in preview.output


def test_a_text_model_and_alignment_refuse_videos(tiny_models, tmp_path):
    square_video(tmp_path / "square.mp4")
    data = write_jsonl(tmp_path / "videos.jsonl", [video_turn("square.mp4")])
    with pytest.raises(modelloop.errors.ModelloopError, match=r"videos.jsonl:1: the record has videos, and this model"):
        modelloop.sft({"model": str(tiny_models("qwen2")), "data": [str(data)], "output_dir": str(tmp_path / "run")})
    question = [{"role": "user", "content": [{"type": "video", "video": "square.mp4"}, {"type": "text", "text": "?"}]}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": question, "chosen": "right", "rejected": "left"}])
    with pytest.raises(ConfigError, match=r"pairs.jsonl:1: dpo does not take video"):
        modelloop.rlhf(
            {
                "method": "dpo",
                "model": str(tiny_models("qwen2_vl")),
                "data": [str(pairs)],
                "output_dir": str(tmp_path / "dpo"),
            }
        )


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_video_examples_give_each_example_the_logits_it_has_alone(tiny_models, tmp_path, family):

    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_media_tokens, load_model
    from modelloop.training import Collator, TrainingData

    folder = tiny_models(family)
    loaded = load_model(folder, dtype="fp32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    media = load_media_tokens(loaded.family, folder, model.config, tokenizer)
    videos = squares(tmp_path / "data", 3, seed=5)
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": str(PICTURE)}, {"type": "text", "text": "Colour?"}]},
                    {"role": "assistant", "content": "red"},
                ]
            },
        ],
    )  # fmt: skip
    tokenized = prepare_data(
        [videos, mixed], tokenizer, resolve_chat_format(tokenizer, loaded.family), max_length=512, media=media
    )
    (row,) = TrainingData.build(tokenized, max_length=512, packing=True).items
    assert sum(bool(example) for example in row.media) == 4 and len(row.lengths) == 5
    rope_index = lambda *args: loaded.family.vision.rope_index(model, *args)  # noqa: E731
    packed = Collator(tokenizer.pad_token_id, packing=True, media=media, rope_index=rope_index)([row])
    alone = Collator(tokenizer.pad_token_id, packing=False, media=media)
    assert_packed_examples_match_alone(model, packed, row, alone)


def test_sft_learns_which_way_a_square_moves(tiny_models, tmp_path):
    base = tiny_models("qwen2_vl")
    train, held_out = squares(tmp_path / "data", 48, seed=1), squares(tmp_path / "data", 16, seed=2)
    before, after, model = accuracy_before_and_after_sft(
        base,
        held_out,
        ("left", "right"),
        data=[str(train)],
        max_steps=80,
        batch_size=8,
        lr=2e-3,
        max_length=256,
        output_dir=str(tmp_path / "run"),
    )
    assert (model / "video_preprocessor_config.json").is_file()  # the next stage samples frames the same way
    assert before <= 0.75 and after >= 0.9, (before, after)


# --------------------------------------------------------------------------- serving


def test_the_openai_client_sends_a_video_to_modelloop_serve(tiny_models, subprocess_env, tmp_path):
    import openai
    from test_serve import free_port, start_server

    short = square_video(tmp_path / "short.mp4", frames=4)  # 1 s: two frames at 2 a second, one step
    long = square_video(tmp_path / "long.mp4", frames=8)  # 2 s: two steps

    def ask(url: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Which way?"}]}]  # fmt: skip

    port = free_port()
    process = start_server(tiny_models("qwen2_vl"), port, subprocess_env, "--served-name", "vl")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        one = client.chat.completions.create(model="vl", messages=ask(data_url(short)), max_tokens=4, temperature=0)
        two = client.chat.completions.create(model="vl", messages=ask(data_url(long)), max_tokens=4, temperature=0)
        assert one.choices[0].message.content is not None and one.usage.completion_tokens > 0
        assert two.usage.prompt_tokens - one.usage.prompt_tokens == 4  # a step more: 4 tokens more
        with pytest.raises(openai.BadRequestError, match="send videos as base64 data URLs"):
            client.chat.completions.create(model="vl", messages=ask(str(long)), max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="remote URLs are not fetched"):
            client.chat.completions.create(model="vl", messages=ask("https://example.com/a.mp4"), max_tokens=2)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_engine_takes_a_video_as_frames_and_batches_it_with_text(tiny_models, tmp_path):
    from modelloop.errors import EngineError
    from modelloop.inference.hf import HFSession
    from modelloop.inference.types import GenerationRequest, SamplingParams

    frames = [
        "data:image/png;base64," + base64.b64encode(Path(frame).read_bytes()).decode()
        for frame in frame_files(tmp_path / "frames", 4)
    ]
    question = [
        {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "Which way?"}]}
    ]
    greedy = SamplingParams(max_tokens=3, temperature=0)
    session = HFSession.load(tiny_models("qwen2_vl"), options={"inline": True})
    try:
        requests = [
            GenerationRequest(messages=question, params=greedy),
            GenerationRequest(messages=[{"role": "user", "content": "Hi"}], params=greedy),
        ]
        together = session.generate(requests)
        alone = [session.generate([request])[0] for request in requests]
        assert [g.choices[0].token_ids for g in together] == [g.choices[0].token_ids for g in alone]
        assert session.check(requests[0]) > session.check(requests[1])
        local = [{"role": "user", "content": [{"type": "video", "video": [str(tmp_path / "frames" / "frame-0.png")]}]}]
        with pytest.raises(EngineError, match="videos are sent as base64 data URLs"):
            session.generate([GenerationRequest(messages=local, params=greedy)])
    finally:
        session.close()
