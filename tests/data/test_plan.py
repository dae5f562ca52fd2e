"""The epoch plan's arithmetic, checked exhaustively on small sizes (no Ray, no data)."""

from __future__ import annotations

import pytest

from pipeline.data.plan import Layout, ShardRef, make_plan, read_groups


def _emitted_units(layout: Layout, shards: list[ShardRef]) -> dict[int, list[int | None]]:
    """Rows per unit as the read tasks emit them: sample indices, None for pads."""
    units: dict[int, list[int | None]] = {}
    for group in read_groups(shards, seed=3, epoch=1, permute=True, interleave=2):
        for index in layout.index_range(group):
            units.setdefault(layout.unit_of(index), []).append(index)
            for unit, count in layout.pads_after(index):
                units.setdefault(unit, []).extend([None] * count)
    return units


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("per_unit", [1, 2, 5])
def test_layout_covers_every_sample_once_in_equal_worker_shares(world_size: int, per_unit: int) -> None:
    sizes = [3, 5, 0, 7, 2, 1]
    shards = [ShardRef(f"s{i}", n) for i, n in enumerate(sizes)]
    total = sum(sizes)
    for start in range(total + 1):
        layout = Layout(total, start, world_size, per_unit)
        units = _emitted_units(layout, shards)
        assert layout.units % world_size == 0
        assert sorted(units) == list(range(layout.units))
        assert all(len(rows) == per_unit for rows in units.values())  # every batch is one full block
        real = sorted(i for rows in units.values() for i in rows if i is not None)
        assert real == list(range(total - start))  # each remaining sample exactly once
        counts = [sum(i is not None for i in units[u]) for u in range(layout.units)]
        assert not counts or max(counts) - min(counts) <= 1  # spread evenly: no batch is mostly padding
        if per_unit >= 2 and total - start >= 2 * world_size:
            assert min(counts) >= 1  # empty batches only for tiny remainders or one-sample batches
        groups = read_groups(shards, seed=3, epoch=1, permute=True, interleave=2)
        assert sum(layout.group_rows(g) for g in groups) == layout.units * per_unit
        for done in range(layout.batches_per_worker + 1):  # resume positions match what was consumed
            assert layout.position_after(done) == start + sum(counts[: done * world_size])


def test_shard_order_is_seeded_per_epoch_and_eval_keeps_manifest_order() -> None:
    shards = [ShardRef(f"s3://b/train-{i:06d}.tar", 10) for i in range(12)]
    order = lambda seed, epoch, permute=True: [s.url for g in read_groups(shards, seed, epoch, permute, 1) for s in g.shards]  # noqa: E731
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 5)) == sorted(s.url for s in shards)
    assert order(0, 3, permute=False) == [s.url for s in shards]
    groups = read_groups(shards, 0, 0, True, 4)
    assert [g.first for g in groups] == [0, 40, 80] and all(len(g.shards) == 4 for g in groups)


def test_resume_plan_skips_finished_groups() -> None:
    shards = [ShardRef(f"s{i}", 4) for i in range(6)]
    plan = make_plan(shards, seed=0, epoch=2, start=9, world_size=2, per_unit=2, permute=True, interleave=1)
    assert [g.first for g in plan.groups] == [8, 12, 16, 20]  # the group holding position 9 is re-read
    assert plan.layout.remaining == 15 and plan.layout.units == 8
    with pytest.raises(ValueError, match="outside"):
        Layout(10, 11, 1, 1)
