"""The decode side's write in two halves (workers/kv_import.py): staged on another thread from a copy of the block
table, written on the engine's; the cache must end byte-equal to the sender's blocks, and a bad payload must be
refused while staging, before anything is written."""
import threading

import pytest
import torch

from partita.workers.kv_import import prepare_writes, stage_payloads, write_staged
from partita.workers.kv_migration import cache_target, export_request, kv_layout, layer_byte_rows, layer_state
from tests.workers.test_kv_migration import GREEDY, PROMPTS, assert_all_free, cut_runs, make_engine, prefill


def engine_on(kv_format: str, device: str = "cpu"):
    memory = {"kv_cache_memory_bytes": 2**26} if device == "cuda" else {}  # two engines on one GPU
    return make_engine(kv_format, device=device, **memory)


def exported(kv_format: str, prompt: list[int], device: str = "cpu"):
    src = engine_on(kv_format, device)
    prefill(src, "r", prompt)
    return src, export_request(src, "r")


def cache_bytes(engine, seq, num_tokens: int) -> list[torch.Tensor]:
    """The request's blocks, part by part, and the state rows that hold its newest tokens."""
    layout = kv_layout(engine)
    ids = torch.tensor(seq.block_table[:layout.num_blocks(num_tokens)])
    layers = range(engine.model_config.num_layers)
    out = [part[ids.to(part.device)].cpu() for layer in layers for part in layer_byte_rows(engine, layer)]
    rows = num_tokens % layout.state_period
    return out + [s[seq.kv_slot, :rows].cpu() for layer in layers for s in layer_state(engine, layer)]


@pytest.mark.parametrize("device, impl", [("cpu", "auto"), ("cpu", "triton"),
                                          pytest.param("cuda", "auto", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kv_format", ["none", "int4", "kivi2"])
def test_staged_on_another_thread_equals_the_senders_cache(kv_format, device, impl):
    """On CUDA the staging thread fills pinned memory that the engine's thread uploads."""
    src, export = exported(kv_format, PROMPTS[2], device)  # 45 tokens: kivi2 sends residual rows as state payloads
    dst = engine_on(kv_format, device)
    seq = dst.reserve_migrated("r", export.prompt_token_ids, GREEDY)
    target, block_table = cache_target(dst), list(seq.block_table)  # read on the engine's thread
    n = export.layout.num_blocks(export.num_tokens)
    payloads = cut_runs(export.payloads, export.layout.bytes_per_block, n)  # runs of several layers per call
    payloads += [p for p in export.payloads if p[1] == n]
    before = cache_bytes(dst, seq, export.num_tokens)
    prepare_writes(target, impl)  # compiles the scatter where it is used; writes nothing
    assert all(torch.equal(a, b) for a, b in zip(cache_bytes(dst, seq, export.num_tokens), before))
    staged = []
    worker = threading.Thread(target=lambda: staged.extend(
        stage_payloads(target, block_table, export.num_tokens, payloads[i:i + 3], export.layout, impl)
        for i in range(0, len(payloads), 3)))
    worker.start()
    worker.join()
    for s in staged:
        write_staged(dst, seq, s)
    got, want = cache_bytes(dst, seq, export.num_tokens), cache_bytes(src, src.requests["r"].seq, export.num_tokens)
    assert len(got) == len(want) and all(w.any() for w in want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    dst.abort_reserved("r")
    src.release_prefilled("r")
    assert_all_free(src, dst)


@pytest.mark.parametrize("case, match", [
    (lambda p, n, w: [(99, 0, p[0][2])], "no such layer"),
    (lambda p, n, w: [(0, 0, p[0][2][:w - 1])], "expected whole blocks"),
    (lambda p, n, w: [(0, n - 1, p[0][2][:2 * w])], "within the"),
    (lambda p, n, w: [(0, n, b"\0" * 3)], "state payload of layer 0"),
])
def test_bad_payloads_are_refused_while_staging(case, match):
    src, export = exported("kivi2", PROMPTS[2])
    dst = make_engine("kivi2")
    seq = dst.reserve_migrated("r", export.prompt_token_ids, GREEDY)
    before = cache_bytes(dst, seq, export.num_tokens)
    n, width = export.layout.num_blocks(export.num_tokens), export.layout.bytes_per_block
    good = [p for p in export.payloads if p[0] == 1]
    with pytest.raises(ValueError, match=match):  # a good payload first: nothing of the call may be written
        stage_payloads(cache_target(dst), seq.block_table, export.num_tokens, good + case(export.payloads, n, width),
                       export.layout)
    assert all(torch.equal(a, b) for a, b in zip(cache_bytes(dst, seq, export.num_tokens), before))
    with pytest.raises(ValueError, match="holds 1 blocks"):
        stage_payloads(cache_target(dst), seq.block_table[:1], export.num_tokens, good, export.layout)
    dst.abort_reserved("r")
    src.release_prefilled("r")
