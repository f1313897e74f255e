"""workers/kv_ipc.py on CPU: which tensors a same-GPU peer would map, the refusals off the GPU, and the copies into
a reservation (after the prefill and streamed layer by layer), with another engine's tensors standing in for the
mapped cache.

The mapping itself needs two processes on one GPU: it is proven end to end in tests/cluster/test_kv_transfer.py::
test_same_gpu_pd_in_place_equals_colocated and tests/cluster/test_kv_stream.py::test_same_gpu_streamed_in_place_...
(PD output equals colocated)."""
import pytest

from partita.workers import Engine, EngineConfig
from partita.workers.kv_ipc import cache_tensors, copy_in_place, device_uuid, peer_cache, share_cache, stream_in_place
from partita.workers.kv_migration import kv_layout
from tests.cluster.test_kv_transfer import CONFIG, GREEDY, PROMPT, colocated


@pytest.mark.parametrize("kv_format", ["none", "fp8", "int8", "int4", "kivi2"])
def test_cache_tensors_cover_the_wire_layout(kv_format):
    """Per layer, the block-indexed tensors hold exactly one block's wire bytes per row (the layout the descriptor
    check guarantees equal on both ends), and only kivi2 adds per-sequence state."""
    engine = Engine("tiny-llama", device="cpu", kv_format=kv_format,
                    config=EngineConfig(max_model_len=128, max_num_seqs=4))
    layout = kv_layout(engine)
    layers, num_parts = cache_tensors(engine)
    assert len(layers) == engine.model_config.num_layers
    for tensors in layers:
        parts = tensors[:num_parts]
        assert all(t.shape[0] == parts[0].shape[0] for t in parts)
        assert sum(t.shape[1] * t.element_size() for t in parts) == layout.bytes_per_block
        assert len(tensors) - num_parts == (2 if kv_format == "kivi2" else 0)
        for state in tensors[num_parts:]:
            assert state.shape[0] == engine.config.max_num_seqs


def test_nothing_is_shared_off_the_gpu():
    engine = Engine("tiny-llama", device="cpu", config=EngineConfig(max_model_len=128, max_num_seqs=4))
    assert device_uuid(engine) == ""
    with pytest.raises(ValueError, match="not on a CUDA device"):
        share_cache(engine)


def _greedy_after(decode: Engine, seq, first_token: int) -> list[int]:
    decode.commit_migrated(seq.request_id, first_token, GREEDY)
    tokens = [first_token]
    while decode.has_unfinished():
        tokens += [t for o in decode.step() for t in o.new_token_ids]
    return tokens


def _first_token(engine: Engine) -> int:
    while True:
        outputs = engine.step()
        if outputs:
            return outputs[0].new_token_ids[0]


@pytest.mark.parametrize("kv_format", ["none", "fp8", "int4", "kivi2"])
@pytest.mark.parametrize("streamed", [False, True], ids=["after", "streamed"])
def test_copies_into_a_reservation_decode_like_colocated(kv_format, streamed):
    """The copy logic on CPU, the peer's cache being another engine's own tensors (what CUDA IPC maps on a GPU):
    copied after the prefill, or layer by layer inside the chunked prefill's last step, the reservation then
    decodes greedily to the colocated engine's tokens (kivi2: its residual rows included), and every block returns."""
    prefill, decode = (Engine("tiny-llama", device="cpu", kv_format=kv_format, config=EngineConfig(**CONFIG))
                       for _ in range(2))
    peer = peer_cache(prefill, cache_tensors(decode)[0])
    seq = decode.reserve_migrated("r", PROMPT)
    n = kv_layout(prefill).num_blocks(len(PROMPT))
    prefill.add_request("r", PROMPT, GREEDY, prefill_only=True)
    if streamed:
        copies = stream_in_place(prefill, "r", peer, seq.block_table[:n], seq.kv_slot)
        with pytest.raises(RuntimeError, match="has not run"):
            copies.wait()
        first = _first_token(prefill)
        written = copies.wait()
    else:
        first = _first_token(prefill)
        written = copy_in_place(prefill, "r", peer, seq.block_table[:n], seq.kv_slot)
    assert written == kv_layout(prefill).total_bytes(len(PROMPT))
    prefill.release_prefilled("r")
    assert _greedy_after(decode, seq, first) == colocated(kv_format)
    for engine in (prefill, decode):
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_failed_streamed_copy_is_reported_and_the_prefill_goes_on():
    """A reservation of the wrong size fails the copies inside the forward pass: the prefill still produces its
    first token (equal to the colocated one), and wait() names the problem, so the sender can fall back."""
    prefill, decode = (Engine("tiny-llama", device="cpu", kv_format="int4", config=EngineConfig(**CONFIG))
                       for _ in range(2))
    seq = decode.reserve_migrated("r", PROMPT)
    prefill.add_request("r", PROMPT, GREEDY, prefill_only=True)
    peer = peer_cache(prefill, cache_tensors(decode)[0])
    copies = stream_in_place(prefill, "r", peer, seq.block_table[:1], seq.kv_slot)
    assert _first_token(prefill) == colocated("int4")[0]
    with pytest.raises(RuntimeError, match="1 reserved blocks for 45 tokens"):
        copies.wait()
