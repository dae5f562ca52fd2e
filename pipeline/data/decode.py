"""The decoder actor: encoded samples in, uint8 views out (``map_batches`` callable class).

This module stays free of torch and torchvision (seconds of imports and hundreds of MB per process):
with ``decoder.isolate`` the actor never decodes itself, its child does (``sample_decode``, imported by
the child's zygote), so an actor only pays for them when isolation is off.

Each input row is one sample (or a pad / broken placeholder, see ``plan``); each output row is one
view: a training view (``augment.repeated_aug`` per sample, decoded once) or an evaluation view
(``eval_clips`` x ``eval_crops`` per video, decoded once). Video is decoded by Decord, images (JPEG)
by Pillow; both resize at decode time where that saves work (Decord's scaler for the frame size the
views need, Pillow's JPEG draft mode for DCT-domain downscaling by 2/4/8).

With ``augment.on_device`` a training row's ``video`` is its view's box cut out of the decoded frames,
(T, h, w, 3) uint8 at the box's own size (a ragged column: Ray Data's variable-shaped tensors), and the
row carries the view's flip and drawn RandAugment ops and erase box (``flip`` int8, ``rand_augment``
float64 (slots, 3), ``erase`` int64 (5,); ``sampling.augment_record``), which the decode process sends
before the crops and the actor checks before passing them on; the training device resizes, flips and
augments (``device_augment``). A failed or pad row's crop is (T, 0, 0, 3).

Decode context: ``decord.gpu(i)`` (NVDEC) when Decord was built with CUDA and Ray gave the actor a
GPU, ``decord.cpu(0)`` otherwise; chosen per actor at start-up and logged. A sample that fails to
decode becomes ``views`` rows with status FAILED and the reason, never an exception: whether its
decode raised or, with ``decoder.isolate`` (see ``isolation``), crashed, was killed or hung.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.config import DataConfig, DecoderPoolConfig
from pipeline.data.plan import BROKEN, FAILED, OK, PAD, stable_hash
from pipeline.data.sampling import augment_dtype, augment_problem, augment_slots, train_clip

log = logging.getLogger(__name__)


def load_decord() -> Any:
    """Decord, imported after PyAV: decord's bundled libav otherwise breaks PyAV's libvpx."""
    import av  # noqa: F401
    import decord

    return decord


def decord_has_cuda() -> bool:
    """Whether this Decord build has its CUDA (NVDEC) device API compiled in (its runtime registers one
    ``device_api.<kind>`` function per compiled-in device API; see docs/versions.md)."""
    return "device_api.gpu" in load_decord().list_global_func_names()


@dataclass(frozen=True)
class DecodeDevice:
    kind: str  # "cpu" | "gpu"
    index: int
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}({self.index})"


def choose_decode_device(requested: str, decord_cuda: bool, gpu_ids: Sequence[Any]) -> DecodeDevice:
    """The decode context of an actor: GPU when asked or allowed ("auto") and possible, else CPU."""
    if requested == "cpu":
        return DecodeDevice("cpu", 0, "decoder.device=cpu")
    if decord_cuda and gpu_ids:
        # Ray restricts CUDA_VISIBLE_DEVICES to the actor's GPU, so it is device 0 in this process.
        return DecodeDevice("gpu", 0, f"Decord has CUDA and Ray assigned GPU {gpu_ids[0]}")
    why = "Decord was built without CUDA" if not decord_cuda else "no GPU assigned to this actor"
    if requested == "gpu":
        raise RuntimeError(f"decoder.device=gpu but {why}")
    return DecodeDevice("cpu", 0, why)


def pool_gpus_per_actor(cfg: DecoderPoolConfig, decord_cuda: bool, cluster_gpus: float, reserved_gpus: float = 0.0) -> float:
    """GPU share each decoder actor requests from Ray (0 = CPU actors).

    ``reserved_gpus`` is what the training workers (and pools built before this one) take. The pool
    starts ``min_actors`` actors at once: if their GPU shares do not fit in the rest, Ray would keep
    them pending and the job would wait forever, so "auto" falls back to CPU decoding (and says why)
    and "gpu" refuses.
    """
    if cfg.device == "cpu":
        return 0.0
    need, free = cfg.min_actors * cfg.num_gpus, max(cluster_gpus - reserved_gpus, 0.0)
    fits = need <= free + 1e-9
    if cfg.device == "gpu":
        if cfg.num_gpus <= 0:
            raise ValueError("decoder.device=gpu needs decoder.num_gpus > 0")
        if not fits:
            raise ValueError(
                f"decoder.device=gpu: {cfg.min_actors} actors x {cfg.num_gpus:g} GPU = {need:g} GPU, but only "
                f"{free:g} GPU are left beside the training workers; lower trainer.gpus_per_worker (e.g. 0.8), "
                "decoder.min_actors or decoder.num_gpus"
            )
        return cfg.num_gpus
    if not (decord_cuda and cluster_gpus > 0 and cfg.num_gpus > 0):
        return 0.0
    if not fits:
        log.warning(
            "decoding on CPU: %d decoder actors x %g GPU = %g GPU do not fit in the %g GPU left beside the "
            "training workers (lower trainer.gpus_per_worker, e.g. 0.8, to decode with NVDEC)",
            cfg.min_actors, cfg.num_gpus, need, free,
        )  # fmt: skip
        return 0.0
    return cfg.num_gpus


def views_per_sample(cfg: DataConfig, modality: str, train: bool) -> int:
    if train:
        return cfg.augment.repeated_aug
    return 1 if modality == "image" else cfg.sampling.eval_clips * cfg.sampling.eval_crops


def view_rng(seed: int, epoch: int, key: str, view: int, stream: int = 0) -> np.random.Generator:
    """A generator of one training view: a function of (seed, epoch, key, view) only. Stream 0 draws
    the spatial parameters, stream 1 the clip position."""
    return np.random.default_rng([seed, epoch, view, stable_hash("sample", key), stream])


def train_clips(cfg: DataConfig, key: str, epoch: int, video_frames: int, fps: float) -> list[np.ndarray]:
    """Frame indices of the ``augment.clips_per_sample`` clips a training sample's views are cut from,
    clip c drawn by view c's clip-position stream: with one clip per view this is each view's own draw,
    as before the setting existed, and with one clip per sample it is view 0's."""
    return [train_clip(view_rng(cfg.seed, epoch, key, clip, stream=1), video_frames, fps, cfg.sampling)
            for clip in range(cfg.augment.clips_per_sample)]


def split_crops(packed: np.ndarray, views: int, frames: int, slots: int, crop: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A sample's crops and their records out of what ``SampleDecoder.decode`` returns with
    ``augment.on_device`` (``sample_decode.pack_crops``): a flat uint8 buffer -> one (frames, h, w, 3) view
    of it per view, and the records. Raises ``ValueError`` for anything a decode process could not have
    sent (``sampling.augment_problem``, and crops that do not add up to the buffer)."""
    dtype = augment_dtype(slots)
    head = views * dtype.itemsize
    if packed.dtype != np.uint8 or packed.ndim != 1 or len(packed) < head:
        raise ValueError(f"the decode process sent {packed.dtype} {list(packed.shape)} for {views} cropped views")
    records = np.ascontiguousarray(packed[:head]).view(dtype).reshape(views)
    problem = augment_problem(records, crop)
    if problem:
        raise ValueError(f"the decode process sent invalid augmentation parameters: {problem}")
    shapes = [(frames, h, w, 3) for h, w, _ in records["crop"].tolist()]
    sizes = [math.prod(shape) for shape in shapes]
    if head + sum(sizes) != len(packed):
        raise ValueError(f"the decode process sent {len(packed) - head} bytes of pixels for crops of {sum(sizes)}")
    ends = np.cumsum([head, *sizes]).tolist()
    return [packed[start:end].reshape(shape) for start, end, shape in zip(ends, ends[1:], shapes)], records


def sample_meta(text: str) -> dict[str, Any]:
    """The ``.json`` metadata of a row ({} when absent or unreadable)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def failure_reason(exc: Exception) -> str:
    """What a sample that failed to decode records: the decode process's own text (``SampleFailed``, it
    already names the type), else the exception's type and message; bounded, as it goes into every row."""
    from pipeline.data.isolation import SampleFailed

    message = str(exc) if isinstance(exc, SampleFailed) else f"{type(exc).__name__}: {exc}"
    return message[:300]


class Decoder:
    """``map_batches`` callable: one batch = one unit (batch) of samples -> views x samples rows.

    With ``decoder.isolate`` (the default) each sample is decoded in a child process
    (``isolation.DecodeProcess``): a sample that crashes, gets killed or hangs its decoder becomes
    FAILED rows with the reason, and the actor goes on. Without it, decoding runs in the actor itself.
    """

    def __init__(self, cfg: DataConfig, modality: str, train: bool) -> None:
        from core import faults

        self.cfg, self.modality, self.train = cfg, modality, train
        self.views = views_per_sample(cfg, modality, train)
        self.frames = 1 if modality == "image" else cfg.sampling.num_frames
        self.on_device = train and cfg.augment.on_device is True  # as SampleDecoder decides it
        self.device = DecodeDevice("cpu", 0, "images decode with Pillow on the CPU")
        gpu_ids: list = []
        if modality == "video":
            import ray

            gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
            self.device = choose_decode_device(cfg.decoder.device, decord_has_cuda(), gpu_ids)
        self._faults = faults.current()  # planted faults (reliability drills); empty unless MVIT_FAULTS is set
        d = cfg.decoder
        if d.isolate:
            from pipeline.data.isolation import ChildSettings, DecodeProcess

            settings = ChildSettings(cfg, modality, train, self.device.kind, self.device.index)
            self._process = DecodeProcess(settings, timeout_s=d.sample_timeout_s, retries=d.sample_retries,
                                          recycle_after=d.recycle_after)  # fmt: skip
            self._local = None
        else:
            from pipeline.data.sample_decode import SampleDecoder

            self._process = None
            self._local = SampleDecoder(cfg, modality, train, self.device.kind, self.device.index)
        # The driver logged the pool's plan (CPU or GPU shares); an actor says where it decodes at INFO
        # (a new pool starts every epoch), and warns when it holds a GPU share but decodes on the CPU.
        gpu_unused = modality == "video" and self.device.kind != "gpu" and bool(gpu_ids)
        log.log(logging.WARNING if gpu_unused else logging.INFO, "decoder actor: %s %s views on %s (%s)%s", modality,
                "train" if train else "eval", self.device, self.device.reason,
                ", each sample in a child process" if d.isolate else "")  # fmt: skip

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Ends the decode process and its zygote, if any (a caller outside Ray Data ends them here rather
        than when the object is collected)."""
        process, self._process = getattr(self, "_process", None), None
        if process is not None:
            try:
                process.close()
            except (OSError, EOFError):  # at interpreter exit the zygote may be gone first: nothing to close
                pass

    def decode_sample(self, data: bytes, meta: dict[str, Any], key: str, epoch: int) -> np.ndarray:
        """One sample's bytes -> its views, as every row of ``__call__`` is decoded (``pipeline.predict``
        decodes files with it so that they are seen exactly as evaluation sees a sample). Raises for a
        sample that does not decode: ``failure_reason`` is what a FAILED row records."""
        if self._process is not None:
            return self._process.decode(data, meta, key, epoch, self._faults if not self._faults.empty else None)
        kind = self._faults.decode_fault(key, 1)
        if kind:
            from core.faults import fire_decode_fault

            fire_decode_fault(kind)
        return self._local.decode(data, meta, key, epoch)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.data.isolation import SampleFailed

        if self._faults.kill_decoder_actor:  # a drill (MVIT_FAULTS): this actor dies, on every attempt
            from core.faults import kill_process_if_planted

            kill_process_if_planted(self._faults.kill_decoder_actor, [str(k) for k in batch["key"]], "decoder actor")
        n, views, crop = len(batch["kind"]), self.views, self.cfg.augment.crop_size
        rows = n * views
        no_crop = np.zeros((self.frames, 0, 0, 3), np.uint8)  # a pad or failed row's crop, with on_device
        if self.on_device:  # each view its crop, of its own size: a ragged column (Ray Data's variable-shaped tensors)
            video = np.empty(rows, dtype=object)
            for row in range(rows):  # one by one: numpy would try to broadcast a list of equal arrays into the slots
                video[row] = no_crop
        else:
            video = np.zeros((rows, 3, self.frames, crop, crop), np.uint8)
        status = np.full(rows, OK, np.int8)
        errors = [""] * rows
        slots = augment_slots(self.cfg.augment)
        records = np.zeros(rows, augment_dtype(slots))
        records["ops"][..., 0] = -1
        for i in range(n):
            kind, key = int(batch["kind"][i]), str(batch["key"][i])
            block = slice(i * views, (i + 1) * views)
            if kind == PAD:
                status[block] = PAD
                continue
            if kind == BROKEN:
                status[block], errors[block] = FAILED, [str(batch["error"][i])] * views
                continue
            try:
                decoded = self.decode_sample(batch["data"][i], sample_meta(str(batch["meta"][i])), key,
                                             int(batch["epoch"][i]))  # fmt: skip
                if self.on_device:
                    try:
                        crops, records[block] = split_crops(decoded, views, self.frames, slots, crop)
                    except ValueError as err:  # the child's numbers, not the sample: still only this sample fails
                        raise SampleFailed(str(err)) from None
                    for row, view_crop in enumerate(crops, start=i * views):
                        video[row] = view_crop
                else:
                    video[block] = decoded
            except Exception as exc:  # noqa: BLE001 - a bad sample is skipped and counted, never fatal
                if self._process is not None and not isinstance(exc, SampleFailed):
                    raise  # the isolation itself broke (not the sample): Ray Data's bounded retries take over
                message = failure_reason(exc)
                log.warning("skipping sample %s: %s", key, message)
                status[block], errors[block] = FAILED, [message] * views
                if not self.on_device:  # (with it, a sample's crops are set only once all of them are checked)
                    video[block] = 0
        repeat = lambda column: np.repeat(np.asarray(batch[column]), views)  # noqa: E731
        augment = {"rand_augment": np.ascontiguousarray(records["ops"]), "erase": np.ascontiguousarray(records["erase"]),
                   "flip": records["crop"][:, 2].astype(np.int8)} if self.on_device else {}  # fmt: skip
        return {
            "video": video,
            "label": np.where(status == OK, repeat("label"), -1).astype(np.int64),
            "video_id": repeat("key"),
            "view": np.tile(np.arange(views, dtype=np.int64), n),
            "status": status,
            "pos": repeat("pos"),
            "unit": repeat("unit"),
            "epoch": repeat("epoch"),
            "error": np.asarray(errors, dtype=object),
            **augment,
        }
