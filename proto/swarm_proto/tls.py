"""TLS for the three planes from one set of files: gRPC (mutual TLS), MQTT and HTTPS.

Every daemon and the client take ``--tls-cert/--tls-key/--tls-ca`` (env
``SWARM_TLS_CERT``...; :func:`add_tls_flags`), which make a :class:`TlsFiles`. With
them a gRPC server asks every caller for a certificate signed by the swarm CA (mutual
TLS), and a channel presents its own and checks the server's against the CA. Without
them everything stays in clear: :func:`exposed` says when that is reachable beyond
loopback with no token either (both daemons warn at start; the dashboard shows it).
Certificates come from :mod:`swarm_proto.certs` (``swarm certs``).
"""

from __future__ import annotations

import argparse
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from swarm_proto.errors import SwarmProtoError

__all__ = ["TlsFiles", "add_tls_flags", "exposed", "exposure_warning", "tls_from_args"]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: this process's certificate and key, and the swarm CA."""

    cert: str
    key: str
    ca: str

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            if not Path(getattr(self, name)).is_file():
                raise SwarmProtoError(f"--tls-{name} {getattr(self, name)!r} is not a file")

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def client_context(self) -> ssl.SSLContext:
        """For MQTT and HTTPS clients: check the server against the CA, show our cert."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
        return context


def secure_aio_channel(address: str, tls: TlsFiles | None, options: list[tuple[str, object]] | None = None) -> grpc.aio.Channel:
    """A channel to ``address``: mutual TLS with ``tls``, in clear without."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)


def is_loopback(host: str) -> bool:
    """``host`` (a bind address or name) reaches only this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a name or "" (all interfaces): reachable from elsewhere


def exposed(host: str, *, token: str, tls: TlsFiles | None) -> bool:
    """A daemon bound to ``host`` is open to the network: beyond loopback, with neither
    TLS nor a swarm token, anyone who can reach its ports can join, read and steer."""
    return not is_loopback(host) and not token and tls is None


def exposure_warning(what: str, host: str) -> str:
    """The warning an exposed daemon logs at start and the dashboard shows."""
    return (
        f"{what} listening on {host} with neither TLS nor a swarm token: anyone who can reach these ports "
        "can join the swarm, read prompts and steer routes (set SWARM_TOKEN, and --tls-cert/--tls-key/--tls-ca)"
    )


def add_tls_flags(add: Callable[..., None]) -> None:
    """``--tls-cert/--tls-key/--tls-ca`` through a ``flag_adder``."""
    add("--tls-cert", str, "", "this process's certificate (PEM, from `swarm certs issue`); enables TLS")
    add("--tls-key", str, "", "the certificate's private key (PEM)")
    add("--tls-ca", str, "", "the swarm CA (PEM): peers must present certificates it signed")


def tls_from_args(ns: argparse.Namespace) -> TlsFiles | None:
    given = [ns.tls_cert, ns.tls_key, ns.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise SwarmProtoError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    return TlsFiles(ns.tls_cert, ns.tls_key, ns.tls_ca)
