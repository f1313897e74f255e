import pytest

from tests.client.gateway_server import running_gateway


@pytest.fixture(scope="session")
def gateway():
    """A real gateway (gRPC + HTTP) with a real engine (tiny-llama, CPU) on loopback, in this process."""
    with running_gateway() as server:
        yield server
