"""SSv2's VP9 WebM stored as released, or re-encoded to H.264 MP4 like Kinetics: what each costs.

`python benchmarks/ssv2_storage.py [--videos N]` writes N videos the size of the release's (427x240, 48
frames: 4 s at 12 fps, VP9 at constant quality with camera-like noise, a textured background panning and
an object moving), re-encodes each with the tool's own `transcode.VideoEncoder` at the `preprocessing
ssv2` defaults (short side 240, GOP 16, CRF 23, one thread), and reads both versions as the data
service's decoder does: Decord from bytes, one `get_batch` of 16 frames (one per segment, as SSv2's
segment sampling draws them) scaled to 224x224, median of 20 reads. Prints bytes, encode time and read
time; the figures and the decision are in docs/preprocessing.md ("SSv2").
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import av
import decord
import numpy as np

from preprocessing.synth import _background, _shape_mask
from preprocessing.transcode import VideoEncoder


def release_like_vp9(seed: int, width: int = 427, height: int = 240, fps: int = 12, frames: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    background = _background(rng, height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = io.BytesIO()
    with av.open(out, "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "31", "b": "0", "deadline": "good", "cpu-used": "4"}
        for t in range(frames):
            frame = np.roll(background, t * 2, axis=1).astype(int) + rng.integers(-12, 13, size=background.shape)
            frame = np.clip(frame, 0, 255).astype(np.uint8)
            frame[_shape_mask("disk", xx - 50 - 5 * t, yy - height / 2, 30)] = (220, 40, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return out.getvalue()


def decord_read_seconds(data: bytes, frames: int = 16, repeats: int = 20) -> tuple[float, int]:
    """Median seconds of one segment-sampled read, and the frame count Decord sees."""
    times = []
    for repeat in range(repeats):
        started = time.perf_counter()
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), width=224, height=224, num_threads=1)
        total = len(reader)
        edges = np.linspace(0, total, frames + 1)
        rng = np.random.default_rng(repeat)
        wanted = [int(rng.integers(int(edges[i]), max(int(edges[i]) + 1, int(edges[i + 1])))) for i in range(frames)]
        batch = reader.get_batch(wanted).asnumpy()
        times.append(time.perf_counter() - started)
        assert batch.shape == (frames, 224, 224, 3), batch.shape
    return statistics.median(times), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8)
    args = parser.parse_args()
    encoder = VideoEncoder(short_side=240)
    rows = []
    for seed in range(args.videos):
        vp9 = release_like_vp9(seed)
        started = time.perf_counter()
        mp4 = encoder.transcode(io.BytesIO(vp9))[0]
        encode = time.perf_counter() - started
        (read_vp9, frames_vp9), (read_mp4, frames_mp4) = decord_read_seconds(vp9), decord_read_seconds(mp4)
        assert frames_vp9 == frames_mp4 == 48, (frames_vp9, frames_mp4)
        rows.append((len(vp9), len(mp4), encode, read_vp9, read_mp4))
    a = np.array(rows, dtype=float).mean(axis=0)
    print(f"{args.videos} videos of 427x240, 48 frames (4 s at 12 fps); Decord reads 48 frames of each version")
    print(f"bytes: VP9 {a[0] / 1e3:.0f} KB, H.264 {a[1] / 1e3:.0f} KB (x{a[1] / a[0]:.2f})")
    print(f"re-encode (VideoEncoder, short side 240, 1 thread): {a[2] * 1e3:.0f} ms per video")
    print(f"Decord read of 16 segment frames at 224x224: VP9 {a[3] * 1e3:.1f} ms, H.264 {a[4] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
