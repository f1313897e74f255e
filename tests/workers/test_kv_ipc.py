"""workers/kv_ipc.py on CPU: which tensors a same-GPU peer would map, and the refusals off the GPU.

The mapping and the in-place copy themselves need two processes on one GPU: they are proven end to end in
tests/cluster/test_kv_transfer.py::test_same_gpu_pd_in_place_equals_colocated (PD output equals colocated)."""
import pytest

from partita.workers import Engine, EngineConfig
from partita.workers.kv_ipc import cache_tensors, device_uuid, share_cache
from partita.workers.kv_migration import kv_layout


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
