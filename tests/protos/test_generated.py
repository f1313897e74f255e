"""The committed generated code matches the `.proto` files, and imports under old protobuf runtimes.

The check compares descriptors (what the `.proto` files define), not bytes, so that it holds whatever
grpcio-tools version this machine has; `protos/generate.py --check` compares bytes with the pinned one.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

PROTOS_DIR = Path(__file__).resolve().parents[2] / "protos"
# protos/generate.py, loaded by path: putting protos/ on sys.path would shadow the `partita` package
_spec = importlib.util.spec_from_file_location("partita_protos_generate", PROTOS_DIR / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def module_name(proto: Path, suffix: str) -> str:
    return "partita.protos." + str(proto.with_suffix("")).replace("/", ".") + suffix


def strip_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        strip_json_names(nested)


def normalized(file_proto: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc's descriptor sets fill json_name; the descriptors embedded in gencode do not."""
    for message in file_proto.message_type:
        strip_json_names(message)
    return file_proto


@pytest.fixture(scope="module")
def fresh_descriptors(tmp_path_factory) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    pytest.importorskip("grpc_tools", reason="grpcio-tools compiles the .proto files for this check")
    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    protos = [str(p) for p in generate.proto_files()]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS_DIR}",
                    f"--descriptor_set_out={out}", *protos], check=True, cwd=PROTOS_DIR)
    file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: normalized(f) for f in file_set.file}


def test_every_proto_file_has_generated_modules():
    protos = generate.proto_files()
    assert {str(p) for p in protos} >= {
        "partita/v1/inference.proto", "partita/v1/admin.proto", "partita/v1/kv_transfer.proto",
        "grpc_health/v1/health.proto", "grpc_reflection/v1alpha/reflection.proto"}
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = PROTOS_DIR / (str(proto.with_suffix("")) + suffix)
            assert path.exists(), f"{path} is missing: run python protos/generate.py"


def test_committed_descriptors_match_proto_files(fresh_descriptors):
    for proto in generate.proto_files():
        committed = importlib.import_module(module_name(proto, "_pb2"))
        embedded = normalized(descriptor_pb2.FileDescriptorProto.FromString(committed.DESCRIPTOR.serialized_pb))
        assert embedded == fresh_descriptors[str(proto)], (
            f"protos/{proto} changed since its code was generated: run python protos/generate.py")


def test_grpc_modules_serve_every_method(fresh_descriptors):
    for proto in generate.proto_files():
        source = (PROTOS_DIR / (str(proto.with_suffix("")) + "_pb2_grpc.py")).read_text()
        file_proto = fresh_descriptors[str(proto)]
        for service in file_proto.service:
            for method in service.method:
                path = f"/{file_proto.package}.{service.name}/{method.name}"
                assert path in source, f"{path} missing from the generated stub: run python protos/generate.py"


def test_gencode_needs_no_newer_protobuf_than_5_26():
    """GPU machines may run protobuf 5.x: gencode must not demand a newer runtime than pyproject's floor."""
    for path in PROTOS_DIR.rglob("*_pb2.py"):
        text = path.read_text()
        version = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", text, re.MULTILINE)
        assert version and tuple(map(int, version.groups())) <= (5, 27, 0), path
        check = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+)",
                          text)
        assert check is None or (int(check[1]), int(check[2])) <= (5, 26), path
    for path in PROTOS_DIR.rglob("*_pb2_grpc.py"):
        pinned = re.search(r"GRPC_GENERATED_VERSION = '(\d+)\.(\d+)", path.read_text())
        assert pinned is None or (int(pinned[1]), int(pinned[2])) <= (1, 64), path


def test_imports_are_rewritten_into_the_partita_protos_package():
    for path in PROTOS_DIR.rglob("*_pb2*.py*"):
        for line in path.read_text().splitlines():
            if line.lstrip().startswith(("from ", "import ")):
                assert not re.match(r"\s*(from|import) (partita\.v1|grpc_health|grpc_reflection)\b", line), (
                    f"{path}: {line}")


def test_rewrite_imports_leaves_method_paths_alone():
    source = ("from partita.v1 import inference_pb2 as x\n"
              "    '/partita.v1.Inference/Generate',\n"
              "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'grpc_health.v1.health_pb2', _globals)\n")
    assert generate.rewrite_imports(source) == (
        "from partita.protos.partita.v1 import inference_pb2 as x\n"
        "    '/partita.v1.Inference/Generate',\n"
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'partita.protos.grpc_health.v1.health_pb2', _globals)\n")


def test_messages_round_trip():
    from partita.protos.partita.v1 import inference_pb2 as pb

    request = pb.GenerateRequest(request_id="r1", token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                 sampling=pb.SamplingParams(max_tokens=4, temperature=0.0, stop=["\n"]))
    again = pb.GenerateRequest.FromString(request.SerializeToString())
    assert again == request and again.WhichOneof("prompt") == "token_ids"
    assert again.sampling.HasField("temperature") and not again.sampling.HasField("top_p")
    done = pb.GenerateResponse(request_id="r1", complete=pb.GenerateComplete(
        finish_reason=pb.FINISH_REASON_LENGTH, usage=pb.Usage(prompt_tokens=3, completion_tokens=4)))
    assert pb.GenerateResponse.FromString(done.SerializeToString()).WhichOneof("response") == "complete"


def test_vendored_standard_services_keep_their_upstream_names():
    from partita.protos.grpc_health.v1 import health_pb2
    from partita.protos.grpc_reflection.v1alpha import reflection_pb2

    assert health_pb2.DESCRIPTOR.name == "grpc_health/v1/health.proto"
    assert health_pb2.DESCRIPTOR.services_by_name["Health"].full_name == "grpc.health.v1.Health"
    assert reflection_pb2.DESCRIPTOR.name == "grpc_reflection/v1alpha/reflection.proto"


def test_pinned_compiler_reproduces_the_committed_bytes():
    """Byte-for-byte check, where the pinned grpcio-tools is already on this machine (no download in tests)."""
    if not (generate.VENV_DIR / "bin" / "python").exists():
        pytest.skip(f"pinned grpcio-tools {generate.PINNED_GRPCIO_TOOLS} not installed at {generate.VENV_DIR}")
    assert generate.main(["--check"]) == 0
