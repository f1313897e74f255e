"""small_m_linear against a float64 product at awkward shapes, on Triton's interpreter when no GPU.

Tolerances, ||y - y64|| / ||y64|| with y64 from float64 inputs: bf16 1e-2 (the output's own rounding is
~2e-3), fp16 2e-3, fp32 1e-5. Outputs are poisoned with NaN before each call (the launcher's torch.empty
is patched), so an unwritten element fails.
"""
import pytest
import torch

from partita.kernels.linear import (LinearConfig, configs, default_config, small_m_linear,
                                    small_m_linear_reference, use_small_m_linear, warmup)

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned(monkeypatch):
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", empty)


def _rel_err(y: torch.Tensor, ref64: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "output has NaN/inf: an element was not written"
    return ((y.double() - ref64).norm() / ref64.norm()).item()


def _inputs(M, N, K, dtype, bias):
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    w = (torch.randn(N, K, dtype=torch.float32, device=DEVICE) * K ** -0.5).to(dtype)
    b = torch.randn(N, dtype=dtype, device=DEVICE) if bias else None
    return x, w, b


def _untuned(M, N, K, dtype):
    """On a GPU, the default config (the first eager call would otherwise time every candidate for each
    of these awkward shapes); on the interpreter, None (a pinned config)."""
    return default_config(M, N, K, dtype) if DEVICE == "cuda" else None


def _ref64(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("N,K", [(37, 100), (64, 96)])
def test_matches_float64(poisoned, dtype, M, N, K):
    x, w, b = _inputs(M, N, K, dtype, bias=(M == 3))
    y = small_m_linear(x, w, b, config=_untuned(M, N, K, dtype))
    assert y.shape == (M, N) and y.dtype == dtype
    assert _rel_err(y, _ref64(x, w, b)) < TOL[dtype]


@pytest.mark.parametrize("config", [
    LinearConfig("gemv", 16, 32, 4, 1), LinearConfig("dot", 16, 32, 4, 1), LinearConfig("gemv", 8, 64, 4, 1),
    LinearConfig("dot", 64, 128, 4, 3), LinearConfig("gemv", 4, 64, 4, 1, prefetch=False),
    LinearConfig("dot", 16, 64, 4, 1, prefetch=False, trigger_late=True), LinearConfig("gemv", 2, 256, 4, 1)])
@pytest.mark.parametrize("M", [1, 3])
def test_each_config_kind(poisoned, config, M):
    if config.kernel == "gemv" and M > 1:
        pytest.skip("gemv is for M == 1")
    x, w, b = _inputs(M, 45, 200, torch.bfloat16, bias=True)
    assert _rel_err(small_m_linear(x, w, b, config=config), _ref64(x, w, b)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("M", [17, 33, 64])
def test_wider_m_tiles(poisoned, M):
    x, w, b = _inputs(M, 19, 70, torch.float16, bias=True)
    y = small_m_linear(x, w, b, config=_untuned(M, 19, 70, torch.float16))
    assert _rel_err(y, _ref64(x, w, b)) < TOL[torch.float16]


def test_strided_operands(poisoned):
    x_big = torch.randn(3, 2 * 80, dtype=torch.bfloat16, device=DEVICE)
    x = x_big[:, ::2]  # K-stride 2
    w = torch.randn(80, 41, dtype=torch.bfloat16, device=DEVICE).T * 0.1  # [41, 80], strides (1, 41)
    y = small_m_linear(x, w, config=_untuned(3, 41, 80, torch.bfloat16))
    assert _rel_err(y, _ref64(x, w, None)) < TOL[torch.bfloat16]


def test_reference_matches_independent_formula():
    x, w, b = _inputs(3, 7, 11, torch.float64, bias=True)
    by_sum = (x[:, None, :] * w[None, :, :]).sum(-1) + b
    torch.testing.assert_close(small_m_linear_reference(x, w, b), by_sum, rtol=1e-12, atol=1e-12)
    x32, w32 = x.float(), w.float()
    assert _rel_err(small_m_linear_reference(x32, w32), _ref64(x32, w32, None)) < 1e-6


@pytest.mark.parametrize("M", [1, 2, 16, 32, 64])
def test_configs_are_well_formed(M):
    for dtype in (torch.bfloat16, torch.float32):
        for config in configs(M, dtype) + [default_config(M, 4096, 4096, dtype)]:
            assert config.kernel in ("gemv", "dot")
            assert config.kernel == "dot" or M == 1
            assert config.block_n >= 1 and config.block_k >= 16 and config.num_warps in (1, 2, 4, 8)
        assert len(set(configs(M, dtype))) == len(configs(M, dtype))


def test_crossover_is_small_m_only():
    assert use_small_m_linear(1, 4096, 4096)
    assert not use_small_m_linear(65, 4096, 4096)


@pytest.mark.parametrize("args,match", [
    (((0, 8), (4, 8), None), "outside"),
    (((65, 8), (4, 8), None), "outside"),
    (((2, 8), (4, 9), None), "weight must be"),
    (((2, 8, 1), (4, 8), None), r"\[M, K\]"),
    (((2, 8), (4, 8), (5,)), "bias must be"),
])
def test_rejects_bad_shapes(args, match):
    xs, ws, bs = args
    x, w = torch.randn(*xs, dtype=torch.bfloat16), torch.randn(*ws, dtype=torch.bfloat16)
    b = None if bs is None else torch.randn(*bs, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        small_m_linear(x, w, b)


def test_rejects_bad_dtypes():
    with pytest.raises(ValueError, match="share one dtype"):
        small_m_linear(torch.randn(1, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="not one of"):
        small_m_linear(torch.randn(1, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown kernel"):
        small_m_linear(torch.randn(1, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE),
                       config=LinearConfig("nope", 16, 16))


@pytest.mark.gpu
def test_warmup_then_graph_capture():
    M, N, K = 2, 1000, 512
    x, w, b = _inputs(M, N, K, torch.bfloat16, bias=True)
    warmup(M, N, K, torch.bfloat16, x.device, weight=w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = small_m_linear(x, w, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_err(y, _ref64(x, w, b)) < TOL[torch.bfloat16]


def test_row_tiles():
    from partita.kernels.linear import tile_rows
    assert [tile_rows(m) for m in (1, 2, 3, 15, 16, 17, 32, 33, 64)] == [1, 16, 16, 16, 16, 32, 32, 64, 64]


@pytest.mark.gpu
def test_one_tuned_config_serves_its_row_tile():
    """A config tuned (here pinned) for M = 2 is the one M = 3..16 take, where they once fell back to
    default_config (and compiled it while serving); M = 1 and M = 17 keep their own."""
    from partita.kernels.linear import cached_config, default_config, set_config
    N, K = 1008, 512  # a shape no other test tunes
    pinned = LinearConfig("dot", 16, 64, 4, 2)
    assert pinned != default_config(3, N, K, torch.bfloat16)
    set_config(2, N, K, torch.bfloat16, "cuda", pinned)
    assert all(cached_config(m, N, K, torch.bfloat16, torch.device("cuda")) == pinned for m in range(2, 17))
    assert cached_config(1, N, K, torch.bfloat16, torch.device("cuda")) != pinned
    assert cached_config(17, N, K, torch.bfloat16, torch.device("cuda")) != pinned
