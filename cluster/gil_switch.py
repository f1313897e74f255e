"""Lets a worker's engine thread take the GIL back sooner from the threads beside it that keep it busy.

A thread that gives the GIL up long enough for another to take it (waiting for the GPU, for a queue, for a
lock) and then wants it back waits until the holder gives it up too, or until the holder has run for the
interpreter's switch interval (5 ms by default) and is made to. An engine step does so at least once (it waits
for the GPU to hand back the sampled tokens), and in a worker the event loop's thread (gRPC and Ray streams:
grpcio copies each received message twice, in Python objects) and the KV checksum and staging threads run
Python for long stretches while KV moves. (Short releases, such as a kernel launch, rarely lose the GIL: the
releasing thread takes it back before another wakes.) On the 2-core development machine a thread waking
every 0.5 ms next to a thread copying 4 MiB messages in a loop woke 5.5 ms late at the default interval and 1.0
ms late at 0.5 ms (a copy in progress is not cut short); next to isal's crc32, which releases the GIL, 0.1 ms
either way. Serving PD over gRPC on one H100 (Llama-3-8B, bf16 KV, 16 req/s offered), all processes at 0.5 ms
against the default, one run each in one call: 6.63 against 6.16 req/s, TPOT p50 40.6 against 49.5 ms, ITL p99
114 against 162 ms (benchmarks/results/2026-12-07-gil-switch-autotune-cache-h100.md). KV transfer throughput
alone showed no change at 0.5 ms (2026-12-07-kv-transfer-timeline-h100.md). The cost: every thread, the engine's
included, is made to hand the GIL over more often while it runs Python (beside the copying thread, a decode
step's input staging took 0.98 ms instead of 0.75 at the default; the waits saved are up to 4.5 ms each).
"""
from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0005


def shorten_gil_switch_interval() -> float:
    """Sets this process's switch interval to SWITCH_INTERVAL_S (module docstring); returns the one before."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return before
