"""Shared pytest configuration: tests marked `gpu` skip cleanly without a CUDA device; the
`one_torch_thread` fixture; the PostgreSQL fixtures of conftest_postgres.py."""

from __future__ import annotations

import pytest
import torch
from conftest_postgres import postgres_server, postgres_url  # noqa: F401  (fixtures)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one thread, and then do not fight other processes for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
