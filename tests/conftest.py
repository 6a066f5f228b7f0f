"""Shared fixtures: every test leaves no job behind in this process."""

from __future__ import annotations

import sys

import pytest

import multiverso_py as mv

MV = [sys.executable, "-m", "multiverso_py"]


@pytest.fixture(autouse=True)
def _no_leaked_job():
    yield
    mv.shutdown()


@pytest.fixture
def embedded():
    """An embedded job (in-process scheduler and server) with a short timeout."""
    with mv.init(timeout=20) as job:
        yield job
