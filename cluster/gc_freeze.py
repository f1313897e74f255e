"""Keeps a serving process's full garbage collections short: what it loaded at start-up is left out of them.

CPython's full (generation 2) collection walks every container object the collector tracks, holding the GIL, so
every thread of the process waits: in a decode worker, its decode steps and the KV stream it is receiving. A loaded
worker tracks about 200k objects (torch, triton, gRPC, Ray, the model's modules) that live as long as the process,
and one full collection of them took 85-95 ms on a 2-core machine like CI's; one that fell inside an 8192-token int4
KV transfer made it 433 ms instead of about 365 (benchmarks/results/2026-12-07-kv-transfer-gc-pauses-cpu.md).
Full collections come every so often from ordinary allocation churn (each chunk received makes tuples and sets).

`freeze_startup_objects()` collects once, then moves every object alive to CPython's permanent generation
(`gc.freeze`), which collections skip: the same process's full collection then took about 0.01 ms. Reference
counting still frees those objects; only reference cycles among them are never collected, which is why this is
for what a process loads once and keeps (vLLM freezes its heap after start-up for the same reason). At exit they
are handed back (`gc.unfreeze`), so that the interpreter's shutdown finalizes them as usual (nanobind reports
triton's objects as leaked otherwise).
"""
from __future__ import annotations

import atexit
import gc


def freeze_startup_objects() -> int:
    """Collects the garbage start-up left, then freezes every object alive now out of later collections (module
    docstring); returns how many objects are frozen in all. Call it once the process holds what it serves (the
    model loaded, the servers started); a later call also freezes what came since."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # one hand-back at exit however many calls
    atexit.register(gc.unfreeze)
    return gc.get_freeze_count()
