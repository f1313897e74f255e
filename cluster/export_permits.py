"""How many requests a prefill worker holds in host memory at once (`KvTransferSpec.max_exports`).

An export takes a permit before it copies a request's KV to the host and gives it back once the KV is sent. Most
exports start on the engine thread, in the step that holds the request (`Engine.on_held`), where waiting is not
an option: `try_take` answers at once. Those that found none, and retries, wait on the event loop (`take`), in
arrival order; a permit given back goes to the longest waiter first, and `try_take` never jumps that queue.
"""
from __future__ import annotations

import asyncio
import collections
import threading


class ExportPermits:
    """`limit` permits; `try_take` from any thread, `take` and `release` on one event loop."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"max_exports={limit}: must be >= 1")
        self._free = limit
        self._lock = threading.Lock()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    def try_take(self) -> bool:
        """A permit now, if one is free and nobody waits for one."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            return False

    async def take(self) -> None:
        """Waits for a permit. Cancelled while waiting, it holds none (one handed over meanwhile is given back)."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            with self._lock:
                handed = waiter.done() and not waiter.cancelled()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if handed:
                self.release()
            raise

    def release(self) -> None:
        """Gives a permit back: to the first waiter, if any."""
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
            self._free += 1

    @property
    def free(self) -> int:
        return self._free
