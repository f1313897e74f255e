"""Linear layer for decode-sized batches: a pass over the weight at memory speed.

Operation: y = x @ weight.T + bias, with fp32 accumulation and y in x's dtype.

    x: [M, K], weight: [N, K], bias: [N] or None  ->  y: [M, N]

Dtypes: bf16 and fp16 are the fast path; fp32 runs (IEEE fp32 products, no tf32) for correctness only.
x, weight and bias share one dtype. Limits: 1 <= M <= 64 (use it for M <= 16, see `use_small_m_linear`);
any N, K >= 1; any strides (a weight whose K-stride is 1 gets 16-byte loads).

Why: at batch 1..16 a linear layer does 1..16 multiply-adds per weight element it reads, far under the
~200 FLOP/byte at which an H200 stops being memory-bound, so the time floor is the weight's bytes over
memory bandwidth. Measured on an H200 (benchmarks/decode_kernels.py): 3.8-4.6 TB/s of weight at M = 1 for
the Llama-3-8B shapes, against cuBLAS's 2.5-4.3.

Two kernels, one program per BLOCK_N weight rows, each streaming its rows once over all of K:
- `_gemv_kernel` (M == 1): fp32 multiply-adds on the CUDA cores into a [BLOCK_N, BLOCK_K] register tile,
  summed across K once at the end. Small tiles (4 rows x 2048) give >= 1024 programs on every shape.
- `_dot_kernel` (any M <= 64): tensor-core products of the weight tile [BLOCK_N, BLOCK_K] with x's tile
  [BLOCK_K, BLOCK_M], x's rows padded to BLOCK_M = 16, 32 or 64 by masked (free) loads; the weight tiles
  are pipelined through shared memory (cp.async, num_stages deep).
Weight loads are unmasked along N (rows wrap modulo N; only the store is masked) and along K when
BLOCK_K divides K, so they vectorise; they are marked evict-first. No split-K: the tuned tiles already
give >= 96 programs of >= 256 KB each, or >= 1024 small ones at M = 1, and reach the target without it.

Programmatic dependent launch (PDL, sm_90+, on by default on CUDA): each program lets the next kernel
in the stream launch early (`gdc_launch_dependents`, at its start or, per config, after its main loop)
and may read its first weight tile before `gdc_wait`, which it passes before touching x or writing y.
Weights are never written by a preceding kernel, so this is safe next to any kernel; chained PDL
kernels (rms_norm, silu_and_mul, apply_rotary here do the same) overlap one kernel's tail with the
next one's first loads, which is worth ~1.5 µs per kernel inside a CUDA graph.

Config choice: `configs(M, dtype)` lists the candidates; the first eager CUDA call for an (M, N, K,
dtype, device, pdl) times them as a CUDA graph of calls over rotating weight copies (L2-cold, as in
decode), rejects any whose output disagrees with torch, and caches the fastest for every M of its row
tile (`tile_rows`: M = 1, or 2..16, 17..32, 33..64, which run the same tiles); `warmup` does the same
ahead of time, `set_config` pins one. The engine tunes at start and never times while it serves: M = 3
then takes M = 2's tuned config, not `default_config`, and so also its compiled kernel. A call during
graph capture never times anything: it uses the cached choice, or `default_config`. Under Triton's
interpreter one pinned config per kernel is used. The cache of chosen configs is the one piece of
module state, like `triton.autotune`'s own cache. This file is a little over 400 lines because the
tuner belongs with the configs it tunes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_M = 64
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LinearConfig:
    """One launch configuration: which kernel, its tile and its warps/pipeline depth."""

    kernel: str  # "gemv" (M == 1 only) or "dot"
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = True  # with PDL: read the first weight tile before waiting for the previous kernel
    trigger_late: bool = False  # with PDL: let the next kernel launch after the main loop, not at the start


@triton.jit
def _load_w(w_ptrs, offs_k, k0, K, EVEN_K: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] weight tile, streamed (evict-first); K-masked unless BLOCK_K divides K."""
    if EVEN_K:
        return tl.load(w_ptrs, eviction_policy="evict_first")
    else:
        return tl.load(w_ptrs, mask=(offs_k < K - k0)[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _load_x(x_ptrs, row_in, offs_k, k0, K, EVEN_K: tl.constexpr):
    """One tile of x ([BLOCK_K] or [BLOCK_M, BLOCK_K]); row_in masks x's padding rows."""
    if EVEN_K:
        return tl.load(x_ptrs, mask=row_in, other=0.0)
    else:
        return tl.load(x_ptrs, mask=row_in & (offs_k < K - k0), other=0.0)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,  # x [1, K], weight [N, K], bias [N] (unused unless HAS_BIAS), y [1, N]
    N, K,  # sizes
    stride_xk, stride_wn, stride_wk, stride_yn,  # strides, in elements
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,  # EVEN_K: BLOCK_K divides K, so no K mask
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, TRIGGER_LATE: tl.constexpr,  # see LinearConfig
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,  # > 1: tiles prefetched through shared memory (cp.async), STAGES - 1 ahead
):
    pid = tl.program_id(0)
    if USE_PDL and not TRIGGER_LATE:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start and fetch its own weights
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N  # always in bounds: loads need no N mask, the store is masked
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    x_ptrs = x_ptr + offs_k * stride_xk
    if PREFETCH:  # the first tile, before waiting: no earlier kernel writes the weight
        w = _load_w(w_ptrs, offs_k, 0, K, EVEN_K)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()  # x, and the memory y reuses, may belong to the previous kernel
        x = _load_x(x_ptrs, True, offs_k, 0, K, EVEN_K)
        acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        k_start = BLOCK_K
    else:
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        k_start = 0
    for k0 in tl.range(k_start, K, BLOCK_K, num_stages=STAGES):
        w = _load_w(w_ptrs, offs_k, k0, K, EVEN_K)
        x = _load_x(x_ptrs, True, offs_k, k0, K, EVEN_K)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
    if USE_PDL and TRIGGER_LATE:
        tl.extra.cuda.gdc_launch_dependents()
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(y_ptr + offs_n * stride_yn, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit(do_not_specialize=["M"])
def _dot_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,  # x [M, K], weight [N, K], bias [N] (unused unless HAS_BIAS), y [M, N]
    M, N, K,  # sizes
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,  # strides, in elements
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # upcast the operands before tl.dot (the interpreter's bf16 dot is wrong)
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, TRIGGER_LATE: tl.constexpr,  # see LinearConfig
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    if USE_PDL and not TRIGGER_LATE:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start and fetch its own weights
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N  # always in bounds: loads need no N mask, the store is masked
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    m_in = offs_m[:, None] < M
    if PREFETCH:  # the first tile, before waiting: no earlier kernel writes the weight
        w = _load_w(w_ptrs, offs_k, 0, K, EVEN_K)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()  # x, and the memory y reuses, may belong to the previous kernel
        x = _load_x(x_ptrs, m_in, offs_k[None, :], 0, K, EVEN_K)
        if DOT_IN_FP32:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        k_start = BLOCK_K
    else:
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_start = 0
    for k0 in range(k_start, K, BLOCK_K):
        w = _load_w(w_ptrs, offs_k, k0, K, EVEN_K)
        x = _load_x(x_ptrs, m_in, offs_k[None, :], k0, K, EVEN_K)
        if DOT_IN_FP32:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
    if USE_PDL and TRIGGER_LATE:
        tl.extra.cuda.gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
    y_in = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_in)


def _block_m(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


def configs(M: int, dtype: torch.dtype) -> list[LinearConfig]:
    """Candidate configs for an M-row product: those within 3% of the fastest for some Llama-3-8B shape
    and M in 1..32 on an H200 (benchmarks/decode_kernels.py --sweep, 2026-11-24)."""
    elt = torch.empty((), dtype=dtype).element_size()
    if M == 1:
        return [LinearConfig("gemv", 4, 2048, 4, 1), LinearConfig("gemv", 8, 1024, 4, 3),
                LinearConfig("gemv", 4, 2048, 4, 1, trigger_late=True), LinearConfig("gemv", 16, 256, 4, 3),
                LinearConfig("gemv", 2, 4096, 4, 1), LinearConfig("gemv", 16, 512, 8, 1)]
    bm = _block_m(M)
    out = []
    for bn, bk, stages, prefetch, late in (
            (32, 256, 5, False, True), (64, 128, 5, False, True), (64, 128, 3, True, False),
            (64, 128, 5, False, False), (32, 128, 3, False, True), (64, 128, 3, False, False),
            (64, 128, 5, True, False), (32, 128, 5, False, True), (64, 256, 3, False, True)):
        if (bn + bm) * bk * elt * stages <= 160 * 1024:  # shared memory for the pipeline
            out.append(LinearConfig("dot", bn, bk, 4, stages, prefetch, late))
    return out


def default_config(M: int, N: int, K: int, dtype: torch.dtype) -> LinearConfig:
    """The config used when none was tuned for this shape (e.g. first seen during graph capture):
    the H200 winners for Llama-3-8B shapes, with a pipeline that fits shared memory at any M <= 64."""
    if M == 1:
        return LinearConfig("gemv", 4, 2048, 4, 1)
    if dtype == torch.float32:
        return LinearConfig("dot", 16, 128, 4, 3)
    if M > 16:
        return LinearConfig("dot", 64, 128, 4, 3, prefetch=False)
    if N >= 65536:
        return LinearConfig("dot", 64, 128, 4, 5, prefetch=False)
    if N >= 16384:
        return LinearConfig("dot", 32, 128, 4, 3, prefetch=False, trigger_late=True)
    return LinearConfig("dot", 32, 256, 4, 5, prefetch=False, trigger_late=True)


def _interpreter_config(M: int) -> LinearConfig:
    # Small blocks so the tests' awkward shapes exercise the N wrap and the K mask; speed is irrelevant.
    return LinearConfig("gemv" if M == 1 else "dot", 16, 32, 4, 1)


def _is_interpreted() -> bool:
    return type(_dot_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 was set at import


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [M, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"x is [M, K={K}] but weight is {tuple(weight.shape)}; weight must be [N, {K}]")
    if not 1 <= M <= MAX_M:
        raise ValueError(f"M={M} is outside 1..{MAX_M}; use torch.nn.functional.linear for larger batches")
    if N < 1 or K < 1:
        raise ValueError(f"N={N} and K={K} must be >= 1")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not one of {_DTYPES}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias must share one dtype; got {x.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [N={N}]; got {tuple(bias.shape)}")
    tensors = [x, weight] + ([] if bias is None else [bias])
    if any(t.device != x.device for t in tensors[1:]):
        raise ValueError("x, weight and bias must be on one device")
    if x.device.type != "cuda" and not _is_interpreted():
        raise ValueError(f"small_m_linear needs CUDA tensors (or TRITON_INTERPRET=1); got {x.device}")


def pdl_default(device: torch.device) -> bool:
    """Programmatic dependent launch is used on Hopper and newer GPUs (never under the interpreter)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
            config: LinearConfig, pdl: bool) -> None:
    M, K = x.shape
    N = weight.shape[0]
    grid = (triton.cdiv(N, config.block_n),)
    b = bias if bias is not None else y  # never read when HAS_BIAS is False
    even_k = K % config.block_k == 0
    launch = {"launch_pdl": True} if pdl else {}
    if config.kernel == "gemv":
        if M != 1:
            raise ValueError(f"the gemv kernel takes M == 1 only; got M={M}")
        _gemv_kernel[grid](
            x, weight, b, y, N, K, x.stride(1), weight.stride(0), weight.stride(1), y.stride(1),
            HAS_BIAS=bias is not None, EVEN_K=even_k, USE_PDL=pdl, PREFETCH=config.prefetch,
            TRIGGER_LATE=config.trigger_late, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, STAGES=config.num_stages, num_warps=config.num_warps,
            num_stages=config.num_stages, **launch)
    elif config.kernel == "dot":
        _dot_kernel[grid](
            x, weight, b, y, M, N, K, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, EVEN_K=even_k,
            DOT_PRECISION="ieee",  # fp32: no tf32; bf16/fp16 ignore it
            DOT_IN_FP32=x.dtype == torch.bfloat16 and _is_interpreted(), USE_PDL=pdl,
            PREFETCH=config.prefetch, TRIGGER_LATE=config.trigger_late,
            BLOCK_M=_block_m(M), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages, **launch)
    else:
        raise ValueError(f"unknown kernel {config.kernel!r}; expected 'gemv' or 'dot'")


# (tile_rows(M), N, K, dtype, device index, pdl) -> the fastest config measured for it.
_tuned: dict[tuple[int, int, int, torch.dtype, int, bool], LinearConfig] = {}
_TUNE_BYTES = 256 << 20  # weight copies rotated while timing add up to at least this (L2: 50-60 MB)
_TUNE_MAX_COPIES = 16  # ... but no more copies than this (a tiny weight stays in L2 whatever we do)
_TUNE_CALLS = 40


def tile_rows(M: int) -> int:
    """The rows an M-row product computes: 1 (the gemv kernel) or BLOCK_M (the dot kernel pads x's rows to
    it with masked loads). Products of one tile_rows run the same tiles, so one timing serves them all."""
    return 1 if M == 1 else _block_m(M)


def _key(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str, pdl: bool) -> tuple:
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (tile_rows(M), N, K, dtype, index, pdl)


def graph_time_us(fns: list, calls: int, replays: int = 5) -> float:
    """Median µs per call of a CUDA graph that calls fns round-robin `calls` times (fns run once first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def benchmark_configs(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str,
                      weight: torch.Tensor | None = None, candidates: list[LinearConfig] | None = None,
                      pdl: bool | None = None) -> list[tuple[LinearConfig, float]]:
    """µs per call of each candidate, inf for one that cannot run here or gives a wrong product.

    Timed as the engine runs it: a CUDA graph of back-to-back calls that rotate among copies of the
    weight adding up to >= 256 MB, so L2 never holds the weight being read (the copies are freed after).
    weight: the [N, K] weight to copy (a random one is made if None).
    """
    device = torch.device(device)
    pdl = pdl_default(device) if pdl is None else pdl
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = weight if weight is not None else torch.randn(N, K, dtype=dtype, device=device) * K ** -0.5
    copies = [w] + [w.clone() for _ in range(min(-(-_TUNE_BYTES // w.nbytes), _TUNE_MAX_COPIES) - 1)]
    calls = len(copies) * -(-_TUNE_CALLS // len(copies))
    y = torch.empty(M, N, dtype=dtype, device=device)
    ref = x.float() @ w.float().T
    results = []
    for config in candidates if candidates is not None else configs(M, dtype):
        try:
            y.fill_(float("nan"))
            _launch(x, w, None, y, config, pdl)  # compile, run once outside the graph, and check
            if not ((y.float() - ref).norm() <= 2e-2 * ref.norm()):  # NaN fails too
                raise RuntimeError(f"{config} computes a wrong product here")
            us = graph_time_us([lambda w=w: _launch(x, w, None, y, config, pdl) for w in copies], calls)
        except Exception:  # noqa: BLE001 - a candidate that cannot compile, run or agree is skipped
            us = float("inf")
        results.append((config, us))
    return results


def warmup(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str,
           weight: torch.Tensor | None = None, pdl: bool | None = None) -> LinearConfig:
    """Chooses (by timing) and caches the config for this shape, so that graph capture replays it.

    Call once per (M, N, K, dtype) before capturing a CUDA graph; later calls return the cached choice.
    Timing allocates up to 256 MB of weight copies for a moment.
    """
    pdl = pdl_default(torch.device(device)) if pdl is None else pdl
    key = _key(M, N, K, dtype, device, pdl)
    if key not in _tuned:
        results = benchmark_configs(M, N, K, dtype, device, weight, pdl=pdl)
        config, us = min(results, key=lambda r: r[1])
        _tuned[key] = config if us < float("inf") else default_config(M, N, K, dtype)
    return _tuned[key]


def set_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str, config: LinearConfig,
               pdl: bool | None = None) -> None:
    """Pins the config for this shape (e.g. one recorded by an earlier `warmup`), skipping the timing."""
    pdl = pdl_default(torch.device(device)) if pdl is None else pdl
    _tuned[_key(M, N, K, dtype, device, pdl)] = config


def _choose(x: torch.Tensor, weight: torch.Tensor, pdl: bool) -> LinearConfig:
    M, K = x.shape
    N = weight.shape[0]
    if x.device.type != "cuda":
        return _interpreter_config(M)
    key = _key(M, N, K, x.dtype, x.device, pdl)
    if key in _tuned:
        return _tuned[key]
    if x.dtype == torch.float32 or torch.cuda.is_current_stream_capturing():
        return default_config(M, N, K, x.dtype)
    return warmup(M, N, K, x.dtype, x.device, weight, pdl)


def cached_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> LinearConfig:
    """The config `warmup` chose for this shape, else `default_config`; never times anything."""
    return _tuned.get(_key(M, N, K, dtype, device, pdl_default(device))) or default_config(M, N, K, dtype)


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   config: LinearConfig | None = None, pdl: bool | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ weight [N, K].T (+ bias [N]); one launch, no host sync, graph-capturable.

    config: force one launch config (tests, benchmarks); None picks the tuned or default one.
    pdl: launch with programmatic dependent launch (None: on for CUDA sm_90+). The kernel lets the next
    kernel launch early and reads its first weight tile before waiting for the previous kernel.
    """
    _check(x, weight, bias)
    pdl = pdl_default(x.device) if pdl is None else pdl
    if pdl and x.device.type != "cuda":
        raise ValueError("pdl=True needs CUDA tensors")
    if config is None:
        config = _choose(x, weight, pdl)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, y, config, pdl)
    return y


def use_small_m_linear(M: int, N: int, K: int) -> bool:
    """Whether small_m_linear should replace cuBLAS (F.linear) for this shape.

    Measured on an H200 for the Llama-3-8B shapes (benchmarks/decode_kernels.py, 2026-11-24, CUDA graphs,
    L2-cold): at M = 1 it is 1.10-1.53x faster; at M = 2..16, 1.04-1.23x faster except gate_up
    (28672 x 4096), which is at parity (0.97-1.07x); at M = 32 it is at parity or better only with
    PDL (1.00-1.18x) and slower without it, so the crossover is M = 16 for every shape.
    """
    return 1 <= M <= 16


def small_m_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch y = x @ weight.T + bias, accumulated in fp32 (fp64 for fp64 inputs), cast to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
