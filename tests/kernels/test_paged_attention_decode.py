"""Paged decode attention: the Triton kernels against the float64 reference over the same cache.

Every format, GQA groups of 4 and 1, one and three context splits, odd lengths on shuffled pages,
fresh random inputs each run (the seed is in the failure message); int4 and kivi2 through both
decode kernels (tokens or queries as the dots' rows), kivi2's key groups one or two per loop step
and its default config. The reference dequantizes the same cache in float64, so the error
measured is the kernel's own arithmetic:
    ||out - ref|| / ||ref|| <= TOL
    float operands (none: model dtype; fp8/int8/int4/kivi2: float16) and a 16-bit output: 1e-2
        (the CPU interpreter truncates to bf16: 2**-8 per element)
    int8 operands (int4/kivi2 `k_int8`/`v_int8`: query and P quantized per row to 8 bits): 4e-2
Outputs are poisoned with NaN first, so every row must be written.
"""
import secrets

import pytest
import torch

from partita.kernels.kv_formats import get_kv_format
from partita.kernels.kv_testing import make_paged_batch, outlier_kv
from partita.kernels import paged_attention
from partita.kernels.paged_attention import (AttentionConfig, attention_config, compile_decode, decode_launches,
                                             decode_variant, paged_decode_attention)
from partita.kernels.paged_attention_ref import paged_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL_FLOAT, TOL_INT8 = 1e-2, 4e-2
LENS = [1, 37, 150, 97]
# (spec, block_size, head_dim, dtype)
FORMATS = [("none", 16, 64, torch.bfloat16), ("none", 32, 128, torch.float16),
           ("fp8", 16, 64, torch.bfloat16), ("int8", 16, 64, torch.float16),
           ("int4", 16, 128, torch.bfloat16), ("int4:group_size=32", 32, 64, torch.float16),
           ("int4:group_size=64", 128, 64, torch.float16),  # blocks longer than a tile
           ("kivi2", 32, 64, torch.bfloat16), ("kivi2", 32, 128, torch.bfloat16),
           ("kivi2:residual=64", 64, 128, torch.float16),  # residual of two key groups
           ("kivi2:residual=64,value_group_size=64", 64, 128, torch.float16)]


@pytest.fixture
def poisoned(monkeypatch):
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like",
                        lambda *a, **k: real(*a, **k).fill_(float("nan")))


def make_case(spec, block_size, head_dim, dtype, lens, num_kv_heads=2, seed=0):
    """A filled cache (all tokens written in one call), its batch, and queries [B, 4 H, D]."""
    g = torch.Generator().manual_seed(seed)
    fmt = get_kv_format(spec)
    batch = make_paged_batch(lens, block_size, max_num_seqs=len(lens) + 2, device=DEVICE,
                             generator=g)
    cache = fmt.allocate(int(batch.block_tables.max()) + 1, block_size, num_kv_heads, head_dim,
                         dtype, DEVICE, max_num_seqs=len(lens) + 2)
    slots, seqs, _ = batch.write_plan([0] * len(lens))
    k, v = outlier_kv(len(slots), num_kv_heads, head_dim, dtype=dtype, device=DEVICE,
                      generator=g)
    if fmt.name == "fp8":
        fmt.calibrate(cache, k, v)
    fmt.write(cache, k, v, slots, seqs)
    return cache, batch, g


@pytest.mark.parametrize("spec,block_size,head_dim,dtype", FORMATS)
@pytest.mark.parametrize("group", [4, 1])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_float64_reference(poisoned, spec, block_size, head_dim, dtype, group,
                                          num_splits):
    seed = secrets.randbelow(2**31 - 1)
    cache, batch, g = make_case(spec, block_size, head_dim, dtype, LENS, seed=seed)
    q = torch.randn(len(LENS), 2 * group, head_dim, generator=g).to(dtype).to(DEVICE)
    scale = head_dim ** -0.5
    ref = paged_attention_reference(q, cache, batch.block_tables, batch.context_lens, scale,
                                    seq_slots=batch.seq_slots, compute_dtype=torch.float64)
    configs = [AttentionConfig(k_int8=False, v_int8=False)]
    if cache.fmt.name in ("int4", "kivi2"):  # both decode kernels, and int8 dots
        configs += [AttentionConfig(token_rows=False), AttentionConfig(k_int8=True, v_int8=True)]
    if cache.fmt.name == "kivi2":  # key groups in pairs and the odd one left; the defaults (maxnreg)
        configs += [AttentionConfig(key_group_pairs=True), None]
    if spec == "int4":  # tiles in two halves, the tail's second half partly or wholly masked
        configs += [AttentionConfig(num_warps=1, tile_halves=True)]
    for cfg in configs:
        out = paged_decode_attention(q, cache, batch.block_tables, batch.context_lens, scale,
                                     max_context_len=max(LENS), seq_slots=batch.seq_slots,
                                     num_splits=num_splits, config=cfg, impl="triton")
        assert torch.isfinite(out).all(), f"rows not written, seed {seed}"
        err = ((out.double() - ref).norm() / ref.norm()).item()
        tol = TOL_INT8 if cfg is not None and (cfg.k_int8 or cfg.v_int8) else TOL_FLOAT
        assert err <= tol, f"{cfg}: relative error {err:.2e} > {tol}, seed {seed}"


def test_split_heuristic():
    from partita.kernels.paged_attention import _SPLITS, choose_num_splits
    assert choose_num_splits(64, 8, 8192, 132) == 1  # 512 programs: enough without splits
    assert choose_num_splits(1, 8, 32768, 132) == 33  # 8 programs -> 264, two per SM
    assert choose_num_splits(1, 8, 300, 132) == 1  # too short to split
    assert choose_num_splits(2, 8, 2048, 132) == 8  # capped by 256 tokens per split
    assert choose_num_splits(64, 8, 8192, 132, waves=4) == 2  # one-warp programs: 4 per SM
    assert choose_num_splits(32, 8, 4096, 132, waves=4) == 3
    assert choose_num_splits(32, 8, 4096, 132, waves=4, pow2=True) == 4  # a power of two
    assert choose_num_splits(1, 8, 32768, 132, waves=4, pow2=True, max_splits=64) == 64  # capped

    def per_format(name: str) -> dict:
        waves, min_tokens, max_splits = _SPLITS[name]
        return {"waves": waves, "min_tokens_per_split": min_tokens, "max_splits": max_splits,
                "pow2": True}
    # int4's 255-register programs: 4 per SM, splits down to 128 tokens
    int4 = per_format("int4")
    assert choose_num_splits(64, 8, 8192, 132, **int4) == 2
    assert choose_num_splits(32, 8, 4096, 132, **int4) == 4
    assert choose_num_splits(8, 8, 4096, 132, **int4) == 16
    assert choose_num_splits(1, 8, 32768, 132, **int4) == 128
    assert choose_num_splits(1, 8, 4096, 132, **int4) == 32  # 128 tokens per split at least
    # kivi2's 128-register programs: 8 per SM, splits down to 64 tokens (two key groups)
    kivi2 = per_format("kivi2")
    assert choose_num_splits(64, 8, 8192, 132, **kivi2) == 4
    assert choose_num_splits(128, 8, 4096, 132, **kivi2) == 2
    assert choose_num_splits(8, 8, 4096, 132, **kivi2) == 32
    assert choose_num_splits(1, 8, 32768, 132, **kivi2) == 256
    assert choose_num_splits(1, 8, 4096, 132, **kivi2) == 64


def test_int4_tiles_in_halves_only_for_long_splits():
    assert attention_config("int4", 128, True, 2, 4096).tile_halves  # 64 x 8k
    assert not attention_config("int4", 128, True, 4, 1024).tile_halves  # 32 x 4k
    assert not attention_config("int4", 128, True, 128, 256).tile_halves  # 1 x 32k
    assert not attention_config("int4", 128, False).tile_halves  # prefill


@pytest.mark.gpu
def test_decode_is_cuda_graph_capturable():
    cache, batch, g = make_case("int4", 16, 128, torch.bfloat16, [300, 5000, 77])
    q = torch.randn(3, 8, 128, generator=g).to(torch.bfloat16).to(DEVICE)
    args = (q, cache, batch.block_tables, batch.context_lens, 128 ** -0.5)
    eager = paged_decode_attention(*args, max_context_len=8192)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(*args, max_context_len=8192)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.parametrize("spec", ["none", "int4", "kivi2"])
def test_decode_launches_reach_every_variant(spec, monkeypatch):
    """The launches compile_decode makes (batch sizes 1..N at contexts of 2^k and 2^k + 1 tokens) reach
    every kernel variant of every batch up to N sequences of up to L tokens, checked against all of
    them; the split counts of an H100's 132 SMs."""
    def on_132_sms(cache, num_seqs, max_context_len):
        waves, min_tokens, max_splits = paged_attention._SPLITS.get(cache.fmt.name, (2, 256, 64))
        return paged_attention.choose_num_splits(num_seqs, cache.num_kv_heads, max_context_len, 132,
                                                 min_tokens_per_split=min_tokens, waves=waves,
                                                 pow2=waves > 2, max_splits=max_splits)

    monkeypatch.setattr(paged_attention, "decode_num_splits", on_132_sms)
    cache = get_kv_format(spec).allocate(4, 32, 8, 128, torch.bfloat16, "cpu", max_num_seqs=4)
    max_seqs, max_len = 24, 5000
    launches = decode_launches(cache, 32, max_seqs, max_len)
    every = {decode_variant(cache, 32, b, n) for b in range(1, max_seqs + 1) for n in range(1, max_len + 1)}
    reached = {decode_variant(cache, 32, b, n) for b, n, _ in launches}
    assert reached == every and len(launches) == len(every)
    assert all(s == on_132_sms(cache, b, n) and b <= max_seqs and n <= max_len for b, n, s in launches)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["none", "int4", "kivi2"])
def test_no_decode_compiles_after_compile_decode(spec):
    """After compile_decode, decode batches of any size and context length up to the bounds given
    launch only compiled kernels (Triton's compile hook sees none)."""
    triton = pytest.importorskip("triton")
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no compile hook")
    num_blocks, max_seqs, max_len = 2048, 48, 6000
    cache = get_kv_format(spec).allocate(num_blocks, 32, 8, 128, torch.bfloat16, DEVICE, max_num_seqs=max_seqs)
    compile_decode(cache, 32, max_seqs, max_len)
    compiled = []
    knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(kw["fn"].name)
    try:
        g = torch.Generator().manual_seed(secrets.randbits(32))
        for b in list(range(1, max_seqs + 1, 3)) + [max_seqs]:
            for n in (1, 17, 100, 255, 256, 257, 700, 1025, 2049, 4097, max_len):
                lens = torch.randint(1, n + 1, (b,), generator=g, dtype=torch.int32)
                lens[0] = n
                tables = torch.randint(0, num_blocks, (b, -(-n // 32)), generator=g, dtype=torch.int32)
                q = torch.randn(b, 32, 128, generator=g).to(torch.bfloat16)
                paged_decode_attention(q.to(DEVICE), cache, tables.to(DEVICE), lens.to(DEVICE), 0.1,
                                       max_context_len=n, seq_slots=torch.arange(b, dtype=torch.int32, device=DEVICE))
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_post_compile_hook = None
    assert compiled == []
