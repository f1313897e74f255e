"""`partita serve`: Ray, the deployment's controller and workers, the router and the gateway, until stopped.

    ray   : `address` given or RAY_ADDRESS set (inside `ray job submit`) -> connect to that cluster;
            otherwise start a private local instance (token authentication on) and stop it on exit
    spec  -> controller (detached actor, cluster/controller.py) -> workers become ready
    router (cluster/router.py, the gateway's EngineClient) -> gateway (gRPC + HTTP) -> endpoints printed
    SIGINT / SIGTERM, or the controller removed by `partita down`
          -> gateway drains (gateway.drain_timeout_s) -> workers and controller removed -> Ray stopped if ours

A SIGTERM sent to the whole process group (systemd's default stop, `kill -- -PGID`, `timeout`) also reaches
the processes of a Ray this process started, which then exit at once, taking the workers with them; removing
the workers is not waited for then (it would wait out the controller's timeout), only Ray is stopped.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from typing import Callable, TextIO

import ray

from partita.cluster.controller import NAMESPACE, start_controller, stop_controller
from partita.cluster.gateway import Gateway
from partita.cluster.gc_freeze import freeze_startup_objects
from partita.cluster.router import RayRouter
from partita.cluster.spec import ClusterSpec

log = logging.getLogger(__name__)

RAY_ADDRESS_ENV = "RAY_ADDRESS"


def use_local_ray_token(environ=os.environ) -> None:
    """Sends the local Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) to a cluster named by
    address. Ray itself does so only for a cluster it discovers (address "auto"), or when RAY_AUTH_MODE=token;
    an explicit RAY_AUTH_MODE is left alone."""
    if "RAY_AUTH_MODE" in environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # another Ray version: RAY_AUTH_MODE=token does the same
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect_ray(address: str | None, environ=os.environ) -> bool:
    """Connects to `address` (or RAY_ADDRESS), or starts a private local Ray; True if it started one."""
    if ray.is_initialized():
        return False
    target = address or environ.get(RAY_ADDRESS_ENV) or None
    if target:
        use_local_ray_token(environ)
        ray.init(address=target, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
        return False
    # Ray turns token authentication on for a new local cluster unless RAY_AUTH_MODE says otherwise;
    # partita leaves it so (setting RAY_AUTH_MODE itself would not reach Ray's already-loaded config).
    if environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        log.warning("RAY_AUTH_MODE=%s: the local Ray starts without token authentication",
                    environ["RAY_AUTH_MODE"])
    ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    return True


def endpoints_text(spec: ClusterSpec, gateway: Gateway, started_ray: bool) -> str:
    host = gateway.config.host
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if gateway.config.tls else "http"
    pools = ", ".join(f"{p.name} ({p.role}) x{p.replicas}" for p in spec.pools)
    lines = [f"partita serving {gateway.model_name!r} (deployment {spec.name!r}; pools: {pools})"]
    if gateway.grpc_port is not None:
        lines.append(f"  grpc     {host}:{gateway.grpc_port}")
    if gateway.http_port is not None:
        lines.append(f"  http     {scheme}://{host}:{gateway.http_port}/v1  (OpenAI-compatible)")
    ray_where = "private local instance" if started_ray else "existing cluster"
    lines.append(f"  ray      {ray.get_runtime_context().gcs_address} ({ray_where}, namespace {NAMESPACE!r})")
    lines.append(f"  status   partita status --name {spec.name}" + ("" if started_ray else
                                                                   f" --address {ray.get_runtime_context().gcs_address}"))
    lines.append("  stop     Ctrl-C" + (" (or `ray job stop`)" if os.environ.get(RAY_ADDRESS_ENV) else ""))
    return "\n".join(lines)


async def run_deployment(spec: ClusterSpec, *, started_ray: bool, out: TextIO = sys.stdout,
                         stop: asyncio.Event | None = None, on_ready: Callable[[Gateway], None] | None = None) -> int:
    """Runs the deployment on a connected Ray until `stop` is set (or a signal, or `partita down`).
    Returns the process exit status."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    controller = router = gateway = None
    try:
        controller = start_controller(spec)
        router = await _until_stopped(RayRouter.connect(controller, spec, spec.controller.worker_start_timeout_s),
                                      stop)
        if router is None:
            return 130
        gateway = Gateway(router, spec.gateway)
        await gateway.start()
        freeze_startup_objects()  # a full collection would stall every stream the gateway relays (gc_freeze.py)
        print(endpoints_text(spec, gateway, started_ray), file=out, flush=True)
        if on_ready is not None:
            on_ready(gateway)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if router.controller_lost:
                print("partita: the controller is gone (partita down?); stopping", file=out, flush=True)
                controller = None
                break
        print("partita: shutting down", file=out, flush=True)
        return 0
    finally:
        await _shutdown(spec, controller, router, gateway)
        for sig in handled:
            loop.remove_signal_handler(sig)


async def _until_stopped(coro, stop: asyncio.Event):
    """Awaits `coro` unless `stop` is set first (then cancels it and returns None)."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


def local_ray_lost() -> bool:
    """True when this process started Ray and a process of that node (raylet, GCS, ...) has exited. A node
    that was only connected to has no processes here, so this stays False for an existing cluster."""
    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return node is not None and bool(node.dead_processes())
    except Exception:  # noqa: BLE001 - another Ray version: then the controller's timeout bounds the wait
        return False


async def _shutdown(spec: ClusterSpec, controller, router, gateway) -> None:
    started = time.monotonic()
    if gateway is not None:
        try:
            await gateway.stop()
        except Exception:  # noqa: BLE001 - carry on tearing down
            log.exception("gateway stop failed")
    if router is not None:
        await router.aclose()
    if controller is not None:
        try:
            removed = await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(stop_controller, controller, abandon=local_ray_lost))
            if removed is None:
                log.warning("the local Ray stopped with this process (the signal reached its process group); "
                            "its workers went with it")
        except Exception:  # noqa: BLE001 - the controller may already be gone
            log.warning("controller of %r did not stop cleanly", spec.name, exc_info=True)
    log.info("deployment %r stopped in %.1f s", spec.name, time.monotonic() - started)


def serve(spec: ClusterSpec, address: str | None = None, out: TextIO = sys.stdout) -> int:
    """The blocking `partita serve`: connect or start Ray, run the deployment, clean up."""
    started_ray = connect_ray(address)
    try:
        return asyncio.run(run_deployment(spec, started_ray=started_ray, out=out))
    finally:
        if started_ray:
            ray.shutdown()
