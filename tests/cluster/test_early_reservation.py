"""cluster/early_reservation.py's ordering edges; its whole path (reserved during the prefill on a real decode
worker, used by the migration, unclaimed ones aborted) is tests/cluster/test_pd_worker.py's
test_the_decode_worker_reserves_while_the_prefill_computes."""
from __future__ import annotations

import asyncio

from partita.cluster import early_reservation
from partita.cluster.early_reservation import EarlyReservation


def make() -> EarlyReservation:
    return EarlyReservation(None, "r", None, model="", sender_id="", spawn=lambda task: None)


def test_a_reservation_claimed_before_it_began_is_never_sent(monkeypatch):
    """The engine thread's begin can reach the loop after the first token's claim (or a drop): no Reserve goes out
    then, since nothing would use or abort it."""
    sent = []

    async def reserve(*args, **kwargs):
        sent.append(args)

    monkeypatch.setattr(early_reservation, "reserve", reserve)

    async def main():
        claimed, dropped = make(), make()
        assert await claimed.claim() is None
        dropped.drop()
        claimed.begin([1, 2, 3])
        dropped.begin([1, 2, 3])
        await asyncio.sleep(0.05)
        began = make()
        began.begin([1, 2, 3])
        await asyncio.sleep(0.05)
        return await began.claim()

    asyncio.run(main())
    assert len(sent) == 1


def test_begin_after_the_event_loop_closed_does_not_raise():
    """begin runs inside an engine step, which must not fail because the worker's loop has closed."""
    async def made() -> EarlyReservation:
        return make()

    loop = asyncio.new_event_loop()
    reservation = loop.run_until_complete(made())
    loop.close()
    reservation.begin([1, 2, 3])
