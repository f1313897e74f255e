"""gRPC server reflection (`grpc.reflection.v1alpha.ServerReflection`), so grpcurl and grpcui can list
and call partita's services without the `.proto` files. Answers from the default descriptor pool, where
the generated modules registered themselves.
"""
from __future__ import annotations

from typing import Iterable

import grpc
from google.protobuf import descriptor_pool

from partita.protos.grpc_reflection.v1alpha import reflection_pb2 as pb
from partita.protos.grpc_reflection.v1alpha import reflection_pb2_grpc

SERVICE_NAME = "grpc.reflection.v1alpha.ServerReflection"


class ReflectionServicer(reflection_pb2_grpc.ServerReflectionServicer):
    def __init__(self, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None):
        self._service_names = sorted(set(service_names) | {SERVICE_NAME})
        self._pool = pool or descriptor_pool.Default()

    async def ServerReflectionInfo(self, request_iterator, context):
        async for request in request_iterator:
            yield self._answer(request)

    def _answer(self, request: pb.ServerReflectionRequest) -> pb.ServerReflectionResponse:
        response = pb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                response.list_services_response.service.extend(
                    pb.ServiceResponse(name=name) for name in self._service_names)
            elif kind == "file_by_filename":
                self._add_files(response, self._pool.FindFileByName(request.file_by_filename))
            elif kind == "file_containing_symbol":
                self._add_files(response, self._pool.FindFileContainingSymbol(request.file_containing_symbol))
            elif kind == "file_containing_extension":
                ext = request.file_containing_extension
                message = self._pool.FindMessageTypeByName(ext.containing_type)
                self._add_files(response, self._pool.FindExtensionByNumber(message, ext.extension_number).file)
            elif kind == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                response.all_extension_numbers_response.base_type_name = message.full_name
                response.all_extension_numbers_response.extension_number.extend(
                    sorted(e.number for e in self._pool.FindAllExtensions(message)))
            else:
                return _error(response, grpc.StatusCode.INVALID_ARGUMENT, "empty reflection request")
        except KeyError as e:
            return _error(response, grpc.StatusCode.NOT_FOUND, f"not found: {e}")
        return response

    @staticmethod
    def _add_files(response: pb.ServerReflectionResponse, file) -> None:
        """The file and, transitively, the files it imports (each once)."""
        seen, pending = set(), [file]
        while pending:
            current = pending.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            response.file_descriptor_response.file_descriptor_proto.append(current.serialized_pb)
            pending.extend(current.dependencies)


def _error(response: pb.ServerReflectionResponse, code: grpc.StatusCode, message: str) -> pb.ServerReflectionResponse:
    response.error_response.error_code = code.value[0]
    response.error_response.error_message = message
    return response
