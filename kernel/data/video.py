"""Video clips: decoded through PyAV (FFmpeg), whatever the container (MP4, WebM, MKV,
AVI, MOV ...), or given as a list of frames (pictures, in order); sampled to the frames a
model sees, by a rate (frames per second of video) or a count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

#: The rate frames given as a list of pictures are taken to have been sampled at, as
#: Qwen's own tooling assumes.
FRAME_LIST_FPS = 2.0


class Video(NamedTuple):
    """Sampled frames (RGB PIL images), when each was taken (seconds from the start), and
    the whole clip's length and frame count."""

    frames: list[Any]
    timestamps: list[float]
    seconds: float
    total_frames: int

    @property
    def fps(self) -> float:
        """The sampled frames' rate."""
        if len(self.timestamps) < 2:
            return FRAME_LIST_FPS
        return (len(self.timestamps) - 1) / max(self.timestamps[-1] - self.timestamps[0], 1e-6)


def sampled_indices(
    total: int,
    rate: float | None,
    *,
    fps: float | None = None,
    count: int | None = None,
    min_frames: int = 1,
    max_frames: int | None = None,
    multiple: int = 1,
) -> list[int]:
    """Which of ``total`` frames (``rate`` a second) to keep: ``count`` of them, or ``fps``
    a second, within ``min_frames`` and ``max_frames``, a multiple of ``multiple`` where the
    clip has that many, spread evenly from the first."""
    if count is not None:
        wanted = count
    elif fps is not None and rate:
        wanted = total / rate * fps
    else:
        wanted = total
    ceiling = min(max_frames or total, total)
    wanted = min(max(wanted, min_frames), ceiling)
    wanted = max(multiple, math.floor(wanted / multiple) * multiple) if total >= multiple else total
    wanted = min(wanted, total)
    return [int(i * total / wanted) for i in range(wanted)]


def open_video(reference: str | Sequence[str], **sampling: Any) -> Video:
    """The clip at ``reference`` (a file or data URL, or a list of frames), its frames
    sampled as ``sampled_indices`` says (all of them when nothing is asked); ValueError
    naming the clip when it cannot be read."""
    if not isinstance(reference, str):
        return _frame_list(list(reference), **sampling)
    import av
    import httpx

    from modelloop.data.locations import readable

    shown = reference[:40] + "..." if reference.startswith("data:") else reference
    try:
        source = readable(reference)
        with av.open(source) as container:  # a first pass counts the frames, without decoding them
            if not container.streams.video:
                raise ValueError("it holds no video stream")
            stream = container.streams.video[0]
            total = sum(1 for packet in container.demux(stream) if packet.size)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        if not total:
            raise ValueError("it holds no frames")
        keep = set(sampled_indices(total, rate, **sampling) if sampling else range(total))
        if hasattr(source, "seek"):
            source.seek(0)
        frames, timestamps, last = [], [], 0.0
        with av.open(source) as container:
            stream = container.streams.video[0]
            for number, frame in enumerate(container.decode(stream)):
                last = float(frame.time or 0.0)
                if number in keep:
                    frames.append(frame.to_image())
                    timestamps.append(last)
            seconds = float(stream.duration * stream.time_base) if stream.duration else last + 1 / (rate or 1)
    except (av.FFmpegError, OSError, ValueError, httpx.HTTPError) as error:
        raise ValueError(f"cannot read video {shown}: {error}") from None
    if not frames:
        raise ValueError(f"cannot read video {shown}: no frame decodes")
    return Video(frames, timestamps, seconds, total)


def _frame_list(references: list[str], **sampling: Any) -> Video:
    from modelloop.data.images import open_image

    if not references:
        raise ValueError("a video given as frames needs at least one")
    frames = [open_image(reference) for reference in references]  # every frame read, as a file's are decoded
    keep = sampled_indices(len(references), FRAME_LIST_FPS, **sampling) if sampling else range(len(references))
    return Video(
        [frames[index] for index in keep],
        [index / FRAME_LIST_FPS for index in keep],
        len(references) / FRAME_LIST_FPS,
        len(references),
    )
