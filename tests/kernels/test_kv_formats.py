"""KV formats: quantize-on-write kernels against their torch references, round-trip error bounds,
block export/import and the registry.

Every test draws fresh random inputs (the seed is in the failure message), places sequences of odd
lengths on shuffled pages, and writes them in two calls (a chunked prefill: the kivi2 residual
carries over between calls) with padding slots (-1) mixed in.

Write kernel vs torch reference: identical parts and state on CPU (the interpreter runs the same
float32 operations); on a GPU at most 0.1% of code bytes may differ (a value on a rounding
boundary) and metadata within 1e-3.

Round trip, per element |x - dequant(x)|:
    none            0
    fp8             2**-4 |x| + 2**-10 scale   (3 mantissa bits; subnormal quantum 2**-9 scale)
    int8/int4/kivi2 step / 2 + 2**-10 amax + 1e-6, step = (max - min) / levels and amax = max |x|
                    over x's quantization group (the 2**-10 covers the float16 scale and zero)
    kivi2 residual  0 (the newest context_len % R tokens stay in full precision)
"""
import secrets

import pytest
import torch

from partita.kernels.kv_formats import export_blocks, get_kv_format, import_blocks
from partita.kernels.kv_testing import make_paged_batch, outlier_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (spec, block_size, head_dim): every format, two block sizes, kivi2 with a residual of 2 groups
FORMATS = [("none", 16, 32), ("fp8", 16, 32), ("int8", 32, 32), ("int4:group_size=32", 16, 64),
           ("int4", 32, 128), ("kivi2", 32, 64), ("kivi2:residual=64,value_group_size=64", 64, 128)]
LENS = [37, 1, 70]  # context lengths: odd, one token, several blocks


def _seed() -> int:
    return secrets.randbelow(2**31 - 1)


def _fill(spec, block_size, head_dim, impl, seed, dtype=torch.bfloat16, lens=LENS):
    """Cache with `lens` tokens per sequence written in two calls; returns cache, batch, k, v."""
    g = torch.Generator().manual_seed(seed)
    fmt = get_kv_format(spec)
    batch = make_paged_batch(lens, block_size, max_num_seqs=5, device=DEVICE, generator=g)
    cache = fmt.allocate(int(batch.block_tables.max()) + 1, block_size, 2, head_dim, dtype,
                         DEVICE, max_num_seqs=5)
    k, v = outlier_kv(sum(lens), 2, head_dim, dtype=dtype, device=DEVICE, generator=g)
    if fmt.name == "fp8":
        fmt.calibrate(cache, k, v)
    cut = [n // 2 + 1 if n > 1 else 0 for n in lens]
    first, first_seq, _ = batch.write_plan([0] * len(lens))  # all tokens, to split in two
    starts = torch.cumsum(torch.tensor([0] + lens), 0).tolist()
    early = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, cut)])
    late = torch.cat([torch.arange(s + c, s + n) for s, c, n in zip(starts, cut, lens)])
    for idx in (early, late):
        slots = first[idx].clone()
        slots = torch.cat([slots, torch.full((2,), -1, device=DEVICE)])  # padding tokens
        pad = torch.zeros(2, dtype=k.dtype, device=DEVICE)
        kk = torch.cat([k[idx], pad[:, None, None].expand(2, 2, head_dim)])
        vv = torch.cat([v[idx], pad[:, None, None].expand(2, 2, head_dim)])
        seqs = torch.cat([first_seq[idx], torch.zeros(2, dtype=torch.int32, device=DEVICE)])
        fmt.write(cache, kk, vv, slots, seqs, impl=impl)
    return cache, batch, k, v


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if DEVICE == "cpu":
        return torch.equal(a, b)
    if a.dtype == torch.uint8:
        return (a != b).float().mean().item() <= 1e-3
    return torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("spec,block_size,head_dim", FORMATS)
def test_write_kernel_matches_reference(spec, block_size, head_dim):
    seed = _seed()
    ref, *_ = _fill(spec, block_size, head_dim, "torch", seed)
    out, *_ = _fill(spec, block_size, head_dim, "triton", seed)
    for name in ref.parts:
        assert _same(out.parts[name], ref.parts[name]), f"part {name}, seed {seed}"
    for name in ref.state:
        assert _same(out.state[name], ref.state[name]), f"state {name}, seed {seed}"


def _bound(xg: torch.Tensor, dim: int, levels: int) -> torch.Tensor:
    """step / 2 + 2**-10 amax + 1e-6 of each element's group (groups along `dim` of xg)."""
    step = (xg.amax(dim, keepdim=True) - xg.amin(dim, keepdim=True)) / levels
    amax = xg.abs().amax(dim, keepdim=True)
    return (step / 2 + 2.0**-10 * amax + 1e-6).expand_as(xg)


@pytest.mark.parametrize("spec,block_size,head_dim", FORMATS)
def test_round_trip_error_bound(spec, block_size, head_dim):
    seed = _seed()
    cache, batch, k, v = _fill(spec, block_size, head_dim, "triton", seed)
    fmt = cache.fmt
    start = 0
    for b, n in enumerate(LENS):
        ids = batch.block_tables[b, : -(-n // block_size)].long()
        kq, vq = fmt.gather(cache, ids, n, int(batch.seq_slots[b]))
        for x, xq, is_key in ((k[start:start + n].float(), kq, True),
                              (v[start:start + n].float(), vq, False)):
            err = (x - xq).abs()
            if fmt.name == "none":
                bound = torch.zeros_like(x)
            elif fmt.name == "fp8":
                scale = cache.state["scales"][0 if is_key else 1][None, :, None]
                bound = 2.0**-4 * x.abs() + 2.0**-10 * scale
            elif fmt.name == "kivi2":
                done = n // fmt.r * fmt.r
                bound = torch.zeros_like(x)  # residual rows: exact
                if is_key:  # per channel over groups of tokens
                    xg = x[:done].reshape(done // fmt.group_size, fmt.group_size, 2, head_dim)
                    bound[:done] = _bound(xg, 1, 3).reshape(done, 2, head_dim)
                else:  # per token over groups of channels
                    gv = fmt.value_group(head_dim)
                    xg = x[:done].reshape(done, 2, head_dim // gv, gv)
                    bound[:done] = _bound(xg, -1, 3).reshape(done, 2, head_dim)
            else:
                g = head_dim if fmt.name == "int8" else fmt.group_size
                levels = {"int8": 255, "int4": 15}[fmt.name]
                bound = _bound(x.reshape(n, 2, head_dim // g, g), -1, levels).reshape(x.shape)
            worst = (err - bound).max().item()
            assert worst <= 0, f"{'k' if is_key else 'v'} of seq {b} off by {worst}, seed {seed}"
        start += n


@pytest.mark.parametrize("spec,block_size,head_dim", FORMATS[1::2])
def test_export_import_blocks(spec, block_size, head_dim):
    seed = _seed()
    src, batch, *_ = _fill(spec, block_size, head_dim, "torch", seed)
    dst = src.fmt.allocate(src.num_blocks + 3, block_size, 2, head_dim, src.dtype, DEVICE,
                           max_num_seqs=5)
    dst.state.update({name: t.clone() for name, t in src.state.items()})  # per-layer state
    ids = batch.block_tables[2, : -(-LENS[2] // block_size)].long()
    new_ids = ids.flip(0) + 3
    data = export_blocks(src, ids)
    assert data.shape == (len(ids), src.bytes_per_block) and data.dtype == torch.uint8
    import_blocks(dst, new_ids, data)
    a = src.fmt.gather(src, ids, LENS[2], int(batch.seq_slots[2]))
    b = dst.fmt.gather(dst, new_ids, LENS[2], int(batch.seq_slots[2]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"seed {seed}"


def test_registry_and_bytes_per_token():
    per_token = {"none": 4096, "fp8": 2048, "int8": 2112, "int4": 1088,
                 "int4:group_size=32": 1280, "kivi2": 672, "kivi2:value_group_size=64": 704}
    for spec, nbytes in per_token.items():
        assert get_kv_format(spec).bytes_per_token(8, 128) == nbytes, spec
    assert get_kv_format("kivi2:residual=64").r == 64
    assert [get_kv_format("kivi2").value_group(d) for d in (64, 128, 256)] == [64, 128, 128]
    with pytest.raises(ValueError, match="value_group_size=32"):
        get_kv_format("kivi2:value_group_size=32").allocate(4, 32, 2, 128, torch.float16, "cpu")
    assert get_kv_format("int4", group_size=64).group_size == 64
    assert get_kv_format("BF16").name == "none"
    for bad in ("int3", "int4:group_size", "int4:bits=4"):
        with pytest.raises(ValueError, match="kv_format"):
            get_kv_format(bad)
    with pytest.raises(ValueError, match="group_size=48"):
        get_kv_format("int4:group_size=48").allocate(4, 16, 2, 64, torch.float16, "cpu")
    with pytest.raises(ValueError, match="block_size=16"):
        get_kv_format("kivi2").allocate(4, 16, 2, 64, torch.float16, "cpu")
    with pytest.raises(ValueError, match="seq_slots"):
        cache = get_kv_format("kivi2").allocate(4, 32, 2, 64, torch.float16, "cpu")
        x = torch.zeros(1, 2, 64, dtype=torch.float16)
        cache.fmt.write(cache, x, x, torch.zeros(1, dtype=torch.int64))
