"""Fixtures shared by the integration tests that run work on a real Ray cluster."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from ray_cluster import RayTestCluster, two_node_cluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayTestCluster]:
    """A two-node Ray cluster on 127.0.0.1 for the tests of one module, stopped whatever
    happens."""
    started = time.monotonic()
    with two_node_cluster(tmp_path_factory.mktemp("ray")) as running:
        print(f"two-node cluster up in {time.monotonic() - started:.1f} s")
        yield running
