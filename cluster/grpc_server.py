"""The gateway's gRPC side: `partita.v1.Inference` and `partita.v1.Admin` on one grpc.aio server, beside
the standard health and reflection services, with the configured message limits, token auth and TLS.

A Generate stream is chunks, then one `complete` or one `error`; an error also ends the call with its
status code (cluster/gateway_errors.py has the table). Cancelling the call or passing its deadline
cancels the handler, which closes the request's stream and so aborts it in the engine.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from typing import TYPE_CHECKING

import grpc

from partita.cluster.auth import GrpcTokenAuthInterceptor
from partita.cluster.gateway_errors import InvalidArgumentError, NotFoundError, as_gateway_error
from partita.cluster.grpc_health import HealthServicer
from partita.cluster.grpc_reflection import ReflectionServicer
from partita.protos.grpc_health.v1 import health_pb2_grpc
from partita.protos.grpc_reflection.v1alpha import reflection_pb2_grpc
from partita.protos.partita.v1 import admin_pb2, admin_pb2_grpc, inference_pb2 as pb, inference_pb2_grpc
from partita.workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from partita.cluster.gateway import Gateway

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
INFERENCE_SERVICE = "partita.v1.Inference"
ADMIN_SERVICE = "partita.v1.Admin"
_SAMPLING_SCALARS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs",
                     "repetition_penalty", "skip_special_tokens")


def sampling_from_proto(message: pb.SamplingParams) -> SamplingParams:
    """Engine sampling parameters from the wire; unset fields keep the engine's defaults.
    Raises InvalidRequestError naming the field (SamplingParams validates)."""
    kwargs = {name: getattr(message, name) for name in _SAMPLING_SCALARS if message.HasField(name)}
    if message.stop:
        kwargs["stop"] = tuple(message.stop)
    if message.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(message.stop_token_ids)
    kwargs["ignore_eos"] = message.ignore_eos
    return SamplingParams(**kwargs)


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """The wire form of engine sampling parameters (the inverse of sampling_from_proto); a prefill worker
    sends it with a migrated request so that the decode worker samples the rest alike."""
    message = pb.SamplingParams(stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
                                ignore_eos=params.ignore_eos)
    for name in _SAMPLING_SCALARS:
        value = getattr(params, name)
        if value is not None:
            setattr(message, name, value)
    return message


def prompt_from_proto(request: pb.GenerateRequest) -> str | list[int]:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        return request.text
    if kind == "token_ids":
        return list(request.token_ids.ids)
    raise InvalidArgumentError("prompt", "set either text or token_ids")


def _chunk(request_id: str, out, skip_text: bool) -> pb.GenerateResponse:
    chunk = pb.GenerateChunk(token_ids=out.new_token_ids, text="" if skip_text else out.text_delta)
    if out.logprobs:
        chunk.logprobs.extend(pb.TokenLogprob(token_id=lp["token_id"], logprob=lp["logprob"], top=lp.get("top") or {})
                              for lp in out.logprobs)
    return pb.GenerateResponse(request_id=request_id, chunk=chunk)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, gateway: "Gateway"):
        self._gateway = gateway

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        gateway = self._gateway
        request_id = request.request_id or f"req-{uuid.uuid4().hex}"
        try:
            gateway.check_model(request.model)
            prompt = prompt_from_proto(request)
            params = sampling_from_proto(request.sampling)
            priority = request.priority if request.HasField("priority") else 0
            skip_text = request.skip_text
            async with contextlib.aclosing(gateway.tracker.open(request_id, prompt, params, priority)) as tracked:
                async for out in tracked:
                    if out.new_token_ids or out.text_delta:
                        yield _chunk(request_id, out, skip_text)
                    if out.finished:
                        usage = pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                                         total_tokens=out.num_prompt_tokens + out.num_output_tokens)
                        yield pb.GenerateResponse(request_id=request_id, complete=pb.GenerateComplete(
                            finish_reason=FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                            usage=usage, time_to_first_token_s=tracked.ttft_s, e2e_latency_s=tracked.e2e_s))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a typed stream value and a status
            error = as_gateway_error(exc)
            yield pb.GenerateResponse(request_id=request_id, error=pb.GenerateError(
                code=error.grpc_code.value[0], message=error.message, field=error.field or ""))
            context.set_code(error.grpc_code)
            context.set_details(error.message)

    async def Abort(self, request: pb.AbortRequest, context):
        aborted = [rid for rid in request.request_ids if await self._gateway.engine.abort(rid)]
        return pb.AbortResponse(aborted_request_ids=aborted)

    async def ListModels(self, request, context):
        info = self._gateway.engine.model_info
        return pb.ListModelsResponse(models=[pb.ModelCard(
            id=self._gateway.model_name, owned_by="partita", created_unix_s=info.created_unix_s,
            max_model_len=info.max_model_len)])

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
        try:
            self._gateway.check_model(request.model)
        except NotFoundError as e:
            await context.abort(e.grpc_code, e.message)
        info = self._gateway.engine.model_info
        return pb.ModelInfo(model_name=self._gateway.model_name, max_model_len=info.max_model_len,
                            eos_token_ids=info.eos_token_ids, has_chat_template=info.has_chat_template,
                            bos_token=info.bos_token or "", eos_token=info.eos_token or "")

    async def GetServerInfo(self, request, context):
        return server_info(self._gateway)

    async def GetLoads(self, request, context):
        return pb.GetLoadsResponse(loads=[load_to_proto(x) for x in self._gateway.engine.loads()],
                                   num_gateway_queued=self._gateway.tracker.num_queued)


def load_to_proto(load) -> pb.WorkerLoad:
    return pb.WorkerLoad(worker_id=load.worker_id, role=load.role, pool=load.pool, num_running=load.num_running,
                         num_waiting=load.num_waiting, num_free_blocks=load.num_free_blocks,
                         num_total_blocks=load.num_total_blocks, kv_cache_usage=load.kv_cache_usage,
                         num_preemptions=load.num_preemptions)


def server_info(gateway: "Gateway") -> pb.ServerInfo:
    config = gateway.config
    return pb.ServerInfo(
        version=gateway.version, server_id=gateway.server_id, started_unix_s=int(gateway.started_unix_s),
        uptime_s=time.time() - gateway.started_unix_s, is_draining=gateway.tracker.is_draining,
        max_queued_requests=config.max_queued_requests or 0, max_message_bytes=config.max_message_bytes,
        request_timeout_s=config.request_timeout_s or 0.0, auth_required=config.api_key is not None,
        tls=config.tls, num_engines=len(gateway.engine.loads()))


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, gateway: "Gateway"):
        self._gateway = gateway

    async def GetClusterStatus(self, request, context):
        gateway = self._gateway
        loads = list(gateway.engine.loads())
        pools: dict[tuple[str, str], int] = {}
        for load in loads:
            pools[(load.pool, load.role)] = pools.get((load.pool, load.role), 0) + 1
        queued, active = gateway.tracker.counts()
        return admin_pb2.ClusterStatus(
            server=server_info(gateway), workers=[load_to_proto(x) for x in loads],
            pools=[admin_pb2.PoolStatus(name=name, role=role, desired_replicas=n, ready_replicas=n)
                   for (name, role), n in sorted(pools.items())],
            num_gateway_queued=queued, num_gateway_running=active - queued)

    async def Drain(self, request: admin_pb2.DrainRequest, context):
        if request.worker_id:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "draining one worker needs the control plane; leave worker_id empty")
        finished, aborted = await self._gateway.drain(request.timeout_s)
        return admin_pb2.DrainResponse(num_finished=finished, num_aborted=aborted)

    async def Scale(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Scale needs the control plane behind this gateway")

    async def Rebalance(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Rebalance needs the control plane behind this gateway")


def build_grpc_server(gateway: "Gateway") -> tuple[grpc.aio.Server, int]:
    """A started-ready grpc.aio server with every service added and its port bound: (server, port)."""
    config = gateway.config
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    interceptors = [GrpcTokenAuthInterceptor(config.api_key)] if config.api_key else []
    server = grpc.aio.server(interceptors=interceptors, options=options)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(gateway), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(gateway), server)
    health_pb2_grpc.add_HealthServicer_to_server(
        HealthServicer(lambda: gateway.is_serving, [INFERENCE_SERVICE, ADMIN_SERVICE]), server)
    if config.enable_reflection:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer([INFERENCE_SERVICE, ADMIN_SERVICE, "grpc.health.v1.Health"]), server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    address = f"{host}:{config.grpc_port}"
    if config.tls:
        with open(config.tls_key_path, "rb") as key, open(config.tls_cert_path, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    return server, port
