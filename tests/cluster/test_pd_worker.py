"""cluster/pd_worker.py's PrefillSide without Ray: a prefill engine and real KvTransfer servers on 127.0.0.1 (tiny
random models on CPU). When the decode worker the router chose does not take the KV (nothing listens there, or it
has no room), the next one offered does, and Migrated names it; when none does, the prefill worker decodes the
request itself. Greedy output equals the colocated engine's either way, and every block returns."""
from __future__ import annotations

import asyncio
import socket

import pytest

from partita.cluster.pd_worker import Migrated, PrefillSide
from tests.cluster.test_kv_transfer import GREEDY, PROMPT, Pair, colocated


def dead_address() -> str:
    """127.0.0.1 and a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def run(side: PrefillSide, addresses: list[str]) -> list:
    return [item async for item in side.run("r", PROMPT, GREEDY, addresses)]


async def fill(pair: Pair) -> None:
    """Takes 7 of the decode worker's 8 blocks (num_kv_blocks=8): no room for PROMPT's 3."""
    await asyncio.wrap_future(pair.decode.submit(lambda e: e.reserve_migrated("hog", [3] * 100)))


async def unfill(pair: Pair) -> None:
    await asyncio.wrap_future(pair.decode.submit(lambda e: e.abort_reserved("hog")))


@pytest.mark.parametrize("stream_layers", [False, True], ids=["after", "streamed"])
@pytest.mark.parametrize("first", ["dead", "full"])
def test_the_next_decode_worker_takes_the_kv_when_the_first_does_not(first, stream_layers):
    async def main():
        async with Pair("int4") as pair, Pair("int4", num_kv_blocks=8) as full:
            await fill(full)
            side = PrefillSide(pair.prefill, "prefill-0", "tiny-llama", "int4", stream_layers=stream_layers)
            await side.start()  # as the worker does: exports read the cache's layout read here
            try:
                items = await run(side, [dead_address() if first == "dead" else full.address, pair.address])
            finally:
                await side.close()
            await unfill(full)
            *outputs, migrated = items
            tokens = [t for o in outputs for t in o.new_token_ids] + await pair.outputs["r"]
            await pair.assert_all_free()
            await full.assert_all_free()
            return tokens, migrated
    tokens, migrated = asyncio.run(main())
    assert isinstance(migrated, Migrated) and not migrated.streamed  # streaming reserves on the first only
    assert tokens == colocated("int4")


def test_migrated_names_the_decode_worker_that_took_the_kv():
    async def main():
        async with Pair("int4") as pair:
            side = PrefillSide(pair.prefill, "prefill-0", "tiny-llama", "int4")
            try:
                *_, migrated = await run(side, [dead_address(), pair.address])
            finally:
                await side.close()
            return migrated, pair.address
    migrated, address = asyncio.run(main())
    assert isinstance(migrated, Migrated) and migrated.decode_address == address


@pytest.mark.parametrize("stream_layers", [False, True], ids=["after", "streamed"])
def test_when_no_decode_worker_takes_the_kv_the_prefill_worker_decodes(stream_layers):
    async def main():
        async with Pair("int4", num_kv_blocks=8) as full:
            await fill(full)
            side = PrefillSide(full.prefill, "prefill-0", "tiny-llama", "int4", stream_layers=stream_layers)
            try:
                items = await run(side, [full.address, dead_address()])
            finally:
                await side.close()
            await unfill(full)
            await full.assert_all_free()
            return items
    items = asyncio.run(main())
    assert not any(isinstance(x, Migrated) for x in items)
    assert [t for o in items for t in o.new_token_ids] == colocated("int4")
    assert items[-1].finished


def test_exports_in_host_memory_are_bounded(monkeypatch):
    """max_exports: of six requests migrating at once, at most two hold their export (from export to the end of
    the send) at a time; the others wait with their KV on the prefill engine, and every one completes as the
    colocated engine does."""
    from partita.cluster import kv_transfer_client

    held, most = 0, 0
    real_send = kv_transfer_client.send_kv

    async def slow_send(*args, **kwargs):
        nonlocal held, most
        held += 1
        most = max(most, held)
        try:
            await asyncio.sleep(0.3)  # a long transfer: the others pile up behind the bound
            return await real_send(*args, **kwargs)
        finally:
            held -= 1

    monkeypatch.setattr(kv_transfer_client, "send_kv", slow_send)

    async def main():
        async with Pair("int4", num_kv_blocks=64) as pair:
            side = PrefillSide(pair.prefill, "prefill-0", "tiny-llama", "int4", max_exports=2)
            try:
                results = await asyncio.gather(*[collect(side, f"r{i}", pair) for i in range(6)])
            finally:
                await side.close()
            await pair.assert_all_free()
            return results

    async def collect(side: PrefillSide, request_id: str, pair: Pair) -> list[int]:
        items = [item async for item in side.run(request_id, PROMPT, GREEDY, [pair.address])]
        *outputs, migrated = items
        assert isinstance(migrated, Migrated)
        return [t for o in outputs for t in o.new_token_ids] + await pair.outputs[request_id]

    results = asyncio.run(main())
    assert results == [colocated("int4")] * 6
    assert most == 2


def test_the_export_begins_in_the_step_that_holds_the_request(monkeypatch):
    """Once a decode worker is known not to share this GPU, a request's export begins on the engine thread in the
    step that holds it (`Engine.on_held`), not from the event loop after its first token; the first request to
    that worker, whose GPU is not known yet, exports the usual way. A caller leaving after the first token gives
    the early export's permit back. Output equals the colocated engine's; permits and blocks all return."""
    from partita.cluster import kv_transfer_client, pd_worker

    calls = {"early": [], "late": 0}
    real_begin = pd_worker.begin_export

    def early_begin(engine, request_id, source):
        calls["early"].append(engine.prefilled_sequence(request_id).request_id)
        return real_begin(engine, request_id, source)

    def late_begin(engine, request_id, source):
        calls["late"] += 1
        return real_begin(engine, request_id, source)

    monkeypatch.setattr(pd_worker, "begin_export", early_begin)
    monkeypatch.setattr(kv_transfer_client, "begin_export", late_begin)

    async def main():
        async with Pair("int4") as pair:
            side = PrefillSide(pair.prefill, "prefill-0", "tiny-llama", "int4", max_exports=2)
            await side.start()
            try:
                tokens = []
                for request_id in ("r0", "r1"):
                    *outputs, migrated = [x async for x in side.run(request_id, PROMPT, GREEDY, [pair.address])]
                    assert isinstance(migrated, Migrated) and migrated.handoff_seconds >= migrated.seconds > 0
                    assert 0 < migrated.stream_seconds < migrated.seconds  # Commit comes after the last ack
                    tokens.append([t for o in outputs for t in o.new_token_ids] + await pair.outputs[request_id])
                leaving = side.run("r2", PROMPT, GREEDY, [pair.address])
                await anext(leaving)
                await leaving.aclose()
                assert side._exports.free == 2
            finally:
                await side.close()
            await pair.assert_all_free()
            return tokens

    tokens = asyncio.run(main())
    assert tokens == [colocated("int4")] * 2
    assert calls == {"early": ["r1", "r2"], "late": 1}


def test_the_decode_worker_reserves_while_the_prefill_computes():
    """The prefill worker reserves on the decode worker when its engine schedules the request's prefill
    (`EarlyReservation`), not after the first token: with prefill steps slowed to 0.2 s, the decode engine holds
    the reservation long before the first token, and the migration uses it (one reservation per request). A
    request whose first token ends it, and one whose caller leaves after its first token, have theirs aborted.
    Output equals the colocated engine's; every block and transfer is freed."""
    import time

    from partita.workers import SamplingParams

    reserved_at: list[tuple[str, float]] = []

    def slow_prefill(engine):
        run = engine.runner.run

        def slow(batch, *args):
            if batch.prefills:
                time.sleep(0.2)
            return run(batch, *args)
        engine.runner.run = slow

    def record_reserves(engine):
        reserve = engine.reserve_migrated

        def recorded(request_id, *args, **kwargs):
            reserved_at.append((request_id, time.perf_counter()))
            return reserve(request_id, *args, **kwargs)
        engine.reserve_migrated = recorded

    async def main():
        async with Pair("int4") as pair:
            await asyncio.wrap_future(pair.prefill.submit(slow_prefill))
            await asyncio.wrap_future(pair.decode.submit(record_reserves))
            side = PrefillSide(pair.prefill, "prefill-0", "tiny-llama", "int4")
            await side.start()
            try:
                stream = side.run("r0", PROMPT, GREEDY, [pair.address])
                first = await anext(stream)
                first_at = time.perf_counter()
                *outputs, migrated = [first] + [x async for x in stream]
                assert isinstance(migrated, Migrated)
                tokens = [t for o in outputs for t in o.new_token_ids] + await pair.outputs["r0"]
                one = [x async for x in side.run("r1", PROMPT, SamplingParams(max_tokens=1, temperature=0.0),
                                                 [pair.address])]
                assert len(one) == 1 and one[0].finished
                leaving = side.run("r2", PROMPT, GREEDY, [pair.address])
                await anext(leaving)
                await leaving.aclose()
            finally:
                await side.close()
            await pair.assert_all_free()
            return tokens, first_at

    tokens, first_at = asyncio.run(main())
    assert tokens == colocated("int4")
    assert [r for r, _ in reserved_at] == ["r0", "r1", "r2"]
    assert reserved_at[0][1] < first_at - 0.2  # reserved during the first of two 0.2 s prefill steps


def test_a_run_on_the_decode_worker_frees_what_a_dead_attempt_left_there():
    """A prefill worker that died after its Reserve, or after its Commit but before anyone followed, leaves a
    reservation or a committed request under the request's id; the router then runs the request again, on the
    decode worker among others. There the engine refuses the id as already running until `drop_stale` frees
    both; afterwards the run equals the colocated engine's and every block returns."""
    import grpc

    from partita.cluster.async_engine import AsyncEngine
    from partita.cluster.kv_transfer_client import reserve_request, send_kv
    from partita.cluster.pd_worker import DecodeSide
    from partita.protos.partita.v1 import kv_transfer_pb2_grpc
    from partita.workers import EngineConfig, InvalidRequestError
    from partita.workers.kv_migration import export_request, kv_layout
    from tests.cluster.test_kv_transfer import CONFIG, WIRE_GREEDY

    async def generate(engine, request_id):
        return [t async for o in engine.generate(request_id, PROMPT, GREEDY) for t in o.new_token_ids]

    async def main():
        decode = AsyncEngine.from_model("tiny-llama", device="cpu", kv_format="int4", config=EngineConfig(**CONFIG))
        prefill = AsyncEngine.from_model("tiny-llama", device="cpu", kv_format="int4", config=EngineConfig(**CONFIG))
        side = DecodeSide(decode, "decode-0", "")
        channel = grpc.aio.insecure_channel(await side.start("127.0.0.1"))
        try:
            layout = await asyncio.wrap_future(decode.submit(kv_layout))
            await kv_transfer_pb2_grpc.KvTransferStub(channel).Reserve(
                reserve_request("reserved", PROMPT, layout, model="", sender_id="", ttl_s=60.0))
            stream = prefill.adopt("committed", lambda e: e.add_request("committed", PROMPT, GREEDY,
                                                                        prefill_only=True))
            await anext(stream)
            export = await asyncio.wrap_future(prefill.submit(lambda e: export_request(e, "committed")))
            await send_kv(channel, export, WIRE_GREEDY)
            await asyncio.wrap_future(prefill.submit(lambda e: e.release_prefilled("committed")))
            await stream.aclose()
            assert side.num_transfers == 1 and "committed" in side._committed
            results = {}
            for request_id in ("reserved", "committed"):
                with pytest.raises(InvalidRequestError, match="already running"):
                    await generate(decode, request_id)
                await side.drop_stale(request_id)
                results[request_id] = await generate(decode, request_id)
            assert side.num_transfers == 0 and not side._committed

            def all_free(e):
                return e.blocks.num_free_blocks == e.blocks.num_blocks and not e.scheduler.held
            assert await asyncio.wrap_future(decode.submit(all_free))
            return results
        finally:
            await channel.close()
            await side.close()
            decode.shutdown()
            prefill.shutdown()

    results = asyncio.run(main())
    assert results == {"reserved": colocated("int4"), "committed": colocated("int4")}
