"""Admission control for the entry service: overload is answered with 503 + Retry-After, never a 500.

A request holds one of `max_active` slots while it is read, decoded and scored; up to `max_waiting` more
wait for a slot in arrival order. Anything beyond that is refused at once, before its body is read, with
a Retry-After from the measured service time. Bounding what is in flight keeps at most two batches'
worth of studies between the upload and the model (service/batching.py: one scoring, one filling), so no
accepted study times out, and bounds memory: at most `max_active` uploads are held or decoded at once.

Sizing (see `from_env`): `max_active` = 2 x the model's batch size (one batch scoring while the next
fills); `max_waiting` = what the hardware can serve within the latency budget at the measured rate, so a
waiting request is answered within the budget or refused up front, not left to time out.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from contextlib import asynccontextmanager


class Overloaded(Exception):
    """The service cannot take this request now; `retry_after` seconds is a fair time to come back."""

    def __init__(self, retry_after: int, message: str):
        super().__init__(message)
        self.retry_after, self.message = retry_after, message


class Admission:
    def __init__(self, max_active: int, max_waiting: int, budget_s: float):
        if max_active < 1 or max_waiting < 0 or budget_s <= 0:
            raise ValueError("max_active >= 1, max_waiting >= 0 and budget_s > 0 are required")
        self.max_active, self.max_waiting, self.budget_s = int(max_active), int(max_waiting), float(budget_s)
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._service_s = 0.1  # running mean of the time a request holds a slot (seeded, then measured)
        self.admitted = self.refused = 0

    @classmethod
    def from_env(cls, batch_size: int) -> "Admission":
        """CXRLT_MAX_ACTIVE (default 2 x batch size), CXRLT_MAX_WAITING (default 4 x max_active) and
        CXRLT_LATENCY_BUDGET_S (default 10 s): a waiting request whose expected wait exceeds the budget
        is refused instead of queued."""
        active = int(os.environ.get("CXRLT_MAX_ACTIVE") or 2 * batch_size)
        waiting = int(os.environ.get("CXRLT_MAX_WAITING") or 4 * active)
        return cls(active, waiting, float(os.environ.get("CXRLT_LATENCY_BUDGET_S") or 10))

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def expected_wait_s(self, position: int) -> float:
        """Time until the request at `position` in the queue gets a slot, at the measured rate."""
        return (position + 1) * self._service_s / self.max_active

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self.expected_wait_s(self.waiting) + self._service_s)))

    def _refuse(self, why: str) -> Overloaded:
        self.refused += 1
        ra = self.retry_after()
        return Overloaded(ra, f"the service is at capacity ({why}): retry in {ra} s")

    @asynccontextmanager
    async def slot(self):
        """Hold a processing slot for the body of the `async with`; raises Overloaded when full."""
        if self.active >= self.max_active or self._waiters:
            if self.waiting >= self.max_waiting:
                raise self._refuse(f"{self.active} studies in progress and {self.waiting} waiting")
            if self.expected_wait_s(self.waiting) > self.budget_s:
                raise self._refuse(f"the expected wait exceeds {self.budget_s:.0f} s")
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut  # resolved by a finishing request, which hands its slot over
            except BaseException:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                elif fut.done() and not fut.cancelled():
                    self._release()  # the slot was handed to us as we were cancelled: pass it on
                raise
        else:
            self.active += 1
        self.admitted += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._service_s = 0.9 * self._service_s + 0.1 * (time.perf_counter() - t0)
            self._release()

    def _release(self) -> None:
        while self._waiters:  # hand the slot to the oldest live waiter; `active` stays the same
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1

    def status(self) -> dict:
        return {"active": self.active, "waiting": self.waiting, "max_active": self.max_active,
                "max_waiting": self.max_waiting, "budget_s": self.budget_s,
                "service_time_s": round(self._service_s, 4), "admitted": self.admitted, "refused": self.refused}
