"""The PTX that unpacks int4/kivi2 codes (`nibble_planes`, `crumb_planes`, `biased_nibble_planes`,
`subnormal_crumbs` on CUDA), run through a small emulator of its instructions on every byte value, against
plain integer arithmetic. The CPU tests of the kernels take the portable path; this pins the asm's constants
and register order, which the GPU-marked kernel tests then check end to end.

`combine_splits` (the split-KV merge) against a float64 log-sum-exp merge, at split counts that take each of
its tilings (many rows per program; one row over channel slices; more splits than a power of two)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from partita.kernels.paged_attention_common import (_BIASED_NIBBLES_ASM, _CRUMBS_ASM, _NIBBLES_ASM,
                                                    _SUBNORMAL_CRUMBS_ASM, combine_splits)


def _prmt(a: int, b: int, sel: int) -> int:
    pool = (a | (b << 32)).to_bytes(8, "little")
    return int.from_bytes(bytes(pool[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def _halves(x: int) -> np.ndarray:
    return np.array([x & 0xFFFF, x >> 16], dtype=np.uint16).view(np.float16)


def _fma_f16x2(a: int, b: int, c: int) -> int:
    r = (_halves(a).astype(np.float64) * _halves(b) + _halves(c)).astype(np.float16)  # one rounding
    lo, hi = (int(v) for v in r.view(np.uint16))
    return lo | (hi << 16)


def run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """Registers after running `asm` (prmt, mov, lop3, and, fma.rn.f16x2 on .b32 registers and
    immediates)."""
    regs = dict(inputs)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip().strip("{}").strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        if op == "prmt.b32":
            regs[dst] = _prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op == "mov.b32":
            regs[dst] = val(src[0])
        elif op == "and.b32":
            regs[dst] = val(src[0]) & val(src[1])
        elif op == "lop3.b32":
            regs[dst] = _lop3(val(src[0]), val(src[1]), val(src[2]), val(src[3]))
        elif op == "fma.rn.f16x2":
            regs[dst] = _fma_f16x2(val(src[0]), val(src[1]), val(src[2]))
        else:
            raise AssertionError(f"the emulator does not know {op!r}")
    return regs


@pytest.mark.parametrize("bits,asm,form", [(4, _NIBBLES_ASM, "code"), (2, _CRUMBS_ASM, "code"),
                                           (4, _BIASED_NIBBLES_ASM, "biased"),
                                           (2, _SUBNORMAL_CRUMBS_ASM, "subnormal")])
def test_unpack_asm_gives_every_code_exactly(bits, asm, form):
    asm = asm.value if hasattr(asm, "value") else asm
    fields = 8 // bits
    in_reg = f"${2 * fields}"
    assert len(set(re.findall(r"\$\d+", asm))) == 2 * fields + 1  # outputs, then the packed input
    values = np.arange(256, dtype=np.uint8)
    for word in values.reshape(-1, 4):  # one invocation: 4 bytes, element i in byte i
        regs = run_ptx(asm, {in_reg: int.from_bytes(word.tobytes(), "little")})
        for f in range(fields):
            # output f is registers $2f (elements 0, 1) and $2f+1 (elements 2, 3), element 0 in the low half
            got = np.concatenate([_halves(regs[f"${2 * f}"]), _halves(regs[f"${2 * f + 1}"])])
            want = ((word >> (f * bits)) & ((1 << bits) - 1)).astype(np.float16)
            if form == "biased":  # 1024 + 2**s * code for the field at bit s
                want = (1024.0 + 2.0 ** (f * bits) * want.astype(np.float64)).astype(np.float16)
            elif form == "subnormal":  # 2**(s - 24) * code, a float16 subnormal
                want = (2.0 ** (f * bits - 24) * want.astype(np.float64)).astype(np.float16)
                assert (np.abs(want) < 2.0 ** -14).all()
            np.testing.assert_array_equal(got, want, err_msg=f"field {f} of bytes {list(word)}")


@pytest.mark.parametrize("batch,heads,splits,head_dim", [(3, 4, 3, 64), (5, 8, 1, 128), (1, 2, 256, 32),
                                                         (2, 3, 300, 16)])
def test_combine_splits_matches_float64(batch, heads, splits, head_dim):
    acc = torch.randn(batch, heads, splits, head_dim)
    m = torch.randn(batch, heads, splits) * 8  # log2 units: split weights spread over 2**+-24
    l = torch.rand(batch, heads, splits) * 50 + 0.5
    if splits > 1:  # a split that saw no tokens, as a kernel stores it: reference max, no weight
        acc[:, :, 1], m[:, :, 1], l[:, :, 1] = 0.0, -1.0e30, 0.0
    out_rows = torch.full((batch, heads, 2 * head_dim), float("nan"))
    out = out_rows[..., :head_dim]  # strided rows: the head stride is not head_dim
    combine_splits(out, acc, torch.stack([m, l], -1))
    w = torch.exp2(m.double() - m.double().amax(-1, keepdim=True))
    ref = (w[..., None] * acc.double()).sum(2) / (w * l.double()).sum(-1, keepdim=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert out_rows[..., head_dim:].isnan().all()  # the memory between rows untouched
