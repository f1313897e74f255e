"""The gateway's gRPC side on loopback, through raw generated stubs: the Generate stream's shape, a
table of bad inputs and their status codes, health, reflection, the info RPCs, Admin, overload, auth,
message limits, cancellation and timeouts freeing KV blocks."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2

from partita.protos.grpc_health.v1 import health_pb2, health_pb2_grpc
from partita.protos.grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from partita.protos.partita.v1 import admin_pb2, admin_pb2_grpc, inference_pb2 as pb, inference_pb2_grpc
from tests.client.gateway_server import LONG, engine_busy, engine_idle, running_gateway, wait_until

API_KEY = "test-key-123"
AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def server():
    with running_gateway() as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return inference_pb2_grpc.InferenceStub(channel)


def request(text: str | None = "Hi", token_ids=None, **sampling) -> pb.GenerateRequest:
    sampling.setdefault("max_tokens", 4)
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if text is not None:
        req.text = text
    if token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    return req


def test_generate_streams_chunks_then_one_complete(stub):
    responses = list(stub.Generate(request("Hello", max_tokens=5, temperature=0.0, ignore_eos=True), timeout=30))
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds[-1] == "complete" and set(kinds[:-1]) == {"chunk"}
    assert len({r.request_id for r in responses}) == 1 and responses[0].request_id
    assert sum(len(r.chunk.token_ids) for r in responses[:-1]) == 5
    done = responses[-1].complete
    assert done.finish_reason == pb.FINISH_REASON_LENGTH
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (5, 5, 10)
    assert 0 < done.time_to_first_token_s <= done.e2e_latency_s


def test_token_prompt_and_skip_text(stub):
    responses = list(stub.Generate(pb.GenerateRequest(
        request_id="tok-1", token_ids=pb.TokenIds(ids=[0, 72, 105]), skip_text=True,
        sampling=pb.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)), timeout=30))
    assert all(r.request_id == "tok-1" for r in responses)
    assert all(r.chunk.text == "" for r in responses[:-1])
    assert responses[-1].complete.usage.prompt_tokens == 3


BAD_INPUTS = [
    ("no prompt", request(text=None), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("empty prompt", request(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("token id out of vocab", request(None, token_ids=[5, 100000]), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("prompt too long", request("x" * 2100), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("prompt + max_tokens too long", request("x" * 2000, max_tokens=100), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens"),
    ("max_tokens 0", request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("negative temperature", request(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("top_p 0", request(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("top_p above 1", request(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("top_k -2", request(top_k=-2), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    ("min_p above 1", request(min_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "min_p"),
    ("too many logprobs", request(logprobs=99), grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    ("repetition_penalty 0", request(repetition_penalty=0.0), grpc.StatusCode.INVALID_ARGUMENT,
     "repetition_penalty"),
    ("empty stop string", request(stop=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "stop[1]"),
    ("seed beyond int64", request(seed=2**64 - 1), grpc.StatusCode.INVALID_ARGUMENT, "seed"),
    ("unknown model", pb.GenerateRequest(text="Hi", model="gpt-17"), grpc.StatusCode.NOT_FOUND, "model"),
]


@pytest.mark.parametrize("name, req, code, field", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_get_their_status_and_name_the_field(stub, server, name, req, code, field):
    responses = []
    with pytest.raises(grpc.RpcError) as info:
        for response in stub.Generate(req, timeout=30):
            responses.append(response)
    assert info.value.code() == code, info.value.details()
    assert field in info.value.details()
    # the error also travels as the stream's last (and only) value
    assert [r.WhichOneof("response") for r in responses] == ["error"]
    assert responses[-1].error.code == code.value[0] and responses[-1].error.field == field
    assert wait_until(lambda: engine_idle(server))


def test_duplicate_running_request_id_is_invalid(stub, server):
    first = stub.Generate(pb.GenerateRequest(request_id="dup-1", text="Hi", sampling=pb.SamplingParams(
        max_tokens=LONG, ignore_eos=True)), timeout=30)
    next(first)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(request_id="dup-1", text="Hi"), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in info.value.details()
    first.cancel()
    assert wait_until(lambda: engine_idle(server))


def test_cancelling_the_call_frees_kv_blocks(stub, server):
    call = stub.Generate(request(max_tokens=LONG, ignore_eos=True), timeout=30)
    next(call)
    next(call)
    assert engine_busy(server)
    assert server.gateway.engine.loads()[0].num_free_blocks < 512
    call.cancel()
    assert wait_until(lambda: engine_idle(server)), server.gateway.engine.loads()


def test_deadline_aborts_the_request_and_frees_kv_blocks(stub, server):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request(max_tokens=LONG, ignore_eos=True), timeout=0.3))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: engine_idle(server))


def test_abort_rpc_ends_the_stream_with_abort(stub, server):
    call = stub.Generate(pb.GenerateRequest(request_id="abort-me", text="Hi", sampling=pb.SamplingParams(
        max_tokens=LONG, ignore_eos=True)), timeout=30)
    next(call)
    assert list(stub.Abort(pb.AbortRequest(request_ids=["abort-me", "nope"])).aborted_request_ids) == ["abort-me"]
    last = list(call)[-1]
    assert last.complete.finish_reason == pb.FINISH_REASON_ABORT
    assert wait_until(lambda: engine_idle(server))


def test_concurrent_streams(stub, server):
    calls = [stub.Generate(pb.GenerateRequest(request_id=f"c{i}", text=f"p{i}", sampling=pb.SamplingParams(
        max_tokens=8, ignore_eos=True, seed=i)), timeout=60) for i in range(10)]
    for i, call in enumerate(calls):
        responses = list(call)
        assert {r.request_id for r in responses} == {f"c{i}"}
        assert sum(len(r.chunk.token_ids) for r in responses) == 8
    assert wait_until(lambda: engine_idle(server))


def test_info_rpcs(stub, server):
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.id for m in models] == ["tiny-llama"] and models[0].max_model_len == 2048
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_name == "tiny-llama" and info.has_chat_template and info.eos_token == "</s>"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelInfo(pb.GetModelInfoRequest(model="other"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    server_info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert server_info.max_queued_requests == 1024 and not server_info.auth_required and server_info.uptime_s >= 0
    loads = stub.GetLoads(pb.GetLoadsRequest())
    assert loads.loads[0].worker_id == "engine-0" and loads.loads[0].num_total_blocks == 512


def test_health_check(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "partita.v1.Inference", "partita.v1.Admin"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services_and_serves_their_files(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="partita.v1.Admin"),
                reflection_pb2.ServerReflectionRequest(file_by_filename="no/such.proto")]
    responses = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"partita.v1.Inference", "partita.v1.Admin", "grpc.health.v1.Health"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in responses[1].file_descriptor_response.file_descriptor_proto]
    assert [f.name for f in files] == ["partita/v1/admin.proto", "partita/v1/inference.proto"]
    assert responses[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_admin_status_and_unimplemented_operations(channel):
    admin = admin_pb2_grpc.AdminStub(channel)
    status = admin.GetClusterStatus(admin_pb2.GetClusterStatusRequest())
    assert [(p.name, p.role, p.ready_replicas) for p in status.pools] == [("default", "colocated", 1)]
    assert status.workers[0].num_total_blocks == 512 and status.server.version
    for call, req in [(admin.Scale, admin_pb2.ScaleRequest(pool="default", replicas=2)),
                      (admin.Rebalance, admin_pb2.RebalanceRequest())]:
        with pytest.raises(grpc.RpcError) as info:
            call(req)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- a strict server: auth, small messages, a queue of one, one running sequence ------------------------
@pytest.fixture(scope="module")
def strict():
    with running_gateway(engine={"max_num_seqs": 1}, api_key=API_KEY, max_queued_requests=1,
                         max_message_bytes=4096) as s:
        yield s


@pytest.fixture(scope="module")
def strict_stub(strict):
    with grpc.insecure_channel(strict.grpc_target) as ch:
        yield inference_pb2_grpc.InferenceStub(ch)


def test_missing_or_wrong_token_is_unauthenticated_except_health(strict, strict_stub):
    for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", API_KEY),)):
        with pytest.raises(grpc.RpcError) as info:
            list(strict_stub.Generate(request(), metadata=metadata, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            strict_stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list(strict_stub.Generate(request(), metadata=AUTH, timeout=10))[-1].WhichOneof("response") == "complete"
    with grpc.insecure_channel(strict.grpc_target) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_oversized_message_is_refused(strict, strict_stub):
    with pytest.raises(grpc.RpcError) as info:
        list(strict_stub.Generate(request("x" * 8000), metadata=AUTH, timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()


def test_queue_past_its_bound_is_resource_exhausted(strict, strict_stub):
    running = strict_stub.Generate(request(max_tokens=LONG, ignore_eos=True), metadata=AUTH, timeout=30)
    next(running)  # running now: the one sequence slot is taken
    queued = strict_stub.Generate(request(max_tokens=LONG, ignore_eos=True), metadata=AUTH, timeout=30)
    assert wait_until(lambda: strict.gateway.tracker.num_queued == 1)
    call = strict_stub.Generate(request(), metadata=AUTH, timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_requests=1" in info.value.details()
    running.cancel()
    next(queued)  # the queued one runs once the slot frees
    queued.cancel()
    assert wait_until(lambda: engine_idle(strict))
