"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import pytest
from e2e.trust import MODES, Trust


@pytest.fixture(scope="module", params=MODES)
def trust(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trust:
    """The module's swarms run once plain and once with mutual TLS and a swarm token."""
    return Trust.make(request.param, tmp_path_factory.mktemp(f"certs-{request.param}"))
