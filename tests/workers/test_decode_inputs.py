"""The staged inputs of a captured decode step (workers/engine/decode_inputs.py) against values computed here from
the sequences, padding rows included, after a larger batch left other values behind."""
import random

import torch

from partita.workers import SamplingParams
from partita.workers.engine.decode_inputs import ALIGN, DecodeInputs, input_layout
from partita.workers.engine.sequence import Sequence

BLOCK = 16


def make_seqs(count: int, rng: random.Random) -> list[Sequence]:
    seqs = []
    for i in range(count):
        length = rng.randint(1, 70)
        seq = Sequence(f"r{i}", [rng.randint(0, 500) for _ in range(length + 1)], length, SamplingParams(), i)
        seq.num_computed_tokens = length
        seq.block_table = rng.sample(range(200), -(-(length + 1) // BLOCK))
        seq.kv_slot = rng.randint(0, 7)
        seqs.append(seq)
    return seqs


def expected(seqs: list[Sequence], batch: int, width: int) -> dict[str, list]:
    pad = batch - len(seqs)
    pos = [s.num_computed_tokens for s in seqs]
    return {
        "token_ids": [s.token_ids[p] for s, p in zip(seqs, pos)] + [0] * pad,
        "positions": pos + [0] * pad,
        "slots": [s.block_table[p // BLOCK] * BLOCK + p % BLOCK for s, p in zip(seqs, pos)] + [-1] * pad,
        "mask": [1] * len(seqs) + [0] * pad,
        "lens": [p + 1 for p in pos] + [1] * pad,
        "seq_slots": [s.kv_slot for s in seqs] + [0] * pad,
        "tables": [s.block_table + [0] * (width - len(s.block_table)) for s in seqs] + [[0] * width] * pad,
    }


def test_staged_inputs_reach_the_device_views():
    rng = random.Random()
    batch, width = 8, 8
    inputs = DecodeInputs(batch, width, torch.device("cpu"))
    for count in (8, 3, 0, 5):  # fewer after more: the rows left behind must become padding
        seqs = make_seqs(count, rng)
        inputs.stage(seqs, BLOCK)
        inputs.upload()
        got = {name: t.tolist() for name, t in inputs.device.items()}
        assert got == expected(seqs, batch, width)


def test_fresh_inputs_are_all_padding():
    inputs = DecodeInputs(4, 8, torch.device("cpu"))
    assert {name: t.tolist() for name, t in inputs.device.items()} == expected([], 4, 8)


def test_every_input_starts_on_an_aligned_boundary_and_none_overlap():
    for batch, width in ((1, 8), (3, 8), (256, 512)):
        layout, nbytes = input_layout(batch, width)
        spans = []
        for offset, dtype, shape in layout.values():
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            assert offset % ALIGN == 0
            spans.append((offset, offset + size))
        spans.sort()
        assert all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:]))
        assert spans[-1][1] <= nbytes
        inputs = DecodeInputs(batch, width, torch.device("cpu"))
        assert all(t.data_ptr() % ALIGN == inputs.buffer.data_ptr() % ALIGN for t in inputs.device.values())
