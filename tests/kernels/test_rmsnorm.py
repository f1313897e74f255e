"""rms_norm against its Hugging Face-order reference and a float64 formula, at awkward shapes.

Tolerances: against the reference in the same dtype, every element within two rounding steps of the
output dtype: the kernel sums squares in another order, so the normalised h, rounded before the weight
product, may be one step off, which the weight carries into out, and out is rounded once more
(|w| * step(h) ~ step(out)); residual_out must be bit-identical. Against float64
math on the same rounded residual sum, ||out - out64|| / ||out64||: bf16 1e-2, fp16 2e-3, fp32 1e-5.
Outputs are poisoned with NaN before each call.
"""
import pytest
import torch
import torch.nn.functional as F

from partita.kernels.rmsnorm import rms_norm, rms_norm_reference

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton's interpreter (CPU runs) converts fp32 to bf16 by truncation where the GPU rounds to nearest
# even, so each bf16 rounding there can be one step off: bf16 comparisons with the reference allow
# BF16_STEPS steps on CPU, one on a GPU.
BF16_STEPS = 1 if torch.cuda.is_available() else 3
ULP = {torch.bfloat16: BF16_STEPS * 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -20}


@pytest.fixture
def poisoned(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(out):
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def within_steps(out, ref, dtype, steps=1):
    """Every element within `steps` rounding steps of `dtype` relative to ref (at least one subnormal step)."""
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was not written"
    step = (ref.float().abs() * steps + torch.finfo(dtype).tiny) * ULP[dtype]
    return bool(((out.float() - ref.float()).abs() <= step).all())


def assert_residual_equal(res_out, ref_res):
    """Bit-identical (one rounded add each), except for the interpreter's truncating bf16 conversion."""
    if res_out.dtype == torch.bfloat16 and BF16_STEPS > 1:
        assert within_steps(res_out, ref_res, res_out.dtype)
    else:
        assert torch.equal(res_out, ref_res)


def _float64(s, weight, eps):
    h = s.double()
    return weight.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,H", [(1, 4096), (3, 100), (16, 257)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference_and_float64(poisoned, dtype, T, H, with_residual):
    x = torch.randn(T, H, dtype=dtype, device=DEVICE) * 3
    weight = (1 + 0.1 * torch.randn(H, device=DEVICE)).to(dtype)
    residual = torch.randn(T, H, dtype=dtype, device=DEVICE) if with_residual else None
    out, res_out = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = rms_norm_reference(x, weight, 1e-5, residual)
    assert out.dtype == ref_out.dtype == dtype
    assert_residual_equal(res_out, ref_res)
    if not with_residual:
        assert res_out is x
    assert within_steps(out, ref_out, dtype, steps=2)
    out64 = _float64(ref_res, weight, 1e-5)
    assert ((out.double() - out64).norm() / out64.norm()).item() < TOL[dtype]


def test_strided_rows_and_fp32_weight(poisoned):
    big = torch.randn(5, 2, 96, dtype=torch.bfloat16, device=DEVICE)
    x, residual = big[:, 0], big[:, 1]  # rows 192 elements apart
    weight = torch.randn(96, device=DEVICE)
    out, res_out = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = rms_norm_reference(x, weight, 1e-6, residual)
    assert out.dtype == torch.float32
    assert_residual_equal(res_out, ref_res)
    assert within_steps(out, ref_out, torch.bfloat16)  # h is rounded to bf16 before the fp32 product


def test_reference_matches_torch_rms_norm():
    # The reference works in fp32 whatever the input (HF's h.float()), so compare at fp32 accuracy.
    x = torch.randn(4, 33, dtype=torch.float32)
    weight = torch.randn(33, dtype=torch.float32)
    out, _ = rms_norm_reference(x, weight, 1e-6)
    expected = F.rms_norm(x.double(), (33,), weight.double(), eps=1e-6)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make,match", [
    (lambda: (torch.randn(2, 3, 4), torch.randn(4), None), r"\[T, H\]"),
    (lambda: (torch.randn(2, 4), torch.randn(5), None), "weight must be"),
    (lambda: (torch.randn(2, 4), torch.randn(4), torch.randn(2, 5)), "residual must match"),
    (lambda: (torch.randn(2, 4), torch.randn(4), torch.randn(2, 4, dtype=torch.float16)), "residual must match"),
    (lambda: (torch.randn(2, 4, dtype=torch.float64), torch.randn(4), None), "must be in"),
    (lambda: (torch.randn(1, 70000), torch.randn(70000), None), "outside"),
])
def test_rejects_bad_inputs(make, match):
    x, weight, residual = make()
    with pytest.raises(ValueError, match=match):
        rms_norm(x, weight, 1e-6, residual)
