"""cluster/export_permits.py: a bounded count of exports, taken at once from any thread or awaited in order on the
event loop; waiters are served first in arrival order; a waiter cancelled holds none, also when a permit reached
it just before the cancel."""
from __future__ import annotations

import asyncio
import threading

import pytest

from partita.cluster.export_permits import ExportPermits


def test_try_take_from_another_thread_and_release():
    permits = ExportPermits(2)
    taken = []
    threads = [threading.Thread(target=lambda: taken.append(permits.try_take())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == [False, True, True] and permits.free == 0
    permits.release()
    assert permits.free == 1 and permits.try_take() and permits.free == 0
    with pytest.raises(ValueError, match="max_exports=0"):
        ExportPermits(0)


def test_waiters_are_served_in_order_and_try_take_does_not_jump_the_queue():
    async def main():
        permits = ExportPermits(1)
        assert permits.try_take()
        order = []

        async def wait(name):
            await permits.take()
            order.append(name)

        tasks = [asyncio.ensure_future(wait(n)) for n in ("a", "b")]
        await asyncio.sleep(0.01)
        assert not permits.try_take()  # one waits already
        permits.release()
        await asyncio.sleep(0.01)
        assert order == ["a"] and not permits.try_take()
        permits.release()
        await asyncio.gather(*tasks)
        assert order == ["a", "b"] and permits.free == 0
        permits.release()
        assert permits.free == 1
    asyncio.run(main())


@pytest.mark.parametrize("handed", [False, True], ids=["while waiting", "after the permit reached it"])
def test_a_cancelled_waiter_holds_no_permit(handed):
    async def main():
        permits = ExportPermits(1)
        assert permits.try_take()
        waiting = asyncio.ensure_future(permits.take())
        await asyncio.sleep(0.01)
        if handed:
            permits.release()  # resolves the waiter's future; the task has not run since
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        if not handed:
            permits.release()
        assert permits.free == 1 and permits.try_take()
    asyncio.run(main())
