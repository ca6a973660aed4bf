"""What the checks feed the specs: a few conversations, one with a tool call, a picture,
and the tiny model that checks of tuners, engines, exporters and strategies run on.

The conversations are short and made of the words ``new-model`` trains its tokenizers
on, so that every family's tiny tokenizer encodes them in few tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modelloop.registry import MODELS, get_registry
from modelloop.specs import ModelFamily
from modelloop.testing.kit import Broken, Skip, raised
from modelloop.testing.workspace import Workspace

CONVERSATIONS: tuple[dict[str, Any], ...] = (
    {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]},
    {
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Reverse the string: river"},
            {"role": "assistant", "content": "revir"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And thanks?"},
            {"role": "assistant", "content": "Thanks, you are welcome."},
        ]
    },
    {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]},
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

#: A tool call and its result: the call is the assistant's (trained), the result is not.
TOOL_CALL = "get_weather"
TOOL_RESULT = "sunny, 21 degrees"
TOOL_CONVERSATION: dict[str, Any] = {
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": TOOL_CALL, "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": TOOL_RESULT},
        {"role": "assistant", "content": "It is sunny in Paris."},
    ],
    "tools": TOOLS,
}


def picture_conversation(workspace: Workspace) -> dict[str, Any]:
    """A conversation about a red square, drawn into the workspace."""
    from PIL import Image

    from modelloop.data.media import IMAGE

    path = workspace.folder("picture") / "red.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(path)
    return {
        "messages": [
            {"role": "user", "content": f"{IMAGE.mark}What colour is this?"},
            {"role": "assistant", "content": "Red."},
        ],
        "images": [str(path)],
    }


def clip_conversation(workspace: Workspace) -> dict[str, Any]:
    """A conversation about a one-second 440 Hz tone, written into the workspace."""
    import numpy

    from modelloop.data.audio import wav_bytes
    from modelloop.data.media import AUDIO

    path = workspace.folder("clip") / "a440.wav"
    rate = 16000
    path.write_bytes(wav_bytes(0.5 * numpy.sin(2 * numpy.pi * 440 * numpy.arange(rate) / rate), rate))
    return {
        "messages": [
            {"role": "user", "content": f"{AUDIO.mark}Which note is this?"},
            {"role": "assistant", "content": "A."},
        ],
        "audios": [str(path)],
    }


def video_conversation(workspace: Workspace) -> dict[str, Any]:
    """A conversation about a two-second video of a square moving right, written into
    the workspace (MPEG-4, 4 frames a second)."""
    import av
    import numpy

    from modelloop.data.media import VIDEO

    path = workspace.folder("video") / "square.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for number in range(8):
            frame = numpy.full((64, 64, 3), 30, numpy.uint8)
            frame[24:40, 4 + 5 * number : 20 + 5 * number] = (230, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return {
        "messages": [
            {"role": "user", "content": f"{VIDEO.mark}Which way does the square move?"},
            {"role": "assistant", "content": "Right."},
        ],
        "videos": [str(path)],
    }


def media_conversations(family: ModelFamily, workspace: Workspace) -> list[dict[str, Any]]:
    """A conversation for each kind of media the family takes."""
    return [
        *([picture_conversation(workspace)] if family.vision is not None else []),
        *([video_conversation(workspace)] if family.vision is not None and family.vision.video is not None else []),
        *([clip_conversation(workspace)] if family.audio is not None else []),
    ]


def assistant_turns(record: Mapping[str, Any]) -> int:
    return sum(message["role"] == "assistant" for message in record["messages"])


def buildable(family: ModelFamily) -> bool:
    """Whether ``new-model`` can build the family's tiny preset."""
    return "tiny" in family.presets and family.tokenizer is not None


def tiny_model(workspace: Workspace, family: ModelFamily) -> Path:
    """The family's tiny model; a family whose model does not build skips the checks that
    need it (the check that builds it fails, once)."""
    try:
        return workspace.tiny_model(family.name)
    except Exception as error:  # noqa: BLE001 - whatever the family's preset makes new-model raise
        raise Skip(f"its tiny preset does not build ({raised(error)})") from None


def reference(workspace: Workspace) -> tuple[ModelFamily, Path]:
    """The text model that tuners, engines, exporters and strategies are checked on: the
    tiny Qwen2 when its family is installed, else the first text family's tiny model."""
    families = [family for family in get_registry(MODELS) if buildable(family) and not family.multimodal]
    if not families:
        raise Skip(
            "no installed model family has a tiny text preset to check it on (pip install modelloop-plugin-model-qwen)"
        )
    family = next((family for family in families if family.name == "qwen2"), families[0])
    return family, tiny_model(workspace, family)


def load(folder: Path, **options: Any) -> Any:
    """The model in fp32 (so that outputs compare exactly), with its tokenizer and family."""
    from modelloop.models.loading import load_model

    return load_model(folder, dtype="fp32", **options)


def encode(tokenizer: Any, chat: Any, records: Sequence[Mapping[str, Any]], media: Any = None) -> list[Any]:
    """Each conversation's tokens and labels, as training makes them (``Encoded``)."""
    from modelloop.data.records import Example
    from modelloop.data.tokenize import Encoder

    examples = [
        Example(f"sample conversation {number}", "conversation", dict(record))
        for number, record in enumerate(records, start=1)
    ]
    encoded = []
    for result in Encoder(tokenizer, chat, media).encode(examples):
        if not isinstance(result, list):  # a Problem: the record cannot be rendered or its media placed
            raise Broken(str(result))
        encoded += result
    return encoded


def batch(tokenizer: Any, family: ModelFamily) -> dict[str, Any]:
    """The sample conversations as one padded training batch."""
    from modelloop.chat import resolve_chat_format
    from modelloop.data.packing import collate_padded

    encoded = encode(tokenizer, resolve_chat_format(tokenizer, family), CONVERSATIONS)
    return collate_padded([e.input_ids for e in encoded], [e.labels for e in encoded], tokenizer.pad_token_id)


def on_device(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A batch on the model's device (a model quantized as it loads sits on the GPU)."""
    device = next(model.parameters()).device
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in inputs.items()}


def logits(model: Any, inputs: Mapping[str, Any]) -> Any:
    """The model's logits for a batch, without dropout or gradients, on the CPU."""
    import torch

    model.eval()
    with torch.no_grad():
        return (
            model(**on_device(model, {key: value for key, value in inputs.items() if key != "labels"}))
            .logits.float()
            .cpu()
        )


def loss(model: Any, inputs: Mapping[str, Any]) -> float:
    """The model's loss on a batch, without dropout or gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        value = float(model(**on_device(model, inputs)).loss)
    if not math.isfinite(value):
        raise Broken(f"the model's loss on the sample conversations is {value}")
    return value


def difference(first: Any, second: Any) -> float:
    """The largest absolute difference between two tensors of one shape."""
    if first.shape != second.shape:
        return float("inf")
    return float((first - second).abs().max())
