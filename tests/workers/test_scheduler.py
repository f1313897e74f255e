"""Scripted scheduler runs: no model, the test plays the runner by advancing num_computed_tokens."""
from partita.workers.engine.block_manager import BlockManager
from partita.workers.engine.scheduler import Scheduler
from partita.workers.engine.sequence import Sequence, Status
from partita.workers.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_seqs=8, budget=16, chunked=True):
    return Scheduler(BlockManager(num_blocks, block_size), max_seqs, budget, chunked)


def add(s: Scheduler, rid: str, n: int, arrival: int) -> Sequence:
    seq = Sequence(rid, list(range(n)), n, SamplingParams(), arrival)
    s.add(seq)
    return seq


def advance(batch) -> None:
    """What the engine does after the model ran: mark computed, append a sampled token where due."""
    for seq, n in batch.prefills:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
    for seq in batch.decodes:
        seq.num_computed_tokens += 1
        seq.token_ids.append(7)


def test_long_prompt_is_chunked_under_the_token_budget():
    s = make(budget=16)
    a = add(s, "a", 40, 0)
    chunks = []
    for _ in range(3):
        batch = s.schedule()
        chunks.append([(q.request_id, n) for q, n in batch.prefills])
        advance(batch)
    assert chunks == [[("a", 16)], [("a", 16)], [("a", 8)]]
    assert a.num_output_tokens == 1
    batch = s.schedule()
    assert batch.decodes == [a] and not batch.prefills


def test_decodes_go_first_and_prefill_fills_the_rest_of_the_budget():
    s = make(budget=10)
    a = add(s, "a", 3, 0)
    advance(s.schedule())
    b = add(s, "b", 30, 1)
    batch = s.schedule()
    assert batch.decodes == [a]
    assert [(q.request_id, n) for q, n in batch.prefills] == [("b", 9)]
    assert batch.num_tokens == 10


def test_whole_prompt_mode_never_splits_a_prompt():
    s = make(budget=12, chunked=False)
    add(s, "a", 12, 0)
    add(s, "b", 12, 1)
    batch = s.schedule()
    assert [(q.request_id, n) for q, n in batch.prefills] == [("a", 12)]
    advance(batch)
    batch = s.schedule()
    assert [(q.request_id, n) for q, n in batch.prefills] == []  # 1 decode + 12 > 12 budget: b waits whole
    assert len(batch.decodes) == 1


def test_max_num_seqs_bounds_the_running_set():
    s = make(max_seqs=2, budget=100)
    for i in range(4):
        add(s, f"r{i}", 3, i)
    batch = s.schedule()
    assert len(batch.prefills) == 2 and len(s.waiting) == 2


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    s = make(num_blocks=4, block_size=4, budget=64)
    a = add(s, "a", 8, 0)   # 2 blocks
    b = add(s, "b", 7, 1)   # 2 blocks
    advance(s.schedule())
    assert s.blocks.num_free_blocks == 0
    # b's output fills its last block; a needs a 3rd block for token 9: b (newest) is preempted.
    batch = s.schedule()
    assert batch.preempted == [b] and batch.decodes == [a]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert s.waiting[0] is b and s.num_preemptions == 1
    advance(batch)
    s.finish(a, "stop")
    batch = s.schedule()
    assert [(q.request_id, n) for q, n in batch.prefills] == [("b", 8)]  # prompt + its output, recomputed


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_newest():
    s = make(num_blocks=3, block_size=4, budget=64)
    a = add(s, "a", 4, 0)
    b = add(s, "b", 8, 1)
    advance(s.schedule())
    batch = s.schedule()  # both need a new block, one is free: a gets it, b is preempted
    assert batch.decodes == [a] and batch.preempted == [b]


def test_finish_frees_blocks_from_either_queue():
    s = make(num_blocks=8, budget=4)
    a = add(s, "a", 10, 0)
    b = add(s, "b", 10, 1)
    s.schedule()
    s.finish(a, "abort")
    s.finish(b, "abort")
    assert s.blocks.num_free_blocks == 8 and not s.has_unfinished()
    assert a.finish_reason == "abort"
