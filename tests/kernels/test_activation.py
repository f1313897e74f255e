"""silu_and_mul against its Hugging Face-order reference and a float64 formula, at awkward shapes.

Tolerances: against the reference in the same dtype, every element within two rounding steps of the dtype
(exp differs from torch's in the last fp32 bits, which can move the rounded silu by one step, and the
product is rounded again); against float64 silu(g) * u on the same inputs, ||out - out64|| / ||out64||:
bf16 2e-2 (two bf16 roundings, truncating ones under the interpreter), fp16 2e-3, fp32 1e-5.
Outputs are poisoned with NaN first.
"""
import pytest
import torch

from partita.kernels.activation import silu_and_mul, silu_and_mul_reference

TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton's interpreter (CPU runs) converts fp32 to bf16 by truncation where the GPU rounds to nearest
# even, so each bf16 rounding there can be one step off: bf16 comparisons with the reference allow
# BF16_STEPS steps on CPU, one on a GPU.
BF16_STEPS = 1 if torch.cuda.is_available() else 3
ULP = {torch.bfloat16: BF16_STEPS * 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -21}


@pytest.fixture
def poisoned(monkeypatch):
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", empty)


def _silu_mul64(x):
    g, u = x.double().chunk(2, dim=-1)
    return g / (1 + torch.exp(-g)) * u


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,I", [(1, 14336), (3, 5), (16, 513)])
def test_matches_reference_and_float64(poisoned, dtype, T, I):
    x = torch.randn(T, 2 * I, dtype=dtype, device=DEVICE) * 4
    out = silu_and_mul(x)
    assert out.shape == (T, I) and out.dtype == dtype
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was not written"
    ref = silu_and_mul_reference(x)
    step = 2 * ref.float().abs().clamp_min(1e-30) * ULP[dtype]
    assert ((out.float() - ref.float()).abs() <= step).all()
    out64 = _silu_mul64(x)
    assert ((out.double() - out64).norm() / out64.norm()).item() < TOL[dtype]


def test_strided_input(poisoned):
    x = torch.randn(4, 2, 2 * 70, dtype=torch.float16, device=DEVICE)[:, 1]  # row stride 280
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x), rtol=2e-3, atol=1e-3)


def test_reference_matches_independent_formula():
    x = torch.randn(5, 22, dtype=torch.float64) * 4
    torch.testing.assert_close(silu_and_mul_reference(x), _silu_mul64(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 5), r"\[T, 2I\]"),
    (torch.randn(2, 0), r"\[T, 2I\]"),
    (torch.randn(2, 2, 4), r"\[T, 2I\]"),
    (torch.randn(2, 4, dtype=torch.float64), "not one of"),
])
def test_rejects_bad_inputs(x, match):
    with pytest.raises(ValueError, match=match):
        silu_and_mul(x)
