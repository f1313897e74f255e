"""Where workers run: each worker's resources as placement-group bundles, and a node for each replica.

One worker = one placement group. A GPU worker's group has one bundle per GPU, `{"GPU": 1, "CPU": c}` for
the first and `{"GPU": 1}` for the rest, placed STRICT_PACK so that a tensor-parallel worker's GPUs share a
node (NVLink); a CPU worker's group is one `{"CPU": c}` bundle. The engine actor takes bundle 0.

Replicas of a pool are spread: `choose_node` picks, among alive nodes whose totals can hold the worker,
the one with the fewest replicas of that pool (then the most GPUs, then CPUs), and the group asks Ray for
it as a soft target; Ray places it elsewhere when that node is full. Pure functions here are tested
without Ray; `create_worker_group` and `node_inventory` are the two calls into it.
"""
from __future__ import annotations

from dataclasses import dataclass

from partita.cluster.spec import PoolSpec

STRATEGY = "STRICT_PACK"
MIN_CPU_BUNDLE = 0.01  # a bundle may not be empty; a GPU worker asking for no CPU still needs a sliver


@dataclass(frozen=True)
class WorkerShape:
    """One worker's resources. bundles: [num_gpus or 1] placement-group bundles; device: cuda or cpu."""

    bundles: tuple[dict[str, float], ...]
    num_gpus: float  # a fraction below 1: the worker shares its GPU
    num_cpus: float
    device: str

    @property
    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for bundle in self.bundles:
            for key, value in bundle.items():
                out[key] = out.get(key, 0.0) + value
        return out


@dataclass(frozen=True)
class NodeInfo:
    """An alive Ray node: its id and total resources ({"CPU": 16, "GPU": 8, ...})."""

    node_id: str
    resources: dict[str, float]


def worker_shape(pool: PoolSpec, cluster_has_gpus: bool) -> WorkerShape:
    """The bundles of one worker of `pool`; `gpus_per_worker` unset means GPUs if the cluster has any."""
    gpus = pool.gpus_per_worker
    if gpus is None:
        gpus = pool.tensor_parallel_size if cluster_has_gpus else 0
    cpus = float(pool.cpus_per_worker)
    if gpus == 0:
        return WorkerShape(({"CPU": max(cpus, MIN_CPU_BUNDLE)},), 0, max(cpus, MIN_CPU_BUNDLE), "cpu")
    if gpus < 1:
        return WorkerShape(({"GPU": float(gpus), "CPU": max(cpus, MIN_CPU_BUNDLE)},), float(gpus),
                           max(cpus, MIN_CPU_BUNDLE), "cuda")
    gpus = int(gpus)
    first = {"GPU": 1.0, "CPU": max(cpus, MIN_CPU_BUNDLE)}
    return WorkerShape((first,) + tuple({"GPU": 1.0} for _ in range(gpus - 1)), gpus, first["CPU"], "cuda")


def fits(shape: WorkerShape, node: NodeInfo) -> bool:
    return all(node.resources.get(key, 0.0) >= value for key, value in shape.totals.items())


def choose_node(shape: WorkerShape, nodes: list[NodeInfo], replicas_per_node: dict[str, int]) -> str | None:
    """The node to aim one more replica at: fewest replicas of its pool among nodes that can hold it.

    replicas_per_node: node_id -> replicas of this pool already there. Returns None if no node fits."""
    candidates = [n for n in nodes if fits(shape, n)]
    if not candidates:
        return None
    best = min(candidates, key=lambda n: (replicas_per_node.get(n.node_id, 0), -n.resources.get("GPU", 0.0),
                                          -n.resources.get("CPU", 0.0), n.node_id))
    return best.node_id


def node_inventory() -> list[NodeInfo]:
    """Alive nodes of the connected Ray cluster."""
    import ray

    return [NodeInfo(n["NodeID"], dict(n.get("Resources", {}))) for n in ray.nodes() if n.get("Alive")]


def cluster_has_gpus(nodes: list[NodeInfo]) -> bool:
    return any(n.resources.get("GPU", 0.0) > 0 for n in nodes)


def create_worker_group(name: str, shape: WorkerShape, target_node_id: str | None):
    """Asks Ray for the worker's placement group (STRICT_PACK bundles, soft target node); returns it at once,
    placement pending: `await group.ready()` resolves when Ray reserved it."""
    from ray.util.placement_group import placement_group

    return placement_group([dict(b) for b in shape.bundles], strategy=STRATEGY, name=name,
                           _soft_target_node_id=target_node_id)


def remove_worker_group(group) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(group)
    except Exception:  # noqa: BLE001 - already removed, or the cluster is going away
        pass


def engine_memory_share(gpu_memory_utilization: float, shape: WorkerShape) -> float:
    """The GPU memory share one worker's engine sizes itself to: all of it for whole GPUs, its fraction of it
    for a worker that shares its GPU (two workers at 0.5 each take half of gpu_memory_utilization each)."""
    return gpu_memory_utilization * shape.num_gpus if 0 < shape.num_gpus < 1 else gpu_memory_utilization
