"""Pieces shared by the paged-attention kernels of every KV format.

Work split. One program handles one kv head of one sequence for a tile of query rows, and, in
decode, one of `num_splits` slices of the context (FlashDecoding). A row is (query token, query
head of the kv head's GQA group): row r -> token r // GQ_PAD, head r % GQ_PAD. Decode has one
token per sequence, so its rows are the GQA group (padded to the 16 rows a tensor-core dot
needs) and every K/V byte is read once for all query heads of the group. Prefill tiles take
BLOCK_M // GQ_PAD tokens.

Context slice of a program: tokens [lo, hi), tiles of BLOCK_N; tiles below `full_hi` are visible
to every row (no mask), the rest take the causal mask (query at absolute position
context_len - q_len + i sees keys 0..position).

Softmax (FlashDecoding++'s unified max, made safe): scores are kept in log2 units against one
reference max per row; a tile rescales the accumulators only when some row's tile max exceeds
the reference by more than TAU = 8, so p = exp2(s - m) <= 256 can never overflow (nor the fp16
dot operands built from it) and most tiles skip the rescale. Split partials (m, l, acc) are merged
by `_combine_kernel` with the usual log-sum-exp weights.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

TAU = tl.constexpr(8.0)  # log2 headroom before a rescale: p <= 2**8
NEG_BIG = tl.constexpr(-1.0e30)  # initial reference max: finite, so exp2(m - m_new) never sees inf - inf


@triton.jit
def split_range(kv_end, split, BLOCK_N: tl.constexpr, num_splits):
    """Context slice [lo, hi) of split `split` of tokens [0, kv_end): num_splits slices of whole
    BLOCK_N tiles (FlashDecoding)."""
    chunk = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    return lo, tl.minimum(kv_end, lo + chunk)


@triton.jit
def program_rows(context_lens_ptr, cu_seqlens_q_ptr,
                 GQ: tl.constexpr, GQ_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, num_splits,
                 IS_DECODE: tl.constexpr):
    """This program's sequence, rows and context slice (see the module docstring)."""
    b = tl.program_id(0)
    ctx_len = tl.load(context_lens_ptr + b)
    if IS_DECODE:
        q_start = b
        q_len = 1
        q_tile = 0
        split = tl.program_id(1)
    else:
        q_start = tl.load(cu_seqlens_q_ptr + b)
        q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
        q_tile = tl.program_id(1)
        split = 0
    r = tl.arange(0, BLOCK_M)
    i = r // GQ_PAD
    q_idx = q_tile * BLOCK_Q + i
    row_valid = ((r % GQ_PAD) < GQ) & (i < BLOCK_Q) & (q_idx < q_len)
    tok = q_start + q_idx
    head = tl.program_id(2) * GQ + r % GQ_PAD
    first_pos = ctx_len - q_len + q_tile * BLOCK_Q
    pos = first_pos + i
    lo, hi = split_range(tl.minimum(ctx_len, first_pos + BLOCK_Q), split, BLOCK_N, num_splits)
    visible = tl.maximum(tl.minimum(hi, first_pos + 1) - lo, 0)
    full_hi = lo + visible // BLOCK_N * BLOCK_N
    is_done = q_tile * BLOCK_Q >= q_len
    return b, split, is_done, row_valid, tok, head, pos, lo, full_hi, hi


@triton.jit
def decode_slice(context_lens_ptr, BLOCK_N: tl.constexpr, num_splits):
    """Decode kernels with tokens as rows: this program's sequence, split and context slice
    [lo, hi) (the split of `program_rows`); tiles below `full_hi` need no mask."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    lo, hi = split_range(tl.load(context_lens_ptr + b), split, BLOCK_N, num_splits)
    full_hi = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    return b, split, lo, full_hi, hi


@triton.jit
def causal_mask(s, n, pos, hi):
    """Scores s [M, N] of keys n [N] for rows at positions pos [M]; keys >= hi are out."""
    keep = (n[None, :] <= pos[:, None]) & (n[None, :] < hi)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def biased_codes(x):
    """Small unsigned codes (uint8, < 1024) as float16 1024 + code, exactly: 0x6400 is float16 1024.0
    and OR-ing a code into its mantissa is cheaper than an int-to-float conversion."""
    return (x.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)


@triton.jit
def codes_operand(x, INT8: tl.constexpr):
    """Small unsigned codes (uint8, < 1024) as a dot operand: int8, or float16 exactly."""
    if INT8:
        return x.to(tl.int8)
    else:
        return (biased_codes(x) - 1024.0).to(tl.float16)


# PTX for the packed unpacking below. A byte pair b0, b1 is spread into the two 16-bit halves of
# a register (prmt), so each following instruction handles two codes: lop3 keeps one code field
# and ORs in 0x6400 (float16 1024.0, whose ulp is 1), giving 1024 + 2**s * code for a field at bit
# s; one fma.rn.f16x2 by 2**-s and -1024 * 2**-s then leaves the code itself, exactly.
_SPREAD = """
    .reg .b32 t0, t1;
    prmt.b32 t0, $IN, 0, 0x4140;
    prmt.b32 t1, $IN, 0, 0x4342;
"""
_FIELD = """
    {{
    .reg .b32 f, m;
    mov.b32 f, {scale};
    mov.b32 m, {offset};
    lop3.b32 ${a}, t0, {mask}, 0x64006400, 0xEA;
    lop3.b32 ${b}, t1, {mask}, 0x64006400, 0xEA;
    fma.rn.f16x2 ${a}, ${a}, f, m;
    fma.rn.f16x2 ${b}, ${b}, f, m;
    }}
"""


def _f16x2(x: float) -> str:
    """A float16 value in both halves of a .b32 immediate."""
    (bits,) = struct.unpack("<H", struct.pack("<e", x))
    return f"0x{bits:04X}{bits:04X}"


_BIASED_FIELD = """
    lop3.b32 ${a}, t0, {mask}, 0x64006400, 0xEA;
    lop3.b32 ${b}, t1, {mask}, 0x64006400, 0xEA;
"""


def _unpack_asm(bits: int, biased: bool = False) -> str:
    """Asm of one invocation (4 bytes in, 8 // bits fields of 4 float16 codes out). `biased`
    stops before the fma: a field at bit s comes out as 1024 + 2**s * code."""
    fields = 8 // bits
    body = [_SPREAD.replace("$IN", f"${2 * fields}")]
    for i in range(fields):
        shift = i * bits
        mask = ((1 << bits) - 1) << shift
        field = _BIASED_FIELD if biased else _FIELD
        body.append(field.format(a=2 * i, b=2 * i + 1, scale=_f16x2(2.0 ** -shift),
                                 offset=_f16x2(-1024.0 * 2.0 ** -shift),
                                 mask=f"0x{mask:04X}{mask:04X}"))
    return "{" + "".join(body) + "}"


def _subnormal_asm(bits: int) -> str:
    """Asm of one invocation (4 bytes in, 8 // bits fields of 4 float16 out): after the byte
    spread, an AND keeps one field in place, and a field at bit s of a byte is float16
    2**(s - 24) * code, a subnormal (exponent bits zero), exactly."""
    fields = 8 // bits
    body = [_SPREAD.replace("$IN", f"${2 * fields}")]
    for i in range(fields):
        mask = ((1 << bits) - 1) << (i * bits)
        body.append(f"and.b32 ${2 * i}, t0, 0x{mask:04X}{mask:04X};\n"
                    f"and.b32 ${2 * i + 1}, t1, 0x{mask:04X}{mask:04X};\n")
    return "{" + "".join(body) + "}"


_NIBBLES_ASM = tl.constexpr(_unpack_asm(4))
_BIASED_NIBBLES_ASM = tl.constexpr(_unpack_asm(4, biased=True))
_CRUMBS_ASM = tl.constexpr(_unpack_asm(2))
_SUBNORMAL_CRUMBS_ASM = tl.constexpr(_subnormal_asm(2))


def packed_unpack(codes: torch.Tensor) -> bool:
    """Whether kernels reading `codes` take the PTX unpacking (NVIDIA GPUs; not the interpreter)."""
    return codes.is_cuda and torch.version.hip is None


@triton.jit
def nibble_planes(x, PACKED: tl.constexpr, INT8: tl.constexpr):
    """uint8 bytes -> (low nibbles, high nibbles) as dot operands: int8 codes with INT8, else exact
    float16 codes 0..15, two per instruction when PACKED (the PTX above)."""
    if INT8:
        lo = codes_operand(x & 15, True)
        hi = codes_operand(x >> 4, True)
    elif PACKED:
        lo, hi = tl.inline_asm_elementwise(_NIBBLES_ASM, "=r,=r,=r,=r,r", [x],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        lo = codes_operand(x & 15, False)
        hi = codes_operand(x >> 4, False)
    return lo, hi


@triton.jit
def biased_nibble_planes(x, PACKED: tl.constexpr):
    """uint8 bytes -> float16 (1024 + low nibble, 1024 + 16 * high nibble), one lop3 per two
    values on CUDA: the fma of `nibble_planes` is left to the caller, which can fold it into a dot
    (a q . (1024 + 16 c) = 1024 sum(q) + 16 q . c, the first term a constant of the query)."""
    if PACKED:
        lo, hi = tl.inline_asm_elementwise(_BIASED_NIBBLES_ASM, "=r,=r,=r,=r,r", [x],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        lo = biased_codes(x & 15)
        hi = biased_codes(x & 0xF0)
    return lo, hi


@triton.jit
def crumb_planes(x, PACKED: tl.constexpr, INT8: tl.constexpr):
    """uint8 bytes -> their four 2-bit fields (bits 0-1 first) as dot operands: int8 codes with
    INT8, else exact float16 codes 0..3, two per instruction when PACKED (the PTX above)."""
    if PACKED and not INT8:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            _CRUMBS_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        c0 = codes_operand(x & 3, INT8)
        c1 = codes_operand((x >> 2) & 3, INT8)
        c2 = codes_operand((x >> 4) & 3, INT8)
        c3 = codes_operand(x >> 6, INT8)
    return c0, c1, c2, c3


@triton.jit
def float16_halves(pair):
    """int32 -> (float16 in its low 16 bits, float16 in its high 16 bits): two float16 values
    read with one 32-bit load."""
    lo = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def scale_zero(meta_ptr, row, mask):
    """float32 (scale, zero) of rows [N] of a one-group meta part (int4, kivi2 values): one 32-bit
    load per row."""
    scale, zero = float16_halves(tl.load(meta_ptr.to(tl.pointer_type(tl.int32)) + row, mask=mask,
                                         other=0))
    return scale.to(tl.float32), zero.to(tl.float32)


@triton.jit
def _subnormal(x, mask):
    return (x & mask).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def subnormal_crumbs(x, PACKED: tl.constexpr):
    """uint8 bytes -> their four 2-bit fields p (bits 2p..2p+1) as float16 2**(2p - 24) * code:
    each field left in place as the mantissa of a subnormal, one AND per two values on CUDA.
    Tensor cores multiply subnormal float16 exactly; the caller scales its other operand by
    2**(24 - 2p), so codes need neither a conversion nor a bias to cancel."""
    if PACKED:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            _SUBNORMAL_CRUMBS_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [x],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        c0 = _subnormal(x, 0x03)
        c1 = _subnormal(x, 0x0C)
        c2 = _subnormal(x, 0x30)
        c3 = _subnormal(x, 0xC0)
    return c0, c1, c2, c3


@triton.jit
def quantize_rows(x, row_scale, INT8: tl.constexpr):
    """Dot operand of float32 x: int8 of x / row_scale (row_scale broadcast to x), or float16."""
    if INT8:
        return tl.clamp(tl.floor(x / row_scale + 0.5), -127.0, 127.0).to(tl.int8)
    else:
        return x.to(tl.float16)


@triton.jit
def store_output(acc, l_b, ch, out_rows, part_rows, mask, out_ptr, part_acc_ptr,
                 SPLIT: tl.constexpr):
    """Normalized output, or (SPLIT) the unnormalized split partial. acc any shape; the rest
    broadcast."""
    if not SPLIT:
        tl.store(out_ptr + out_rows + ch, (acc / l_b).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_acc_ptr + part_rows + ch, acc, mask=mask)


@triton.jit
def store_split_stats(m, l, b, head, split, row_valid, part_ml_ptr,
                      NUM_Q_HEADS: tl.constexpr, num_splits, SPLIT: tl.constexpr):
    if SPLIT:
        idx = ((b * NUM_Q_HEADS + head) * num_splits + split) * 2
        tl.store(part_ml_ptr + idx, m, mask=row_valid)
        tl.store(part_ml_ptr + idx + 1, l, mask=row_valid)


@triton.jit(do_not_specialize=["num_rows", "num_splits"])
def _combine_kernel(
    # output [B, Hq, D]; split partials acc [B, Hq, S, D] and (m, l) [B, Hq, S, 2], float32
    out_ptr, part_acc_ptr, part_ml_ptr,
    # strides of the output, in elements; rows are (sequence, query head) pairs, B * Hq of them;
    # S = num_splits <= SPLITS_PAD
    stride_ot, stride_oh, num_rows, num_splits,
    # shapes and tiling: ROWS rows x BLOCK_D channels per program, all splits at once
    NUM_Q_HEADS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.arange(0, SPLITS_PAD)
    r_ok = r < num_rows
    ok = r_ok[:, None] & (s < num_splits)[None, :]  # [ROWS, SPLITS_PAD]
    base = r[:, None] * num_splits + s[None, :]
    m = tl.load(part_ml_ptr + base * 2, mask=ok, other=-1.0e30)
    l = tl.load(part_ml_ptr + base * 2 + 1, mask=ok, other=0.0)
    w = tl.where(ok, tl.exp2(m - tl.max(m, 1)[:, None]), 0.0)  # empty splits have l = 0: weight 0
    acc = tl.load(part_acc_ptr + base[:, :, None] * HEAD_DIM + d[None, None, :],
                  mask=ok[:, :, None], other=0.0)
    den = tl.where(r_ok, tl.sum(w * l, 1), 1.0)  # rows past the end: no 0 / 0
    o = tl.sum(acc * w[:, :, None], 1) / den[:, None]
    rows = (r // NUM_Q_HEADS) * stride_ot + (r % NUM_Q_HEADS) * stride_oh
    tl.store(out_ptr + rows[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None])


# elements of the partials one combine program reads (32 per thread of its four warps): a few
# hundred programs at every split count, instead of one per row (B x Hq programs of 2 KiB each at
# batch 64 with 4 splits, or 32 programs of 128 KiB at batch 1 with 256)
_COMBINE_TILE = 4096


def combine_tiling(num_rows: int, num_splits: int, head_dim: int) -> tuple[int, int, int]:
    """(SPLITS_PAD, BLOCK_D, ROWS) of the combine of num_rows = B x Hq rows: its constexprs, so one
    compiled variant per distinct triple."""
    splits_pad = triton.next_power_of_2(num_splits)
    block_d = min(head_dim, max(16, _COMBINE_TILE // splits_pad))  # all channels while they fit
    rows = min(triton.next_power_of_2(num_rows), max(1, _COMBINE_TILE // (splits_pad * block_d)))
    return splits_pad, block_d, rows


def combine_splits(out, part_acc, part_ml) -> None:
    """out [B, Hq, D] from split partials [B, Hq, S, D] and [B, Hq, S, 2]."""
    b, hq, s, d = part_acc.shape
    splits_pad, block_d, rows = combine_tiling(b * hq, s, d)
    _combine_kernel[(triton.cdiv(b * hq, rows), triton.cdiv(d, block_d))](
        out, part_acc, part_ml, out.stride(0), out.stride(1), b * hq, s,
        NUM_Q_HEADS=hq, SPLITS_PAD=splits_pad, HEAD_DIM=d, ROWS=rows,
        BLOCK_D=block_d, num_warps=4)
