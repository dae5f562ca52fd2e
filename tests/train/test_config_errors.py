"""Config errors are structured: every section raises ``ConfigError`` with the key, the value and the
problem, and ``load_config`` fills in where the key was set (the file, the command line or a default)
from that key, never from the message text."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

import core.errors
from pipeline.config import ConfigError, load_config
from pipeline.data.config import DataConfig
from pipeline.models.config import MViTConfig
from pipeline.tracking import TrackingConfig
from pipeline.trainer.config import OptimConfig, TrainerConfig

DEMO = Path(__file__).resolve().parents[2] / "configs" / "experiment" / "demo.yaml"
ROOT = ["data.root=/shards"]


def _file(tmp_path: Path, body: dict) -> Path:
    body.setdefault("data", {}).setdefault("root", "/shards")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _refused(path: Path | None, overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    err = caught.value
    assert "\n" not in str(err)
    return err


# (dotted key, bad value, what the message says): one per section, each raised by the section itself.
SECTIONS = [
    ("trainer.num_workers", 0, "trainer.num_workers must be >= 1, got 0"),
    ("optim.lr", 0.0, "optim.lr must be > 0, got 0.0"),
    ("tracking.log_every_steps", 0, "tracking.log_every_steps must be >= 1, got 0"),
    ("data.batch_size", 0, "data.batch_size must be >= 1, got 0"),
    ("data.sampling.num_frames", 0, "data.sampling.num_frames must be >= 1, got 0"),
    ("data.train_split", "../x", "data.train_split must match [A-Za-z0-9_-]+, got '../x'"),
    ("model.num_frames", 0, "model.num_frames must be >= 1, got 0"),
    ("model.pool_mode", "Max", "model.pool_mode must be one of 'conv', 'max', 'avg', got 'Max'"),
    ("seed", -1, "seed must be >= 0, got -1"),
    ("name", "../up", "name must be a plain folder name ([A-Za-z0-9_.-], no '..'), got '../up'"),
]


def _nested(key: str, value: object) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


@pytest.mark.parametrize(("key", "value", "says"), SECTIONS, ids=[k for k, _, _ in SECTIONS])
def test_a_bad_value_in_the_file_is_keyed_and_traced_to_the_file(tmp_path, key, value, says):
    path = _file(tmp_path, _nested(key, value))
    err = _refused(path, ["tracking.experiment=unrelated"])
    assert (err.key, err.value, err.where) == (key, value, str(path))
    assert str(err) == f"invalid config from {path}: {says}"


@pytest.mark.parametrize(("key", "value", "says"), SECTIONS, ids=[k for k, _, _ in SECTIONS])
def test_a_bad_value_on_the_command_line_is_keyed_and_traced_to_the_command_line(key, value, says):
    err = _refused(DEMO, [*ROOT, f"{key}={value}"])
    assert (err.key, err.value, err.where) == (key, value, "the command line")
    assert str(err) == f"invalid config from the command line: {says}"


def test_the_command_line_wins_over_the_file_for_the_same_key(tmp_path):
    path = _file(tmp_path, {"trainer": {"num_workers": 0}})
    err = _refused(path, ["trainer.num_workers=-2"])
    assert (err.key, err.value, err.where) == ("trainer.num_workers", -2, "the command line")
    assert load_config(path, ["trainer.num_workers=2"]).trainer.num_workers == 2


def test_a_key_no_source_set_is_traced_to_its_default(tmp_path):
    # optim.lr from the file falls below the default optim.min_lr: the error is about min_lr, and it is
    # traced to the file, which set optim.lr, the key the rule compares min_lr with.
    path = _file(tmp_path, {"optim": {"lr": 1e-6}})
    err = _refused(path, [])
    assert (err.key, err.value, err.related) == ("optim.min_lr", 1.6e-5, ("optim.lr",))
    assert err.where == str(path)
    err = _refused(path, ["optim.lr=1e-7"])
    assert err.where == "the command line"
    # data.root is checked by load_config (DataConfig() without a root is a valid start).
    empty = tmp_path / "empty.yaml"
    empty.write_text("trainer:\n  epochs: 1\n")
    err = _refused(empty, [])
    assert (err.key, err.value) == ("data.root", "")
    assert err.where == f"{empty} (where data.root is not set: the default applies)"
    assert str(err) == (f"invalid config from {empty} (where data.root is not set: the default applies): "
                        "data.root must name the shard set (local path or URL), got ''")
    err = _refused(None, [])
    assert (err.key, err.where) == ("data.root", "the schema defaults")


def test_model_errors_carry_the_model_prefix():
    err = _refused(DEMO, [*ROOT, "model.pool_padding=[1,2,1]"])
    assert (err.key, err.value, err.where) == ("model.pool_padding", (1, 2, 1), "the command line")
    assert str(err).startswith("invalid config from the command line: model.pool_padding (1, 2, 1) exceeds half")
    err = _refused(DEMO, [*ROOT, "model.preset=mvit_huge"])
    assert (err.key, err.value, err.where) == ("model.preset", "mvit_huge", "the command line")
    assert str(err).startswith("invalid config from the command line: model.preset: unknown MViT preset 'mvit_huge'")
    # MViTConfig itself does not know it lives under model.: its keys are its field names.
    with pytest.raises(ConfigError) as caught:
        MViTConfig(depth=0)
    assert (caught.value.key, caught.value.value, caught.value.where) == ("depth", 0, None)
    assert str(caught.value) == "depth must be >= 1, got 0"
    assert caught.value.under("model").key == "model.depth"


def test_omegaconf_type_errors_are_keyed_by_the_key_omegaconf_reports(tmp_path):
    err = _refused(DEMO, [*ROOT, "trainer.epochs=many"])
    assert (err.key, err.where, err.has_value) == ("trainer.epochs", "the command line", False)
    assert str(err).startswith("invalid config from the command line: key 'trainer.epochs': ")
    assert "could not be converted" in str(err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  epocs: 3\n")
    err = _refused(bad, [])
    assert (err.key, err.where) == ("trainer.epocs", str(bad)) and "Did you mean" in str(err)


def test_sections_raise_config_error_when_built():
    cases = [
        (lambda: TrainerConfig(precision="fp8"), "trainer.precision", "fp8"),
        (lambda: TrainerConfig(storage_path=" "), "trainer.storage_path", " "),
        (lambda: OptimConfig(betas=(0.9, 1.0)), "optim.betas", [0.9, 1.0]),
        (lambda: TrackingConfig(experiment=""), "tracking.experiment", ""),
        (lambda: DataConfig(root="x", batch_size=0), "data.batch_size", 0),
        (lambda: MViTConfig(pool_padding=(1, 1, 1, 1)), "pool_padding", (1, 1, 1, 1)),
    ]
    for build, key, value in cases:
        with pytest.raises(ConfigError) as caught:
            build()
        assert (caught.value.key, caught.value.value, caught.value.where) == (key, value, None)
        assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("overrides", "key", "says"), [
    (["tracking.register_as=a/b"], "tracking.register_as", "must be a registered model name"),
    (["tracking.register_as=.."], "tracking.register_as", "must be a registered model name"),
    (["tracking.register_as=kinetics@best"], "tracking.register_as", "must be a registered model name"),
    (["tracking.register_alias=candidate"], "tracking.register_alias", "needs tracking.register_as"),
    (["tracking.register_as=k400", "tracking.register_alias=Latest"], "tracking.register_alias", "reserved by MLflow"),
    (["tracking.register_as=k400", "tracking.register_alias=v3"], "tracking.register_alias", "reserved by MLflow"),
    (["tracking.register_as=k400", "tracking.register_alias=a.b"], "tracking.register_alias", "must be a model alias"),
])
def test_a_registry_name_mlflow_would_refuse_is_refused_when_the_config_loads(overrides, key, says):
    """Not after the training: the job registers its model at the end, so the names are checked first."""
    err = _refused(DEMO, [*ROOT, *overrides])
    assert err.key == key and says in str(err) and err.where == "the command line"


def test_data_config_checks_its_values_when_built_and_the_root_in_validate():
    cfg = DataConfig()  # no shard set yet: valid to build, refused by validate()
    with pytest.raises(ConfigError) as caught:
        cfg.validate()
    assert caught.value.key == "data.root"
    cfg.root = "/shards"
    assert cfg.validate() is cfg
    cfg.sampling.eval_crops = 2  # changed after it was built: validate() still checks it
    with pytest.raises(ConfigError) as caught:
        cfg.validate()
    assert (caught.value.key, caught.value.value) == ("data.sampling.eval_crops", 2)


def test_secrets_in_values_and_in_messages_are_redacted(monkeypatch):
    secret = "hunter2secretPW"
    err = _refused(DEMO, [*ROOT, f"data.s3_endpoint_url=ftp://user:{secret}@store"])
    assert err.key == "data.s3_endpoint_url" and err.where == "the command line"
    assert secret not in str(err) and "ftp://***@store" in str(err)
    # An OmegaConf message quoting the value is scrubbed too.
    err = _refused(DEMO, [*ROOT, f"data.batch_size=http://user:{secret}@host"])
    assert err.key == "data.batch_size" and secret not in str(err) and "user:***@host" in str(err)
    # A value holding a secret from the environment, and a URL password, shown redacted.
    monkeypatch.setenv("MY_API_TOKEN", "tok3nValue42")
    err = ConfigError("must be reachable", "tracking.tracking_uri", "https://u:pw99999@mlflow/?t=tok3nValue42")
    assert str(err.at("the command line")) == ("invalid config from the command line: tracking.tracking_uri must be "
                                               "reachable, got 'https://u:***@mlflow/?t=***'")


def test_config_error_is_one_class_and_survives_pickling():
    assert ConfigError is core.errors.ConfigError and issubclass(ConfigError, ValueError)
    err = ConfigError("must be >= 1", "trainer.epochs", 0).at("the command line")
    back = pickle.loads(pickle.dumps(err))
    assert (back.problem, back.key, back.value, back.where, str(back)) == (
        err.problem, err.key, err.value, err.where, str(err))
    assert not pickle.loads(pickle.dumps(ConfigError("config file not found: x"))).has_value


def test_errors_that_are_not_about_one_key(tmp_path):
    err = _refused(tmp_path / "nope.yaml", [])
    assert err.key is None and str(err) == f"config file not found: {tmp_path / 'nope.yaml'}"
    err = _refused(DEMO, [*ROOT, "trainer.epochs"])
    assert err.key is None
    assert str(err) == "invalid config from the command line: 'trainer.epochs' is not a key.path=value override"
