"""Both datasets to s3:// on the moto server (through s3fs), compared byte for byte with local runs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import s3fs
from shard_helpers import cli_env, output_files, run_cli

from core.manifest import list_shard_urls, load_manifest
from preprocessing.verify import verify_split


def _objects(url: str, storage_options: dict) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem(**storage_options)
    fs.invalidate_cache()
    root = url.removeprefix("s3://")
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def test_kinetics_to_s3_with_endpoint_flag(kinetics_raw: Path, tmp_path: Path, s3_bucket) -> None:
    common = ["kinetics", "--csv", str(kinetics_raw / "annotations" / "train.csv"), "--videos", str(kinetics_raw / "train"),
              "--short-side", "64", "--shard-samples", "4", "--no-progress"]  # fmt: skip
    run_cli(*common, "--out", s3_bucket.url, "--s3-endpoint-url", s3_bucket.endpoint_url)
    run_cli(*common, "--out", str(tmp_path / "local"))

    objects = _objects(s3_bucket.url, s3_bucket.storage_options)
    published = {name: data for name, data in objects.items() if not name.startswith("_state/")}
    assert published == output_files(tmp_path / "local"), "S3 and local outputs must be byte-identical"
    assert set(objects) - set(published) == {f"_state/train/train-00000{i}.tar.json" for i in range(3)}

    manifest_text = objects["train.manifest.json"].decode()
    for secret in ("testing", "127.0.0.1", "endpoint"):
        assert secret not in manifest_text, "manifests must not record credentials or endpoints"

    manifest = load_manifest(s3_bucket.url, "train", s3_bucket.storage_options)
    urls = list_shard_urls(s3_bucket.url, "train", s3_bucket.storage_options)
    assert urls == [f"{s3_bucket.url}/train-00000{i}.tar" for i in range(3)]
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(urls[0]))) as tar:
        assert len(tar.getnames()) == 3 * manifest.shards[0].samples

    assert verify_split(s3_bucket.url, "train", s3_bucket.storage_options, decode_per_shard=2).ok
    verified = run_cli("verify", s3_bucket.url, "--split", "train", "--s3-endpoint-url", s3_bucket.endpoint_url)
    assert "train: OK" in verified.stdout


def test_imagenet_from_s3_to_s3_with_endpoint_from_env(imagenet_raw: Path, tmp_path: Path, s3_bucket) -> None:
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    bucket = s3_bucket.url.removeprefix("s3://").split("/")[0]
    fs.put(str(imagenet_raw), f"{bucket}/raw", recursive=True)
    env = cli_env(AWS_ENDPOINT_URL=s3_bucket.endpoint_url)
    run_cli("imagenet", "--root", f"s3://{bucket}/raw", "--split", "train", "--out", s3_bucket.url, "--no-progress", env=env)
    run_cli("imagenet", "--root", str(imagenet_raw), "--split", "train", "--out", str(tmp_path / "local"), "--no-progress")

    remote = _objects(s3_bucket.url, s3_bucket.storage_options)
    local = output_files(tmp_path / "local")
    assert remote["train.manifest.json"] == local["train.manifest.json"]
    assert remote["train-000000.tar"] == local["train-000000.tar"]
    rejects = remote["train.rejects.jsonl"].decode()
    assert rejects.count("\n") == 1 and f"s3://{bucket}/raw/train/" in rejects
    assert run_cli("verify", s3_bucket.url, "--split", "train", env=env).returncode == 0
