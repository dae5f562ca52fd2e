"""The decoder actor class run in-process on real shard samples: frames equal PyAV's, bad samples
become FAILED rows, the decode context is chosen (CPU here) and logged."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import av
import numpy as np
import pytest
from data_helpers import decoder_batch, decoder_row, first_sample, small_config

from pipeline.data.decode import (
    Decoder,
    choose_decode_device,
    decord_has_cuda,
    pool_gpus_per_actor,
    train_clips,
    views_per_sample,
)
from core.errors import ConfigError
from pipeline.data.config import DecoderPoolConfig
from pipeline.data.plan import BROKEN, FAILED, OK, PAD
from pipeline.data.sampling import eval_clips


def _pyav_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_eval_views_are_the_frames_pyav_decodes_at_the_same_indices(kinetics_shards: Path) -> None:
    key, data, meta = first_sample(kinetics_shards)
    assert (meta["width"], meta["height"]) == (96, 64)
    cfg = small_config(str(kinetics_shards))
    cfg.augment.crop_size = cfg.augment.eval_short_side = 64  # no resize: views are plain centre crops
    decoder = Decoder(cfg, "video", train=False)
    out = decoder(decoder_batch([decoder_row(key, data, meta)]))
    reference = _pyav_frames(data)
    clips = eval_clips(len(reference), meta["fps"], cfg.sampling)
    assert out["video"].shape == (3, 3, 8, 64, 64) and out["status"].tolist() == [OK] * 3
    assert out["view"].tolist() == [0, 1, 2] and out["video_id"].tolist() == [key] * 3
    for view, indices in enumerate(clips):
        expected = reference[indices][:, :, 16:80].transpose(3, 0, 1, 2)  # (C, T, H, W), centre of 96 px
        np.testing.assert_array_equal(out["video"][view], expected)


def test_training_views_are_deterministic_and_differ_per_view_and_epoch(kinetics_shards: Path) -> None:
    key, data, meta = first_sample(kinetics_shards)
    cfg = small_config(str(kinetics_shards))
    decoder = Decoder(cfg, "video", train=True)
    first = decoder(decoder_batch([decoder_row(key, data, meta)]))
    again = Decoder(cfg, "video", train=True)(decoder_batch([decoder_row(key, data, meta)]))
    assert first["video"].shape == (2, 3, 8, 48, 48)
    np.testing.assert_array_equal(first["video"], again["video"])
    assert not np.array_equal(first["video"][0], first["video"][1])  # repeated augmentation: 2 views
    next_epoch = decoder(decoder_batch([{**decoder_row(key, data, meta), "epoch": 1}]))
    assert not np.array_equal(first["video"], next_epoch["video"])


def test_segment_sampling_decodes_the_frames_of_its_segments(kinetics_shards: Path) -> None:
    """``sampling.mode: segment`` (SSv2) through the decoder: evaluation views are PyAV's frames at the
    segments' middle (and spread) frames; a training view's frames are one per segment, and are the same
    for a fresh decoder (what a resumed epoch relies on), other for another epoch."""
    key, data, meta = first_sample(kinetics_shards)
    cfg = small_config(str(kinetics_shards))
    cfg.sampling.mode = "segment"
    cfg.decoder.isolate = False  # in-process: the sampling is the same, without a decode child per decoder
    cfg.augment.crop_size = cfg.augment.eval_short_side = 64
    reference = _pyav_frames(data)
    out = Decoder(cfg, "video", train=False)(decoder_batch([decoder_row(key, data, meta)]))
    clips = eval_clips(len(reference), meta["fps"], cfg.sampling)
    assert out["status"].tolist() == [OK] * 3 and [c.tolist() for c in clips] != [clips[0].tolist()] * 3
    for view, indices in enumerate(clips):
        np.testing.assert_array_equal(out["video"][view], reference[indices][:, :, 16:80].transpose(3, 0, 1, 2))

    cfg.augment.crop_size = cfg.augment.eval_short_side = 48
    cfg.augment.flip = False
    cfg.augment.rand_augment = False
    cfg.augment.random_erasing = 0.0
    first = Decoder(cfg, "video", train=True)(decoder_batch([decoder_row(key, data, meta)]))
    again = Decoder(cfg, "video", train=True)(decoder_batch([decoder_row(key, data, meta)]))
    np.testing.assert_array_equal(first["video"], again["video"])
    (indices,) = train_clips(cfg, key, 0, len(reference), meta["fps"])
    first_bound, last_bound = np.round((len(reference) - 1) / 8 * np.arange(9)).astype(int)[[0, -1]]
    assert len(indices) == 8 and indices[0] >= first_bound and indices[-1] <= last_bound
    assert (np.diff(indices) >= 0).all() and indices[-1] - indices[0] > len(reference) / 2  # spans the video
    later = Decoder(cfg, "video", train=True)(decoder_batch([{**decoder_row(key, data, meta), "epoch": 3}]))
    assert not np.array_equal(first["video"], later["video"])


@pytest.mark.parametrize("clips", [1, 2, 4])
def test_a_samples_training_views_are_cut_from_clips_per_sample_decoded_clips(kinetics_shards: Path, clips: int) -> None:
    """PySlowFast's repeated augmentation: the views of one decode share its clip (clips_per_sample 1,
    the default), or split evenly over that many clips, each drawn as view c's own clip would be."""
    key, data, meta = first_sample(kinetics_shards)
    cfg = small_config(str(kinetics_shards))
    a = cfg.augment
    # no resize, flip or colour op: a view is the clip's frames cropped at some x of the 96x64 frame
    a.mode, a.jitter_scales, a.crop_size, a.eval_short_side = "jitter", [64, 64], 64, 64
    a.flip, a.rand_augment, a.random_erasing = False, False, 0.0
    a.repeated_aug, a.clips_per_sample = 4, clips
    out = Decoder(cfg.validate(), "video", train=True)(decoder_batch([decoder_row(key, data, meta)]))
    reference = _pyav_frames(data)
    drawn = train_clips(cfg, key, 0, len(reference), meta["fps"])
    assert len(drawn) == clips and out["status"].tolist() == [OK] * 4
    if clips > 1:
        assert any(not np.array_equal(drawn[0], other) for other in drawn[1:])  # the clips do differ here

    def crops_of(indices: np.ndarray) -> list[np.ndarray]:
        return [reference[indices][:, :, x:x + 64].transpose(3, 0, 1, 2) for x in range(96 - 64 + 1)]

    for view in range(4):
        clip = view // (4 // clips)
        assert any(np.array_equal(out["video"][view], crop) for crop in crops_of(drawn[clip])), (view, clip)
        others = [c for c in drawn if not np.array_equal(c, drawn[clip])]
        assert not any(np.array_equal(out["video"][view], crop) for c in others for crop in crops_of(c))


def test_clips_per_sample_must_divide_the_views() -> None:
    cfg = small_config("shards")
    cfg.augment.clips_per_sample = 3  # repeated_aug 2
    with pytest.raises(ConfigError, match="augment.clips_per_sample.*divide augment.repeated_aug"):
        cfg.validate()


def test_bad_samples_become_failed_rows_never_exceptions(kinetics_shards: Path) -> None:
    key, data, meta = first_sample(kinetics_shards)
    cfg = small_config(str(kinetics_shards))
    decoder = Decoder(cfg, "video", train=True)
    rows = [decoder_row("good", data, meta), decoder_row("cut", data[:300], meta), decoder_row("noise", bytes(range(256)) * 40, meta),
            decoder_row("", b"", {}, kind=PAD, label=-1), decoder_row("gone", b"", {}, kind=BROKEN, label=-1),
            decoder_row("nometa", data, {})]  # fmt: skip
    out = decoder(decoder_batch(rows))
    # the stream is the truth: a sample without metadata decodes from its container's own headers
    assert out["status"].tolist() == [OK] * 2 + [FAILED] * 4 + [PAD] * 2 + [FAILED] * 2 + [OK] * 2
    assert out["label"].tolist() == [1, 1] + [-1] * 8 + [1, 1]
    assert all(out["error"][i] for i in range(2, 6)) and out["error"][8] == "lost"
    assert not out["video"][2:10].any() and out["video"][10:].any()


def test_decode_device_choice_is_automatic_and_logged(kinetics_shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    cuda = decord_has_cuda()
    assert cuda is False  # the CPU build installed here
    assert choose_decode_device("auto", True, [3]).kind == "gpu"
    assert choose_decode_device("auto", True, []).reason == "no GPU assigned to this actor"
    assert choose_decode_device("auto", False, [0]).kind == "cpu"
    assert choose_decode_device("cpu", True, [0]).kind == "cpu"
    with pytest.raises(RuntimeError, match="without CUDA"):
        choose_decode_device("gpu", False, [0])
    cfg = small_config(str(kinetics_shards))
    assert pool_gpus_per_actor(cfg.decoder, cuda, cluster_gpus=0) == 0.0
    assert pool_gpus_per_actor(cfg.decoder, True, cluster_gpus=4) == cfg.decoder.num_gpus
    with caplog.at_level(logging.INFO, logger="pipeline.data.decode"):
        decoder = Decoder(cfg, "video", train=True)
    assert str(decoder.device) == "cpu(0)"
    assert "video train views on cpu(0) (Decord was built without CUDA)" in caplog.text


def test_gpu_decoders_only_where_their_shares_fit_beside_the_trainers(caplog: pytest.LogCaptureFixture) -> None:
    """8 GPUs, 8 trainers at 1.0 GPU: 8 actors x 0.2 cannot start, so "auto" decodes on CPU (and says
    why) rather than leave the pool pending forever; at 0.8 GPU per trainer they fit."""
    pool = DecoderPoolConfig(min_actors=8, num_gpus=0.2, device="auto")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.decode"):
        assert pool_gpus_per_actor(pool, True, cluster_gpus=8, reserved_gpus=8 * 1.0) == 0.0
    assert "do not fit in the 0 GPU left" in caplog.text
    assert pool_gpus_per_actor(pool, True, cluster_gpus=8, reserved_gpus=8 * 0.8) == 0.2
    assert pool_gpus_per_actor(pool, False, cluster_gpus=8, reserved_gpus=6.4) == 0.0  # Decord without CUDA
    forced = DecoderPoolConfig(min_actors=8, num_gpus=0.2, device="gpu")
    with pytest.raises(ValueError, match=r"8 actors x 0.2 GPU = 1.6 GPU, but only 0.8 GPU are left.*gpus_per_worker"):
        pool_gpus_per_actor(forced, True, cluster_gpus=4, reserved_gpus=3.2)
    assert pool_gpus_per_actor(DecoderPoolConfig(device="cpu"), True, cluster_gpus=8) == 0.0


def test_views_per_sample() -> None:
    cfg = small_config("x")
    cfg.sampling.eval_clips, cfg.sampling.eval_crops = 10, 3
    assert views_per_sample(cfg, "video", train=False) == 30
    assert views_per_sample(cfg, "video", train=True) == cfg.augment.repeated_aug
    assert views_per_sample(cfg, "image", train=False) == 1
