"""How an end-to-end swarm is secured: ``plain`` (no TLS, no token), or ``tls`` (mutual
TLS on every plane with a swarm CA made for the module, and a swarm token).

Every e2e module's swarm fixture takes the module-scoped ``trust`` fixture
(``conftest.py``), which runs the module once per mode: the whole end-to-end suite
passes with trust on, as it does without. :class:`Trust` gives what each side needs:
daemon flags and environment, and the test's own clients (gRPC channels, the client
library, urllib and the OpenAI client over HTTPS) with the client certificate and token.
"""

from __future__ import annotations

import secrets
import ssl
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from swarm_proto.tls import TlsFiles
from swarm_proto.transport import Metadata, call_metadata

MODES = ("plain", "tls")


@dataclass
class Trust:
    """``certs``: the swarm CA's folder (None: plain); ``token``: the swarm token."""

    mode: str = "plain"
    certs: Path | None = None
    token: str = ""
    _issued: dict[str, TlsFiles] = field(default_factory=dict)

    @classmethod
    def make(cls, mode: str, folder: Path) -> Trust:
        if mode == "plain":
            return cls()
        from swarm_proto.certs import init_ca

        init_ca(folder)
        return cls("tls", folder, secrets.token_urlsafe(16))

    @property
    def on(self) -> bool:
        return self.certs is not None

    def files(self, name: str) -> TlsFiles | None:
        """The certificate of ``name`` (issued once), or None when plain."""
        if self.certs is None:
            return None
        if name not in self._issued:
            from swarm_proto.certs import issue

            got = issue(self.certs, name)
            self._issued[name] = TlsFiles(str(got.cert), str(got.key), str(got.ca))
        return self._issued[name]

    def flags(self, name: str) -> list[str]:
        """``--tls-cert/--tls-key/--tls-ca`` of the daemon ``name``."""
        tls = self.files(name)
        return [] if tls is None else ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]

    @property
    def env(self) -> dict[str, str]:
        """The daemons' environment: the token travels as ``SWARM_TOKEN`` (empty: none)."""
        return {"SWARM_TOKEN": self.token}

    # --- the test's own clients ----------------------------------------------------------

    @property
    def client(self) -> TlsFiles | None:
        return self.files("client")

    @property
    def scheme(self) -> str:
        return "https" if self.on else "http"

    @property
    def metadata(self) -> Metadata:
        return call_metadata(self.token)

    def ssl_context(self) -> ssl.SSLContext | None:
        """For HTTPS callers (the gateway, the dashboard): the swarm CA, our certificate."""
        client = self.client
        return None if client is None else client.client_context()

    def channel(self, address: str) -> grpc.Channel:
        client = self.client
        if client is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, client.channel_credentials())

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        client = self.client
        if client is None:
            return grpc.aio.insecure_channel(address)
        return grpc.aio.secure_channel(address, client.channel_credentials())

    def urlopen(self, request: str | urllib.request.Request, timeout: float = 10.0) -> Any:
        return urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context())

    def openai(self, base_url: str, api_key: str, **kwargs: Any) -> Any:
        import openai

        if self.on:
            kwargs["http_client"] = openai.DefaultHttpxClient(verify=self.ssl_context())
        return openai.OpenAI(base_url=base_url, api_key=api_key, **kwargs)

    def async_openai(self, base_url: str, api_key: str, **kwargs: Any) -> Any:
        import openai

        if self.on:
            kwargs["http_client"] = openai.DefaultAsyncHttpxClient(verify=self.ssl_context())
        return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, **kwargs)

    def client_env(self) -> dict[str, str]:
        """The environment of a client process (``swarm generate``): the token and the
        client certificate (``SWARM_TLS_*``, the fallbacks of ``--tls-*``)."""
        client = self.client
        if client is None:
            return dict(self.env)
        return {**self.env, "SWARM_TLS_CERT": client.cert, "SWARM_TLS_KEY": client.key, "SWARM_TLS_CA": client.ca}

    def library(self) -> dict[str, Any]:
        """Keyword arguments of ``SwarmClient.remote`` / ``AsyncSwarmClient.remote``."""
        return {"token": self.token, "tls": self.client}
