"""The epoch plan: which sample goes to which batch and which worker, as pure arithmetic.

An epoch of a split is a sequence of the split's N samples, fixed by (seed, epoch) alone:
1. Shards are grouped into read groups of ``interleave`` shards, after a seeded permutation of the
   shard order (training; evaluation keeps the manifest order, one shard per group).
2. A read group emits its shards' samples round-robin through a seeded shuffle buffer. The
   sample at place i of the sequence has *position* i.

Resuming an epoch at position p drops the first p samples and lays the remaining M = N - p out
in *units*, one unit = one batch of one worker:

- U = W * ceil(M / (W * S)) units for W workers and S samples per batch, so every worker gets
  U / W batches (equal counts: no rank waits at the epoch end);
- the M samples are spread evenly: the first M mod U units hold ceil(M/U) samples, the others
  floor(M/U); each unit is topped up to S rows with *pad* rows, which the worker drops, so no
  sample is dropped or repeated to make the counts equal;
- unit u goes to worker u mod W (streaming_split hands equal-sized blocks out round-robin when
  order is preserved; the loader checks this on every batch).

After a worker has taken k batches, the whole job has consumed the first k * W units, i.e. the
samples before ``Layout.position_after(k)``: that position is what a checkpoint stores.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from core.tar_members import DEFAULT_MAX_MEMBER_BYTES

CURSOR_NAMESPACE = "mvit-data"

# Row kinds from the reader, which the decoder turns into row statuses with the same codes.
SAMPLE, PAD, BROKEN = 0, 1, 2
OK, FAILED = 0, 2


@dataclass(frozen=True)
class ShardRef:
    """A shard to read: its URL, its manifest's sample count, and the largest member its reader accepts
    (``core.tar_members.member_cap`` of its manifest entry, worked out on the driver)."""

    url: str
    samples: int
    member_cap: int = DEFAULT_MAX_MEMBER_BYTES


@dataclass(frozen=True)
class ReadGroup:
    """Shards read by one read task; ``first`` is the position of its first sample."""

    index: int
    shards: tuple[ShardRef, ...]
    first: int

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of ``parts`` that is the same in every process and Python version."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def read_groups(shards: list[ShardRef], seed: int, epoch: int, permute: bool, interleave: int) -> list[ReadGroup]:
    """The epoch's read groups in reading order."""
    order = sorted(shards, key=lambda s: stable_hash("shard-order", seed, epoch, s.url)) if permute else list(shards)
    groups, first = [], 0
    for index, start in enumerate(range(0, len(order), interleave)):
        group = ReadGroup(index, tuple(order[start : start + interleave]), first)
        groups.append(group)
        first += group.samples
    return groups


@dataclass(frozen=True)
class Layout:
    """How the samples after ``start`` fill units (batches) of ``per_unit`` rows for ``world_size``."""

    total: int
    start: int
    world_size: int
    per_unit: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.total:
            raise ValueError(f"start position {self.start} outside the epoch's {self.total} samples")
        if self.world_size < 1 or self.per_unit < 1:
            raise ValueError("world_size and per_unit must be >= 1")

    @property
    def remaining(self) -> int:
        return self.total - self.start

    @property
    def units(self) -> int:
        per_round = self.world_size * self.per_unit
        return self.world_size * math.ceil(self.remaining / per_round)

    @property
    def batches_per_worker(self) -> int:
        return self.units // self.world_size

    def _q_r(self) -> tuple[int, int]:
        return divmod(self.remaining, self.units) if self.units else (0, 0)

    def unit_count(self, unit: int) -> int:
        """Real samples in ``unit`` (the rest of its ``per_unit`` rows are pads)."""
        q, r = self._q_r()
        return q + (1 if unit < r else 0)

    def unit_first(self, unit: int) -> int:
        """Index (among the remaining samples) of the first sample of ``unit``."""
        q, r = self._q_r()
        return unit * q + min(unit, r)

    def unit_last(self, unit: int) -> int:
        """Index of the last sample of ``unit`` (-1 past the first for an empty unit)."""
        return self.unit_first(unit) + self.unit_count(unit) - 1

    def unit_of(self, index: int) -> int:
        """The unit holding remaining sample ``index`` (0-based from ``start``)."""
        q, r = self._q_r()
        if index < r * (q + 1):
            return index // (q + 1)
        return r + (index - r * (q + 1)) // q

    def position_after(self, batches_per_worker_done: int) -> int:
        """Epoch position once every worker has taken this many batches of this layout."""
        units_done = min(batches_per_worker_done * self.world_size, self.units)
        return self.start + self.unit_first(units_done) if units_done < self.units else self.total

    def index_range(self, group: ReadGroup) -> range:
        """Indices (among the remaining samples) of the samples ``group`` emits."""
        start = self.start
        return range(max(group.first - start, 0), max(group.first + group.samples - start, 0))

    def pads_after(self, index: int) -> list[tuple[int, int]]:
        """(unit, pad rows) to emit right after remaining sample ``index``: the pads of its unit if it
        is the unit's last sample, and after the epoch's last sample, any empty trailing units."""
        unit = self.unit_of(index)
        if index != self.unit_last(unit):
            return []
        pads = [(unit, self.per_unit - self.unit_count(unit))]
        if index == self.remaining - 1:
            pads += [(u, self.per_unit) for u in range(unit + 1, self.units)]
        return [(u, n) for u, n in pads if n > 0]

    def group_rows(self, group: ReadGroup) -> int:
        """Rows (samples kept + pads) the read task of ``group`` emits."""
        indices = self.index_range(group)
        if not indices:
            return 0
        rows = len(indices)
        for unit in range(self.unit_of(indices[0]), self.unit_of(indices[-1]) + 1):
            last = self.unit_last(unit)
            if indices[0] <= last <= indices[-1]:
                rows += sum(n for _, n in self.pads_after(last))
        return rows


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    groups: tuple[ReadGroup, ...]
    layout: Layout


def make_plan(shards: list[ShardRef], *, seed: int, epoch: int, start: int, world_size: int, per_unit: int,
              permute: bool, interleave: int) -> EpochPlan:  # fmt: skip
    groups = read_groups(shards, seed, epoch, permute, interleave)
    layout = Layout(sum(s.samples for s in shards), start, world_size, per_unit)
    kept = tuple(g for g in groups if g.first + g.samples > start)
    return EpochPlan(epoch, kept, layout)


@ray.remote(num_cpus=0)
class EpochCursor:
    """Where the next execution of each dataset starts, and which passes it reads.

    Ray Data plans a dataset's read when an execution starts (streaming_split starts one when all
    workers ask for it); the plan asks this actor. Each worker announces what it is about to read,
    like ``DistributedSampler.set_epoch``, before it starts iterating, so the announcements are all in
    when the split's barrier lets the execution start: the epoch and position to start at, the world
    size, and the epochs that follow in the same execution (``then``: one execution can carry a whole
    run's passes, so the decoder actors and read workers start once, not once per epoch). Without
    announcements a dataset reads epoch 0 from its start, for one reader. One actor per driver serves
    all its datasets.
    """

    def __init__(self) -> None:
        self._requests: dict[str, dict[int, Span]] = {}

    def request(self, dataset: str, rank: int, world_size: int, epoch: int, position: int,
                then: tuple[int, ...] = ()) -> None:  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        known = self._requests.get(dataset, {})
        known = {r: v for r, v in known.items() if r < world_size and v.world_size == world_size}
        known[rank] = Span(epoch, position, world_size, tuple(then))
        self._requests[dataset] = known

    def current(self, dataset: str) -> Span:
        """The span all workers of ``dataset`` agree on."""
        requests = self._requests.get(dataset, {})
        values = set(requests.values())
        if not values:
            return Span(0, 0, 1)
        if len(values) > 1:
            raise ValueError(f"workers disagree on the epochs to read: {sorted(requests.items())}")
        return values.pop()


@dataclass(frozen=True)
class Span:
    """What one execution of a dataset reads: ``epoch`` from sample ``position``, then each epoch of
    ``then`` whole, laid out for ``world_size`` workers."""

    epoch: int
    position: int
    world_size: int
    then: tuple[int, ...] = ()

    @property
    def epochs(self) -> tuple[int, ...]:
        return (self.epoch, *self.then)


@dataclass(frozen=True)
class CursorRef:
    """A dataset's entry in an ``EpochCursor`` actor (picklable: travels in the dataset's context)."""

    actor: str
    dataset: str

    def request(self, rank: int, world_size: int, epoch: int, position: int, then: tuple[int, ...] = ()) -> None:
        ray.get(_actor(self.actor).request.remote(self.dataset, rank, world_size, epoch, position, tuple(then)))

    def current(self) -> Span:
        return ray.get(_actor(self.actor).current.remote(self.dataset))


_HANDLES: dict[str, ray.actor.ActorHandle] = {}
_DRIVER_CURSOR: dict[str, str] = {}  # Ray job id -> this driver's cursor actor name


def new_cursor() -> CursorRef:
    """An entry for a new dataset in this driver's cursor actor (created on first use).

    The actor is pinned to the driver's node: it holds the epoch plan every attempt of the job reads, so it
    must outlive any worker node. Left to the scheduler it may land on a worker node, and when that node is
    lost the elastic or preempted job's next attempt finds no cursor and fails."""
    job = ray.get_runtime_context().get_job_id()
    if job not in _DRIVER_CURSOR:
        name = f"epoch-cursor-{uuid.uuid4().hex[:12]}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _HANDLES[name] = EpochCursor.options(name=name, namespace=CURSOR_NAMESPACE, scheduling_strategy=here).remote()
        _DRIVER_CURSOR[job] = name
    return CursorRef(_DRIVER_CURSOR[job], uuid.uuid4().hex[:12])


def _actor(name: str) -> ray.actor.ActorHandle:
    if name not in _HANDLES:
        _HANDLES[name] = ray.get_actor(name, namespace=CURSOR_NAMESPACE)
    return _HANDLES[name]


@dataclass(frozen=True)
class DatasetFacts:
    """What the driver knows about a built dataset and every worker's ``ShardLoader`` needs: the batch
    geometry, the sizes the epoch accounting checks against, and the cursor to announce epochs to.
    It travels with the dataset (``DataContext`` config, see ``service.build_dataset``).

    ``key_digest`` is the manifest's digest of all the split's sample keys (None for a manifest written
    before key digests existed): what a complete epoch's key fingerprint must add up to.
    """

    samples: int
    per_unit: int  # samples per batch ("unit")
    views: int  # rows per sample
    cursor: CursorRef
    modality: str  # "video" or "image"
    train: bool
    seed: int
    key_digest: int | None = None
    # what one decoder actor asks Ray for, and how many an epoch starts with: a stalled worker names them
    decoder_resources: tuple[tuple[str, float], ...] = ()
    decoder_min_actors: int = 1
    batch_timeout_s: float = 900.0  # data.batch_timeout_s
