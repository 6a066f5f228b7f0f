"""Consistency models on a server: each table's vector clock and the requests it holds.

Every worker's clock starts at 0 and `mv.clock()` advances it on every server. A request
from a worker at clock c may run once the slowest live worker's clock reaches a level:
- async: no level, nothing waits;
- ssp(s): a get waits for level c - s; adds run at once;
- bsp: a get waits for level c; an add made at clock c is held until level c + 1 (every
  live worker finished clock c), so all gets at clock c see the same values.
Held requests run in (level, adds before gets, arrival) order. Nothing a worker sends
after a get overtakes that get while it is held (an add must not land in a read issued
before it); a BSP get may pass the worker's own held adds of its clock, which by BSP's
rule it must not see. A worker that leaves stops counting. All of this runs on the
server's event loop: no locks.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from multiverso_py.errors import InvalidArgument


class Model(str, enum.Enum):
    ASYNC = "async"
    SSP = "ssp"
    BSP = "bsp"


class Kind(enum.IntEnum):
    """What a request does, as the clock sees it; at one level adds run before gets."""

    ADD = 0
    GET = 1
    SET = 2  # initial content: never held


_AT_ONCE = (-math.inf, Kind.ADD)


@dataclass(order=True)
class _Held:
    key: tuple[float, int]  # (level, kind)
    arrival: int
    worker: int = field(compare=False)
    kind: Kind = field(compare=False)
    release: Callable[[], None] = field(compare=False)
    payload: Any = field(compare=False)


class TableClock:
    """The vector clock of one table on one server: live worker -> clock, and the
    requests waiting for the slowest clock to reach their level."""

    def __init__(self, model: Model, staleness: int, clocks: dict[int, int]):
        if staleness < 0:
            raise InvalidArgument(f"staleness must be >= 0, got {staleness}")
        self.model, self.staleness = model, staleness
        self.clocks = dict(clocks)
        self._held: list[_Held] = []  # a heap
        self._last_get: dict[int, tuple[float, int]] = {}  # worker -> key of its latest held get
        self._gets_held: dict[int, int] = {}  # worker -> how many of its gets are held
        self._arrivals = itertools.count()

    def slowest(self) -> float:
        return min(self.clocks.values(), default=math.inf)

    def held(self) -> int:
        return len(self._held)

    def held_adds(self) -> list:
        """The payloads of held adds, in the order they will run (for checkpoints: they
        were acknowledged, so they are part of the state)."""
        return [h.payload for h in sorted(self._held) if h.kind is Kind.ADD]

    def admit(self, worker: int, kind: Kind, release: Callable[[], None], payload: Any = None) -> bool:
        """True: the request may run now. False: it is held, and release() runs it later."""
        if self.model is Model.ASYNC:
            return True
        clock = self.clocks.get(worker)
        if clock is None:
            raise InvalidArgument(f"worker {worker} is not a live worker of this job (it left or was declared dead)")
        key = max(self._key(clock, kind), self._last_get.get(worker, _AT_ONCE))
        if key[0] <= self.slowest():
            return True
        heapq.heappush(self._held, _Held(key, next(self._arrivals), worker, kind, release, payload))
        if kind is Kind.GET:
            self._last_get[worker] = key
            self._gets_held[worker] = self._gets_held.get(worker, 0) + 1
        return False

    def _key(self, clock: int, kind: Kind) -> tuple[float, int]:
        if kind is Kind.GET:
            return (clock - (self.staleness if self.model is Model.SSP else 0), kind)
        if kind is Kind.ADD and self.model is Model.BSP:
            return (clock + 1, kind)
        return _AT_ONCE

    def tick(self, worker: int) -> None:
        """The worker finished a clock."""
        if worker in self.clocks:
            self.clocks[worker] += 1
            self._release()

    def join(self, worker: int) -> None:
        """A worker (re)joins: it starts at the slowest clock, so it holds no one back."""
        slowest = self.slowest()
        self.clocks[worker] = 0 if slowest == math.inf else int(slowest)

    def drop(self, worker: int) -> None:
        """The worker left the job: it no longer holds anyone back."""
        if self.clocks.pop(worker, None) is not None:
            self._release()

    def _release(self) -> None:
        slowest = self.slowest()
        while self._held and self._held[0].key[0] <= slowest:
            held = heapq.heappop(self._held)
            if held.kind is Kind.GET:
                self._gets_held[held.worker] -= 1
                if not self._gets_held[held.worker]:
                    del self._gets_held[held.worker], self._last_get[held.worker]
            held.release()


def wait_hint(op: str, model: str) -> str:
    """Why a request of a table with this model may have waited past its timeout."""
    if op != "get" or model == Model.ASYNC.value:
        return ""
    return (f"; a {model} get waits until the slowest live worker's clock catches up: is a worker stuck, "
            f"or not calling mv.clock() as often as the others?")
