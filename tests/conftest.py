"""Shared fixtures: every test leaves no job behind in this process."""

from __future__ import annotations

from typing import Iterator

import pytest

import multiverso_py as mv

JOB_ENV = ("MV_SCHEDULER", "MV_RANK", "MV_TIMEOUT", "MV_CONSISTENCY", "MV_STALENESS")


@pytest.fixture(autouse=True)
def _no_leaked_job() -> Iterator[None]:
    yield
    mv.shutdown()


@pytest.fixture
def no_scheduler_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """mv.init() must start an embedded job, whatever the calling shell exported."""
    for var in JOB_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def job(no_scheduler_env: None) -> Iterator[mv.Job]:
    """An embedded job (in-process scheduler and server) with a short timeout."""
    with mv.init(timeout=20) as j:
        yield j
