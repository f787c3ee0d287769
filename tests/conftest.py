"""Shared fixtures: a real two-namespace network for the netns and kernel tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lab.netns import Topology


def require_root() -> None:
    """Fail (never skip) a test that needs namespaces when we are not root."""
    if os.geteuid() != 0:
        pytest.fail(
            f"this test builds network namespaces and needs root (euid {os.geteuid()}); "
            "netns and kernel tests are never skipped: run pytest as root",
            pytrace=False,
        )


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh server/client namespace pair joined by a veth, removed afterwards."""
    require_root()
    with Topology() as topo:
        yield topo


@pytest.fixture(scope="module")
def module_topology() -> Iterator[Topology]:
    """One topology shared by a module's tests (they must not change it)."""
    require_root()
    with Topology() as topo:
        yield topo
