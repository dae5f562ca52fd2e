"""Experiment configs: presets load, errors name the key and the file, overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, build_model_config, from_container, load_config, to_container
from pipeline.models.presets import preset_config

EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiment"


def test_the_shipped_experiment_presets():
    assert sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")) == [
        "demo", "in1k_mvit_b_16", "k400_mvit_b_16x4", "k400_mvit_b_16x4_from_in1k", "k400_mvit_b_32x3", "k400_mvit_s_16x4", "netns",
        "ssv2_demo", "ssv2_mvit_b_16x4", "ssv2_mvitv2_s_16x4"]


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
def test_every_experiment_preset_loads(name):
    cfg = load_config(EXPERIMENTS / f"{name}.yaml", ["data.root=s3://bucket/shards"])
    model = build_model_config(cfg.model)
    assert model.num_frames in (1, cfg.data.sampling.num_frames)
    assert model.crop_size == cfg.data.augment.crop_size
    assert from_container(to_container(cfg)) == cfg


def test_k400_preset_is_the_paper_model_and_recipe():
    cfg = load_config(EXPERIMENTS / "k400_mvit_b_16x4.yaml", ["data.root=/data/k400", "trainer.num_workers=4"])
    assert build_model_config(cfg.model) == preset_config("mvit_b_16x4", num_classes=400)
    assert cfg.optim.weight_decay == 0.05 and cfg.data.augment.repeated_aug == 2
    assert cfg.global_batch_size == cfg.data.batch_size * 4


def test_k400_32x3_preset_samples_32_frames_at_stride_3():
    cfg = load_config(EXPERIMENTS / "k400_mvit_b_32x3.yaml", ["data.root=/data/k400"])
    assert build_model_config(cfg.model) == preset_config("mvit_b_32x3", num_classes=400)
    assert (cfg.data.sampling.num_frames, cfg.data.sampling.stride) == (32, 3)


def test_unknown_key_is_named_with_its_source(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*trainer\.epocs.*Did you mean: 'epochs'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"command line.*model\.embed_dimm"):
        load_config(EXPERIMENTS / "demo.yaml", ["model.embed_dimm=64"])


def test_wrong_types_and_bad_values_fail_before_any_work():
    with pytest.raises(ConfigError, match=r"trainer\.epochs.*could not be converted"):
        load_config(EXPERIMENTS / "demo.yaml", ["trainer.epochs=many"])
    with pytest.raises(ConfigError, match=r"trainer\.num_workers must be >= 1"):
        load_config(EXPERIMENTS / "demo.yaml", ["trainer.num_workers=0"])
    with pytest.raises(ConfigError, match=r"command line: data\.batch_size must be >= 1, got -8"):
        load_config(EXPERIMENTS / "demo.yaml", ["data.batch_size=-8"])
    with pytest.raises(ConfigError, match="unknown MViT preset"):
        load_config(EXPERIMENTS / "demo.yaml", ["model.preset=mvit_huge"])
    with pytest.raises(ConfigError, match="root must name the shard set"):
        load_config(EXPERIMENTS / "k400_mvit_b_16x4.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(EXPERIMENTS / "nope.yaml")
