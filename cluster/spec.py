"""The cluster spec: what should run, as one tree of frozen dataclasses loaded from YAML.

    spec = load_spec("deploy/specs/tiny-moe-cpu.yaml")           # or ClusterSpec.from_dict({...})
    spec = ClusterSpec.from_dict(apply_overrides(raw, {"gateway.http_port": 0}))

Every key is checked: unknown keys, wrong types and bad values raise `SpecError` naming the path
(`pools[1].replicas`), the value and what is allowed. The spec only states intent; `check_runnable`
says whether this build can run it (roles and KV formats land issue by issue).

Environment: this is the one module that reads `PARTITA_` variables (`env_overrides`). A variable names a
spec path in upper case with `__` between levels: `PARTITA_GATEWAY__API_KEY`, `PARTITA_SCHEDULER__MAX_MODEL_LEN`,
`PARTITA_MODEL__PRESET`; its value is read as a YAML scalar. Precedence: CLI > environment > file > defaults.

(Over 400 lines because every field's documentation lives beside it: the tree is the reference.)
"""
from __future__ import annotations

import copy
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Mapping

import yaml

from partita.cluster.gateway_config import GatewayConfig, GatewayConfigError

ROLES = ("colocated", "prefill", "decode", "attention", "ffn")
DTYPES = ("auto", "float32", "float16", "bfloat16")
KV_FORMATS = ("auto", "none", "bf16", "fp16", "fp8", "int8", "int4", "kivi2")
ENV_PREFIX = "PARTITA_"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class SpecError(ValueError):
    """A spec value that cannot be used; `path` names it (`pools[1].replicas`)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message

    def __reduce__(self):  # keeps (path, message) across pickling (Ray sends it from the controller)
        return SpecError, (self.path, self.message)

    def under(self, prefix: str) -> "SpecError":
        """The same error with its path placed under `prefix`."""
        if not prefix:
            return self
        return SpecError(f"{prefix}.{self.path}" if self.path else prefix, self.message)


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise SpecError(path, message)


def _one_of(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, path, f"{value!r} is not allowed; use one of {', '.join(allowed)}")


def _positive(path: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if allow_zero:
        _require(value >= 0, path, f"must be >= 0, got {value!r}")
    else:
        _require(value > 0, path, f"must be > 0, got {value!r}")


# --- the tree ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """The served model: a checkpoint directory or a preset shape with random weights (exactly one).

    path: a Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json), readable on every
        node that runs a worker and on the gateway's node (the gateway tokenizes locally).
    preset: a preset shape with random weights: tiny-llama, tiny-moe (CPU-fast), llama3-8b, qwen3-30b-a3b.
    seed: seed of a preset's random weights (every replica draws the same weights).
    dtype: weights and activations: auto (the checkpoint's on GPU, float32 on CPU), float32, float16, bfloat16.
    kv_format: KV-cache format: auto, none (bf16/fp16), fp8, int8, int4, kivi2, with options after a colon
        ("int4:group_size=64"); the engine checks the options and that the model's shape fits them.
    """

    path: str | None = None
    preset: str | None = None
    seed: int = 0
    dtype: str = "auto"
    kv_format: str = "auto"

    def __post_init__(self) -> None:
        _require(self.path is not None or self.preset is not None, "",
                 "set model.path (a checkpoint directory) or model.preset (random weights)")
        _require(self.path is None or self.preset is None, "preset",
                 f"{self.preset!r} given beside path {self.path!r}; set only one of them")
        if self.preset is not None:
            from partita.workers.presets import PRESETS
            _one_of("preset", self.preset, tuple(PRESETS))
        if self.path is not None:
            _require(bool(self.path), "path", "must be a non-empty directory path")
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("kv_format", self.kv_format.partition(":")[0].strip().lower(), KV_FORMATS)

    @property
    def name(self) -> str:
        """What the engine calls the model (a preset's name or the checkpoint path)."""
        return self.preset if self.preset is not None else self.path

    @classmethod
    def parse(cls, value: Any, path: str = "model") -> "ModelSpec":
        """A mapping, or a string: a preset name if it is one, else a checkpoint path."""
        if isinstance(value, str):
            from partita.workers.presets import PRESETS
            value = {"preset": value} if value in PRESETS else {"path": value}
        return _build(cls, value, path)


@dataclass(frozen=True)
class PoolSpec:
    """A set of identical workers with one role.

    name: unique among pools; lower-case letters, digits and dashes (it names actors and placement groups).
    role: colocated (prefill and decode in one engine); prefill, decode, attention, ffn as they land.
    replicas: workers to run (0 keeps the pool with no workers).
    gpus_per_worker: GPUs of one worker, packed on one node (STRICT_PACK); 0 runs on CPU; unset (auto) takes
        tensor_parallel_size GPUs when the Ray cluster has GPUs and runs on CPU otherwise. A fraction (0.5)
        shares one GPU between workers (a prefill and a decode worker, semi-PD's setting): each engine then
        sizes its memory as that fraction of scheduler.gpu_memory_utilization.
    cpus_per_worker: CPUs reserved for one worker (its engine thread and the actor's event loop).
    tensor_parallel_size: GPUs one model copy is split over.
    """

    name: str
    role: str = "colocated"
    replicas: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _require(bool(_NAME_RE.match(self.name)), "name",
                 f"{self.name!r} is not allowed; use 1-40 lower-case letters, digits and dashes")
        _one_of("role", self.role, ROLES)
        _require(self.replicas >= 0, "replicas", f"must be >= 0, got {self.replicas}")
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size",
                 f"must be >= 1, got {self.tensor_parallel_size}")
        _require(self.cpus_per_worker >= 0, "cpus_per_worker", f"must be >= 0, got {self.cpus_per_worker}")
        gpus = self.gpus_per_worker
        if gpus is not None:
            _require(gpus >= 0, "gpus_per_worker", f"must be >= 0, got {gpus:g}")
            if 0 < gpus < 1:
                _require(self.tensor_parallel_size == 1, "gpus_per_worker",
                         f"a fraction of a GPU ({gpus:g}) cannot hold tensor_parallel_size="
                         f"{self.tensor_parallel_size}; use whole GPUs")
            else:
                _require(gpus == int(gpus), "gpus_per_worker", f"{gpus:g}: above 1, use a whole number of GPUs")
                _require(gpus % self.tensor_parallel_size == 0, "gpus_per_worker",
                         f"{gpus:g} is not a multiple of tensor_parallel_size ({self.tensor_parallel_size})")
            _require(gpus > 0 or self.tensor_parallel_size == 1, "tensor_parallel_size",
                     f"{self.tensor_parallel_size} needs GPUs, but gpus_per_worker is 0")


@dataclass(frozen=True)
class SchedulerSpec:
    """Engine limits, the same on every worker (partita.workers.EngineConfig has the details).

    max_num_seqs: sequences in one batch at most.
    max_num_batched_tokens: tokens of one engine step (prefill chunks plus decodes).
    max_model_len: prompt plus output tokens at most (unset: the model's maximum).
    block_size: tokens per KV-cache block (a power of two).
    num_kv_blocks: exact KV block count (unset: sized from memory).
    kv_cache_memory_bytes: KV budget in bytes (unset: gpu_memory_utilization on GPU, 1 GiB on CPU).
    gpu_memory_utilization: share of a GPU's memory one engine may use.
    enable_chunked_prefill: split long prompts across steps.
    enforce_eager: never capture CUDA graphs.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_kv_blocks",
                     "kv_cache_memory_bytes"):
            _positive(name, getattr(self, name))
        _require(self.block_size & (self.block_size - 1) == 0, "block_size",
                 f"must be a power of two, got {self.block_size}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 f"must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SLOSpec:
    """Latency targets the autoscaler will scale pools against (recorded now, acted on later).

    ttft_ms: time to first token, milliseconds; tpot_ms: time per output token after the first.
    """

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        _positive("ttft_ms", self.ttft_ms)
        _positive("tpot_ms", self.tpot_ms)


@dataclass(frozen=True)
class ControllerSpec:
    """How the controller watches and repairs workers.

    reconcile_interval_s: period of the reconcile loop (heartbeats, starts, stops).
    heartbeat_timeout_s: a heartbeat slower than this marks a worker dead.
    worker_start_timeout_s: longest a worker may take to load its model and answer.
    restart_backoff_s: delay before restarting a pool's worker after its first failure; doubles with each
        consecutive failure up to restart_backoff_max_s, and resets once a worker of the pool is ready.
    drain_timeout_s: how long a removed worker may finish its requests before they are aborted.
    """

    reconcile_interval_s: float = 0.5
    heartbeat_timeout_s: float = 10.0
    worker_start_timeout_s: float = 600.0
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _positive(f.name, getattr(self, f.name))
        _require(self.restart_backoff_max_s >= self.restart_backoff_s, "restart_backoff_max_s",
                 f"must be >= restart_backoff_s ({self.restart_backoff_s}), got {self.restart_backoff_max_s}")


@dataclass(frozen=True)
class RouterSpec:
    """How the gateway's router places requests and recovers them.

    max_reruns: times a request whose worker died is re-run on another worker before the client gets an error.
    rerun_wait_s: how long a re-run (or a new request) waits for a live worker before failing UNAVAILABLE.
    refresh_interval_s: how often the router reads worker loads from the controller.
    """

    max_reruns: int = 2
    rerun_wait_s: float = 30.0
    refresh_interval_s: float = 0.25

    def __post_init__(self) -> None:
        _require(self.max_reruns >= 0, "max_reruns", f"must be >= 0, got {self.max_reruns}")
        _positive("rerun_wait_s", self.rerun_wait_s)
        _positive("refresh_interval_s", self.refresh_interval_s)


@dataclass(frozen=True)
class KvTransferSpec:
    """The KV-transfer port of decode workers (prefill/decode disaggregation).

    host: the address a decode worker's KvTransfer server binds: 127.0.0.1 (prefill and decode workers on one
        node), `node` (the node's own IP, for pools spread over several nodes), or an explicit address.
    auth_token: the token prefill workers present (`authorization: Bearer <token>`); unset, the controller
        draws a random one per deployment and hands it to its workers, so the port never runs open.
    stream_layers: send each layer's KV while the prefill computes the later ones (cluster/kv_stream_client.py)
        rather than all of it after the prefill, or, to a decode worker on the same GPU (same_gpu), copy each
        layer into its cache as it is computed. The first token then reaches the client once the transfer is
        committed, and the decode worker's blocks are reserved from the request's admission on. Off by default.
        On the H200 (benchmarks/results/2026-11-25-kv-*-h200.md) it hides 89-100% of a same-GPU transfer of
        2k-8k-token prompts (which takes 7-9 ms after the prefill), and 17-86% over gRPC, where the sends share
        the prefill worker's process and slow its prefill.
    same_gpu: a prefill worker whose decode peer sits on its own GPU (fractional `gpus_per_worker`) maps the
        peer's KV cache over CUDA IPC and copies the blocks device to device (workers/kv_ipc.py); gRPC then
        carries only the reservation and the commit. Peers on other GPUs always get chunks over gRPC.
    max_exports: requests a prefill worker exports to host memory and sends over gRPC at once (each holds its
        whole KV there until sent: 128 MiB for 1k tokens of Llama-3-8B in bf16); later ones wait with their KV
        still on the GPU, so host memory stays bounded and a backlog reaches the prefill's admission through its
        KV cache. Same-GPU copies and layer streaming are not counted.
    """

    host: str = "127.0.0.1"
    auth_token: str | None = None
    stream_layers: bool = False
    same_gpu: bool = True
    max_exports: int = 4

    def __post_init__(self) -> None:
        _require(bool(self.host) and not any(c.isspace() for c in self.host), "host",
                 f"{self.host!r} is not an address; use 127.0.0.1, node, or an IP")
        _require(self.auth_token is None or len(self.auth_token) >= 16, "auth_token",
                 "must be at least 16 characters (or unset: a random one per deployment)")
        _positive("max_exports", self.max_exports)


def _default_pools() -> tuple[PoolSpec, ...]:
    return (PoolSpec(name="default"),)


@dataclass(frozen=True)
class ClusterSpec:
    """Everything partita runs for one served model.

    name: names this deployment's controller (`partita-controller-<name>`); several may share a Ray cluster.
    model, pools, scheduler, gateway, slo, controller, router, kv_transfer: see each section's class.
    """

    name: str = "default"
    model: ModelSpec = field(default_factory=lambda: ModelSpec(preset="tiny-moe"))
    pools: tuple[PoolSpec, ...] = field(default_factory=_default_pools)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    slo: SLOSpec = field(default_factory=SLOSpec)
    controller: ControllerSpec = field(default_factory=ControllerSpec)
    router: RouterSpec = field(default_factory=RouterSpec)
    kv_transfer: KvTransferSpec = field(default_factory=KvTransferSpec)

    def __post_init__(self) -> None:
        _require(bool(_NAME_RE.match(self.name)), "name",
                 f"{self.name!r} is not allowed; use 1-40 lower-case letters, digits and dashes")
        _require(len(self.pools) > 0, "pools", "needs at least one pool")
        seen: dict[str, int] = {}
        for i, pool in enumerate(self.pools):
            _require(pool.name not in seen, f"pools[{i}].name",
                     f"{pool.name!r} is already the name of pools[{seen.get(pool.name)}]")
            seen[pool.name] = i

    def pool(self, name: str) -> PoolSpec:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ClusterSpec":
        return _build(cls, {} if data is None else data, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the YAML shape) that `from_dict` turns back into an equal spec."""
        return _to_plain(self)


# --- building from plain data -----------------------------------------------------------------------
def _build(cls: type, data: Any, path: str) -> Any:
    """An instance of dataclass `cls` from a mapping, refusing unknown keys and wrong types by path."""
    if not isinstance(data, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise SpecError(sub, f"unknown key; known keys here: {', '.join(known)}")
        kwargs[key] = _convert(hints[key], value, sub)
    try:
        return cls(**kwargs)
    except SpecError as e:
        raise e.under(path) from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if hint is GatewayConfig:
        try:
            return GatewayConfig.from_dict(value, path)
        except GatewayConfigError as e:
            raise SpecError(e.field, e.message) from None
    if hint is ModelSpec:
        return ModelSpec.parse(value, path)
    if is_dataclass(hint):
        return _build(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(path, f"must be a list, got {type(value).__name__} {value!r}")
        return tuple(_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        _require(isinstance(value, bool), path, f"must be true or false, got {value!r}")
    elif hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), path, f"must be an integer, got {value!r}")
    elif hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value == value, path,
                 f"must be a number, got {value!r}")
        value = float(value)
    elif hint is str:
        _require(isinstance(value, str), path, f"must be a string, got {value!r}")
    return value


def _to_plain(value: Any) -> Any:
    if is_dataclass(value):
        out = {}
        for f in fields(value):
            v = getattr(value, f.name)
            default = f.default if f.default is not MISSING else MISSING
            if default is not MISSING and v == default and f.name != "name":
                continue
            out[f.name] = _to_plain(v)
        return out
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


# --- files, overrides, environment ----------------------------------------------------------------
def load_spec_dict(path: str) -> dict[str, Any]:
    """The parsed YAML of a spec file (not yet validated)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise SpecError("", f"cannot read spec file {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SpecError("", f"{path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError("", f"{path!r} must hold a mapping at the top, got {type(data).__name__}")
    return data


def load_spec(path: str) -> ClusterSpec:
    return ClusterSpec.from_dict(load_spec_dict(path))


_PATH_RE = re.compile(r"([a-z_]+)(\[(\d+|\*)\])?")


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `data` with each `path: value` set: `gateway.api_key`, `pools[0].replicas`, `pools[*].x`
    (every pool; a spec without pools gets the default pool first), `model` (a preset name or a path)."""
    out = copy.deepcopy(dict(data))
    for path, value in overrides.items():
        _set_path(out, path.split("."), value, path)
    return out


def _set_path(node: dict, parts: list[str], value: Any, full: str) -> None:
    match = _PATH_RE.fullmatch(parts[0])
    if match is None:
        raise SpecError(full, "is not a spec path")
    key, _, index = match.groups()
    if index is None:
        if len(parts) == 1:
            node[key] = value
            return
        child = node.get(key)
        if isinstance(child, str) and key == "model":  # `model: tiny-moe` shorthand
            child = node[key] = dict(ModelSpec.parse(child).__dict__)
        if not isinstance(child, dict):
            child = node[key] = {}
        _set_path(child, parts[1:], value, full)
        return
    items = node.setdefault(key, [{"name": "default"}] if key == "pools" else [])
    if not isinstance(items, list):
        raise SpecError(key, f"must be a list, got {type(items).__name__}")
    targets = items if index == "*" else [items[int(index)]] if int(index) < len(items) else []
    if not targets and index != "*":
        raise SpecError(f"{key}[{index}]", f"there are only {len(items)} entries")
    for item in targets:
        if len(parts) == 1:
            raise SpecError(full, "set a field of the entry, not the entry")
        _set_path(item, parts[1:], value, full)


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Spec overrides from `PARTITA_<SECTION>__<FIELD>` variables (module docstring); the others are ignored.
    Pools are addressed as `PARTITA_POOLS__<INDEX or ALL>__<FIELD>`."""
    sections = {f.name for f in fields(ClusterSpec)}
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if parts[0] not in sections:
            continue
        if parts[0] == "pools":
            if len(parts) != 3:
                raise SpecError(name, "pool variables look like PARTITA_POOLS__0__REPLICAS or PARTITA_POOLS__ALL__...")
            parts = [f"pools[{'*' if parts[1] == 'all' else parts[1]}]", parts[2]]
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out[".".join(parts)] = value
    return out
