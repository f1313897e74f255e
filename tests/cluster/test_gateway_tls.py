"""TLS from configuration: both servers speak TLS only, with token auth on top; the SDK and the openai
client connect with the certificate as their trust root."""
from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess

import urllib.error
import urllib.request

import openai
import pytest

from partita.client import AsyncClient, Client, UnauthenticatedError, UnavailableError
from tests.client.gateway_server import running_gateway

API_KEY = "tls-key-789"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl makes the self-signed test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def server(certificate):
    cert, key = certificate
    with running_gateway(tls_cert_path=cert, tls_key_path=key, api_key=API_KEY) as s:
        yield s


def test_sdk_over_tls(server, certificate):
    cert, _ = certificate
    with Client(server.grpc_target, tls=True, root_certificates=cert, api_key=API_KEY) as client:
        assert client.generate("Hi", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3
        assert client.server_info().tls
    with Client(server.grpc_target, tls=True, root_certificates=cert, api_key="wrong") as client:
        with pytest.raises(UnauthenticatedError):
            client.models()
    with Client(server.grpc_target, max_retries=0, timeout_s=5.0) as plaintext:
        with pytest.raises(UnavailableError):
            plaintext.generate("Hi", max_tokens=1)

    async def main():
        async with AsyncClient(server.grpc_target, tls=True, root_certificates=cert, api_key=API_KEY) as client:
            return await client.generate("Hi", max_tokens=2, ignore_eos=True)

    assert asyncio.run(main()).usage.completion_tokens == 2


def test_openai_client_over_https(server, certificate):
    cert, _ = certificate
    assert server.http_url.startswith("https://")
    http_client = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=cert))
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, http_client=http_client,
                       max_retries=0) as client:
        result = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=2, extra_body={"ignore_eos": True})
        assert result.usage.completion_tokens == 2
    trusting = ssl.create_default_context(cafile=cert)
    with urllib.request.urlopen(server.http_url + "/health", context=trusting, timeout=10) as resp:
        assert resp.status == 200
    with pytest.raises(urllib.error.URLError) as info:  # a client that does not trust the certificate
        urllib.request.urlopen(server.http_url + "/health", context=ssl.create_default_context(), timeout=10)
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
