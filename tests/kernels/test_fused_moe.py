"""fused_moe (Triton) against its torch reference evaluated in float64, and the reference against a
naive per-token loop. On CPU the kernel runs under Triton's interpreter (tests/conftest.py), so
shapes are small and deliberately not multiples of the pinned 16x16x32 tiles.

Tolerances are relative Frobenius errors ||out - ref|| / ||ref||: fp32 1e-4 (IEEE dots, fp32
activations), fp16 1e-2, bf16 2e-2 (act and per-expert outputs are rounded to the input dtype).
Inputs are fresh random draws on every run: no seed is relied on.
"""
import os
import subprocess
import sys

import pytest
import torch

from partita.kernels.fused_moe import fused_moe, fused_moe_reference

# The interpreter runs on CPU tensors; with a GPU the same tests run the compiled kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def make_inputs(num_tokens: int, num_experts: int, top_k: int, hidden_size: int, inter_size: int,
                dtype: torch.dtype, ids_dtype: torch.dtype = torch.int64, device: str = DEVICE):
    """Random (hidden, w13, w2, topk_weights, topk_ids) with outputs of order one."""
    hidden = torch.randn(num_tokens, hidden_size, device=device).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter_size, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden_size, inter_size, device=device) / inter_size**0.5).to(dtype)
    topk_weights = torch.rand(num_tokens, top_k, device=device).softmax(dim=-1)
    # randint repeats experts inside a token's top-k now and then, on purpose.
    topk_ids = torch.randint(0, num_experts, (num_tokens, top_k), device=device, dtype=ids_dtype)
    return hidden, w13, w2, topk_weights, topk_ids


def reference_f64(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    return fused_moe_reference(hidden.double(), w13.double(), w2.double(), topk_weights.double(), topk_ids)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty the launcher makes starts as NaN (floats) or a huge index (integers), so an
    element the kernels fail to write shows up as NaN in the output or as a wild access."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if tensor.is_floating_point():
            return tensor.fill_(float("nan"))
        if tensor.dtype in (torch.int32, torch.int64):
            return tensor.fill_(torch.iinfo(tensor.dtype).max)
        return tensor

    monkeypatch.setattr(torch, "empty", empty)


def skewed_ids(num_tokens: int, top_k: int, ids_dtype: torch.dtype) -> torch.Tensor:
    """Experts 1 and 4 only (the rest unused); expert 1 gets more than one 16-row block, and some
    tokens pick the same expert for every k."""
    ids = torch.full((num_tokens, top_k), 1, dtype=ids_dtype, device=DEVICE)
    ids[::2, 1:] = 4
    return ids


# (T, E, K, H, I, routing)
CASES = {
    "random": (37, 8, 3, 40, 24, "random"),
    "one_token": (1, 5, 2, 33, 20, "random"),
    "skewed": (29, 6, 2, 48, 40, "skewed"),
    # Routed by the multi-program path (count, scatter): more pairs than one routing program
    # takes (128), more experts than one scatter chunk (64). The others use the one-program path.
    "many_experts": (40, 70, 4, 24, 20, "random"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES.keys())
def test_matches_float64(case, dtype, poisoned_empty):
    num_tokens, num_experts, top_k, hidden_size, inter_size, routing = CASES[case]
    ids_dtype = torch.int32 if dtype == torch.float32 else torch.int64
    inputs = list(make_inputs(num_tokens, num_experts, top_k, hidden_size, inter_size, dtype, ids_dtype))
    if routing == "skewed":
        inputs[4] = skewed_ids(num_tokens, top_k, ids_dtype)
    out = fused_moe(*inputs)
    assert out.shape == (num_tokens, hidden_size) and out.dtype == dtype
    assert torch.isfinite(out).all(), "some output elements were never written"
    assert rel_error(out, reference_f64(*inputs)) < TOLERANCE[dtype]


def test_fp16_strided_inputs(poisoned_empty):
    """fp16, hidden a column slice of a wider tensor, top-k tensors transposed views."""
    hidden, w13, w2, topk_weights, topk_ids = make_inputs(19, 7, 3, 36, 28, torch.float16)
    wide = torch.randn(19, 50, device=DEVICE).to(torch.float16)
    wide[:, 7:43] = hidden
    hidden = wide[:, 7:43]
    topk_weights = topk_weights.t().contiguous().t()
    topk_ids = topk_ids.t().contiguous().t()
    out = fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    assert torch.isfinite(out).all()
    assert rel_error(out, reference_f64(hidden, w13, w2, topk_weights, topk_ids)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("num_experts", [4, 130], ids=["one_program_routing", "multi_program_routing"])
def test_out_of_range_ids_only_spoil_their_tokens(num_experts, poisoned_empty):
    hidden, w13, w2, topk_weights, topk_ids = make_inputs(40, num_experts, 2, 24, 20, torch.float32)
    topk_ids[3, 1] = num_experts
    topk_ids[7, 0] = -1
    out = fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    keep = [t for t in range(40) if t not in (3, 7)]
    ref = reference_f64(hidden[keep], w13, w2, topk_weights[keep], topk_ids[keep])
    assert rel_error(out[keep], ref) < TOLERANCE[torch.float32]


def test_no_tokens():
    hidden, w13, w2, topk_weights, topk_ids = make_inputs(0, 4, 2, 24, 20, torch.float32)
    out = fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    assert out.shape == (0, 24)


def naive_per_token(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The formula, one token and one k at a time."""
    inter_size = w2.shape[2]
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gate = w13[e, :inter_size] @ hidden[t]
            up = w13[e, inter_size:] @ hidden[t]
            out[t] += topk_weights[t, k] * (w2[e] @ (gate * torch.sigmoid(gate) * up))
    return out


def test_reference_matches_naive_loop():
    inputs = [x.double() if x.is_floating_point() else x
              for x in make_inputs(23, 6, 3, 17, 11, torch.float64)]
    inputs[4][0] = inputs[4][0, 0]  # token 0 sends all its k to one expert
    ref = fused_moe_reference(*inputs)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(ref, naive_per_token(*inputs), rtol=1e-12, atol=1e-12)


def test_reference_keeps_low_precision_dtype():
    inputs = make_inputs(5, 3, 2, 16, 8, torch.bfloat16)
    ref = fused_moe_reference(*inputs)
    assert ref.dtype == torch.bfloat16
    assert rel_error(ref, reference_f64(*inputs)) < TOLERANCE[torch.bfloat16]


def _replace(index: int, value):
    return lambda args: args[:index] + [value(args[index])] + args[index + 1:]


BAD_INPUTS = {
    "hidden_1d": (_replace(0, lambda h: h[0]), "hidden must be"),
    "w13_odd_rows": (_replace(1, lambda w: w[:, :-1]), "w13 must be"),
    "w13_wrong_hidden": (_replace(1, lambda w: w[:, :, :-1]), "w13 must be"),
    "w2_wrong_shape": (_replace(2, lambda w: w[:, :, :-1]), "w2 must be"),
    "w2_wrong_experts": (_replace(2, lambda w: w[:-1]), "w2 must be"),
    "topk_shape": (_replace(3, lambda w: w[:, :1]), "topk_weights and topk_ids"),
    "topk_tokens": (_replace(4, lambda i: i[:-1]), "topk_weights and topk_ids"),
    "ids_float": (_replace(4, lambda i: i.float()), "topk_ids must be int32 or int64"),
    "ids_int16": (_replace(4, lambda i: i.to(torch.int16)), "topk_ids must be int32 or int64"),
    "weights_bf16": (_replace(3, lambda w: w.to(torch.bfloat16)), "topk_weights must be"),
    "weights_dtype": (_replace(1, lambda w: w.to(torch.float16)), "must have hidden's dtype"),
    "hidden_fp64": (lambda a: [x.double() for x in a[:3]] + a[3:], "hidden dtype"),
    "device": (_replace(2, lambda w: w.to("meta")), "one device"),
}


@pytest.mark.parametrize("name", BAD_INPUTS.keys())
def test_launcher_rejects_bad_inputs(name):
    change, message = BAD_INPUTS[name]
    args = change(list(make_inputs(6, 4, 2, 16, 8, torch.float32)))
    with pytest.raises(ValueError, match=message):
        fused_moe(*args)


def test_launcher_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused_moe(*make_inputs(6, 4, 2, 16, 8, torch.float32, device="cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_graph_replay_follows_new_routing(dtype):
    """Captured once, replayed with new routing written into the same input tensors."""
    static = make_inputs(24, 16, 4, 256, 96, dtype, torch.int32, device="cuda")
    fused_moe(*static)  # autotune and compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(*static)
    for _ in range(2):
        fresh = make_inputs(24, 16, 4, 256, 96, dtype, torch.int32, device="cuda")
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out, reference_f64(*static)) < TOLERANCE[dtype]


_AUTOTUNE_RUN = """
import sys
import torch
import triton.runtime.autotuner as autotuner
if sys.argv[1] == "cached":
    def refuse(self, *args, **kwargs):
        raise AssertionError("timed a config although an earlier process chose one for these shapes")
    autotuner.Autotuner._bench = refuse
from partita.kernels.fused_moe import fused_moe
torch.manual_seed(0)
T, H, E, I, K = 64, 128, 8, 64, 2
hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5
w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I ** 0.5
weights = torch.rand(T, K, device="cuda")
ids = torch.randint(0, E, (T, K), device="cuda", dtype=torch.int32)
fused_moe(hidden, w13, w2, weights, ids)
torch.cuda.synchronize()
"""


@pytest.mark.gpu
def test_autotune_choices_outlive_the_process(tmp_path):
    """A second process with the same Triton cache directory takes the first one's choices without timing any
    config (a restarted or healed MoE worker starts in seconds, not tens of seconds)."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.pop("TRITON_INTERPRET", None)
    for mode in ("fresh", "cached"):
        run = subprocess.run([sys.executable, "-c", _AUTOTUNE_RUN, mode], env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"{mode} run failed:\n{run.stderr[-3000:]}"


def test_autotune_keeps_tiles_that_fit_the_matrix(monkeypatch):
    """The GPU config space (not the interpreter's one config) pruned for a routing: BLOCK_M near the rows per
    expert, and BLOCK_N, BLOCK_K no larger than the matrix (next power of two), or the smallest tile when none
    fits; real shapes lose no tile size."""
    from partita.kernels import fused_moe as fm

    monkeypatch.setattr(fm, "_interpreting", lambda: False)

    def kept(gated, num_pairs, inter, hidden):
        found = fm._prune_configs(fm._gemm_configs(gated), {"w13_ptr" if gated else "w2_ptr": None,
                                  "num_pairs": num_pairs, "num_experts": 8, "inter_size": inter,
                                  "hidden_size": hidden})
        return sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                      for c in found)

    # tiny-moe (intermediate 64, hidden 128), 16 rows per expert
    assert kept(True, 128, 64, 128) == sorted([(16, 32, 128, 4, 4), (16, 32, 128, 4, 6), (16, 64, 128, 4, 4),
                                               (16, 64, 128, 4, 6), (16, 32, 128, 2, 6)])
    assert kept(False, 128, 64, 128) == [(16, 32, 128, 4, 4)]  # every 16-row tile is 128+ deep: the smallest
    # 1024 rows per expert: down's 64-deep tiles fit, its 256-wide one does not (hidden 128)
    assert kept(False, 8192, 64, 128) == sorted([(32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                                 (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3),
                                                 (128, 128, 64, 8, 4), (128, 64, 64, 4, 4)])
    for gated in (True, False):  # qwen3-30b-a3b (intermediate 768, hidden 2048): only BLOCK_M decides
        for pairs in (128, 8192):
            rows = pairs // 8
            cap = min(128, max(16, 1 << (rows - 1).bit_length()))
            assert kept(gated, pairs, 768, 2048) == sorted(
                (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in fm._gemm_configs(gated) if cap // 4 <= c.kwargs["BLOCK_M"] <= cap)
