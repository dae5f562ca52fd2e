"""Typed configuration of the data-loading service: the ``data:`` section of an experiment YAML.

Every field is a plain value (int, float, str, bool, list), so OmegaConf can merge YAML and
``data.sampling.num_frames=32`` style overrides onto it. Defaults follow the MViT-B 16x4 Kinetics
recipe (PySlowFast); ``imagenet_defaults()`` gives the image recipe. A ``DataConfig`` checks its values
when it is built and again, with ``root`` required, in ``DataConfig.validate()`` (called by
``load_config`` and ``build_dataset``), so a bad value fails before any work starts.

    data:
      root: s3://bucket/k400-shards        # what `python -m preprocessing kinetics --out` wrote
      s3_endpoint_url: http://minio:9000   # only for non-AWS stores; credentials come from the env
      batch_size: 8                        # rows (clips) per batch per train worker
      sampling: {num_frames: 16, stride: 4, eval_clips: 5, eval_crops: 1}
      augment: {mode: rrc, rand_augment: true, repeated_aug: 2, mixup_alpha: 0.8, cutmix_alpha: 1.0}
      decoder: {min_actors: 1, max_actors: 8, num_cpus: 1.0, device: auto}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from core.errors import ConfigError
from core.redact import redact_url
from core.tar_members import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MEMBER_HEADROOM

KINETICS_MEAN = [0.45, 0.45, 0.45]
KINETICS_STD = [0.225, 0.225, 0.225]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_SPLIT = re.compile(r"^[A-Za-z0-9_-]+$")  # split names are file-name prefixes (core.manifest)


@dataclass
class ShuffleConfig:
    """Training order. Evaluation always reads the manifest order, one shard per read task.

    ``shards``: permute the shard order every epoch from (seed, epoch).
    ``interleave``: shards one read task reads round-robin (mixes neighbouring shards).
    ``buffer``: samples held by a read task's seeded shuffle buffer (0 = off). Memory per read
    task is about ``buffer`` encoded samples.
    """

    shards: bool = True
    interleave: int = 4
    buffer: int = 16


@dataclass
class SamplingConfig:
    """Which frames make a clip (video only).

    ``mode``: "stride" (below) or "segment": one frame from each of ``num_frames`` equal segments of the
    whole video, random in training, at the same place in every segment in evaluation (the
    Something-Something recipe; ``stride``, ``target_fps`` and ``short_video`` are not used).
    ``pipeline.data.sampling`` defines both. In "stride" mode training takes one clip of ``num_frames``
    frames, ``stride`` frames apart at ``target_fps`` (frame-rate aware: a 15 fps video is read at
    stride * 15 / target_fps source frames), at a random start. Evaluation takes ``eval_clips`` clips uniformly spread over the video, each at
    ``eval_crops`` spatial positions (1 = centre, 3 = both ends and the centre of the long side).
    ``short_video``: "clamp" repeats the last frame, "loop" wraps around to the start, when the
    clip is longer than the video. ``target_fps: 0`` counts the stride in source frames.
    """

    num_frames: int = 16
    stride: int = 4
    target_fps: float = 30.0
    short_video: str = "clamp"
    eval_clips: int = 5
    eval_crops: int = 1
    mode: str = "stride"


@dataclass
class AugmentConfig:
    """Spatial augmentation (decoder actors) and batch mixing (training device).

    ``mode``: "jitter" = short side resized to a random size in ``jitter_scales`` (uniform, or with
    ``jitter_inverse_uniform`` its reciprocal uniform; done by the decoder at decode time) then a
    random ``crop_size`` crop; "rrc" = RandomResizedCrop with
    ``rrc_scale`` (area fraction) and ``rrc_ratio`` (aspect range). Evaluation resizes the short
    side to ``eval_short_side`` (at decode time) and takes centre/edge crops of ``crop_size``.
    ``rand_augment_*``: timm-style RandAugment (m, n, magnitude std, increasing ops), same ops on
    every frame of a clip. ``random_erasing``: probability of erasing one box (the same box in
    every frame). ``repeated_aug``: views per decoded training sample (decode once, augment k
    times; the k views land in the same batch). ``clips_per_sample``: how many clip positions those
    views are cut from (PySlowFast's ``DATA.TRAIN_CROP_NUM_TEMPORAL``, whose default 1 is what the
    MViT recipes train with: every ``AUG.NUM_SAMPLE`` view augments the same decoded clip); it must
    divide ``repeated_aug``, and ``repeated_aug`` gives each view a clip of its own, at the cost of
    decoding that many clips' frames per sample. Mixup/cutmix/label smoothing are applied on the
    training device by ``pipeline.data.device.mix_batch``; set both alphas to 0 to turn mixing off.

    ``on_device``: where a view's resize, flip, RandAugment and random erasing run. true: on the
    training device (``pipeline.data.device_augment``), beside normalisation and mixing; the decoder
    actors keep decoding and cutting each view's box out of the frames, and send the crop with its
    drawn flip, ops and erase box, so a view is the same either way (the parameters are drawn in the
    actor as before). false: in the decoder actors. "auto": true
    when the training workers use GPUs (``trainer.use_gpu``), resolved by the job on the driver; a
    dataset built outside a training job, with "auto" left unresolved, augments in the actors.
    """

    crop_size: int = 224
    mode: str = "rrc"
    jitter_scales: list[int] = field(default_factory=lambda: [256, 320])
    jitter_inverse_uniform: bool = False
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    rrc_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    flip: bool = True
    rand_augment: bool = True
    rand_augment_magnitude: int = 7
    rand_augment_ops: int = 4
    rand_augment_mstd: float = 0.5
    random_erasing: float = 0.25
    repeated_aug: int = 2
    clips_per_sample: int = 1
    eval_short_side: int = 224
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    mean: list[float] = field(default_factory=lambda: list(KINETICS_MEAN))
    std: list[float] = field(default_factory=lambda: list(KINETICS_STD))
    on_device: Union[bool, str] = "auto"

    def on_device_for(self, training_on_gpu: bool) -> bool:
        """``on_device`` resolved for a job whose training workers do (or do not) use GPUs."""
        return training_on_gpu if self.on_device == "auto" else self.on_device is True


@dataclass
class DecoderPoolConfig:
    """The Ray actor pool that decodes, samples and augments (``map_batches`` with a callable class).

    ``device``: "auto" decodes on the GPU (``decord.gpu``) when Decord was built with CUDA and the
    cluster has GPUs, on the CPU otherwise; "cpu" / "gpu" force it. ``num_gpus`` is the GPU share
    each actor requests on the GPU path (actors share a GPU with the trainer). ``threads`` are
    Decord's decoding threads per actor. ``tasks_in_flight``: batches queued per actor so it never
    waits for its next input. ``resources``: custom Ray resources each actor requests, which pins the
    pool to the nodes that advertise them (e.g. ``{mvit_cpu_node: 0.01}`` for the CPU worker group).

    Bounds, so that no fault turns into a silent hang (docs/data.md, "Faults"): ``isolate`` decodes each
    sample in a child process of the actor (``isolation``); a sample whose decode crashes or is killed
    is retried ``sample_retries`` times, one that runs past ``sample_timeout_s`` is cut off, and either
    is then counted FAILED with its reason while the epoch goes on. ``recycle_after``: samples a child
    decodes before it is replaced (bounds what Decord leaks; 0 = never). ``max_restarts``: how often
    Ray restarts a dead actor and retries its batch (Ray Data's default is unlimited).
    ``start_timeout_s``: how long an epoch waits for its ``min_actors`` to be placed before it fails
    naming what is missing.

    Caps, checked from the stream's own header before anything is decoded (the sample's metadata is
    only compared with it): ``max_frame_pixels``, a video's width x height (4096^2 is above 4K UHD);
    ``max_decoded_pixels``, the pixels of every frame one sample's views decode, at decode size (64 Mi
    is about 6x what a 10x3-view evaluation of 16-frame clips at 224 needs); ``max_image_pixels``, an
    image's width x height in any format (64 Mpx, under Pillow's own 89 Mpx warning). A sample over a
    cap is FAILED with the figures, never decoded.
    """

    min_actors: int = 1
    max_actors: int = 4
    num_cpus: float = 1.0
    device: str = "auto"
    num_gpus: float = 0.2
    threads: int = 1
    tasks_in_flight: int = 2
    resources: dict[str, float] = field(default_factory=dict)
    isolate: bool = True
    sample_timeout_s: float = 60.0
    sample_retries: int = 1
    recycle_after: int = 1000
    max_restarts: int = 3
    start_timeout_s: float = 300.0
    max_frame_pixels: int = 4096 * 4096
    max_decoded_pixels: int = 64 << 20
    max_image_pixels: int = 64 << 20


@dataclass
class DataConfig:
    """The data-loading service of one experiment.

    ``root``: the shard set (local path, ``file://`` or ``s3://`` URL) holding
    ``{split}.manifest.json`` and ``{split}-NNNNNN.tar``. ``batch_size`` / ``eval_batch_size``:
    rows per batch per worker, where a row is one view (a training view, or one clip x crop in
    evaluation); rounded down to a multiple of the views per sample (at least one sample per batch).
    ``prefetch_batches``: batches each worker fetches ahead while the model steps.
    ``read_num_cpus``: CPU share of each shard-reading task. ``progress_bars``: Ray Data's
    per-operator progress bars, redrawn for every epoch's execution (off by default in jobs).
    ``read_max_retries``: how often Ray retries a read task whose process died (Ray Data's default is
    unlimited). ``batch_timeout_s``: the longest a worker waits for its next batch before it stops the
    job with a diagnosis (what the data service is waiting for) instead of waiting silently.
    ``member_headroom`` x a shard's mean sample size (from its manifest), at most ``max_member_bytes``,
    is the largest tar member a read task accepts (``core.tar_members``): a member claiming more is a
    FAILED sample, skipped without being held in memory.
    """

    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    s3_endpoint_url: Optional[str] = None
    batch_size: int = 8
    eval_batch_size: int = 40
    seed: int = 0
    prefetch_batches: int = 2
    read_num_cpus: float = 0.25
    progress_bars: bool = False  # Ray Data's per-operator progress bars (off: one line per epoch is the log)
    read_max_retries: int = 3
    batch_timeout_s: float = 900.0
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    member_headroom: float = DEFAULT_MEMBER_HEADROOM
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    decoder: DecoderPoolConfig = field(default_factory=DecoderPoolConfig)

    def storage_options(self) -> dict:
        """fsspec options for ``root``: for S3, a non-secret endpoint and the retry policy (read here,
        on the driver, from ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE``, so every read task retries the
        same way; see ``core.s3.RetryPolicy``). Credentials stay in the env. Imported here, not at the
        top: core.s3 needs pyarrow, and the model and benchmark code that imports this module must run
        on a bare CUDA machine with torch alone (benchmarks/gpu_check.py)."""
        from core.s3 import storage_options_for

        return storage_options_for(self.root, self.s3_endpoint_url)

    def __post_init__(self) -> None:
        """Every check but ``root`` runs when the config is built (by OmegaConf's ``to_object`` too):
        ``DataConfig()`` (no shard set yet) is a valid start that code and tests fill in later."""
        self._check_values()

    def validate(self) -> DataConfig:
        """Every check again, ``root`` included, for a config changed after it was built; returns self.
        Raises ``ConfigError`` keyed by the full key (``data.batch_size``, ``data.sampling.num_frames``),
        which ``pipeline.config.load_config`` traces to the file or command line that set it."""
        if not self.root.strip():
            raise ConfigError("must name the shard set (local path or URL)", "data.root", self.root)
        self._check_values()
        return self

    def _check_values(self) -> None:
        s, a, d, sh = self.sampling, self.augment, self.decoder, self.shuffle

        def pair(values: list, low: float, high: float | None = None) -> bool:
            return len(values) == 2 and low < values[0] <= values[1] and (high is None or values[1] <= high)

        checks = [  # (ok, key under data., what a good value is, the value shown)
            (bool(_SPLIT.match(self.train_split)), "train_split", "must match [A-Za-z0-9_-]+", self.train_split),
            (bool(_SPLIT.match(self.val_split)), "val_split", "must match [A-Za-z0-9_-]+", self.val_split),
            (not self.s3_endpoint_url or self.s3_endpoint_url.startswith(("http://", "https://")), "s3_endpoint_url",
             "must be an http:// or https:// URL", redact_url(self.s3_endpoint_url or "")),
            (self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size),
            (self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1", self.eval_batch_size),
            (self.seed >= 0, "seed", "must be >= 0", self.seed),
            (self.prefetch_batches >= 0, "prefetch_batches", "must be >= 0", self.prefetch_batches),
            (self.read_num_cpus >= 0, "read_num_cpus", "must be >= 0", self.read_num_cpus),
            (self.max_member_bytes >= 1, "max_member_bytes", "must be >= 1", self.max_member_bytes),
            (self.member_headroom >= 1, "member_headroom", "must be >= 1", self.member_headroom),
            (d.max_frame_pixels >= 1, "decoder.max_frame_pixels", "must be >= 1", d.max_frame_pixels),
            (d.max_decoded_pixels >= 1, "decoder.max_decoded_pixels", "must be >= 1", d.max_decoded_pixels),
            (d.max_image_pixels >= 1, "decoder.max_image_pixels", "must be >= 1", d.max_image_pixels),
            (sh.interleave >= 1, "shuffle.interleave", "must be >= 1", sh.interleave),
            (sh.buffer >= 0, "shuffle.buffer", "must be >= 0", sh.buffer),
            (s.num_frames >= 1, "sampling.num_frames", "must be >= 1", s.num_frames),
            (s.mode in ("stride", "segment"), "sampling.mode", "must be 'stride' or 'segment'", s.mode),
            (s.stride >= 1, "sampling.stride", "must be >= 1", s.stride),
            (s.target_fps >= 0, "sampling.target_fps", "must be >= 0 (0 = stride in source frames)", s.target_fps),
            (s.short_video in ("clamp", "loop"), "sampling.short_video", "must be 'clamp' or 'loop'", s.short_video),
            (s.eval_clips >= 1, "sampling.eval_clips", "must be >= 1", s.eval_clips),
            (s.eval_crops in (1, 3), "sampling.eval_crops", "must be 1 or 3", s.eval_crops),
            (a.crop_size >= 1, "augment.crop_size", "must be >= 1", a.crop_size),
            (a.eval_short_side >= a.crop_size, "augment.eval_short_side", "must be >= data.augment.crop_size",
             a.eval_short_side),
            (a.mode in ("jitter", "rrc"), "augment.mode", "must be 'jitter' or 'rrc'", a.mode),
            (pair(a.jitter_scales, 0), "augment.jitter_scales", "must be [min, max] with 0 < min <= max",
             a.jitter_scales),
            (pair(a.rrc_scale, 0, 1), "augment.rrc_scale", "must be [min, max] with 0 < min <= max <= 1", a.rrc_scale),
            (pair(a.rrc_ratio, 0), "augment.rrc_ratio", "must be [min, max] with 0 < min <= max", a.rrc_ratio),
            (0 <= a.rand_augment_magnitude <= 10, "augment.rand_augment_magnitude", "must be in [0, 10]",
             a.rand_augment_magnitude),
            (a.rand_augment_ops >= 0, "augment.rand_augment_ops", "must be >= 0", a.rand_augment_ops),
            (a.rand_augment_mstd >= 0, "augment.rand_augment_mstd", "must be >= 0", a.rand_augment_mstd),
            (0 <= a.random_erasing <= 1, "augment.random_erasing", "must be in [0, 1]", a.random_erasing),
            (0 <= a.mix_prob <= 1, "augment.mix_prob", "must be in [0, 1]", a.mix_prob),
            (0 <= a.switch_prob <= 1, "augment.switch_prob", "must be in [0, 1]", a.switch_prob),
            (a.repeated_aug >= 1, "augment.repeated_aug", "must be >= 1", a.repeated_aug),
            (a.clips_per_sample >= 1 and a.repeated_aug % max(a.clips_per_sample, 1) == 0, "augment.clips_per_sample",
             f"must be >= 1 and divide augment.repeated_aug ({a.repeated_aug})", a.clips_per_sample),
            (a.mixup_alpha >= 0, "augment.mixup_alpha", "must be >= 0", a.mixup_alpha),
            (a.cutmix_alpha >= 0, "augment.cutmix_alpha", "must be >= 0", a.cutmix_alpha),
            (0 <= a.label_smoothing < 1, "augment.label_smoothing", "must be in [0, 1)", a.label_smoothing),
            (len(a.mean) == 3, "augment.mean", "must have 3 values", a.mean),
            (len(a.std) == 3 and min(a.std) > 0, "augment.std", "must have 3 values > 0", a.std),
            (a.on_device is True or a.on_device is False or a.on_device == "auto", "augment.on_device",
             "must be 'auto', true or false", a.on_device),
            (d.min_actors >= 1, "decoder.min_actors", "must be >= 1", d.min_actors),
            (d.max_actors >= d.min_actors, "decoder.max_actors", "must be >= data.decoder.min_actors", d.max_actors),
            (d.num_cpus >= 0, "decoder.num_cpus", "must be >= 0", d.num_cpus),
            (d.num_gpus >= 0, "decoder.num_gpus", "must be >= 0", d.num_gpus),
            (d.threads >= 0, "decoder.threads", "must be >= 0", d.threads),
            (d.device in ("auto", "cpu", "gpu"), "decoder.device", "must be 'auto', 'cpu' or 'gpu'", d.device),
            (d.tasks_in_flight >= 1, "decoder.tasks_in_flight", "must be >= 1", d.tasks_in_flight),
            (d.sample_timeout_s > 0, "decoder.sample_timeout_s", "must be > 0", d.sample_timeout_s),
            (d.sample_retries >= 0, "decoder.sample_retries", "must be >= 0", d.sample_retries),
            (d.recycle_after >= 0, "decoder.recycle_after", "must be >= 0 (0 = never)", d.recycle_after),
            (d.max_restarts >= 0, "decoder.max_restarts", "must be >= 0", d.max_restarts),
            (d.start_timeout_s > 0, "decoder.start_timeout_s", "must be > 0", d.start_timeout_s),
            (self.read_max_retries >= 0, "read_max_retries", "must be >= 0", self.read_max_retries),
            (self.batch_timeout_s > 0, "batch_timeout_s", "must be > 0", self.batch_timeout_s),
            (_custom_resources(d.resources), "decoder.resources",
             "must map custom resource names (not CPU/GPU/memory) to amounts > 0", dict(d.resources)),
        ]
        # a rule that compares with another key names it: that key may be the one that was set
        related = {"augment.eval_short_side": ("data.augment.crop_size",),
                   "augment.clips_per_sample": ("data.augment.repeated_aug",),
                   "decoder.max_actors": ("data.decoder.min_actors",)}
        for ok, name, rule, value in checks:
            if not ok:
                raise ConfigError(rule, f"data.{name}", value, related=related.get(name, ()))


def _custom_resources(resources: dict) -> bool:
    """Custom Ray resources only: CPU and GPU shares have their own keys, which the pool plan checks."""
    return all(k not in ("CPU", "GPU", "memory", "object_store_memory") and v > 0 for k, v in resources.items())


def imagenet_defaults(root: str = "", **overrides: object) -> DataConfig:
    """The image recipe (MViT-B-16 on ImageNet-1K, timm/DeiT style): RandomResizedCrop 224, flip,
    RandAugment m9 n2, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1, one view per
    image; evaluation resizes the short side to 256 and takes the centre 224 crop."""
    augment = AugmentConfig(
        mode="rrc", rand_augment_magnitude=9, rand_augment_ops=2, repeated_aug=1, eval_short_side=256,
        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
    )  # fmt: skip
    cfg = DataConfig(root=root, augment=augment, batch_size=32, eval_batch_size=32)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg
