"""Choosing workers from their load reports (pure functions; the router calls them per request).

Each worker's score, lower is better:

    score = max(requests this router has on it, running + waiting it reported) + waiting + 4 * kv_usage

(waiting requests count twice: they are queue time in front of the new one; a nearly full KV cache is
worth about four requests, since it preempts). A prefill/decode pair is the best prefill worker and the
best decode worker among those whose free KV blocks hold the request (any decode worker when none does); the
prefill worker falls back on the next decode workers in the same order (`decode_alternates`) when the chosen
one does not take the KV.
"""
from __future__ import annotations

from typing import Sequence

from partita.cluster.gateway_engine import WorkerLoad

KV_USAGE_WEIGHT = 4.0


def worker_score(load: WorkerLoad, num_local: int) -> float:
    """Lower is better (module docstring); num_local: requests this router has in flight there."""
    reported = load.num_running + load.num_waiting
    return max(num_local, reported) + load.num_waiting + KV_USAGE_WEIGHT * load.kv_cache_usage


def pick_worker(loads: Sequence[WorkerLoad], num_local: dict[str, int], excluded: set[str] = frozenset(),
                tiebreak: int = 0) -> str | None:
    """The worker_id to send the next request to, among `loads` not in `excluded`; None if there is none.
    Equal scores rotate with `tiebreak`."""
    candidates = [x for x in loads if x.worker_id not in excluded]
    if not candidates:
        return None
    scored = sorted(candidates, key=lambda x: (worker_score(x, num_local.get(x.worker_id, 0)), x.worker_id))
    best = worker_score(scored[0], num_local.get(scored[0].worker_id, 0))
    ties = [x for x in scored if worker_score(x, num_local.get(x.worker_id, 0)) == best]
    return ties[tiebreak % len(ties)].worker_id


def pick_pair(prefills: Sequence[WorkerLoad], decodes: Sequence[WorkerLoad], num_local: dict[str, int],
              excluded: set[str] = frozenset(), tiebreak: int = 0, blocks_needed: int = 0
              ) -> tuple[str, str] | None:
    """(prefill worker_id, decode worker_id) for a PD request, or None when either side has no candidate.
    Decode workers with at least `blocks_needed` free KV blocks come first (module docstring)."""
    prefill = pick_worker(prefills, num_local, excluded, tiebreak)
    roomy = [x for x in decodes if x.num_free_blocks >= blocks_needed]
    decode = pick_worker(roomy, num_local, excluded, tiebreak) or pick_worker(decodes, num_local, excluded, tiebreak)
    return None if prefill is None or decode is None else (prefill, decode)


def decode_alternates(decodes: Sequence[WorkerLoad], num_local: dict[str, int], chosen: str,
                      excluded: set[str] = frozenset(), blocks_needed: int = 0, limit: int = 2) -> list[str]:
    """Up to `limit` decode workers other than `chosen` (and not excluded), in the order the pair's choice ranks
    them: those with room for `blocks_needed` blocks first, then by score."""
    candidates = [x for x in decodes if x.worker_id != chosen and x.worker_id not in excluded]
    ranked = sorted(candidates, key=lambda x: (x.num_free_blocks < blocks_needed,
                                               worker_score(x, num_local.get(x.worker_id, 0)), x.worker_id))
    return [x.worker_id for x in ranked[:limit]]
