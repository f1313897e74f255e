"""The `partita` command: `serve`, `status`, `down`, `bench`.

    partita serve                                  # local Ray, random-weight tiny MoE, one pool, CPU or GPU
    partita serve /models/Qwen3-30B-A3B --tensor-parallel-size 1 --data-parallel-size 2
    partita serve --config deploy/specs/tiny-moe-cpu.yaml --http-port 8080
    partita status [--name default] [--address HOST:PORT] [--json]
    partita down   [--name default] [--address HOST:PORT]
    partita bench  --url http://127.0.0.1:8000 --request-rate 1 2 4 inf   # cluster/bench_cli.py

Settings come from, highest first: flags, PARTITA_* variables (cluster/spec.py), the --config file, defaults.
Flags keep vLLM's names where they mean the same thing.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Mapping, Sequence

from partita.cluster.bench_cli import add_bench_parser, run_bench
from partita.cluster.spec import (ClusterSpec, SpecError, apply_overrides, env_overrides, load_spec_dict)

# flag (argparse dest) -> spec path
FLAG_PATHS = {
    "tensor_parallel_size": "pools[*].tensor_parallel_size",
    "data_parallel_size": "pools[*].replicas",
    "gpus_per_worker": "pools[*].gpus_per_worker",
    "max_model_len": "scheduler.max_model_len",
    "max_num_seqs": "scheduler.max_num_seqs",
    "max_num_batched_tokens": "scheduler.max_num_batched_tokens",
    "num_kv_blocks": "scheduler.num_kv_blocks",
    "max_queued_requests": "gateway.max_queued_requests",
    "api_key": "gateway.api_key",
    "shutdown_timeout": "gateway.drain_timeout_s",
    "host": "gateway.host",
    "http_port": "gateway.http_port",
    "grpc_port": "gateway.grpc_port",
    "served_model_name": "gateway.served_model_name",
    "dtype": "model.dtype",
    "kv_cache_dtype": "model.kv_format",
    "seed": "model.seed",
    "name": "name",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="partita", description="Disaggregated LLM serving on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a deployment and its gateway until Ctrl-C")
    serve.add_argument("model_tag", nargs="?", metavar="MODEL", help="checkpoint directory or preset name")
    serve.add_argument("--model", help="checkpoint directory or preset (tiny-moe, tiny-llama, llama3-8b, ...)")
    serve.add_argument("--config", help="cluster spec YAML (deploy/specs/ has examples)")
    serve.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a private local Ray)")
    serve.add_argument("--name", help="deployment name (default: the spec's, 'default')")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, help="GPUs per model copy (every pool)")
    serve.add_argument("--data-parallel-size", "-dp", "--replicas", type=int, dest="data_parallel_size",
                       help="replicas of every pool")
    serve.add_argument("--gpus-per-worker", type=int, help="GPUs per worker of every pool (0: CPU)")
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--max-num-seqs", type=int)
    serve.add_argument("--max-num-batched-tokens", type=int)
    serve.add_argument("--num-kv-blocks", type=int, help="exact KV-cache blocks per worker")
    serve.add_argument("--max-queued-requests", type=int)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but health")
    serve.add_argument("--shutdown-timeout", type=float, help="seconds to drain requests on shutdown")
    serve.add_argument("--host", help="address the gateway binds (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--served-model-name")
    serve.add_argument("--dtype", help="auto, float32, float16, bfloat16")
    serve.add_argument("--kv-cache-dtype",
                       help="KV-cache format: auto, none, fp8, int8, int4, kivi2 (options: int4:group_size=64)")
    serve.add_argument("--seed", type=int, help="seed of a preset's random weights")
    serve.add_argument("--log-level", default="WARNING")

    for name, text in (("status", "show a deployment's pools and workers"),
                       ("down", "remove a deployment's workers and controller")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--name", default="default", help="deployment name")
        p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else the local one)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the status as JSON")
    add_bench_parser(sub)
    return parser


def build_spec(args: argparse.Namespace, environ: Mapping[str, str]) -> ClusterSpec:
    """The spec from defaults < --config file < PARTITA_* variables < flags (raises SpecError by path)."""
    raw: dict[str, Any] = load_spec_dict(args.config) if args.config else {}
    raw = apply_overrides(raw, env_overrides(environ))
    model = args.model
    if args.model_tag and args.model and args.model_tag != args.model:
        raise SpecError("model", f"MODEL {args.model_tag!r} and --model {args.model!r} disagree; give one")
    model = args.model_tag or model
    if model:
        raw["model"] = _with_model(raw.get("model"), model)
    flags = {path: getattr(args, dest) for dest, path in FLAG_PATHS.items() if getattr(args, dest, None) is not None}
    raw = apply_overrides(raw, flags)
    from partita.cluster.worker_actor import check_runnable

    spec = ClusterSpec.from_dict(raw)
    check_runnable(spec)
    return spec


def _with_model(section: Any, model: str) -> dict:
    """The model section with its checkpoint replaced by `model` (a preset name or a path), rest kept."""
    from partita.workers.presets import PRESETS

    out = dict(section) if isinstance(section, dict) else {}
    out.pop("path", None)
    out.pop("preset", None)
    out["preset" if model in PRESETS else "path"] = model
    return out


def _connect(address: str | None) -> None:
    import ray

    from partita.cluster.controller import NAMESPACE

    from partita.cluster.serve import use_local_ray_token

    if ray.is_initialized():
        return
    if address:
        use_local_ray_token()
    ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)


def _find_controller(args: argparse.Namespace):
    """The deployment's controller on the cluster at --address, or None (said on stderr)."""
    from partita.cluster.controller import get_controller

    _connect(args.address)
    controller = get_controller(args.name)
    if controller is None:
        print(f"partita: no deployment named {args.name!r} on this Ray cluster", file=sys.stderr)
    return controller


def cmd_status(args: argparse.Namespace) -> int:
    import ray

    controller = _find_controller(args)
    if controller is None:
        return 1
    status = ray.get(controller.status.remote(), timeout=30)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def format_status(status: dict) -> str:
    lines = [f"deployment {status['name']}  model {status['model']}", "",
             f"{'POOL':<16}{'ROLE':<11}{'DESIRED':>8}{'READY':>7}{'STARTING':>9}{'DRAINING':>9}  RESTART"]
    for p in status["pools"]:
        restart = f"in {p['restart_in_s']:.0f} s ({p['consecutive_failures']} failures)" if p["restart_in_s"] else "-"
        lines.append(f"{p['name']:<16}{p['role']:<11}{p['desired_replicas']:>8}{p['ready_replicas']:>7}"
                     f"{p['starting_replicas']:>9}{p['draining_replicas']:>9}  {restart}")
    lines += ["", f"{'WORKER':<20}{'STATE':<10}{'DEVICE':<7}{'NODE':<14}{'RUNNING':>8}{'WAITING':>8}{'KV %':>7}"]
    for w in status["workers"]:
        load = w["load"] or {}
        lines.append(f"{w['worker_id']:<20}{w['state']:<10}{w['device']:<7}{(w['node_id'] or '-')[:12]:<14}"
                     f"{load.get('num_running', 0):>8}{load.get('num_waiting', 0):>8}"
                     f"{100 * load.get('kv_cache_usage', 0.0):>7.1f}")
    if status["events"]:
        lines += ["", "recent events:"] + [f"  {e}" for e in status["events"][-8:]]
    return "\n".join(lines)


def cmd_down(args: argparse.Namespace) -> int:
    from partita.cluster.controller import stop_controller

    controller = _find_controller(args)
    if controller is None:
        return 1
    removed = stop_controller(controller)
    print(f"partita: deployment {args.name!r} removed ({removed} workers)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from partita.cluster.serve import serve

    spec = build_spec(args, os.environ)
    return serve(spec, address=args.address)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"serve": cmd_serve, "status": cmd_status, "down": cmd_down, "bench": run_bench}
    try:
        return commands[args.command](args)
    except SpecError as e:
        print(f"partita: error: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError, RuntimeError) as e:  # no Ray cluster, a port in use, no worker ready
        logging.getLogger(__name__).debug("failed", exc_info=True)  # --log-level debug shows where
        print(f"partita: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
