"""configs/model/*.yaml build exactly the presets they are named after."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.models.presets import PRESETS, config_from_file, preset_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def test_there_is_one_config_file_per_preset():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_file_equals_preset(name):
    assert config_from_file(str(CONFIG_DIR / f"{name}.yaml")) == preset_config(name)


def test_preset_reference_with_overrides_and_unknown_keys(tmp_path):
    good = tmp_path / "k10.yaml"
    good.write_text("preset: mvit_b_16x4\nnum_classes: 10\n")
    assert config_from_file(str(good)) == preset_config("mvit_b_16x4", num_classes=10)
    bad = tmp_path / "typo.yaml"
    bad.write_text("preset: mvit_b_16x4\nnum_clases: 10\n")
    with pytest.raises(ValueError, match=r"typo\.yaml.*num_clases"):
        config_from_file(str(bad))


def test_exported_configs_read_back_as_the_presets_including_unset_pool_padding(tmp_path):
    from pipeline.models.__main__ import export_configs

    for path in export_configs(tmp_path):
        assert "pool_padding: null" in path.read_text()  # "None" would read back as a string
        assert config_from_file(str(path)) == preset_config(path.stem)
        assert path.read_text() == (CONFIG_DIR / path.name).read_text(), f"regenerate {path.name}"
