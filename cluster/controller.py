"""The controller: a named, detached Ray actor that makes what runs match the spec, like a Kubernetes operator.

Every `controller.reconcile_interval_s` the loop
1. heartbeats each worker (in the background, one call in flight per worker); a worker whose actor died,
   whose engine thread stopped, or that has not answered for `heartbeat_timeout_s` is killed and its
   placement group removed, and its pool may restart one after a backoff that doubles with each
   consecutive failure (`restart_backoff_s` .. `restart_backoff_max_s`);
2. per pool, starts workers until `replicas` workers of the current shape exist (each in its own placement
   group, cluster/placement.py) and drains the surplus: a draining worker refuses new requests, finishes
   the running ones within `drain_timeout_s`, and is then removed;
3. replaces workers whose shape changed (scheduler limits, GPUs per worker) only once their replacements
   are ready; healthy workers of an unchanged shape are never restarted, so scaling is just a replica count.

Worker states: pending (waiting for its placement group) -> starting (loading the model) -> ready ->
draining -> gone. The router reads `routing_table()`; `partita status` reads `status()`.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from partita.cluster.gateway_engine import WorkerLoad
from partita.cluster.placement import (WorkerShape, choose_node, cluster_has_gpus, create_worker_group,
                                       engine_memory_share, node_inventory, remove_worker_group, worker_shape)
from partita.cluster.spec import ClusterSpec, PoolSpec, SpecError, apply_overrides
from partita.cluster.worker_actor import check_runnable, remote_worker_class

log = logging.getLogger(__name__)

NAMESPACE = "partita"
DRAIN_GRACE_S = 15.0  # beyond drain_timeout_s, for the drain call itself to come back
MAX_EVENTS = 200


def controller_name(cluster_name: str) -> str:
    return f"partita-controller-{cluster_name}"


@dataclass(frozen=True)
class WorkerEntry:
    """A routable worker as the router sees it. state: ready or draining. kv_address: a decode worker's
    KvTransfer server (host:port), where prefill workers send the KV of the requests routed to it."""

    worker_id: str
    pool: str
    role: str
    state: str
    actor: Any
    load: WorkerLoad
    kv_address: str | None = None


@dataclass
class _Worker:
    worker_id: str
    pool: str
    role: str
    fingerprint: tuple
    shape: WorkerShape
    created_s: float
    state: str = "pending"
    actor: Any = None
    group: Any = None
    node_id: str | None = None
    placement_group_id: str | None = None
    kv_address: str | None = None
    last_heartbeat_s: float = 0.0
    heartbeat_inflight: bool = False
    load: WorkerLoad | None = None
    task: asyncio.Task | None = None


class Controller:
    """The reconcile loop over one ClusterSpec (module docstring). Create with `start_controller`."""

    def __init__(self, spec: dict):
        self._spec = ClusterSpec.from_dict(spec)
        check_runnable(self._spec)
        self._workers: dict[str, _Worker] = {}
        self._next_index: dict[str, int] = collections.defaultdict(int)
        self._failures: dict[str, int] = collections.defaultdict(int)
        self._not_before: dict[str, float] = {}
        self._events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self._version = 0
        self._model_info: dict | None = None
        self._loop_task: asyncio.Task | None = None
        self._stopped = False
        # decode workers' KV ports accept only this deployment's prefill workers (spec.kv_transfer.auth_token)
        self._random_kv_token = secrets.token_urlsafe(32)

    # --- public -----------------------------------------------------------------------------------
    async def apply_spec(self, spec: dict) -> dict:
        """Makes `spec` the desired state; refuses a different model (that needs a new deployment)."""
        new = ClusterSpec.from_dict(spec)
        check_runnable(new)
        if new.model != self._spec.model and self._workers:
            raise SpecError("model", f"changing the model of running deployment {self._spec.name!r} is not "
                                     "supported; run `partita down` first")
        if new != self._spec:
            self._event(f"spec applied: {_describe_pools(new)}")
        self._spec = new
        self._ensure_loop()
        return await self.status()

    async def scale(self, pool: str, replicas: int) -> dict:
        """Sets one pool's replica count (raises SpecError for an unknown pool or a bad count)."""
        names = [p.name for p in self._spec.pools]
        if pool not in names:
            raise SpecError("pools", f"no pool named {pool!r}; pools: {', '.join(names)}")
        data = apply_overrides(self._spec.to_dict(), {f"pools[{names.index(pool)}].replicas": replicas})
        return await self.apply_spec(data)

    async def drain_worker(self, worker_id: str, timeout_s: float | None = None) -> tuple[int, int]:
        """Drains one ready worker and removes it (its pool then starts a replacement): a rolling restart of
        one worker. Returns (requests finished while draining, requests handed back for re-run)."""
        w = self._workers.get(worker_id)
        if w is None or w.state != "ready":
            ready = [x.worker_id for x in self._workers.values() if x.state == "ready"]
            raise SpecError("worker_id", f"{worker_id!r} is not a ready worker; ready: {', '.join(ready) or 'none'}")
        self._stop(w, "drain requested", timeout_s)
        return await w.task

    async def routing_table(self) -> tuple[int, list[WorkerEntry]]:
        """(version, ready and draining workers); the version changes whenever the set of workers does."""
        self._ensure_loop()
        entries = [WorkerEntry(w.worker_id, w.pool, w.role, w.state, w.actor, w.load or _empty_load(w), w.kv_address)
                   for w in self._workers.values() if w.state in ("ready", "draining")]
        return self._version, entries

    async def model_info(self) -> dict | None:
        return self._model_info

    async def status(self) -> dict:
        """Pools (desired, ready, starting, draining, restart backoff), workers and recent events."""
        now = time.monotonic()
        pools = []
        for pool in self._spec.pools:
            mine = [w for w in self._workers.values() if w.pool == pool.name]
            count = collections.Counter(w.state for w in mine)
            pools.append({"name": pool.name, "role": pool.role, "desired_replicas": pool.replicas,
                          "ready_replicas": count["ready"], "starting_replicas": count["starting"] + count["pending"],
                          "draining_replicas": count["draining"], "consecutive_failures": self._failures[pool.name],
                          "restart_in_s": max(0.0, self._not_before.get(pool.name, 0.0) - now)})
        workers = [{"worker_id": w.worker_id, "pool": w.pool, "role": w.role, "state": w.state,
                    "node_id": w.node_id, "placement_group_id": w.placement_group_id, "device": w.shape.device,
                    "kv_address": w.kv_address, "age_s": now - w.created_s,
                    "load": dataclasses.asdict(w.load) if w.load else None} for w in self._workers.values()]
        return {"name": self._spec.name, "model": self._spec.model.name, "version": self._version,
                "pools": pools, "workers": workers, "events": list(self._events)[-20:],
                "spec": self._spec.to_dict()}

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every pool has exactly its desired replicas ready and nothing starts or drains."""
        deadline = time.monotonic() + timeout_s
        self._ensure_loop()
        while time.monotonic() < deadline:
            if self._is_settled():
                return True
            await asyncio.sleep(0.1)
        return self._is_settled()

    async def shutdown(self) -> int:
        """Stops the loop and removes every worker and placement group at once; returns how many."""
        self._stopped = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        workers = list(self._workers.values())
        for w in workers:
            self._discard(w)
        self._event(f"shut down, {len(workers)} workers removed")
        return len(workers)

    # --- the loop ---------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None and not self._stopped:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopped:
            try:
                self._tick(time.monotonic())
            except Exception:  # noqa: BLE001 - one bad tick must not end the control plane
                log.exception("reconcile tick failed")
            await asyncio.sleep(self._spec.controller.reconcile_interval_s)

    def _tick(self, now: float) -> None:
        self._check_health(now)
        names = {p.name for p in self._spec.pools}
        for w in list(self._workers.values()):
            if w.pool not in names and w.state != "draining":
                self._stop(w, "its pool left the spec")
        for pool in self._spec.pools:
            self._reconcile_pool(pool, now)

    def _reconcile_pool(self, pool: PoolSpec, now: float) -> None:
        fingerprint = self._fingerprint(pool)
        mine = [w for w in self._workers.values() if w.pool == pool.name and w.state != "draining"]
        current = [w for w in mine if w.fingerprint == fingerprint]
        outdated = [w for w in mine if w.fingerprint != fingerprint]
        missing = pool.replicas - len(current)
        if missing > 0 and now >= self._not_before.get(pool.name, 0.0):
            for _ in range(missing):
                self._start(pool, fingerprint)
        elif missing < 0:
            for w in _victims(current, -missing):
                self._stop(w, f"pool {pool.name} scaled to {pool.replicas}")
        if outdated and sum(w.state == "ready" for w in current) >= pool.replicas:
            for w in outdated:
                self._stop(w, "replaced by a worker of the new shape")

    def _is_settled(self) -> bool:
        for pool in self._spec.pools:
            fingerprint = self._fingerprint(pool)
            mine = [w for w in self._workers.values() if w.pool == pool.name]
            if len(mine) != pool.replicas or any(w.state != "ready" or w.fingerprint != fingerprint for w in mine):
                return False
        return all(w.pool in {p.name for p in self._spec.pools} for w in self._workers.values())

    def _fingerprint(self, pool: PoolSpec) -> tuple:
        return (self._spec.scheduler, pool.role, pool.gpus_per_worker, pool.cpus_per_worker,
                pool.tensor_parallel_size)

    # --- health -----------------------------------------------------------------------------------
    def _check_health(self, now: float) -> None:
        timeout_s = self._spec.controller.heartbeat_timeout_s
        for w in list(self._workers.values()):
            if w.state not in ("ready", "draining"):
                continue
            if not w.heartbeat_inflight:
                w.heartbeat_inflight = True
                asyncio.get_running_loop().create_task(self._heartbeat(w))
            if w.state == "ready" and now - w.last_heartbeat_s > timeout_s:
                self._fail(w, f"no heartbeat for {now - w.last_heartbeat_s:.1f} s")

    async def _heartbeat(self, w: _Worker) -> None:
        try:
            beat = await w.actor.heartbeat.remote()
            w.last_heartbeat_s = time.monotonic()
            w.load = beat.load
            if not beat.is_healthy and w.state == "ready" and self._workers.get(w.worker_id) is w:
                self._fail(w, "its engine stopped")
        except Exception as e:  # noqa: BLE001 - a dead actor answers with RayActorError and kin
            if w.state == "ready" and self._workers.get(w.worker_id) is w:
                self._fail(w, f"heartbeat failed: {type(e).__name__}: {_first_line(e)}")
        finally:
            w.heartbeat_inflight = False

    def _fail(self, w: _Worker, reason: str) -> None:
        self._discard(w)
        n = self._failures[w.pool] = self._failures[w.pool] + 1
        c = self._spec.controller
        delay_s = min(c.restart_backoff_s * 2 ** (n - 1), c.restart_backoff_max_s)
        self._not_before[w.pool] = time.monotonic() + delay_s
        self._event(f"{w.worker_id} failed ({reason}); pool {w.pool} restarts in {delay_s:.1f} s "
                    f"(consecutive failures: {n})")

    # --- start, stop ------------------------------------------------------------------------------
    def _start(self, pool: PoolSpec, fingerprint: tuple) -> None:
        index = self._next_index[pool.name]
        self._next_index[pool.name] += 1
        worker_id = f"{pool.name}-{index}"
        shape = worker_shape(pool, cluster_has_gpus(node_inventory()))
        w = _Worker(worker_id, pool.name, pool.role, fingerprint, shape, time.monotonic())
        self._workers[worker_id] = w
        w.task = asyncio.get_running_loop().create_task(self._run_start(w))
        self._event(f"{worker_id} starting ({shape.device}, bundles {list(shape.bundles)})")

    async def _run_start(self, w: _Worker) -> None:
        spec = self._spec
        deadline = time.monotonic() + spec.controller.worker_start_timeout_s
        try:
            same_pool = collections.Counter(x.node_id for x in self._workers.values()
                                            if x.pool == w.pool and x.node_id)
            target = choose_node(w.shape, node_inventory(), same_pool)
            w.group = create_worker_group(f"partita-{spec.name}-{w.worker_id}", w.shape, target)
            await asyncio.wait_for(w.group.ready(), deadline - time.monotonic())
            w.state = "starting"
            strategy = PlacementGroupSchedulingStrategy(w.group, placement_group_bundle_index=0,
                                                        placement_group_capture_child_tasks=True)
            scheduler = dataclasses.asdict(spec.scheduler)
            scheduler["gpu_memory_utilization"] = engine_memory_share(spec.scheduler.gpu_memory_utilization, w.shape)
            w.actor = remote_worker_class().options(
                num_cpus=w.shape.num_cpus, num_gpus=min(1.0, w.shape.num_gpus), scheduling_strategy=strategy,
            ).remote(w.worker_id, w.pool, w.role, dataclasses.asdict(spec.model), scheduler,
                     w.shape.device, max(1, int(w.shape.num_cpus)),
                     kv_transfer={**dataclasses.asdict(spec.kv_transfer),
                                  "auth_token": spec.kv_transfer.auth_token or self._random_kv_token})
            info = await asyncio.wait_for(w.actor.ready.remote(), deadline - time.monotonic())
        except asyncio.CancelledError:
            self._discard(w)
            raise
        except Exception as e:  # noqa: BLE001 - every start failure is reported and retried with backoff
            if self._workers.get(w.worker_id) is w:
                what = "timed out" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {_first_line(e)}"
                self._fail(w, f"start {what} in state {w.state}")
            return
        w.node_id, w.state, w.last_heartbeat_s = info.pop("node_id"), "ready", time.monotonic()
        w.placement_group_id = info.pop("placement_group_id")
        w.kv_address = info.pop("kv_address")
        self._model_info = self._model_info or info
        self._failures[w.pool] = 0
        self._version += 1
        self._event(f"{w.worker_id} ready on node {w.node_id[:12]}")

    def _stop(self, w: _Worker, reason: str, timeout_s: float | None = None) -> None:
        if w.state in ("pending", "starting"):
            if w.task is not None:
                w.task.cancel()
            self._discard(w)
            self._event(f"{w.worker_id} cancelled before it was ready ({reason})")
            return
        w.state = "draining"
        self._version += 1
        self._event(f"{w.worker_id} draining ({reason})")
        timeout_s = self._spec.controller.drain_timeout_s if timeout_s is None else timeout_s
        w.task = asyncio.get_running_loop().create_task(self._run_drain(w, timeout_s))

    async def _run_drain(self, w: _Worker, timeout_s: float) -> tuple[int, int]:
        finished = cut = 0
        try:
            finished, cut = await asyncio.wait_for(w.actor.drain.remote(timeout_s), timeout_s + DRAIN_GRACE_S)
            self._event(f"{w.worker_id} drained: {finished} requests finished, {cut} handed back for re-run")
        except Exception as e:  # noqa: BLE001 - a worker that dies while draining is removed all the same
            self._event(f"{w.worker_id} drain ended early: {type(e).__name__}")
        finally:
            self._discard(w)
        return finished, cut

    def _discard(self, w: _Worker) -> None:
        """Forgets the worker and frees what it holds (actor, placement group); safe to repeat."""
        if self._workers.get(w.worker_id) is w:
            del self._workers[w.worker_id]
            self._version += 1
        w.state = "gone"
        if w.actor is not None:
            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
            w.actor = None
        if w.group is not None:
            remove_worker_group(w.group)
            w.group = None

    def _event(self, message: str) -> None:
        log.info("%s", message)
        self._events.append(f"{time.strftime('%H:%M:%S')} {message}")


def _victims(workers: list[_Worker], n: int) -> list[_Worker]:
    """Whom to remove first: not-yet-ready workers, then the least loaded, then the newest."""
    rank = {"pending": 0, "starting": 1, "ready": 2}

    def key(w: _Worker):
        busy = (w.load.num_running + w.load.num_waiting) if w.load else 0
        return rank.get(w.state, 3), busy, -w.created_s

    return sorted(workers, key=key)[:n]


def _empty_load(w: _Worker) -> WorkerLoad:
    return WorkerLoad(w.worker_id, w.role, w.pool)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _describe_pools(spec: ClusterSpec) -> str:
    return ", ".join(f"{p.name}={p.replicas}" for p in spec.pools)


# --- client side ------------------------------------------------------------------------------------
def start_controller(spec: ClusterSpec):
    """Gets or creates the deployment's detached controller and applies `spec`; returns its handle.
    Needs a connected Ray (`ray.init`). A controller left from an earlier run is reused, with its workers."""
    handle = ray.remote(Controller).options(
        name=controller_name(spec.name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000,
    ).remote(spec.to_dict())
    ray.get(handle.apply_spec.remote(spec.to_dict()))
    return handle


def get_controller(name: str = "default"):
    """The running controller of deployment `name`, or None."""
    try:
        return ray.get_actor(controller_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


def stop_controller(handle, timeout_s: float = 60.0, abandon: Callable[[], bool] | None = None) -> int | None:
    """Removes the deployment's workers and then the controller itself; returns the workers removed. Raises
    GetTimeoutError after timeout_s; returns None as soon as `abandon()` (asked twice a second) says there is
    nothing left to wait for."""
    ref = handle.shutdown.remote()
    deadline = time.monotonic() + timeout_s
    try:
        while not ray.wait([ref], timeout=min(0.5, max(0.0, deadline - time.monotonic())))[0]:
            if time.monotonic() >= deadline:
                raise ray.exceptions.GetTimeoutError(f"the controller did not stop within {timeout_s:g} s")
            if abandon is not None and abandon():
                return None
        return ray.get(ref)
    finally:
        ray.kill(handle, no_restart=True)
