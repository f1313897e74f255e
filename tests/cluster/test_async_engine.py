"""AsyncEngine over the real engine (tiny random model, CPU): streaming, errors, abort semantics, KV
blocks freed when a consumer leaves, merging of outputs a slow consumer missed, death and shutdown."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from partita.cluster.async_engine import AsyncEngine
from partita.cluster.gateway_engine import EngineClient, EngineUnavailableError, merge_outputs
from partita.workers import EngineConfig, InvalidRequestError, RequestOutput, SamplingParams

CONFIG = EngineConfig(max_num_seqs=8, max_model_len=512, num_kv_blocks=64)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=480, ignore_eos=True)


@pytest.fixture()
def engine():
    e = AsyncEngine.from_model("tiny-llama", device="cpu", config=CONFIG)
    yield e
    e.shutdown()


async def collect(engine: AsyncEngine, request_id: str, prompt, params) -> list[RequestOutput]:
    return [out async for out in engine.generate(request_id, prompt, params)]


async def until(predicate, timeout_s: float = 10.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def idle(engine: AsyncEngine) -> bool:
    load = engine.loads()[0]
    return load.num_running == 0 and load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks


def test_is_an_engine_client(engine):
    assert isinstance(engine, EngineClient)
    info = engine.model_info
    assert info.model_name == "tiny-llama" and info.max_model_len == 512 and info.has_chat_template
    assert engine.loads()[0].num_total_blocks == 64 and engine.is_healthy()


def test_streams_to_the_end(engine):
    outs = asyncio.run(collect(engine, "r1", "Hello", GREEDY))
    assert sum(len(o.new_token_ids) for o in outs) == 6
    assert outs[-1].finished and outs[-1].finish_reason == "length" and not any(o.finished for o in outs[:-1])
    assert outs[-1].num_prompt_tokens == 5 and outs[-1].num_output_tokens == 6


def test_concurrent_requests_match_their_solo_runs(engine):
    async def main():
        solo = [await collect(engine, f"solo{i}", f"prompt {i}", GREEDY) for i in range(4)]
        together = await asyncio.gather(*(collect(engine, f"co{i}", f"prompt {i}", GREEDY) for i in range(4)))
        return solo, together

    solo, together = asyncio.run(main())
    tokens = lambda outs: [t for o in outs for t in o.new_token_ids]  # noqa: E731
    assert [tokens(s) for s in solo] == [tokens(t) for t in together]


def test_bad_input_raises_from_the_first_iteration(engine):
    async def main():
        stream = engine.generate("bad", "", GREEDY)  # nothing happens until iterated
        with pytest.raises(InvalidRequestError) as info:
            await stream.__anext__()
        assert info.value.field == "prompt"
        with pytest.raises(InvalidRequestError) as info:
            await collect(engine, "bad2", "x" * 600, GREEDY)
        assert info.value.field == "prompt"
        return await collect(engine, "good", "ok", GREEDY)  # the engine thread lives on

    assert asyncio.run(main())[-1].finished


def test_duplicate_running_request_id(engine):
    async def main():
        first = engine.generate("dup", "Hi", LONG)
        await first.__anext__()
        with pytest.raises(InvalidRequestError) as info:
            await collect(engine, "dup", "Hi", GREEDY)
        assert info.value.field == "request_id"
        await first.aclose()
        await until(lambda: idle(engine))

    asyncio.run(main())


def test_leaving_the_stream_aborts_and_frees_kv_blocks(engine):
    async def main():
        async with contextlib.aclosing(engine.generate("leave", "Hi", LONG)) as stream:
            async for _ in stream:
                break
        assert engine.loads()[0].num_free_blocks < 64 or idle(engine)
        return await until(lambda: idle(engine))

    assert asyncio.run(main())


def test_cancelling_the_consumer_task_aborts(engine):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate("cancel-me", "Hi", LONG):
                started.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return await until(lambda: idle(engine))

    assert asyncio.run(main())


def test_cancelled_calls_are_skipped_and_the_engine_lives_on(engine):
    """A submit() or abort() whose caller gave up (its future cancelled while queued) does not kill the engine
    thread: a cancelled call never runs, a cancelled abort still aborts."""
    async def main():
        stream = engine.generate("ab", "Hi", LONG)
        await stream.__anext__()
        gate, ran = threading.Event(), []
        blocker = engine.submit(lambda e: gate.wait(10))  # holds the engine thread while the others queue
        skipped = asyncio.ensure_future(asyncio.wrap_future(engine.submit(lambda e: ran.append("skipped"))))
        aborting = asyncio.ensure_future(engine.abort("ab"))
        await asyncio.sleep(0.05)
        skipped.cancel()
        aborting.cancel()
        await asyncio.wait([skipped, aborting])  # the cancellations reached the queued futures
        gate.set()
        assert await asyncio.wrap_future(blocker) is True
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == "abort"
        assert await asyncio.wrap_future(engine.submit(lambda e: "alive")) == "alive"
        assert ran == [] and engine.is_healthy()
        return await until(lambda: idle(engine))

    assert asyncio.run(main())


def test_abort_ends_the_stream_with_abort(engine):
    async def main():
        stream = engine.generate("ab", "Hi", LONG)
        await stream.__anext__()
        assert await engine.abort("ab") is True
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == "abort" and rest[-1].finished
        assert await engine.abort("ab") is False and await engine.abort("never") is False
        return await until(lambda: idle(engine))

    assert asyncio.run(main())


def test_a_slow_consumer_gets_merged_outputs(engine):
    async def main():
        stream = engine.generate("slow", "Hi", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
        first = await stream.__anext__()
        await until(lambda: idle(engine))  # the engine finishes while nobody reads
        rest = [out async for out in stream]
        return first, rest

    first, rest = asyncio.run(main())
    assert len(rest) == 1 and rest[0].finished and len(first.new_token_ids) + len(rest[0].new_token_ids) == 20


def test_merge_outputs():
    a = RequestOutput("r", [1], "a", False, None, 3, 1, [{"token_id": 1, "logprob": -0.1, "top": {}}])
    b = RequestOutput("r", [2, 3], "bc", False, None, 3, 3, None)
    c = RequestOutput("r", [4], "d", True, "stop", 3, 4, [{"token_id": 4, "logprob": -0.2, "top": {}}])
    merged = merge_outputs([a, b, c])
    assert merged.new_token_ids == [1, 2, 3, 4] and merged.text_delta == "abcd"
    assert merged.finished and merged.finish_reason == "stop" and merged.num_output_tokens == 4
    assert [lp["token_id"] for lp in merged.logprobs] == [1, 4]
    assert merge_outputs([b]).logprobs is None


def test_engine_death_fails_running_and_new_requests(engine):
    async def main():
        stream = engine.generate("victim", "Hi", LONG)
        await stream.__anext__()

        def broken_step():
            raise RuntimeError("simulated device failure")

        engine._engine.step = broken_step
        with pytest.raises(EngineUnavailableError, match="simulated device failure"):
            async for _ in stream:
                pass
        assert not engine.is_healthy()
        with pytest.raises(EngineUnavailableError):
            await collect(engine, "after", "Hi", GREEDY)
        assert await engine.abort("victim") is False

    asyncio.run(main())


def test_shutdown_ends_running_streams(engine):
    async def main():
        stream = engine.generate("running", "Hi", LONG)
        await stream.__anext__()
        await engine.aclose()
        with pytest.raises(EngineUnavailableError):
            async for _ in stream:
                pass
        assert not engine.is_healthy()

    asyncio.run(main())


def test_stream_interval_coalesces_middle_tokens_but_not_the_first_or_last():
    engine = AsyncEngine.from_model("tiny-llama", device="cpu", config=CONFIG, stream_interval_s=0.05)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    try:
        started = time.monotonic()
        outs = asyncio.run(collect(engine, "coalesced", "Hi", params))
        elapsed_s = time.monotonic() - started
    finally:
        engine.shutdown()
    plain = AsyncEngine.from_model("tiny-llama", device="cpu", config=CONFIG)
    try:
        reference = asyncio.run(collect(plain, "plain", "Hi", params))
    finally:
        plain.shutdown()
    assert len(outs[0].new_token_ids) == 1  # the first token is never held
    assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 60
    assert [t for o in outs for t in o.new_token_ids] == [t for o in reference for t in o.new_token_ids]
    assert "".join(o.text_delta for o in outs) == "".join(o.text_delta for o in reference)
    assert len(outs) <= 3 + elapsed_s / 0.05  # first, last, and one per interval at most


def test_stream_interval_is_validated():
    from partita.workers import Engine

    with pytest.raises(ValueError, match="stream_interval_s"):
        AsyncEngine(Engine("tiny-llama", device="cpu", config=CONFIG), stream_interval_s=-1)
