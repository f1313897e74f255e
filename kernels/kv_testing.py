"""Synthetic paged batches for kernel tests and benchmarks.

`make_paged_batch` places sequences of the given lengths on pages drawn from a shuffled pool (so
consecutive blocks of a sequence are scattered in memory), fills unused block-table entries with
arbitrary ids, and gives each sequence a shuffled `seq_slot`. `outlier_kv` makes keys the way
KIVI and QServe describe real ones: a few fixed channels per head carry a large offset (same sign
for every token) and a wider spread, the rest are unit noise; values have no outlier channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    """Paging metadata of a batch of sequences (shapes as in `kv_base`)."""

    block_size: int
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    seq_slots: torch.Tensor  # [num_seqs] int32

    def slots(self, b: int, start: int, end: int) -> torch.Tensor:
        """Slots of positions start..end-1 of sequence b: [end - start] int64."""
        pos = torch.arange(start, end, device=self.block_tables.device)
        blk = self.block_tables[b, pos // self.block_size].long()
        return blk * self.block_size + pos % self.block_size

    def write_plan(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """slot_mapping [T], token seq slots [T] and cu_seqlens [num_seqs + 1] (int32) of the
        tokens from position starts[b] to the end of every sequence, sequence after sequence."""
        lens = self.context_lens.tolist()
        slots = [self.slots(b, s, n) for b, (s, n) in enumerate(zip(starts, lens))]
        seqs = [torch.full((n - s,), int(self.seq_slots[b]), dtype=torch.int32,
                           device=self.block_tables.device)
                for b, (s, n) in enumerate(zip(starts, lens))]
        counts = torch.tensor([0] + [n - s for s, n in zip(starts, lens)])
        cu = torch.cumsum(counts, 0).to(torch.int32).to(self.block_tables.device)
        return torch.cat(slots), torch.cat(seqs), cu


def make_paged_batch(context_lens: list[int], block_size: int, *, num_blocks: int | None = None,
                     max_num_seqs: int | None = None, extra_table_cols: int = 1,
                     device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> PagedBatch:
    """Sequences on shuffled pages of a pool of `num_blocks` (default: what they need + 25%)."""
    need = [-(-n // block_size) for n in context_lens]
    num_blocks = num_blocks or max(1, int(sum(need) * 1.25) + 1)
    if num_blocks < sum(need):
        raise ValueError(f"num_blocks={num_blocks}: the sequences need {sum(need)}")
    pool = torch.randperm(num_blocks, generator=generator)
    cols = max(need) + extra_table_cols
    # unused entries hold arbitrary (but in-range) ids: kernels must not depend on them
    tables = torch.randint(0, num_blocks, (len(context_lens), cols), generator=generator)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = pool[used:used + n]
        used += n
    max_num_seqs = max_num_seqs or len(context_lens)
    seq_slots = torch.randperm(max_num_seqs, generator=generator)[:len(context_lens)]
    return PagedBatch(block_size, tables.to(torch.int32).to(device),
                      torch.tensor(context_lens, dtype=torch.int32, device=device),
                      seq_slots.to(torch.int32).to(device))


def outlier_kv(num_tokens: int, num_kv_heads: int, head_dim: int, *,
               num_outlier_channels: int = 4, outlier_scale: float = 10.0,
               dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [num_tokens, H, D]: keys N(0, 1) except `num_outlier_channels` channels per head with
    an offset of +-(0.5..1) * outlier_scale and twice the spread; values N(0, 1)."""
    shape = (num_tokens, num_kv_heads, head_dim)
    dev = generator.device if generator is not None else torch.device(device)
    k = torch.randn(shape, generator=generator, device=dev)
    v = torch.randn(shape, generator=generator, device=dev)
    for h in range(num_kv_heads):
        ch = torch.randperm(head_dim, generator=generator, device=dev)[:num_outlier_channels]
        sign = torch.randint(0, 2, (num_outlier_channels,), generator=generator, device=dev)
        size = 0.5 + 0.5 * torch.rand(num_outlier_channels, generator=generator, device=dev)
        k[:, h, ch] = 2 * k[:, h, ch] + (2 * sign - 1) * size * outlier_scale
    return k.to(dtype).to(device), v.to(dtype).to(device)


def output_errors(spec: str, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, *,
                  block_size: int = 64, impl: str = "auto",
                  write_impl: str | None = None) -> dict[str, float]:
    """Relative attention-output error ||o - o64|| / ||o64|| of one sequence stored in `spec`.

    k, v [L, H, D] are the true keys/values, q [1, Hq, D] the query at position L - 1, o64 the
    float64 attention over the true k, v. Returns the error of the decode kernel ("kernel") and of
    float64 attention with only the keys ("keys") or only the values ("values") dequantized.
    """
    from partita.kernels.kv_formats import get_kv_format
    from partita.kernels.paged_attention import paged_decode_attention
    from partita.kernels.paged_attention_ref import attention_reference

    fmt = get_kv_format(spec)
    length, h, d = k.shape
    group = q.shape[1] // h
    batch = make_paged_batch([length], block_size, device=k.device)
    cache = fmt.allocate(int(batch.block_tables.max()) + 1, block_size, h, d, k.dtype, k.device,
                         max_num_seqs=1)
    if fmt.name == "fp8":
        fmt.calibrate(cache, k, v)
    slots, seqs, _ = batch.write_plan([0])
    fmt.write(cache, k, v, slots, seqs, impl=write_impl or impl)
    out = paged_decode_attention(q, cache, batch.block_tables, batch.context_lens, d ** -0.5,
                                 seq_slots=batch.seq_slots, impl=impl)
    kq, vq = fmt.gather(cache, batch.block_tables[0].long(), length, int(batch.seq_slots[0]))

    def attend(kk, vv):
        kk = kk.double().repeat_interleave(group, 1)
        vv = vv.double().repeat_interleave(group, 1)
        return attention_reference(q.double(), kk, vv, d ** -0.5)
    truth = attend(k, v)

    def err(o):
        return ((o.double() - truth).norm() / truth.norm()).item()
    return {"kernel": err(out), "keys": err(attend(kq, v)), "values": err(attend(k, vq))}
