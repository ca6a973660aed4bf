"""Sound clips: decoded through PyAV (FFmpeg), whatever the container (WAV, FLAC, MP3,
OGG, M4A ...), to one channel of float samples at the rate a model's feature extractor
wants. A clip is a local path or a base64 ``data:`` URL (OpenAI's ``input_audio`` parts
become one), as pictures are.
"""

from __future__ import annotations

import binascii
import io
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy


class Clip(NamedTuple):
    """A decoded clip: mono float32 samples in [-1, 1] and their rate (per second)."""

    samples: numpy.ndarray
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


def open_audio(reference: str, rate: int | None = None) -> Clip:
    """The clip at ``reference`` decoded to one channel, resampled to ``rate`` when given
    (its own rate otherwise); ValueError naming the clip when it cannot be read."""
    import av
    import httpx

    from modelloop.data.locations import readable

    shown = reference[:40] + "..." if reference.startswith("data:") else reference
    try:
        with av.open(readable(reference)) as container:
            if not container.streams.audio:
                raise ValueError("it holds no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate or stream.codec_context.sample_rate)
            pieces = [
                resampled.to_ndarray() for frame in container.decode(stream) for resampled in resampler.resample(frame)
            ]
            pieces += [resampled.to_ndarray() for resampled in resampler.resample(None)]
            out_rate = resampler.rate
    except (av.FFmpegError, OSError, binascii.Error, ValueError, httpx.HTTPError) as error:
        raise ValueError(f"cannot read audio {shown}: {error}") from None
    if not pieces:
        raise ValueError(f"cannot read audio {shown}: it holds no samples")
    import numpy

    return Clip(numpy.concatenate(pieces, axis=1)[0].astype(numpy.float32), int(out_rate))


def wav_bytes(samples: numpy.ndarray, rate: int) -> bytes:
    """Mono float samples as 16-bit PCM WAV (how generated clips are written)."""
    import av
    import numpy

    buffer = io.BytesIO()
    pcm = (numpy.clip(samples, -1, 1) * 32767).astype(numpy.int16)[None]
    with av.open(buffer, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()
