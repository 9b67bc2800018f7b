"""Shared fixtures. Test helpers live in plain modules beside this file (backend_support,
e2e_support), importable from every test module."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from e2e_support import Cluster  # noqa: E402


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A work folder for a dispatcher and workers; every process it starts is ended."""
    cl = Cluster(tmp_path)
    try:
        yield cl
    finally:
        cl.close()
