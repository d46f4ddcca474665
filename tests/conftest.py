"""Shared fixtures. Only fixtures with names no test module defines itself live here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai_stub import StubServer, running_stub_server


@pytest.fixture(scope="session")
def stub_server() -> Iterator[StubServer]:
    """The deterministic OpenAI-compatible stub (tests/openai_stub.py), one per session."""
    with running_stub_server() as server:
        yield server
