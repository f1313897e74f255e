"""Prefill/decode disaggregation on local Ray (tiny-llama on CPU): a prefill pool and a decode pool behind the
router and the gateway. Greedy PD output equals the colocated engine's token for token (kv_format none, and
int8 against a colocated int8 engine); a decode worker dead at transfer time (its KV then goes to another decode
worker when there is one, else the prefill worker decodes), or killed mid-stream after commit, loses no request (the client sees the complete, correct completion) and the controller restores
it; leaving a stream or aborting reaches the worker holding the request; KV blocks on both sides return to
the free pool (read from heartbeats)."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from partita.cluster.routing import decode_alternates, pick_pair
from partita.cluster.gateway_engine import WorkerLoad
from partita.workers import SamplingParams
from tests.cluster.ray_fixtures import ServedDeployment, collect, ray_local, wait_until  # noqa: F401

pytestmark = pytest.mark.timeout(240)

PROMPT = [(7 * j) % 500 + 2 for j in range(30)]


def pd_spec(name: str, kv_format: str, stream_layers: bool = False, decode_replicas: int = 1,
            cpus_per_worker: float = 1.0):
    from partita.cluster.spec import ClusterSpec

    return ClusterSpec.from_dict({
        "name": name,
        "kv_transfer": {"stream_layers": stream_layers},
        "model": {"preset": "tiny-llama", "kv_format": kv_format},
        "pools": [{"name": "prefill", "role": "prefill", "replicas": 1, "gpus_per_worker": 0,
                   "cpus_per_worker": cpus_per_worker},
                  {"name": "decode", "role": "decode", "replicas": decode_replicas, "gpus_per_worker": 0,
                   "cpus_per_worker": cpus_per_worker}],
        "scheduler": {"max_model_len": 320, "max_num_seqs": 8, "max_num_batched_tokens": 256},
        "gateway": {"grpc_port": 0, "http_port": 0},
        "controller": {"reconcile_interval_s": 0.2, "heartbeat_timeout_s": 10.0, "restart_backoff_s": 0.5,
                       "restart_backoff_max_s": 4.0, "drain_timeout_s": 5.0, "worker_start_timeout_s": 120.0},
        "router": {"refresh_interval_s": 0.1, "rerun_wait_s": 60.0},
    })


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def colocated(spec, prompt: list[int], max_tokens: int) -> list[int]:
    """The reference: one in-process engine of the spec's model, scheduler and KV format."""
    from partita.cluster.worker_actor import engine_config
    from partita.workers import Engine

    engine = Engine(spec.model.name, device="cpu", kv_format=spec.model.kv_format,
                    config=engine_config(spec.scheduler, spec.model))
    engine.add_request("ref", prompt, greedy(max_tokens))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    return tokens


def test_pick_pair_prefers_decode_workers_with_room():
    prefills = [WorkerLoad("p0", num_running=3), WorkerLoad("p1", num_running=1)]
    decodes = [WorkerLoad("d0", num_free_blocks=2), WorkerLoad("d1", num_running=4, num_free_blocks=50)]
    assert pick_pair(prefills, decodes, {}, blocks_needed=10) == ("p1", "d1")  # d0 has no room
    assert pick_pair(prefills, decodes, {}, blocks_needed=1) == ("p1", "d0")  # both do: the least loaded
    assert pick_pair(prefills, decodes, {}, blocks_needed=100) == ("p1", "d0")  # none does: the least loaded
    assert pick_pair(prefills, decodes, {}, excluded={"d0", "d1"}) is None
    assert pick_pair([], decodes, {}) is None


def test_decode_alternates_follow_the_pairs_order():
    decodes = [WorkerLoad("d0", num_free_blocks=50), WorkerLoad("d1", num_running=4, num_free_blocks=50),
               WorkerLoad("d2", num_free_blocks=2), WorkerLoad("d3", num_running=1, num_free_blocks=50)]
    # room first (d2 has none), then the least loaded; never the chosen one or an excluded one
    assert decode_alternates(decodes, {}, "d0", blocks_needed=10) == ["d3", "d1"]
    assert decode_alternates(decodes, {}, "d0", blocks_needed=10, limit=3) == ["d3", "d1", "d2"]
    assert decode_alternates(decodes, {}, "d0", excluded={"d3"}, blocks_needed=10) == ["d1", "d2"]
    assert decode_alternates(decodes, {"d3": 9}, "d0", blocks_needed=10) == ["d1", "d3"]
    assert decode_alternates(decodes[:1], {}, "d0") == []


def test_the_router_takes_a_pair_a_colocated_worker_or_half_a_pair():
    from types import SimpleNamespace

    from partita.cluster.gateway_engine import ModelInfo
    from partita.cluster.router import RayRouter
    from partita.workers.tokenizer import byte_tokenizer

    def entry(worker_id, role, running=0):
        return SimpleNamespace(worker_id=worker_id, role=role, state="ready", actor=None,
                               load=WorkerLoad(worker_id, role, num_running=running, num_free_blocks=100))

    router = RayRouter(None, pd_spec("fake", "none"), ModelInfo("m", 320), byte_tokenizer((1,)))
    router._entries = {e.worker_id: e for e in (entry("p0", "prefill", 1), entry("d0", "decode"),
                                                 entry("c0", "colocated", 3))}
    target = router._pick(set(), 4)
    assert (target.worker.worker_id, target.decode.worker_id, target.alternates) == ("p0", "d0", ())
    router._entries["d1"] = entry("d1", "decode", 2)
    router._entries["d2"] = entry("d2", "decode", 1)
    target = router._pick(set(), 4)  # the other decode workers, best first, for the prefill worker to fall back on
    assert [d.worker_id for d in target.decodes] == ["d0", "d2", "d1"]
    assert [d.worker_id for d in router._pick({"d2"}, 4).decodes] == ["d0", "d1"]
    del router._entries["d1"], router._entries["d2"]
    router._entries["p0"].load = WorkerLoad("p0", "prefill", num_running=5)
    assert router._pick(set(), 4).worker.worker_id == "c0" and router._pick(set(), 4).decode is None
    del router._entries["c0"]
    target = router._pick({"d0"}, 4)  # the decode side failed: the prefill worker decodes alone
    assert target.worker.worker_id == "p0" and target.decode is None
    assert router._pick({"d0", "p0"}, 4) is None


async def _state(entry) -> tuple:
    beat = await entry.actor.heartbeat.remote()
    load = beat.load
    return load.num_running + load.num_waiting, load.num_total_blocks - load.num_free_blocks, beat.num_active


def scrape_migrations(served) -> dict[str, float]:
    """The gateway's KV migration counters of the kv_format 'none' (GET /metrics)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(served.http_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("partita:kv_")
            and sample.labels.get("kv_format") == "none"}


def assert_all_free(served) -> None:
    """Every worker idle with every KV block free, and no KV transfer reserved on a decode worker."""
    async def check():
        await served.router.refresh()
        states = {}
        for entry in served.router._entries.values():
            states[entry.worker_id] = (*await _state(entry), await entry.actor.num_transfers.remote())
        return states
    wait_until(lambda: all(s == (0, 0, 0, 0) for s in served.thread.call(check(), 10).values()), 20,
               "every worker idle with its KV blocks free")


@pytest.fixture(scope="module")
def served(ray_local):
    deployment = ServedDeployment(pd_spec("pd-none", "none")).start()
    yield deployment
    deployment.stop()


def test_pd_through_router_and_gateway_equals_colocated(served):
    from partita.client import AsyncClient

    router = served.router
    expected = colocated(served.spec, PROMPT, 24)
    before = router.num_migrations
    ids, last = served.thread.call(collect(router.generate("pd-1", PROMPT, greedy(24))), 60)
    assert ids == expected and last.finish_reason == "length" and last.num_output_tokens == 24
    assert router.num_migrations == before + 1 and router.num_reruns == 0

    async def over_grpc():
        async with AsyncClient(served.grpc_target) as client:
            return await client.generate("Hello there", max_tokens=16, temperature=0.0, ignore_eos=True)
    result = served.thread.call(over_grpc(), 60)
    assert result.token_ids == colocated(served.spec, served.router.tokenizer.encode("Hello there"), 16)
    assert result.usage.completion_tokens == 16 and router.num_migrations == before + 2
    entries = served.router._entries.values()
    assert {e.role for e in entries} == {"prefill", "decode"}
    migrated = scrape_migrations(served)
    assert migrated["partita:kv_migrations_total"] == router.num_migrations
    assert migrated["partita:kv_migrated_bytes_total"] > 0 and migrated["partita:kv_transfer_seconds_total"] > 0
    # the handoff (first token to commit, on the prefill side) holds the transfer and the export before it
    assert migrated["partita:kv_handoff_seconds_total"] > migrated["partita:kv_transfer_seconds_total"]
    # the stream (to the last ack) is part of the transfer, which ends with Commit
    assert 0 < migrated["partita:kv_stream_seconds_total"] < migrated["partita:kv_transfer_seconds_total"]
    assert all((e.kv_address is not None) == (e.role == "decode") for e in entries)
    assert_all_free(served)


def test_leaving_or_aborting_reaches_the_decode_worker(served):
    router = served.router

    async def leave():
        stream = router.generate("pd-leave", PROMPT, greedy(200))
        async with contextlib.aclosing(stream):
            n = 0
            async for out in stream:
                n += len(out.new_token_ids)
                if n >= 3:  # past the first token: the request lives on the decode worker
                    return router._requests["pd-leave"].worker_id

    async def abort():
        stream = router.generate("pd-abort", PROMPT, greedy(200))
        ids, last, aborted = [], None, False
        async for out in stream:
            ids += out.new_token_ids
            last = out
            if not aborted and len(ids) >= 2:  # past the first token: the request lives on the decode worker
                assert router._requests["pd-abort"].worker_id.startswith("decode-")
                aborted = await router.abort("pd-abort")
                assert aborted
        return last

    async def abort_in_flight():
        stream = router.generate("pd-abort-early", PROMPT, greedy(200))
        async for out in stream:  # the first token: the KV is about to move, or moving
            await router.abort("pd-abort-early")
            break
        return [out async for out in stream][-1]

    async def follow_unknown():
        decode = next(e for e in router._entries.values() if e.role == "decode")
        return [await ref async for ref in decode.actor.follow.options(num_returns="streaming").remote("nope", 0.2)]

    [error] = served.thread.call(follow_unknown(), 30)
    assert error.kind == "unavailable" and "'nope' was not committed to decode worker" in error.message
    assert served.thread.call(leave(), 60).startswith("decode-")
    assert served.thread.call(abort(), 60).finish_reason == "abort"
    assert served.thread.call(abort_in_flight(), 60).finish_reason == "abort"
    assert_all_free(served)


def test_a_dead_decode_worker_loses_no_request_and_is_restored(served, ray_local):
    router = served.router
    expected = colocated(served.spec, PROMPT, 200)

    # dead at transfer time: a router whose table still lists it sends the KV there; the prefill worker's
    # transfer fails and it decodes the request itself, in the same stream
    ids, last, migrations, reruns = served.thread.call(run_with_dead(served, ray_local, "decode", "pd-dead"), 90)
    assert ids == expected and last.finish_reason == "length" and (migrations, reruns) == (0, 0)
    restored = wait_until(lambda: entry_of_or_none(served, "decode", "decode-0"), 60, "a new decode worker")

    # killed mid-stream after commit: the router re-runs the rest (prompt + tokens sent) elsewhere; several
    # requests at once keep the decode worker busy long enough for the kill to land mid-stream
    async def kill_mid_stream():
        tasks = [asyncio.ensure_future(collect(router.generate(f"pd-kill-{i}", PROMPT, greedy(200))))
                 for i in range(6)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if any(r.worker_id == restored.worker_id and len(r.sent_ids) >= 3 for r in router._requests.values()):
                break
        ray_local.kill(restored.actor, no_restart=True)
        return await asyncio.gather(*tasks)
    reruns = router.num_reruns
    for ids, last in served.thread.call(kill_mid_stream(), 120):
        assert ids == expected and last.finish_reason == "length" and last.num_output_tokens == 200
    assert router.num_reruns > reruns
    again = wait_until(lambda: entry_of_or_none(served, "decode", restored.worker_id), 60, "another decode worker")

    # killed as the first token arrives, while its KV is in flight or just committed: either the prefill
    # worker decodes it or the router re-runs it; every request completes alike
    async def kill_at_first_token():
        tasks = [asyncio.ensure_future(collect(router.generate(f"pd-first-{i}", PROMPT, greedy(200))))
                 for i in range(4)]
        for _ in range(500):
            await asyncio.sleep(0.005)
            if any(r.sent_ids for r in router._requests.values()):
                break
        ray_local.kill(again.actor, no_restart=True)
        return await asyncio.gather(*tasks)
    for ids, last in served.thread.call(kill_at_first_token(), 120):
        assert ids == expected and last.num_output_tokens == 200
    newest = wait_until(lambda: entry_of_or_none(served, "decode", again.worker_id), 60, "a fourth decode worker")
    migrations = router.num_migrations
    ids, _ = served.thread.call(collect(router.generate("pd-after", PROMPT, greedy(24))), 60)
    assert ids == expected[:24] and router.num_migrations == migrations + 1
    assert router._entries[newest.worker_id].state == "ready"
    assert_all_free(served)


def test_a_dead_prefill_worker_loses_no_request_and_is_restored(served, ray_local):
    ids, last, migrations, reruns = served.thread.call(run_with_dead(served, ray_local, "prefill", "pd-nopre"), 90)
    assert ids == colocated(served.spec, PROMPT, 40) and (migrations, reruns) == (0, 1)  # ran on the decode worker
    wait_until(lambda: entry_of_or_none(served, "prefill", "prefill-0"), 60, "a new prefill worker")
    migrations = served.router.num_migrations
    ids, _ = served.thread.call(collect(served.router.generate("pd-pre", PROMPT, greedy(40))), 60)
    assert ids == colocated(served.spec, PROMPT, 40) and served.router.num_migrations == migrations + 1
    assert_all_free(served)


async def run_with_dead(served, ray, role: str, request_id: str) -> tuple:
    """Kills the ready worker of `role`, then runs a request through a router whose table still lists it:
    (token ids, last output, migrations, re-runs)."""
    from partita.cluster.router import RayRouter

    stale = await RayRouter.connect(served.controller, served.spec)
    stale._refresh_task.cancel()
    victim = next(e for e in stale._entries.values() if e.role == role and e.state == "ready")
    ray.kill(victim.actor, no_restart=True)
    try:
        ids, last = await collect(stale.generate(request_id, PROMPT, greedy(200 if role == "decode" else 40)))
        return ids, last, stale.num_migrations, stale.num_reruns
    finally:
        await stale.aclose()


def entry_of_or_none(served, role: str, not_id: str):
    """The ready worker of `role` other than `not_id` (a replacement), or None."""
    served.thread.call(served.router.refresh(), 10)
    return next((e for e in served.router._entries.values()
                 if e.role == role and e.state == "ready" and e.worker_id != not_id), None)


def test_the_kv_of_a_dead_decode_worker_goes_to_another(ray_local):
    """Two decode workers, the router's choice dead at transfer time: the prefill worker hands the KV to the other
    one (one migration, no re-run, nothing decoded on the prefill worker), and the output equals colocated."""
    from partita.cluster.router import RayRouter

    # half a CPU each: the module's other deployment holds two of local Ray's four
    deployment = ServedDeployment(pd_spec("pd-two", "none", decode_replicas=2, cpus_per_worker=0.5)).start()
    try:
        def decode_capacity_known():  # a worker that has not reported yet looks full, and is never the choice
            deployment.thread.call(deployment.router.refresh(), 10)
            loads = [e.load for e in deployment.router._entries.values() if e.role == "decode"]
            return len(loads) == 2 and all(load.num_total_blocks > 0 for load in loads)
        wait_until(decode_capacity_known, 60, "both decode workers to report their KV capacity")

        async def run():
            stale = await RayRouter.connect(deployment.controller, deployment.spec)
            stale._refresh_task.cancel()
            victim, survivor = sorted((e for e in stale._entries.values() if e.role == "decode"),
                                      key=lambda e: e.worker_id)
            ray_local.kill(victim.actor, no_restart=True)
            stale._num_local[survivor.worker_id] = 100  # so that the router's choice is the dead one
            try:
                assert stale._pick(set(), 4).decode is victim
                ids, last = await collect(stale.generate("two", PROMPT, greedy(40)))
                return ids, last, stale.num_migrations, stale.num_reruns
            finally:
                await stale.aclose()
        ids, last, migrations, reruns = deployment.thread.call(run(), 90)
        assert ids == colocated(deployment.spec, PROMPT, 40) and last.finish_reason == "length"
        assert (migrations, reruns) == (1, 0)
    finally:
        deployment.stop()


@pytest.mark.parametrize("stream_layers", [False, True])
def test_int8_pd_equals_int8_colocated(ray_local, stream_layers):
    """Also with the KV streamed layer by layer under the prefill (kv_transfer.stream_layers)."""
    deployment = ServedDeployment(pd_spec("pd-int8", "int8", stream_layers)).start()
    try:
        before = deployment.router.num_migrations
        ids, _ = deployment.thread.call(collect(deployment.router.generate("q", PROMPT, greedy(24))), 60)
        assert ids == colocated(deployment.spec, PROMPT, 24)
        assert deployment.router.num_migrations == before + 1
        assert deployment.router.num_streamed_migrations == (1 if stream_layers else 0)
        assert_all_free(deployment)
    finally:
        deployment.stop()
