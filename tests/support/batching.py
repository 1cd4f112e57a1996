"""Measuring when the micro-batcher dispatches (no torch, no processes).

`DispatchLog` is a batch function that records the monotonic time of each call and its items; `submit_at`
records when each item was handed to the batcher. Together they let a test compare each dispatch with the
rule the batcher promises (vlltr/service/batcher.py):

- LOWER bounds are exact: a batch that left on its deadline cannot have left before its oldest item's
  submission time plus `max_wait_s` (the test reads the clock before submitting, the batcher after, so the
  test's time is never later than the batcher's);
- UPPER bounds allow `SLACK_S` for the inference thread to wake and reach the batch function. On an idle
  machine that takes well under a millisecond; `SLACK_S` is generous for two cores shared with other work,
  and every scenario is laid out so that the wrong rule would land later than that (named in each test).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SLACK_S = 0.2  # most a correct dispatch may be late on a shared 2-core machine


@dataclass
class Dispatch:
    """One call of the batch function: when it started and the items it got."""

    at: float
    items: list[int]


@dataclass
class DispatchLog:
    """A batch function (`process`) recording every call; `hold_s(item)` makes a batch holding `item` slow."""

    hold: dict[int, float] = field(default_factory=dict)
    calls: list[Dispatch] = field(default_factory=list)
    submitted: dict[int, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def process(self, items: list[int]) -> list[int]:
        now = time.monotonic()
        with self._lock:
            self.calls.append(Dispatch(now, list(items)))
        slow = max((self.hold.get(i, 0.0) for i in items), default=0.0)
        if slow:
            time.sleep(slow)
        return [i * 10 for i in items]

    def submit_at(self, submit: Callable[[Sequence[int]], list[Any]], items: Sequence[int]) -> list[Any]:
        """Submit `items` through `submit` (a batcher's `submit_many`), recording the time first."""
        now = time.monotonic()
        for i in items:
            self.submitted[i] = now
        return submit(items)

    @property
    def batches(self) -> list[list[int]]:
        return [c.items for c in self.calls]

    def waited(self, index: int) -> float:
        """How long after its oldest item's submission the `index`-th batch was dispatched."""
        call = self.calls[index]
        return call.at - min(self.submitted[i] for i in call.items)
