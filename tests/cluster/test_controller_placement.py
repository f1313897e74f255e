"""Placement without Ray: worker shapes (bundles) per pool and spreading replicas over nodes."""
from __future__ import annotations

from partita.cluster.controller import _victims, _Worker
from partita.cluster.gateway_engine import WorkerLoad
from partita.cluster.placement import NodeInfo, choose_node, engine_memory_share, fits, worker_shape
from partita.cluster.spec import PoolSpec


def test_cpu_worker_is_one_cpu_bundle():
    shape = worker_shape(PoolSpec(name="a", gpus_per_worker=0, cpus_per_worker=2), cluster_has_gpus=True)
    assert shape.bundles == ({"CPU": 2.0},) and shape.device == "cpu" and shape.num_gpus == 0


def test_auto_gpus_follow_the_cluster():
    pool = PoolSpec(name="a")
    assert worker_shape(pool, cluster_has_gpus=False).device == "cpu"
    gpu = worker_shape(pool, cluster_has_gpus=True)
    assert gpu.device == "cuda" and gpu.bundles == ({"GPU": 1.0, "CPU": 1.0},)


def test_multi_gpu_worker_has_one_bundle_per_gpu():
    shape = worker_shape(PoolSpec(name="a", gpus_per_worker=4, tensor_parallel_size=4), cluster_has_gpus=True)
    assert shape.bundles == ({"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0})
    assert shape.totals == {"GPU": 4.0, "CPU": 1.0}
    assert worker_shape(PoolSpec(name="a", gpus_per_worker=1, cpus_per_worker=0), True).bundles[0]["CPU"] > 0


def test_fractional_gpu_workers_share_a_gpu():
    shape = worker_shape(PoolSpec(name="a", gpus_per_worker=0.5), cluster_has_gpus=True)
    assert shape.bundles == ({"GPU": 0.5, "CPU": 1.0},) and shape.device == "cuda" and shape.num_gpus == 0.5
    one_gpu = NodeInfo("n", {"CPU": 4, "GPU": 1})
    assert fits(shape, one_gpu)
    assert not fits(worker_shape(PoolSpec(name="a", gpus_per_worker=0.5), True), NodeInfo("c", {"CPU": 4}))
    assert engine_memory_share(0.9, shape) == 0.45  # each sharer sizes its KV cache to its half
    assert engine_memory_share(0.9, worker_shape(PoolSpec(name="a", gpus_per_worker=2, tensor_parallel_size=2),
                                                 True)) == 0.9


def test_replicas_spread_over_nodes_that_fit():
    shape = worker_shape(PoolSpec(name="a", gpus_per_worker=2, tensor_parallel_size=2), cluster_has_gpus=True)
    nodes = [NodeInfo("n1", {"CPU": 16, "GPU": 8}), NodeInfo("n2", {"CPU": 16, "GPU": 8}),
             NodeInfo("small", {"CPU": 16, "GPU": 1}), NodeInfo("cpu", {"CPU": 64})]
    assert not fits(shape, nodes[2]) and not fits(shape, nodes[3])
    placed: dict[str, int] = {}
    for _ in range(4):
        node = choose_node(shape, nodes, placed)
        placed[node] = placed.get(node, 0) + 1
    assert placed == {"n1": 2, "n2": 2}
    assert choose_node(shape, nodes[2:], {}) is None


def test_spread_prefers_the_node_with_fewer_replicas_then_more_gpus():
    shape = worker_shape(PoolSpec(name="a", gpus_per_worker=1), cluster_has_gpus=True)
    nodes = [NodeInfo("a", {"CPU": 8, "GPU": 2}), NodeInfo("b", {"CPU": 8, "GPU": 8})]
    assert choose_node(shape, nodes, {}) == "b"
    assert choose_node(shape, nodes, {"b": 1}) == "a"


def test_scale_down_removes_unready_then_least_loaded_then_newest():
    def worker(wid, state, created, running=0):
        w = _Worker(wid, "p", "colocated", (), worker_shape(PoolSpec(name="p"), False), created, state)
        w.load = WorkerLoad(wid, num_running=running)
        return w

    workers = [worker("p-0", "ready", 0, running=5), worker("p-1", "ready", 1, running=1),
               worker("p-2", "ready", 2, running=1), worker("p-3", "starting", 3)]
    assert [w.worker_id for w in _victims(workers, 3)] == ["p-3", "p-2", "p-1"]
