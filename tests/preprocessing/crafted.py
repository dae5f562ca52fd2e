"""Inputs crafted against the caps and the time limit: cheap to make and small to store, costly to decode."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def repeated_frame_video(path: Path, frames: int, width: int, height: int, rate: int = 25,
                         container: str | None = None, options: dict[str, str] | None = None) -> None:  # fmt: skip
    """An H.264 video of `frames` uniform frames of width x height with one keyframe: one keyframe and
    one P-frame that repeats it are encoded, and the P-frame's packet is muxed `frames - 1` times.

    Making it costs two encodes whatever `frames` is, and the file stays small (an 8192x8192 one of 2
    frames is ~200 KB, 3000 frames of 720p ~60 KB), yet every frame is decoded, scaled and encoded
    in full when the video is preprocessed: what the caps and the time limit are for."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base, encoder.framerate = Fraction(1, rate), rate
    encoder.options = {"preset": "ultrafast", "x264-params": "keyint=infinite:bframes=0:ref=1"}
    encoder.thread_count = 1
    black = av.VideoFrame.from_ndarray(np.zeros((height * 3 // 2, width), np.uint8), format="yuv420p")
    packets = []
    for pts in range(2):
        black.pts = pts
        packets += encoder.encode(black)
    packets += encoder.encode(None)
    keyframe, repeat = (bytes(p) for p in packets)
    with av.open(str(path), "w", format=container, options=options or {}) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, rate)
        for index in range(frames):
            packet = av.Packet(keyframe if index == 0 else repeat)
            packet.pts = packet.dts = index
            packet.time_base, packet.stream, packet.is_keyframe = Fraction(1, rate), stream, index == 0
            out.mux(packet)


def huge_png(width: int, height: int) -> bytes:
    """A 1-bit PNG of width x height: a few hundred KB on disk, width x height pixels once decoded."""
    import io

    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()
