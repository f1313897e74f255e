"""GatewayConfig validation: each bad value is refused with an error naming the field path."""
from __future__ import annotations

import pytest

from partita.cluster.gateway_config import GatewayConfig, GatewayConfigError


def test_defaults_are_local_and_bounded():
    config = GatewayConfig()
    assert config.host == "127.0.0.1" and config.api_key is None and not config.tls
    assert config.max_queued_requests and config.max_message_bytes == 16 * 1024 * 1024


BAD = [
    ({"host": ""}, "gateway.host"),
    ({"grpc_port": -1}, "gateway.grpc_port"),
    ({"http_port": 70000}, "gateway.http_port"),
    ({"http_port": "8000"}, "gateway.http_port"),
    ({"grpc_port": None, "http_port": None}, "gateway.grpc_port"),
    ({"grpc_port": 9000, "http_port": 9000}, "gateway.http_port"),
    ({"api_key": ""}, "gateway.api_key"),
    ({"tls_cert_path": "/etc/hostname"}, "gateway.tls_key_path"),
    ({"tls_key_path": "/etc/hostname"}, "gateway.tls_cert_path"),
    ({"tls_cert_path": "/no/such/cert.pem", "tls_key_path": "/no/such/key.pem"}, "gateway.tls_cert_path"),
    ({"max_queued_requests": -1}, "gateway.max_queued_requests"),
    ({"max_queued_requests": True}, "gateway.max_queued_requests"),
    ({"max_message_bytes": 10}, "gateway.max_message_bytes"),
    ({"request_timeout_s": 0}, "gateway.request_timeout_s"),
    ({"queue_timeout_s": "soon"}, "gateway.queue_timeout_s"),
    ({"retry_after_s": -2}, "gateway.retry_after_s"),
    ({"drain_timeout_s": -1.0}, "gateway.drain_timeout_s"),
    ({"served_model_name": ""}, "gateway.served_model_name"),
    ({"enable_reflection": "yes"}, "gateway.enable_reflection"),
]


@pytest.mark.parametrize("values, field", BAD, ids=[f for _, f in BAD])
def test_bad_values_name_their_field(values, field):
    with pytest.raises(GatewayConfigError) as info:
        GatewayConfig(**values)
    assert info.value.field == field and str(info.value).startswith(field + ": ")


def test_from_dict_refuses_unknown_keys_and_prefixes_the_path():
    assert GatewayConfig.from_dict({"http_port": 0, "grpc_port": 0}).http_port == 0
    with pytest.raises(GatewayConfigError) as info:
        GatewayConfig.from_dict({"http_prot": 1}, path="serve.gateway")
    assert info.value.field == "serve.gateway.http_prot" and "http_port" in str(info.value)
    with pytest.raises(GatewayConfigError) as info:
        GatewayConfig.from_dict({"grpc_port": -5}, path="serve.gateway")
    assert info.value.field == "serve.gateway.grpc_port"
    with pytest.raises(GatewayConfigError):
        GatewayConfig.from_dict(["not", "a", "mapping"])


def test_is_frozen():
    with pytest.raises(AttributeError):
        GatewayConfig().api_key = "x"
