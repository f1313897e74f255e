"""The router: load-based choice and continuation (pure), then the gateway serving a Ray deployment through
it (gRPC SDK and HTTP): loads, invalid input, cancel -> abort on the worker, no worker -> UNAVAILABLE."""
from __future__ import annotations

import contextlib

import pytest

from partita.cluster.gateway_engine import EngineUnavailableError, WorkerLoad
from partita.cluster.router import _Request
from partita.cluster.routing import pick_worker, worker_score
from partita.workers import RequestOutput, SamplingParams
from partita.workers.tokenizer import byte_tokenizer
from tests.cluster.ray_fixtures import ServedDeployment, collect, ray_local, tiny_spec, wait_until  # noqa: F401

pytestmark = pytest.mark.timeout(240)


def load(wid, running=0, waiting=0, kv=0.0):
    return WorkerLoad(wid, num_running=running, num_waiting=waiting, kv_cache_usage=kv)


def test_pick_the_least_loaded_worker():
    loads = [load("a", running=4), load("b", running=2), load("c", running=3)]
    assert pick_worker(loads, {}) == "b"
    assert pick_worker([load("a", running=3), load("b", running=1, waiting=2)], {}) == "a"  # waiting counts twice
    assert pick_worker([load("a", running=2, kv=0.9), load("b", running=3, kv=0.0)], {}) == "b"  # nearly full KV
    assert pick_worker(loads, {"b": 5}) == "c"  # requests sent since the last report count
    assert pick_worker(loads, {}, excluded={"b"}) == "c"
    assert pick_worker(loads, {}, excluded={"a", "b", "c"}) is None and pick_worker([], {}) is None
    assert worker_score(load("a", running=1, waiting=1, kv=0.5), 0) == 2 + 1 + 2.0


def test_equal_workers_take_turns():
    loads = [load("a"), load("b"), load("c")]
    assert {pick_worker(loads, {}, tiebreak=i) for i in range(3)} == {"a", "b", "c"}


def test_a_rerun_continues_after_the_tokens_already_sent():
    tok = byte_tokenizer((1,))
    req = _Request("hi", SamplingParams(max_tokens=10, temperature=0.0))
    assert req.continuation(tok) == ("hi", req.params)
    req.adjust(RequestOutput("r", [7, 8], "ab", False, None, 3, 2))
    req.adjust(RequestOutput("r", [9], "c", False, None, 3, 3))
    prompt, params = req.continuation(tok)
    assert prompt == tok.encode("hi") + [7, 8, 9] and params.max_tokens == 7
    out = req.adjust(RequestOutput("r", [10], "d", False, None, len(prompt), 1))
    assert (out.num_prompt_tokens, out.num_output_tokens, out.new_token_ids) == (3, 4, [10])
    assert req.sent_ids == [7, 8, 9, 10]


@pytest.fixture(scope="module")
def served(ray_local):
    """A one-worker deployment served by a gateway through the router (tests/cluster/ray_fixtures.py)."""
    deployment = ServedDeployment(tiny_spec("routed", replicas=1, router={"rerun_wait_s": 1.0})).start()
    yield deployment
    deployment.stop()


def test_grpc_and_http_through_the_router(served):
    from partita.client import AsyncClient
    import aiohttp

    async def main():
        async with AsyncClient(served.grpc_target) as client:
            result = await client.generate("Hello", max_tokens=12, temperature=0.0, ignore_eos=True)
            loads = await client.loads()
        async with aiohttp.ClientSession() as session:
            async with session.post(served.http_url + "/v1/completions",
                                    json={"model": "tiny-moe", "prompt": "Hello", "max_tokens": 12,
                                          "temperature": 0.0, "ignore_eos": True}) as response:
                body = await response.json()
        return result, loads, body

    result, loads, body = served.thread.call(main(), 120)
    assert len(result.token_ids) == 12 and result.finish_reason == "length"
    assert result.usage.completion_tokens == 12
    assert [x.worker_id for x in loads.loads] == ["p-0"] and loads.loads[0].pool == "p"
    assert body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["text"] == result.text  # greedy: both doors, one worker, the same text


def test_invalid_input_names_the_field(served):
    from partita.client import InvalidArgumentError

    async def main():
        from partita.client import AsyncClient

        async with AsyncClient(served.grpc_target, max_retries=0) as client:
            with pytest.raises(InvalidArgumentError) as info:
                await client.generate("Hello", max_tokens=100_000)
            return info.value

    error = served.thread.call(main(), 60)
    assert error.field == "max_tokens" and "max_model_len=256" in str(error)


def test_leaving_the_stream_aborts_the_request_on_the_worker(served):
    router, worker = served.router, served.router._entries["p-0"]

    async def main():
        stream = router.generate("leave", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
        async with contextlib.aclosing(stream):
            async for out in stream:
                if out.new_token_ids:
                    break

    served.thread.call(main(), 60)
    wait_until(lambda: served.thread.call(_running(worker), 10) == 0, 20, "the worker to drop the request")


async def _running(worker) -> int:
    beat = await worker.actor.heartbeat.remote()
    return beat.load.num_running + beat.load.num_waiting


def test_admin_scale_and_drain_through_the_router(served, ray_local):
    from partita.workers import InvalidRequestError

    router = served.router

    async def bad(call):
        with pytest.raises(InvalidRequestError) as info:
            await call
        return info.value

    error = served.thread.call(bad(router.scale("nope", 1)))
    assert error.field == "pools" and "no pool named 'nope'" in error.message
    error = served.thread.call(bad(router.scale("p", -1)))
    assert error.field == "pools[0].replicas" and "got -1" in error.message
    error = served.thread.call(bad(router.drain_worker("p-9")))
    assert error.field == "worker_id" and "ready: p-0" in error.message

    assert served.thread.call(router.drain_worker("p-0", 5.0), 60) == (0, 0)  # idle: nothing to finish
    assert ray_local.get(served.controller.wait_ready.remote(120), timeout=150)
    pools = served.thread.call(router.pool_status())
    assert (pools[0]["desired_replicas"], pools[0]["ready_replicas"]) == (1, 1)
    served.thread.call(router.refresh())
    assert list(router._entries) == ["p-1"]  # the drained worker was replaced


def test_no_ready_worker_is_a_clear_unavailable_error(served, ray_local):
    controller = served.controller
    ray_local.get(controller.scale.remote("p", 0), timeout=30)
    try:
        assert ray_local.get(controller.wait_ready.remote(60), timeout=90)

        async def main():
            await served.router.refresh()
            assert not served.router.is_healthy()
            with pytest.raises(EngineUnavailableError, match="no ready worker for request lonely within 1 s"):
                await collect(served.router.generate("lonely", "hi", SamplingParams(max_tokens=4)))

        served.thread.call(main(), 60)
    finally:
        ray_local.get(controller.scale.remote("p", 1), timeout=30)
        assert ray_local.get(controller.wait_ready.remote(120), timeout=150)
