"""apply_rotary against its Hugging Face-order reference and a complex-number formula in float64.

q and k are views into one fused qkv buffer (non-contiguous); the v slice and the padding around them
must stay untouched. Tolerances: against the reference in the same dtype, every element within two
rounding steps of the dtype relative to its pair's size |x1| + |x2| (the output of a difference can be
small; on a GPU the kernel is bit-identical, the interpreter rounds bf16 differently); against float64
rotation by exact angles, ||out - out64|| / ||out64||: bf16 1.5e-2 (cos and sin are rounded to bf16
first, as HF does), fp16 3e-3, fp32 1e-5.
"""
import pytest
import torch

from partita.kernels.rotary import apply_rotary, apply_rotary_reference

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton's interpreter (CPU runs) converts fp32 to bf16 by truncation where the GPU rounds to nearest
# even, so each bf16 rounding there can be one step off: bf16 comparisons with the reference allow
# BF16_STEPS steps on CPU, one on a GPU.
BF16_STEPS = 1 if torch.cuda.is_available() else 3
ULP = {torch.bfloat16: BF16_STEPS * 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -20}
THETA = 10000.0


def _inv_freq(D):
    return 1.0 / THETA ** (torch.arange(0, D, 2, dtype=torch.float64) / D)


def _cos_sin(max_pos, D):
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), _inv_freq(D))
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(DEVICE)


def _rotate64(x, positions):
    """Each pair (x[j], x[j + D/2]) as a complex number, turned by position * inv_freq[j]."""
    D = x.shape[-1]
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double())
    angle = positions.double().cpu()[:, None, None] * _inv_freq(D)
    z = z.cpu() * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def _pair_size(x):
    """|x1| + |x2| for each rotated pair, laid out like x: the scale of one output element's error."""
    x1, x2 = x.float().abs().chunk(2, dim=-1)
    return torch.cat((x1 + x2, x1 + x2), dim=-1)


def _fused(T, Hq, Hkv, D, dtype):
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D + 3, dtype=dtype, device=DEVICE)  # +3: row padding
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
    return qkv, q, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,Hq,Hkv,D", [(1, 32, 8, 128), (3, 5, 1, 24), (16, 4, 4, 6)])
def test_matches_reference_and_float64(dtype, T, Hq, Hkv, D):
    qkv, q, k = _fused(T, Hq, Hkv, D, dtype)
    qkv_ref, q_ref, k_ref = _fused(T, Hq, Hkv, D, dtype)
    qkv_ref.copy_(qkv)
    scale_q, scale_k = _pair_size(q), _pair_size(k)
    positions = torch.randint(0, 2048, (T,), device=DEVICE)
    cos_sin = _cos_sin(2048, D)
    q64, k64 = _rotate64(q, positions), _rotate64(k, positions)
    apply_rotary(q, k, positions, cos_sin)
    apply_rotary_reference(q_ref, k_ref, positions, cos_sin)
    assert torch.equal(qkv[:, (Hq + Hkv) * D:], qkv_ref[:, (Hq + Hkv) * D:]), "v or padding was written"
    for out, ref, out64, scale in ((q, q_ref, q64, scale_q), (k, k_ref, k64, scale_k)):
        assert ((out.float() - ref.float()).abs() <= 2 * ULP[dtype] * scale).all()
        assert ((out.double().cpu() - out64).norm() / out64.norm()).item() < TOL[dtype]


def test_int32_positions_and_contiguous_inputs():
    q = torch.randn(2, 3, 8, device=DEVICE)
    k = torch.randn(2, 1, 8, device=DEVICE)
    q_ref, k_ref = q.clone(), k.clone()
    positions = torch.tensor([0, 7], dtype=torch.int32, device=DEVICE)
    cos_sin = _cos_sin(8, 8)
    apply_rotary(q, k, positions, cos_sin)
    apply_rotary_reference(q_ref, k_ref, positions.long(), cos_sin)
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, k_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q[0], q_ref[0], rtol=0, atol=0)  # position 0 is the identity


def test_reference_matches_complex_formula():
    q = torch.randn(4, 3, 16, dtype=torch.float64)
    k = torch.randn(4, 2, 16, dtype=torch.float64)
    positions = torch.tensor([0, 1, 50, 999])
    freqs = torch.outer(torch.arange(1000, dtype=torch.float64), _inv_freq(16))
    cos_sin64 = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q64, k64 = _rotate64(q, positions), _rotate64(k, positions)
    # The reference casts cos_sin to q's dtype; float64 throughout makes it exact.
    apply_rotary_reference(q, k, positions, cos_sin64)
    torch.testing.assert_close(q, q64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k, k64, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shapes,match", [
    (((1, 2, 8), (1, 1, 6), (1,), (4, 8)), "must have q's"),
    (((1, 2, 7), (1, 1, 7), (1,), (4, 7)), "even"),
    (((2, 2, 8), (2, 1, 8), (3,), (4, 8)), "positions must be"),
    (((1, 2, 8), (1, 1, 8), (1,), (4, 6)), "cos_sin must be"),
    (((1, 2, 8), (1, 1), (1,), (4, 8)), r"\[T, Hq, D\]"),
])
def test_rejects_bad_shapes(shapes, match):
    qs, ks, ps, cs = shapes
    with pytest.raises(ValueError, match=match):
        apply_rotary(torch.randn(*qs), torch.randn(*ks), torch.zeros(ps, dtype=torch.long), torch.randn(*cs))


def test_rejects_bad_dtypes():
    q, k, cs = torch.randn(1, 2, 8), torch.randn(1, 1, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="share one dtype"):
        apply_rotary(q, k.half(), torch.zeros(1, dtype=torch.long), cs)
    with pytest.raises(ValueError, match="int32/int64"):
        apply_rotary(q, k, torch.zeros(1), cs)
    with pytest.raises(ValueError, match="float32"):
        apply_rotary(q, k, torch.zeros(1, dtype=torch.long), cs.double())
