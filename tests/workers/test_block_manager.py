import pytest

from partita.workers.engine.block_manager import BlockManager
from partita.workers.engine.sequence import Sequence
from partita.workers.sampling_params import SamplingParams


def seq(n: int, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(n)), n, SamplingParams(), 0)


def test_allocate_grows_by_whole_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=5, block_size=4)
    s = seq(9)
    assert bm.blocks_needed(s, 9) == 3
    bm.allocate(s, 9)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 2
    assert bm.blocks_needed(s, 12) == 0 and bm.blocks_needed(s, 13) == 1
    assert bm.slot(s, 5) == s.block_table[1] * 4 + 1
    bm.free(s)
    assert bm.num_free_blocks == 5 and s.block_table == []


def test_check_has_no_side_effects_and_refuses_overcommit():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(12)
    assert not bm.can_allocate(s, 12)
    assert bm.num_free_blocks == 2 and s.block_table == []
    with pytest.raises(RuntimeError):
        bm.allocate(s, 12)


def test_shared_block_is_freed_by_its_last_owner():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = seq(4, "a"), seq(4, "b")
    bm.allocate(a, 4)
    b.block_table.append(bm.fork(a.block_table[0]))
    bm.free(a)
    assert bm.num_free_blocks == 2
    bm.free(b)
    assert bm.num_free_blocks == 3
    with pytest.raises(RuntimeError):
        bm.fork(0)
