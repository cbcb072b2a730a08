"""TLS on the three planes, with real processes: a swarm started by `swarm up --tls`
(a swarm CA and certificates from swarm_proto.certs, a coordinator with its embedded
broker over MQTT/TLS and HTTPS, two nodes in mutual TLS, a swarm token) generates the
tokens of the whole model in one process, and refuses whoever comes without a
certificate of the swarm's CA or without the token.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import grpc
import pytest
from e2e.chaos import add_tokenizer, generate, prompts
from helpers import make_tiny_model

from swarm_client.local import LocalBackend
from swarm_client.routed import CoordinatorRoutes, RoutedBackend
from swarm_client.up import LocalSwarm, UpConfig
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.certs import init_ca, issue
from swarm_proto.tls import TlsFiles
from swarm_proto.transport import call_metadata
from swarm_proto.wire import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_tokenizer(make_tiny_model(tmp_path_factory.mktemp("tls-model"), "llama3"))


@pytest.fixture(scope="module")
def swarm(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """``swarm up --tls`` with two nodes: CA, certificates and token made on the spot."""
    saved = os.environ.pop("SWARM_TOKEN", None)
    log_dir = tmp_path_factory.mktemp("tls-swarm")
    local = LocalSwarm(UpConfig(nodes=2, model=str(tiny), swarm_id="tls", threads=1, log_dir=str(log_dir), tls=True))
    try:
        local.start()
        yield local
    finally:
        local.stop()
        if saved is not None:
            os.environ["SWARM_TOKEN"] = saved


def _backend(swarm: LocalSwarm) -> RoutedBackend:
    routes = CoordinatorRoutes(swarm.address, token=swarm.token, tls=swarm.client_tls)
    return RoutedBackend(routes, max_context=256, eos_token_ids=(), token=swarm.token, tls=swarm.client_tls)


def test_swarm_up_tls_sets_it_all_up(swarm: LocalSwarm) -> None:
    text = swarm.describe()
    assert swarm.client_tls is not None and swarm.token and "--tls-ca" in text and "https://" in text
    assert swarm.certs is not None and (swarm.certs / "token").stat().st_mode & 0o777 == 0o600
    assert swarm.mqtt_url.startswith("mqtts://")
    assert len(swarm.list_nodes()) == 2


def test_generation_over_tls_gives_the_tokens_of_one_process(swarm: LocalSwarm, tiny: Path) -> None:
    cases = prompts(3)
    local = LocalBackend.load(tiny)

    async def run() -> list[list[int]]:
        backend = _backend(swarm)
        try:
            return [await generate(backend, p, SamplingParams(), 10) for p in cases]
        finally:
            await backend.aclose()

    over_tls = asyncio.run(run())
    assert over_tls == [[t.token_id for t in local.tokens(p, SamplingParams(), 10)] for p in cases]


def _info(channel: grpc.Channel, metadata: object = None) -> None:
    swarm_pb2_grpc.NodeStub(channel).Info(swarm_pb2.InfoRequest(), timeout=5, metadata=metadata)


def test_clients_without_a_swarm_certificate_or_the_token_are_refused(swarm: LocalSwarm, tmp_path: Path) -> None:
    assert swarm.client_tls is not None
    node = swarm.list_nodes()[0].address
    with grpc.secure_channel(node, swarm.client_tls.channel_credentials()) as channel:
        _info(channel, call_metadata(swarm.token))  # the swarm's own client gets in
        with pytest.raises(grpc.RpcError) as no_token:
            _info(channel)
        assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(node) as plain, pytest.raises(grpc.RpcError):
        _info(plain, call_metadata(swarm.token))  # in clear: no TLS handshake, no answer
    # a certificate from another CA: the node refuses the handshake (mutual TLS)
    init_ca(tmp_path / "other")
    other = issue(tmp_path / "other", "mallory")
    stranger = TlsFiles(str(other.cert), str(other.key), swarm.client_tls.ca)
    with grpc.secure_channel(node, stranger.channel_credentials()) as channel, pytest.raises(grpc.RpcError):
        _info(channel, call_metadata(swarm.token))

    # MQTT: a plaintext client gets nowhere on the TLS listener
    host, port = swarm.mqtt_url.removeprefix("mqtts://").rsplit(":", 1)

    async def plain_mqtt() -> None:
        async with aiomqtt.Client(host, int(port), timeout=3):
            pass

    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(plain_mqtt())

    # HTTPS: the gateway answers over TLS, checked against the swarm CA
    context = ssl.create_default_context(cafile=swarm.client_tls.ca)
    http_port = swarm.http.rsplit(":", 1)[1]
    with urllib.request.urlopen(f"https://127.0.0.1:{http_port}/healthz", timeout=10, context=context) as reply:
        assert reply.status == 200

