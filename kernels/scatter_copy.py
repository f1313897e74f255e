"""Many small copies in one launch, in either direction: the decode side's write of received KV blocks
(`scatter_copy`, `workers/kv_import.py`) and the prefill side's gather of a request's KV for export (`gather_copy`,
`workers/kv_migration.py`).

Operation of `scatter_copy`, for every entry e of `table`:
    dst, offset, count = table[e]
    the `count` words source[offset : offset + count]  ->  the `count` words starting at byte address dst
Operation of `gather_copy`, for every entry e of `table`:
    src, offset, count = table[e]
    the `count` words starting at byte address src  ->  dest[offset : offset + count]
A *word* is the contiguous tensor's element: int64, int32, int16 or uint8 (`word_dtype` picks the widest one that
every byte address, offset and size of a set of copies divides, so each copy moves whole 8-byte words where it
can).

Shapes and dtypes: source / dest [N] (1-D, contiguous, a word dtype); table [E, 3] int64 (byte address, offset in
words into source / dest, words to copy), on the same device. Addresses must be live memory of that device that
nothing else writes meanwhile (the caller takes them from its own tensors); a scatter's destinations must not
overlap source or each other, a gather's sources must not overlap dest; entries are copied in no particular order.

Why: a chunk of KV blocks spans a few layers, and each layer's cache has several parts (codes, scales, zero
points); torch needs one indexed copy per (layer, part), each one a Python call that gives the GIL up and takes
it back while the event loop receiving or sending chunks wants it. One launch replaces them.

Grid: (E, tiles); program (e, t) copies tiles t, t + tiles, ... of BLOCK words of entry e, so any count is
copied whole whatever `max_words` said (it only sets how many programs share a long copy).
`scatter_copy_reference` and `gather_copy_reference` do the same with one host memmove per entry (CPU tensors
only). `warm_up` and `warm_up_gather` compile the kernels ahead of their first use.
"""
from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

BLOCK = 1024  # words per tile
_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


# A table may be a slice that starts on any entry (an export gathered in pieces); its entries are read as scalars,
# so its alignment gains nothing and would only make Triton compile a second variant on first use.
@triton.jit(do_not_specialize_on_alignment=["table_ptr"])
def _copy_kernel(buf_ptr, table_ptr, GATHER: tl.constexpr, BLOCK: tl.constexpr):
    """Entry e = program_id(0): table[e] = (byte address, offset, count) moves count words from buf[offset:] to
    the address (scatter) or from the address to buf[offset:] (GATHER)."""
    e = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    address = tl.load(table_ptr + 3 * e).to(tl.pointer_type(buf_ptr.dtype.element_ty))
    offset = tl.load(table_ptr + 3 * e + 1)
    count = tl.load(table_ptr + 3 * e + 2)
    if GATHER:
        src, dst = address, buf_ptr + offset
    else:
        src, dst = buf_ptr + offset, address
    for start in range(t * BLOCK, count, tl.num_programs(1) * BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < count
        tl.store(dst + i, tl.load(src + i, mask=mask), mask=mask)


def word_dtype(byte_quantities) -> torch.dtype:
    """The widest word (int64 down to uint8) whose size divides every address, offset and size given."""
    size = 8
    for q in byte_quantities:
        while int(q) % size:
            size //= 2
    return _WORD_DTYPES[size]


def _check(words: torch.Tensor, table: torch.Tensor, name: str = "source") -> None:
    if words.dim() != 1 or not words.is_contiguous() or words.dtype not in _WORD_DTYPES.values():
        raise ValueError(f"{name} must be a contiguous 1-D tensor of {list(_WORD_DTYPES.values())}; got "
                         f"shape {tuple(words.shape)}, {words.dtype}")
    if table.dim() != 2 or table.shape[1] != 3 or table.dtype != torch.int64 or not table.is_contiguous():
        raise ValueError(f"table must be a contiguous [E, 3] int64 tensor; got {tuple(table.shape)}, {table.dtype}")
    if table.device != words.device:
        raise ValueError(f"table is on {table.device}, {name} on {words.device}")


def _tiles(max_words: int) -> int:
    return max(1, min(triton.cdiv(max_words, BLOCK), 64))


def scatter_copy(source: torch.Tensor, table: torch.Tensor, max_words: int) -> None:
    """Runs every copy of `table` (module docstring) in one launch; max_words: the largest count (or less), which
    only sizes the grid. Needs CUDA tensors (or TRITON_INTERPRET=1)."""
    _check(source, table)
    if not table.shape[0]:
        return
    _copy_kernel[(table.shape[0], _tiles(max_words))](source, table, GATHER=False, BLOCK=BLOCK)


def gather_copy(dest: torch.Tensor, table: torch.Tensor, max_words: int) -> None:
    """Runs every copy of `table` into dest (module docstring) in one launch; max_words: the largest count (or
    less), which only sizes the grid. Needs CUDA tensors (or TRITON_INTERPRET=1)."""
    _check(dest, table, "dest")
    if table.shape[0]:
        _copy_kernel[(table.shape[0], _tiles(max_words))](dest, table, GATHER=True, BLOCK=BLOCK)


def warm_up(word: torch.dtype, device: torch.device) -> None:
    """Launches the kernel once with nothing to copy, from a source that starts on a 16-byte boundary and from
    one that does not: Triton compiles a kernel for each on its first launch (on a GPU about a second), which
    would otherwise fall inside the first transfer. Needs CUDA (or TRITON_INTERPRET=1)."""
    buf = torch.zeros(32, dtype=torch.uint8, device=device)
    table = torch.tensor([[buf.data_ptr(), 0, 0]], dtype=torch.int64, device=device)
    for start in (0, 8):
        scatter_copy(buf[start:start + 16].view(word), table, 1)


def scatter_copy_reference(source: torch.Tensor, table: torch.Tensor) -> None:
    """The same copies, one host memmove each; CPU tensors only."""
    _memmove_each(source, table, "source", gather=False)


def warm_up_gather(word: torch.dtype, device: torch.device) -> None:
    """Launches `gather_copy` once with nothing to copy into a fresh (aligned) buffer, as exports gather into,
    so that Triton compiles it before the first export. Needs CUDA (or TRITON_INTERPRET=1)."""
    buf = torch.zeros(2, dtype=word, device=device)
    gather_copy(buf, torch.tensor([[buf.data_ptr(), 0, 0]], dtype=torch.int64, device=device), 1)


def gather_copy_reference(dest: torch.Tensor, table: torch.Tensor) -> None:
    """The same copies as `gather_copy`, one host memmove each; CPU tensors only."""
    _memmove_each(dest, table, "dest", gather=True)


def _memmove_each(words: torch.Tensor, table: torch.Tensor, name: str, gather: bool) -> None:
    _check(words, table, name)
    if words.device.type != "cpu":
        raise ValueError(f"the references copy host memory; {name} must be on the CPU")
    size = words.element_size()
    for address, offset, count in table.tolist():
        if offset < 0 or count < 0 or offset + count > words.numel():
            raise ValueError(f"entry ({address:#x}, {offset}, {count}) {'writes' if gather else 'reads'} outside "
                             f"{name}'s {words.numel()} words")
        here = words.data_ptr() + offset * size
        ctypes.memmove(here if gather else address, address if gather else here, count * size)
