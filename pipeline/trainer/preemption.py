"""How often the training ranks ask Ray Train for a preemption notice.

``ray.train.get_preemption_info`` is a barrier across the worker group: every rank must call it at the
same steps, and each call is a round trip through Ray Train's synchronisation actor. Asked every step it
cost 1.6% of a 1-worker demo step on CPU (docs/benchmarks.md, "The stall at one worker"), for news that
Ray's own watcher refreshes every few seconds (``RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S``, 5 s by default)
and that comes with a drain deadline tens of seconds ahead (30 s by Ray's default, 100 s in k8s/). So by
default the ranks ask about every ``trainer.preemption_check_every_s`` seconds: the cadence in steps is
derived from the step time the ranks have just averaged for their metrics (``Trainer._log_window``'s
all-reduce), which every rank holds bit for bit, so they all pick the same steps without another
collective.
"""

from __future__ import annotations


class PreemptionCadence:
    """Decides, identically on every rank, after which optimiser steps to check for a notice.

    ``every_steps``: a fixed cadence (``step % every_steps == 0``; 0 = never). ``None``: every step until
    the first measured step time, then every ``max(1, floor(every_s / step_s))`` steps after the last
    check, re-derived at each logging window.
    """

    def __init__(self, every_steps: int | None, every_s: float) -> None:
        self.fixed = every_steps
        self.every_s = every_s
        self.every = 1  # the adaptive cadence: every step until a step time is known
        self._last: int | None = None  # the step of the last check

    def due(self, step: int) -> bool:
        """Whether to check after optimiser step ``step``; called once per step, on every rank."""
        if self.fixed is not None:
            return self.fixed > 0 and step % self.fixed == 0
        if self._last is not None and step < self._last + self.every:
            return False
        self._last = step
        return True

    def observe(self, step_s: float) -> None:
        """The ranks' mean seconds per optimiser step (the same value on every rank): the next check is
        due ``floor(every_s / step_s)`` steps (at least 1) after the last one."""
        if self.fixed is None and step_s > 0:
            self.every = max(1, int(self.every_s // step_s))
