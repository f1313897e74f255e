"""The controller on a local Ray with the real tiny engine on CPU: placement groups, scaling with requests
in flight, a worker killed mid-stream, restart backoff, and `partita status` / `partita down`."""
from __future__ import annotations

import asyncio

import pytest

from partita.cluster import cli
from partita.cluster.controller import get_controller, start_controller, stop_controller
from partita.cluster.router import RayRouter
from partita.workers import SamplingParams
from tests.cluster.ray_fixtures import collect, ray_local, run, tiny_spec, wait_until  # noqa: F401

pytestmark = pytest.mark.timeout(240)
NUM_TOKENS = 200


def greedy(n: int = NUM_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def status_of(ray, controller) -> dict:
    return ray.get(controller.status.remote(), timeout=30)


def assert_complete(results, n: int = NUM_TOKENS) -> None:
    for ids, last in results:
        assert len(ids) == n and last.finished and last.finish_reason == "length"
        assert last.num_output_tokens == n


@pytest.fixture
def deployment(ray_local):
    """start(spec) -> controller handle; every deployment started is removed after the test."""
    handles = []

    def start(spec):
        handle = start_controller(spec)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        try:
            stop_controller(handle, timeout_s=30)
        except Exception:  # noqa: BLE001 - removed by the test already
            pass


def test_each_worker_gets_a_strict_pack_group_and_status_down_work(ray_local, deployment, capsys):
    ray = ray_local
    controller = deployment(tiny_spec("place", replicas=2))
    assert ray.get(controller.wait_ready.remote(120), timeout=150)
    status = status_of(ray, controller)
    assert status["pools"][0] | {"restart_in_s": 0} == {
        "name": "p", "role": "colocated", "desired_replicas": 2, "ready_replicas": 2, "starting_replicas": 0,
        "draining_replicas": 0, "consecutive_failures": 0, "restart_in_s": 0}
    groups = {g["placement_group_id"]: g for g in ray.util.placement_group_table().values()}
    for worker in status["workers"]:
        group = groups[worker["placement_group_id"]]  # the actor reported the group it runs in
        assert group["name"] == f"partita-place-{worker['worker_id']}"
        assert group["strategy"] == "STRICT_PACK" and group["state"] == "CREATED"
        assert list(group["bundles"].values()) == [{"CPU": 1.0}]
        assert worker["device"] == "cpu" and worker["state"] == "ready"

    assert cli.main(["status", "--name", "place"]) == 0
    printed = capsys.readouterr().out
    assert "p-0" in printed and "p-1" in printed and "colocated" in printed
    assert cli.main(["down", "--name", "place"]) == 0
    assert "removed (2 workers)" in capsys.readouterr().out
    assert get_controller("place") is None
    table = ray.util.placement_group_table()
    assert all(table[g]["state"] == "REMOVED" for g in table if table[g]["name"].startswith("partita-place-"))
    assert cli.main(["status", "--name", "place"]) == 1


def test_scale_1_2_1_with_requests_in_flight_loses_none(ray_local, deployment):
    ray = ray_local
    spec = tiny_spec("scale", replicas=1)
    controller = deployment(spec)
    assert ray.get(controller.wait_ready.remote(120), timeout=150)

    async def main():
        router = await RayRouter.connect(controller, spec)
        try:
            first = {e.worker_id: e.actor for e in router._entries.values()}
            assert list(first) == ["p-0"]

            def wave(tag, n):
                return [asyncio.ensure_future(collect(router.generate(f"{tag}{i}", f"wave {tag} {i}", greedy())))
                        for i in range(n)]

            tasks = wave("a", 4)
            await controller.scale.remote("p", 2)
            assert await controller.wait_ready.remote(120)
            await router.refresh()
            assert set(router._entries) == {"p-0", "p-1"}
            assert router._entries["p-0"].actor._actor_id == first["p-0"]._actor_id  # not restarted
            tasks += wave("b", 8)
            await asyncio.sleep(0.3)
            assert all(router._num_local.get(w, 0) > 0 for w in ("p-0", "p-1"))  # both busy
            await controller.scale.remote("p", 1)
            tasks += wave("c", 4)
            results = await asyncio.gather(*tasks)
            assert_complete(results)
            assert await controller.wait_ready.remote(60)
            return router.num_reruns
        finally:
            await router.aclose()

    num_reruns = run(main())
    status = status_of(ray, controller)
    assert [p["ready_replicas"] for p in status["pools"]] == [1]
    drained = [e for e in status["events"] if "drained:" in e]
    assert len(drained) == 1 and "0 requests finished" not in drained[0], status["events"]
    assert num_reruns == 0 or any("draining" in e for e in status["events"])


def test_worker_killed_mid_stream_requests_finish_elsewhere_and_count_is_restored(ray_local, deployment):
    ray = ray_local
    spec = tiny_spec("heal", replicas=2)
    controller = deployment(spec)
    assert ray.get(controller.wait_ready.remote(120), timeout=150)

    async def main():
        router = await RayRouter.connect(controller, spec)
        try:
            streams = [router.generate(f"r{i}", f"prompt number {i}" if i % 2 else [3, 4, 5, i], greedy())
                       for i in range(6)]
            tasks = [asyncio.ensure_future(collect(s)) for s in streams]
            victim = None
            for _ in range(100):  # until the victim has requests that already streamed tokens
                await asyncio.sleep(0.05)
                busy = [w for w, n in router._num_local.items() if n > 0]
                if busy and any(r.sent_ids and r.worker_id == busy[0] for r in router._requests.values()):
                    victim = router._entries[busy[0]]
                    break
            assert victim is not None
            ray.kill(victim.actor)
            results = await asyncio.gather(*tasks)
            assert_complete(results)
            assert router.num_reruns >= 1
            return victim.worker_id
        finally:
            await router.aclose()

    victim_id = run(main())
    assert ray.get(controller.wait_ready.remote(120), timeout=150)
    status = status_of(ray, controller)
    ids = {w["worker_id"] for w in status["workers"]}
    assert len(ids) == 2 and victim_id not in ids
    assert any(e.split(" ", 1)[1].startswith(f"{victim_id} failed") for e in status["events"]), status["events"]


def test_workers_that_fail_to_start_are_retried_with_growing_backoff(ray_local, deployment):
    ray = ray_local
    spec = tiny_spec("broken", replicas=1, model={"path": "/nonexistent/model-dir"})
    controller = deployment(spec)
    wait_until(lambda: status_of(ray, controller)["pools"][0]["consecutive_failures"] >= 2, 90,
               "two failed starts")
    status = status_of(ray, controller)
    assert status["pools"][0]["ready_replicas"] == 0
    events = " | ".join(status["events"])
    assert "restarts in 0.5 s (consecutive failures: 1)" in events
    assert "restarts in 1.0 s (consecutive failures: 2)" in events
    assert "ModelLoadError" in events or "ActorDiedError" in events
