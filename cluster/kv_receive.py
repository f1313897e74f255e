"""The receiving side of KV chunks (`kv_transfer_server.py`): how Send/SendStream read them, check them and
pass them through a two-stage pipeline.

`add_kv_transfer_servicer` registers the servicer so that chunks are read with `kv_wire.decode_chunk` (payload
data stays a view of the received message). `check_chunk` is what a chunk must satisfy before any of its
payloads' bytes is looked at.

`ChunkPipeline`: each chunk passes `admit` (on the event loop, in order, one at a time: the checks that need
no pass over the data) and then `store` (checksums and the write on a worker thread). Up to
`depth` chunks are in the second stage at once, so that the event loop reads and admits the next chunk (gRPC's
reassembly of a message is the receiver's largest cost on the loop) while the ones before it are checksummed
and written, instead of waiting for each in turn. Chunks come out of `stored` in order, each only once stored:
an ack still means "written". At most `depth` chunks in the second stage plus the one being read are held.
"""
from __future__ import annotations

import asyncio
import collections
from typing import AsyncIterator, Awaitable, Callable, Generic, Sequence, TypeVar

import grpc
from google.protobuf import descriptor_pb2, message_factory

from partita.cluster.kv_wire import crc32, decode_chunk
from partita.protos.partita.v1 import kv_transfer_pb2 as pb, kv_transfer_pb2_grpc
from partita.workers.kv_migration import KvLayout

C = TypeVar("C")  # a chunk as read from the stream
A = TypeVar("A")  # what admit made of it, handed to store

Block = tuple[int, int, int, memoryview, int]  # a payload as received: layer, block_index, blocks, data, crc32


def add_kv_transfer_servicer(servicer: kv_transfer_pb2_grpc.KvTransferServicer, server: grpc.aio.Server) -> None:
    """`kv_transfer_pb2_grpc.add_KvTransferServicer_to_server`, except that Send and SendStream read their chunks
    with `kv_wire.decode_chunk` (the payloads stay views of the received bytes: no copy by protobuf)."""
    service = pb.DESCRIPTOR.services_by_name["KvTransfer"]
    described = descriptor_pb2.ServiceDescriptorProto()
    service.CopyToProto(described)  # the streaming flags: not attributes of every protobuf's MethodDescriptor
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {}
    for method in described.method:
        types = service.methods_by_name[method.name]
        request = message_factory.GetMessageClass(types.input_type)
        response = message_factory.GetMessageClass(types.output_type)
        handlers[method.name] = kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=decode_chunk if request is pb.KvChunk else request.FromString,
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def check_chunk(seq: int, expected_seq: int, blocks: Sequence[Block], max_bytes: int, layout: KvLayout,
                num_tokens: int, received: set[tuple[int, int]]) -> str | None:
    """What is wrong with a chunk for a transfer of num_tokens tokens that has `received` (layer, block_index)
    already, or None: its seq must be the expected one, its payloads at most max_bytes in all, each a run of
    the request's blocks or a layer's state, none of it received before or twice in the chunk, with exactly
    its size. The checksums are not looked at."""
    if seq != expected_seq:
        return f"seq out of order, expected {expected_seq}"
    size = sum(len(data) for _, _, _, data, _ in blocks)
    if size > max_bytes:
        return f"{size} bytes exceed max_chunk_bytes={max_bytes}"
    num_blocks, state_bytes = layout.num_blocks(num_tokens), layout.state_bytes(num_tokens)
    seen: set[tuple[int, int]] = set()
    for layer, index, count, data, _ in blocks:
        what = f"payload (layer {layer}, block {index}, {count} blocks)"
        is_state = bool(state_bytes) and index == num_blocks and count == 1
        if not 0 <= layer < layout.num_layers or not (is_state or index + count <= num_blocks):
            return f"{what} is not part of the transfer"
        keys = {(layer, i) for i in range(index, index + count)}
        if keys & received or keys & seen:
            return f"{what} was sent twice"
        seen |= keys
        want = state_bytes if is_state else count * layout.bytes_per_block
        if len(data) != want:
            return f"{what} has {len(data)} bytes, expected {want}"
    return None


class ChunkPipeline(Generic[C, A]):
    """Reads `chunks` through admit then store (module docstring); `stored` yields admit's results in order."""

    def __init__(self, chunks: AsyncIterator[C], admit: Callable[[C], Awaitable[A]],
                 store: Callable[[A], Awaitable[None]], depth: int):
        self._chunks, self._admit, self._store, self._depth = chunks, admit, store, depth
        self._reading: asyncio.Task | None = None
        self._stores: collections.deque[tuple[A, asyncio.Task]] = collections.deque()

    async def stored(self) -> AsyncIterator[A]:
        """Each admitted chunk once stored, in order; the first failure of either stage is raised."""
        ended = False
        while True:
            if self._reading is None and not ended and len(self._stores) < self._depth:
                self._reading = asyncio.ensure_future(_next(self._chunks))
            head = self._stores[0][1] if self._stores else None
            waiting = [f for f in (head, self._reading) if f is not None]
            if not waiting:
                return
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if head is not None and head.done():
                admitted, _ = self._stores.popleft()
                head.result()
                yield admitted
            elif self._reading is not None and self._reading.done():
                chunk, self._reading = self._reading.result(), None
                if chunk is None:
                    ended = True
                    continue
                admitted = await self._admit(chunk)
                self._stores.append((admitted, asyncio.ensure_future(self._store(admitted))))

    def close(self) -> bool:
        """Stops reading and cancels the stores in flight (call once, in a finally); True when an admitted chunk
        was not stored (cancelled or failed): the transfer then holds unwritten blocks and must be dropped."""
        if self._reading is not None:
            self._reading.cancel()
        unstored = False
        for _, task in self._stores:
            unstored = unstored or not task.done() or task.cancelled() or task.exception() is not None
            task.cancel()
        self._stores.clear()
        return unstored


async def _next(chunks: AsyncIterator[C]) -> C | None:
    return await anext(chunks, None)


def first_bad_crc(blocks: Sequence[Block]) -> tuple[int, int] | None:
    """(layer, block_index) of the first payload whose data does not match its crc32, or None. For a worker
    thread: crc32 releases the GIL on large buffers."""
    for layer, index, _, data, crc in blocks:
        if crc32(data) != crc:
            return layer, index
    return None
