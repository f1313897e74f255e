"""scatter_copy and gather_copy (Triton; on CPU through the interpreter) against plain slice assignment and the
memmove references."""
import pytest
import torch

from partita.kernels.scatter_copy import (BLOCK, gather_copy, gather_copy_reference, scatter_copy, scatter_copy_reference,
                                         warm_up, warm_up_gather, word_dtype)


def make_case(device: str, word: torch.dtype, seed: int = 0):
    """Destinations of several sizes, a source, and a table writing pieces of the source into them; returns the
    destinations, source, table, max count and the expected destinations (slice assignment)."""
    g = torch.Generator().manual_seed(seed)
    dests = [torch.zeros(n, dtype=word) for n in (7, 40, 2 * BLOCK + 300, 5)]
    source = torch.randint(-100, 100, (3 * BLOCK + 64,), generator=g).to(word)
    pieces = [(0, 0, 7, 3), (1, 10, 30, 100), (2, 0, 2 * BLOCK + 300, 50), (3, 1, 4, 0), (1, 0, 10, 3 * BLOCK)]
    expected = [d.clone() for d in dests]
    for d, at, count, offset in pieces:
        expected[d][at:at + count] = source[offset:offset + count]
    dests = [d.to(device) for d in dests]
    source = source.to(device)
    size = source.element_size()
    table = torch.tensor([[dests[d].data_ptr() + at * size, offset, count] for d, at, count, offset in pieces],
                         dtype=torch.int64, device=device)
    return dests, source, table, max(p[2] for p in pieces), expected


@pytest.mark.parametrize("word", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("max_words", [None, 1])  # 1: one tile per entry, so long copies loop
def test_equals_slice_assignment_and_reference(word, max_words):
    dests, source, table, longest, expected = make_case("cpu", word)
    scatter_copy(source, table, longest if max_words is None else max_words)
    for got, want in zip(dests, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref_dests, ref_source, ref_table, _, _ = make_case("cpu", word)
    scatter_copy_reference(ref_source, ref_table)
    for got, want in zip(ref_dests, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_byte_views_of_typed_tensors():
    """The KV use: bytes of bf16 / int8 parts written through int64 words picked by word_dtype."""
    part_a = torch.zeros(4, 16, dtype=torch.bfloat16)
    part_b = torch.zeros(4, 8, dtype=torch.uint8)
    rows = torch.randint(0, 256, (2, 32 + 8), dtype=torch.uint8)
    dtype = word_dtype([part_a.data_ptr(), part_b.data_ptr(), 32, 8, 40])
    assert dtype == torch.int64
    source = rows.view(-1).view(dtype)
    entries = []
    for r, block in enumerate((3, 1)):
        entries.append([part_a.data_ptr() + block * 32, (r * 40) // 8, 32 // 8])
        entries.append([part_b.data_ptr() + block * 8, (r * 40 + 32) // 8, 8 // 8])
    scatter_copy(source, torch.tensor(entries, dtype=torch.int64), 4)
    for r, block in enumerate((3, 1)):
        assert torch.equal(part_a[block].view(torch.uint8), rows[r, :32])
        assert torch.equal(part_b[block], rows[r, 32:])
    assert not part_a[0].any() and not part_a[2].any() and not part_b[0].any() and not part_b[2].any()


@pytest.mark.parametrize("word", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_warm_up_launches_at_both_alignments(word):
    warm_up(word, torch.device("cpu"))  # a launch with nothing to copy; on a GPU it compiles both variants


def test_word_dtype():
    assert word_dtype([16, 4096, 256]) == torch.int64
    assert word_dtype([16, 4, 8]) == torch.int32
    assert word_dtype([6, 4]) == torch.int16
    assert word_dtype([8, 3]) == torch.uint8
    assert word_dtype([]) == torch.int64


def test_bad_inputs_name_the_problem():
    source = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="source must be"):
        scatter_copy(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="source must be"):
        scatter_copy(torch.zeros(8), torch.zeros(1, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="table must be"):
        scatter_copy(source, torch.zeros(1, 2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="table must be"):
        scatter_copy(source, torch.zeros(1, 3, dtype=torch.int32), 1)
    dest = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="reads outside"):
        scatter_copy_reference(source, torch.tensor([[dest.data_ptr(), 6, 4]]))
    assert not dest.any()
    scatter_copy(source, torch.zeros(0, 3, dtype=torch.int64), 0)  # nothing to copy is not an error


@pytest.mark.gpu
@pytest.mark.parametrize("word", [torch.int64, torch.uint8])
def test_cuda_equals_slice_assignment(word):
    dests, source, table, longest, expected = make_case("cuda", word, seed=1)
    scatter_copy(source, table, longest)
    for got, want in zip(dests, expected):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def make_gather_case(device: str, word: torch.dtype, seed: int = 0):
    """Sources of several sizes, a destination, and a table reading pieces of the sources into it; returns the
    destination (pre-filled, so untouched words are checked), sources, table, max count and the expected
    destination (slice assignment)."""
    g = torch.Generator().manual_seed(seed)
    sources = [torch.randint(-100, 100, (n,), generator=g).to(word) for n in (9, 2 * BLOCK + 300, 5, 3 * BLOCK)]
    dest = torch.full((5 * BLOCK + 400,), 7, dtype=word)
    end = 2 * BLOCK + 330  # pieces after the long one
    pieces = [(0, 2, 7, 1), (1, 0, 2 * BLOCK + 300, 20), (2, 1, 4, end), (3, 5, 3 * BLOCK - 5, end + 10),
              (0, 0, 0, 3)]  # (source, first word, count, offset in dest)
    expected = dest.clone()
    for src, at, count, offset in pieces:
        expected[offset:offset + count] = sources[src][at:at + count]
    sources = [t.to(device) for t in sources]
    dest = dest.to(device)
    size = dest.element_size()
    table = torch.tensor([[sources[src].data_ptr() + at * size, offset, count] for src, at, count, offset in pieces],
                         dtype=torch.int64, device=device)
    return dest, sources, table, max(p[2] for p in pieces), expected


@pytest.mark.parametrize("word", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("max_words", [None, 1])
def test_gather_equals_slice_assignment_and_reference(word, max_words):
    dest, sources, table, longest, expected = make_gather_case("cpu", word)
    gather_copy(dest, table, longest if max_words is None else max_words)
    torch.testing.assert_close(dest, expected, rtol=0, atol=0)
    ref_dest, ref_sources, ref_table, _, _ = make_gather_case("cpu", word)
    gather_copy_reference(ref_dest, ref_table)
    torch.testing.assert_close(ref_dest, expected, rtol=0, atol=0)


@pytest.mark.parametrize("word", [torch.int64, torch.uint8])
def test_warm_up_gather(word):
    warm_up_gather(word, torch.device("cpu"))


def test_gather_bad_inputs_name_the_problem():
    source = torch.arange(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="dest must be"):
        gather_copy(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="table must be"):
        gather_copy(torch.zeros(8, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int32), 1)
    dest = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="writes outside"):
        gather_copy_reference(dest, torch.tensor([[source.data_ptr(), 2, 4]]))
    assert not dest.any()


@pytest.mark.gpu
@pytest.mark.parametrize("word", [torch.int64, torch.uint8])
def test_cuda_gather_equals_slice_assignment(word):
    dest, sources, table, longest, expected = make_gather_case("cuda", word, seed=1)
    gather_copy(dest, table, longest)
    torch.testing.assert_close(dest.cpu(), expected, rtol=0, atol=0)
