"""Continuous batching with chunked prefill under a per-step token budget (Sarathi-Serve).

Each step first gives every running decode its one token, then continues running prefills, then admits
waiting requests, until `max_num_batched_tokens` or `max_num_seqs` is reached. When a running sequence
needs a block and none is free, the most recently arrived running sequence is preempted: its blocks are
freed and it returns to the front of the waiting queue, to be recomputed (prompt + output so far).

Prefill/decode disaggregation parks sequences in `held`: they keep their blocks and sequence slot but are
never scheduled (a prefilled request whose KV is being exported, a reservation receiving migrated KV). They
count against max_num_seqs, since each holds one of its sequence slots.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from partita.workers.engine.block_manager import BlockManager
from partita.workers.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """What one step computes: prefill chunks (sequence, token count) first, then single-token decodes."""

    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.held: dict[str, Sequence] = {}
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[str] = set()
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or not _is_decode(seq) or budget <= 0:
                continue
            if self._reserve(seq, seq.num_computed_tokens + 1, scheduled, batch):
                batch.decodes.append(seq)
                scheduled.add(seq.request_id)
                budget -= 1
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.request_id in scheduled or budget <= 0:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, seq.num_computed_tokens + n, scheduled, batch):
                batch.prefills.append((seq, n))
                scheduled.add(seq.request_id)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) + len(self.held) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_uncomputed_tokens
            if n > budget:
                if not self.chunked:
                    break  # without chunking a prompt is prefilled whole (the engine keeps budget >= max_model_len)
                n = budget
            if not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                break
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.prefills.append((seq, n))
            budget -= n
        return batch

    def _reserve(self, seq: Sequence, num_tokens: int, scheduled: set[str], batch: ScheduledBatch) -> bool:
        """Allocates slots for seq's first num_tokens tokens, preempting the newest unscheduled running
        sequences as needed; returns False if seq itself had to be preempted."""
        while not self.blocks.can_allocate(seq, num_tokens):
            victims = [s for s in self.running if s.request_id not in scheduled]
            victim = victims[-1]
            self.preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def has_seq_room(self) -> bool:
        """Whether one more sequence may hold blocks (a sequence slot is free for it)."""
        return len(self.running) + len(self.held) < self.max_num_seqs and bool(self.blocks.free_seq_slots)

    def hold(self, seq: Sequence) -> None:
        """Parks seq (running, or new with its blocks allocated) in `held`: its blocks stay, it is not scheduled."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        seq.status = Status.HELD
        self.held[seq.request_id] = seq

    def resume(self, seq: Sequence) -> None:
        """Moves a held sequence back into the running set; the next step continues it from num_computed_tokens."""
        del self.held[seq.request_id]
        seq.status = Status.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Removes seq from whichever queue holds it and frees its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.HELD:
            del self.held[seq.request_id]
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason


def _is_decode(seq: Sequence) -> bool:
    return seq.num_computed_tokens > 0 and seq.num_uncomputed_tokens == 1
