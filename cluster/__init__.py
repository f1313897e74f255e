"""The control plane on Ray: cluster spec, controller, placement, router, gateway, CLI.

Names are exported lazily (PEP 562) so that `import partita.cluster.spec` does not import Ray or torch.
"""
from importlib import import_module

_EXPORTS = {
    "ClusterSpec": "partita.cluster.spec", "ModelSpec": "partita.cluster.spec", "PoolSpec": "partita.cluster.spec",
    "SpecError": "partita.cluster.spec", "load_spec": "partita.cluster.spec",
    "Controller": "partita.cluster.controller", "start_controller": "partita.cluster.controller",
    "get_controller": "partita.cluster.controller", "stop_controller": "partita.cluster.controller",
    "RayRouter": "partita.cluster.router", "WorkerActor": "partita.cluster.worker_actor",
    "serve": "partita.cluster.serve",
    "Gateway": "partita.cluster.gateway", "GatewayConfig": "partita.cluster.gateway_config",
    "AsyncEngine": "partita.cluster.async_engine", "EngineClient": "partita.cluster.gateway_engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'partita.cluster' has no attribute {name!r}")
