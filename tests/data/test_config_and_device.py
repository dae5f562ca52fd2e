"""The config schema (as the ``data:`` section of an OmegaConf YAML) and the device-side helpers."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.data.config import AugmentConfig, DataConfig, imagenet_defaults
from pipeline.data.device import mix_batch, normalize, soft_cross_entropy


def test_data_config_merges_yaml_and_overrides_and_validates() -> None:
    yaml = OmegaConf.create("root: s3://bucket/k400\ns3_endpoint_url: http://127.0.0.1:9000\nsampling: {num_frames: 32, stride: 3}")
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), yaml, OmegaConf.from_dotlist(["decoder.max_actors=6"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and cfg.validate() is cfg
    assert (cfg.sampling.num_frames, cfg.sampling.stride, cfg.decoder.max_actors) == (32, 3, 6)
    options = cfg.storage_options()
    assert options["endpoint_url"] == "http://127.0.0.1:9000" and options["config_kwargs"]["retries"]["total_max_attempts"] >= 1
    with pytest.raises(Exception, match="bogus"):
        OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create({"augment": {"bogus": 1}}))
    for field, value, message in [("eval_crops", 2, "eval_crops"), ("short_video", "wrap", "short_video"),
                                  ("mode", "tsn", "sampling.mode")]:
        bad = DataConfig(root="x")
        setattr(bad.sampling, field, value)
        with pytest.raises(ValueError, match=message):
            bad.validate()
    with pytest.raises(ValueError, match="root"):
        DataConfig().validate()
    image = imagenet_defaults("/data/in1k")
    assert image.augment.repeated_aug == 1 and image.augment.rand_augment_ops == 2 and image.validate()


def test_normalize_matches_the_float_formula() -> None:
    video = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    mean, std = [0.45, 0.4, 0.35], [0.225, 0.2, 0.25]
    expected = (video.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(normalize(video, mean, std), expected)
    assert normalize(video[:, :, 0], mean, std).shape == (2, 3, 8, 8)  # images (B, C, H, W) too


def test_mix_batch_soft_targets_are_reproducible_and_consistent() -> None:
    x = torch.rand(4, 3, 2, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    aug = AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
    kinds = set()
    for seed in range(20):
        mixed, targets = mix_batch(x, labels, 5, aug, seed)
        again, targets_again = mix_batch(x, labels, 5, aug, seed)
        assert torch.equal(mixed, again) and torch.equal(targets, targets_again)
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        lam = (float(targets[0, 0] - targets[0, 3]) / 0.9 + 1) / 2  # weight of sample 0 vs its partner 3
        changed = (mixed != x).any(dim=(1, 2))  # (B, H, W) pixels taken from the partner
        if torch.equal(mixed[:, :, 0], mixed[:, :, 1]) or not changed.all():
            kinds.add("cutmix")
            assert torch.equal((mixed[:, :, 0] != x[:, :, 0]), (mixed[:, :, 1] != x[:, :, 1]))  # same box per frame
            area = 1 - changed[0].float().mean().item()
            assert abs(area - lam) < 0.05
        else:
            kinds.add("mixup")
            torch.testing.assert_close(mixed[0], x[0] * lam + x[3] * (1 - lam), atol=1e-4, rtol=1e-4)
    assert kinds == {"mixup", "cutmix"}
    off = AugmentConfig(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    same, hard = mix_batch(x, labels, 5, off, 0)
    assert torch.equal(same, x) and torch.equal(hard.argmax(1), labels) and hard.max() == 1
    logits = torch.randn(4, 5)
    torch.testing.assert_close(soft_cross_entropy(logits, hard), torch.nn.functional.cross_entropy(logits, labels))
