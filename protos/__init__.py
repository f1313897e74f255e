"""partita's wire contract: the `.proto` files under this folder and the Python code generated from them.

    partita.protos.partita.v1.inference_pb2 / _grpc      service partita.v1.Inference (Generate, Abort, ...)
    partita.protos.partita.v1.admin_pb2 / _grpc          service partita.v1.Admin (cluster operations)
    partita.protos.partita.v1.kv_transfer_pb2 / _grpc    service partita.v1.KvTransfer (KV migration)
    partita.protos.grpc_health.v1.health_pb2 / _grpc     grpc.health.v1.Health (vendored, standard)
    partita.protos.grpc_reflection.v1alpha.reflection_pb2 / _grpc   server reflection (vendored)

The generated modules are committed and never edited by hand: `python protos/generate.py` rewrites
them (its docstring says why the compiler is pinned); tests/protos/test_generated.py fails when they
no longer match the `.proto` files.
"""
