"""A prefill worker's reservation on the decode worker, made while the request's prefill computes.

A decode worker reserves blocks for a migrated request on its engine thread, between two of its steps, so a
Reserve sent after the prefill waits for the step in progress there before the first chunk can go. Sent when
the prefill worker's engine first schedules the request's prefill (`Engine.on_scheduled`), it runs beside the
prefill's forward pass instead, as SGLang's decode-side preallocation does. Only requests being computed reserve,
not every queued one: a backlog on the prefill worker does not hold the decode worker's KV.

The reservation is a head start, never a requirement: a refused or failed Reserve is logged and the migration
reserves as before; one whose ttl ran out fails its first attempt, and the retry reserves anew. A reservation
nobody claimed (the first token ended the request, the caller left, the migration never began) is aborted.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from partita.cluster.kv_transfer_client import AttemptFailed, abort_transfer, reserve
from partita.protos.partita.v1 import kv_transfer_pb2 as pb, kv_transfer_pb2_grpc
from partita.workers.kv_migration import KvLayout

log = logging.getLogger(__name__)


class EarlyReservation:
    """One request's reservation on the decode worker behind `channel`: `begin` from any thread (the engine's),
    then `claim` or `drop` on the event loop the object was made on."""

    def __init__(self, channel: grpc.aio.Channel, request_id: str, layout: KvLayout, *, model: str, sender_id: str,
                 spawn: Callable[[asyncio.Future], None]):
        self._channel, self._request_id, self._layout = channel, request_id, layout
        self._model, self._sender_id, self._spawn = model, sender_id, spawn
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        self._claimed = False

    def begin(self, prompt_token_ids: list[int]) -> None:
        """Sends the Reserve (from any thread; the request's prompt, as its prefill computes it)."""
        try:
            self._loop.call_soon_threadsafe(self._start, prompt_token_ids)
        except RuntimeError:  # the loop has closed (the worker is shutting down): nothing to reserve for
            pass

    def _start(self, prompt_token_ids: list[int]) -> None:
        if self._task is None and not self._claimed:
            self._task = self._loop.create_task(self._reserve(prompt_token_ids))

    async def _reserve(self, prompt_token_ids: list[int]) -> pb.ReserveResponse | None:
        try:
            return await reserve(self._channel, self._request_id, prompt_token_ids, self._layout, model=self._model,
                                 sender_id=self._sender_id)
        except AttemptFailed as e:
            log.info("reserving early for %s failed (%s); the migration reserves instead", self._request_id,
                     e.message)
            return None

    async def claim(self) -> pb.ReserveResponse | None:
        """The reservation, for the migration to use (it then uses or aborts it); None when there is none. Waits
        for a Reserve in flight."""
        self._claimed = True
        task, self._task = self._task, None
        if task is None:
            return None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._spawn(asyncio.ensure_future(self._abort(task)))
            raise

    def drop(self) -> None:
        """Aborts an unclaimed reservation (in the background, once its Reserve has answered)."""
        self._claimed = True
        task, self._task = self._task, None
        if task is not None:
            self._spawn(asyncio.ensure_future(self._abort(task)))

    async def _abort(self, task: asyncio.Task) -> None:
        reserved = await task
        if reserved is not None:
            await abort_transfer(kv_transfer_pb2_grpc.KvTransferStub(self._channel), reserved.transfer_id,
                                 "the request needs no migration")
