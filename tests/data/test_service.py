"""The service end to end on a local Ray instance, with real shards from the preprocessing CLI:
worker splits, evaluation views, S3, corrupt samples, determinism and mid-epoch resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from data_helpers import delivered, rows_by_id, run_cli, run_epoch, run_epochs, shard_keys, small_config

from pipeline.data.config import imagenet_defaults
from pipeline.data.device_augment import DeviceAugmentParams, augment_on_device, render_on_device
from pipeline.data.loader import EpochStats
from pipeline.data.service import build_dataset
from pipeline.trainer.validation import check_epoch_identity
from core.manifest import keys_digest, load_manifest

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def train_epoch0(kinetics_shards: Path, ray_cluster: None) -> tuple[list, list]:
    """Epoch 0 of the training split read by two workers (seed 7), shared by several tests."""
    batches, stats, _ = run_epoch(build_dataset(small_config(str(kinetics_shards)), "train", train=True), 2, epoch=0)
    return batches, stats


def _labels(root: Path, split: str) -> dict[str, int]:
    import tarfile

    labels = {}
    for path in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    labels[m.name[:-4]] = int(tar.extractfile(m).read())
    return labels


def _check_disjoint_halves(batches: list, stats: list, keys: list[str], views: int) -> None:
    per_rank = [delivered(b) for b in batches]
    assert len(batches[0]) == len(batches[1]) == stats[0].batches == stats[1].batches  # equal batch counts
    assert {k for k, _ in per_rank[0]}.isdisjoint({k for k, _ in per_rank[1]})
    assert sorted(per_rank[0] + per_rank[1]) == sorted((k, v) for k in keys for v in range(views))
    total = EpochStats.merge(stats)
    assert total.complete and total.samples == len(keys) and total.failed == 0
    # The identity the training loop checks: the workers' fingerprints add up to the manifest's digest.
    assert total.fingerprint == total.expected_digest == keys_digest(keys)
    assert check_epoch_identity(total, f"epoch {total.epoch}")


def test_two_workers_receive_disjoint_halves_whose_union_is_the_split(
    kinetics_shards: Path, train_epoch0: tuple[list, list]
) -> None:
    batches, stats = train_epoch0
    keys = shard_keys(kinetics_shards, "train")
    assert len(keys) == 12
    _check_disjoint_halves(batches, stats, keys, views=2)
    assert EpochStats.merge(stats).expected_digest == load_manifest(str(kinetics_shards), "train").split_key_digest()
    labels = _labels(kinetics_shards, "train")
    for batch in batches[0] + batches[1]:
        assert batch["video"].dtype == np.uint8 and batch["video"].shape[1:] == (3, 8, 48, 48)
        assert [labels[k] for k in batch["video_id"]] == batch["label"].tolist()
        assert batch["video_id"][0::2] == batch["video_id"][1::2]  # both views of a sample in one batch
    # The next epoch reads the same samples in another order (a new shard order), same fingerprint.
    ds = build_dataset(small_config(str(kinetics_shards)), "train", train=True)
    next_batches, next_stats, _ = run_epoch(ds, 2, epoch=1)
    _check_disjoint_halves(next_batches, next_stats, keys, views=2)
    assert EpochStats.merge(next_stats).fingerprint == EpochStats.merge(stats).fingerprint
    assert delivered(next_batches[0]) != delivered(batches[0])


def test_shards_on_s3_with_an_endpoint_override(kinetics_shards: Path, s3_bucket: Any) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    for path in kinetics_shards.glob("train*"):
        fs.put_file(str(path), f"{s3_bucket.url}/{path.name}")
    cfg = small_config(s3_bucket.url, s3_endpoint_url=s3_bucket.endpoint_url)
    batches, stats, _ = run_epoch(build_dataset(cfg, "train", train=True), 2, epoch=0)
    _check_disjoint_halves(batches, stats, shard_keys(kinetics_shards, "train"), views=2)


@pytest.mark.parametrize(("clips", "crops"), [(3, 1), (10, 3), (7, 3)])
def test_evaluation_views_count_and_video_ids(kinetics_shards: Path, clips: int, crops: int) -> None:
    """K clips x C crops per video (the 5x1 / 10x3 / 7x3 protocols), each view once, id and label kept."""
    cfg = small_config(str(kinetics_shards))  # 6 rows per batch: 2 videos at 3x1, 1 video at 10x3 / 7x3
    cfg.sampling.eval_clips, cfg.sampling.eval_crops = clips, crops
    batches, stats, _ = run_epoch(build_dataset(cfg, "val", train=False), 2, epoch=0)
    labels = _labels(kinetics_shards, "val")
    views = clips * crops
    rows = delivered(batches[0]) + delivered(batches[1])
    assert sorted(rows) == sorted((k, v) for k in labels for v in range(views))  # 6 videos x K*C views, once each
    assert len(batches[0]) == len(batches[1])
    for batch in batches[0] + batches[1]:
        assert [labels[k] for k in batch["video_id"]] == batch["label"].tolist()
        assert batch["video"].shape[1:] == (3, 8, 48, 48)
        assert len(batch["video_id"]) % views == 0  # a video's views never straddle two batches
    if crops == 3:  # view = clip * C + crop; the videos are wider than tall, so crops see other pixels
        by_view = rows_by_id(batches[0] + batches[1])
        for key in labels:
            assert len({by_view[(key, crop)].tobytes() for crop in range(3)}) == 3
    total = EpochStats.merge(stats)
    assert total.complete and total.samples == len(labels) and total.views == len(labels) * views


@pytest.fixture(scope="module")
def corrupt_epoch0(corrupt_shards: tuple[Path, list[str]], ray_cluster: None) -> tuple[list, list]:
    """Epoch 0 of the training split with 2 damaged samples, read by two workers, the augmentation in the actors."""
    batches, stats, _ = run_epoch(build_dataset(small_config(str(corrupt_shards[0])), "train", train=True), 2, epoch=0)
    return batches, stats


def _check_corrupt_epoch(batches: list, stats: list, root: Path, damaged: list[str]) -> None:
    total = EpochStats.merge(stats)
    assert total.failed == 2 and total.samples == 10 and total.complete
    # Samples that fail to decode still have their keys: the epoch is checked for identity too.
    assert total.unkeyed == 0 and total.fingerprint == total.expected_digest == keys_digest(shard_keys(root, "train"))
    assert sorted(key for key, _ in total.failures) == sorted(damaged)
    ids = {k for k, _ in delivered(batches[0]) + delivered(batches[1])}
    assert ids == set(shard_keys(root, "train")) - set(damaged)
    assert len(batches[0]) == len(batches[1])


def test_corrupt_samples_inside_shards_are_skipped_and_counted(corrupt_shards: tuple[Path, list[str]],
                                                               corrupt_epoch0: tuple[list, list]) -> None:  # fmt: skip
    _check_corrupt_epoch(*corrupt_epoch0, *corrupt_shards)


def test_augmentation_on_the_device_gives_the_views_the_actors_give(
    corrupt_shards: tuple[Path, list[str]], corrupt_epoch0: tuple[list, list]
) -> None:
    """``augment.on_device`` end to end: each view's crop at its own size (a ragged column, in which a failed
    sample's rows carry empty crops) through Ray Data and two workers' loaders, then resized, flipped and
    augmented as the training step does: the same accounting, and the same pixels as the actors' own
    augmentation of the same (seed, epoch, key, view)."""
    root, damaged = corrupt_shards
    cfg = small_config(str(root))
    cfg.augment.on_device = True
    batches, stats, _ = run_epoch(build_dataset(cfg, "train", train=True), 2, epoch=0)
    _check_corrupt_epoch(batches, stats, root, damaged)
    reference, _ = corrupt_epoch0
    sizes = set()
    for rank in range(2):
        assert len(batches[rank]) == len(reference[rank])
        for sent, expected in zip(batches[rank], reference[rank]):
            assert sent["video_id"] == expected["video_id"] and isinstance(sent["video"], list)
            sizes |= {tuple(crop.shape) for crop in sent["video"]}
            video = render_on_device(sent["video"], torch.as_tensor(sent["flip"]), 48, 8)
            params = DeviceAugmentParams(torch.as_tensor(sent["rand_augment"]), torch.as_tensor(sent["erase"]),
                                         cfg.augment.mean, cfg.augment.std)  # fmt: skip
            np.testing.assert_array_equal(augment_on_device(video, params), expected["video"])
    assert len(sizes) > 2 and all(size[0] == 8 and size[3] == 3 for size in sizes)


def test_the_same_seed_reproduces_the_same_batches(kinetics_shards: Path, train_epoch0: tuple[list, list]) -> None:
    batches, _ = train_epoch0
    again, _, _ = run_epoch(build_dataset(small_config(str(kinetics_shards)), "train", train=True), 2, epoch=0)
    for rank in range(2):
        assert len(again[rank]) == len(batches[rank])
        for a, b in zip(again[rank], batches[rank]):
            assert a["video_id"] == b["video_id"] and a["mix_seed"] == b["mix_seed"]
            np.testing.assert_array_equal(a["video"], b["video"])
            np.testing.assert_array_equal(a["label"], b["label"])
    other, _, _ = run_epoch(build_dataset(small_config(str(kinetics_shards), seed=8), "train", train=True), 2, 0)
    first = rows_by_id(batches[0] + batches[1])
    second = rows_by_id(other[0] + other[1])
    assert first.keys() == second.keys()
    assert all(not np.array_equal(first[k], second[k]) for k in first)  # other clips and crops


def test_an_epoch_resumes_from_a_position_on_any_world_size(
    kinetics_shards: Path, train_epoch0: tuple[list, list]
) -> None:
    batches, _ = train_epoch0
    cfg = small_config(str(kinetics_shards))
    _, _, states = run_epoch(build_dataset(cfg, "train", train=True), 2, epoch=0, stop_after=1)
    assert states[0] == states[1] and states[0]["epoch"] == 0
    position = states[0]["position"]
    assert position == sum(len(set(b["video_id"])) for b in (batches[0][0], batches[1][0]))
    rest = rows_by_id(batches[0][1:] + batches[1][1:])  # what the uninterrupted epoch delivered later
    for world_size in (2, 1):
        resumed, stats, _ = run_epoch(build_dataset(cfg, "train", train=True), world_size, epoch=0, position=position)
        got = rows_by_id([b for rank in resumed for b in rank])
        assert got.keys() == rest.keys()
        assert all(np.array_equal(got[k], rest[k]) for k in rest)  # same clips and crops as before
        total = EpochStats.merge(stats)
        assert total.complete and total.start == position and total.expected == 12 - position
        assert total.expected_digest is None and not check_epoch_identity(total, "epoch 0")  # see the check


def test_a_segment_sampled_epoch_resumes_from_a_position_with_the_same_views(kinetics_shards: Path) -> None:
    """``sampling.mode: segment`` (SSv2): an epoch resumed after its first batches, on another world size,
    delivers what the uninterrupted epoch delivered after that point, frame for frame."""
    cfg = small_config(str(kinetics_shards))
    cfg.sampling.mode = "segment"
    batches, _, states = run_epoch(build_dataset(cfg, "train", train=True), 2, epoch=0, stop_after=1)
    position = states[0]["position"]
    assert states[0] == states[1] and 0 < position < 12
    rest = rows_by_id(batches[0][1:] + batches[1][1:])
    resumed, stats, _ = run_epoch(build_dataset(cfg, "train", train=True), 1, epoch=0, position=position)
    got = rows_by_id([b for rank in resumed for b in rank])
    assert got.keys() == rest.keys() and all(np.array_equal(got[k], rest[k]) for k in rest)
    total = EpochStats.merge(stats)
    assert total.complete and total.start == position and total.expected == 12 - position


def _decoder_actors() -> set[str]:
    """Ids of the decoder actors this test process's Ray job has created so far (any state)."""
    import ray
    from ray.util.state import list_actors

    context = ray.get_runtime_context()
    actors = list_actors(address=context.gcs_address, filters=[("job_id", "=", context.get_job_id())], limit=10_000,
                         raise_on_missing_output=False)  # fmt: skip
    return {a.actor_id for a in actors if "Decoder" in a.class_name}


def test_planned_epochs_are_read_by_one_execution_with_the_batches_of_separate_ones(
    kinetics_shards: Path, train_epoch0: tuple[list, list]
) -> None:
    cfg = small_config(str(kinetics_shards))
    cfg.decoder.max_actors = 1
    before = _decoder_actors()
    planned = run_epochs(build_dataset(cfg, "train", train=True), 2, [0, 1, 2], plan=True)
    assert len(_decoder_actors() - before) == 1  # one pool for the three epochs (one per epoch without a plan)
    keys = shard_keys(kinetics_shards, "train")
    for epoch, (batches, stats, states) in planned.items():
        _check_disjoint_halves(batches, stats, keys, views=2)
        assert {s["epoch"] for s in states} == {epoch}
        alone = train_epoch0[0] if epoch == 0 else run_epoch(build_dataset(cfg, "train", train=True), 2, epoch)[0]
        for rank in range(2):
            assert [b["video_id"] for b in batches[rank]] == [b["video_id"] for b in alone[rank]]
            for a, b in zip(batches[rank], alone[rank]):
                np.testing.assert_array_equal(a["video"], b["video"])
    assert rows_by_id(planned[1][0][0] + planned[1][0][1]).keys() == rows_by_id(planned[2][0][0] + planned[2][0][1]).keys()
    # A resumed run plans from where it stopped: epoch 1 from a position, then epoch 2, in one execution
    position = 5
    resumed = run_epochs(build_dataset(cfg, "train", train=True), 2, [1, 2], position=position, plan=True)
    total = EpochStats.merge(resumed[1][1])
    assert total.complete and total.start == position and total.expected == 12 - position
    assert [b["video_id"] for b in resumed[2][0][0]] == [b["video_id"] for b in planned[2][0][0]]


def test_images_go_through_the_same_service(tmp_path_factory: pytest.TempPathFactory) -> None:
    raw, out = tmp_path_factory.mktemp("in_raw"), tmp_path_factory.mktemp("in_shards")
    run_cli("synth", "imagenet", "--out", str(raw), "--classes", "3", "--per-class", "3", "--val-per-class", "1")
    run_cli("imagenet", "--root", str(raw), "--split", "train", "--out", str(out), "--shard-samples", "4",
            "--workers", "1", "--no-progress")  # fmt: skip
    cfg = imagenet_defaults(str(out), batch_size=4)
    cfg.augment.crop_size, cfg.augment.eval_short_side = 32, 36
    cfg.decoder.max_actors = 1
    batches, stats, _ = run_epoch(build_dataset(cfg, "train", train=True), 1, epoch=0)
    total = EpochStats.merge(stats)
    assert total.complete and total.failed == 0
    assert total.fingerprint == total.expected_digest == keys_digest(shard_keys(out, "train"))
    assert {k for k, _ in delivered(batches[0])} == set(shard_keys(out, "train"))
    assert all(b["video"].shape[1:] == (3, 1, 32, 32) and b["video"].dtype == np.uint8 for b in batches[0])
