"""Which adds a worker still waits to see acknowledged, and which failed unobserved.

barrier() and shutdown() wait for every add issued so far; an add_async whose failure
nobody waited on is raised there, so that no failed add goes unnoticed.
"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

from multiverso_py.errors import RequestTimeout


class AddTracker:
    def __init__(self) -> None:
        self._unacked: set[Future] = set()
        self._waited: set[Future] = set()  # futures a caller waits on: their failure is theirs
        self._failed: list[BaseException] = []

    def track(self, future: Future) -> None:
        self._unacked.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        self._unacked.discard(future)
        exc = future.exception()
        if exc is not None and future not in self._waited:
            self._failed.append(exc)

    def wait(self, future: Future) -> Any:
        """Wait for a call on behalf of its caller, who then owns its failure."""
        self._waited.add(future)
        try:
            return future.result()
        except BaseException as exc:
            if exc in self._failed:  # recorded before we marked it as waited on
                self._failed.remove(exc)
            raise
        finally:
            self._waited.discard(future)

    def flush(self, timeout: float) -> None:
        """Wait until every tracked add is acknowledged; raise the first unobserved failure."""
        pending = list(self._unacked)
        if pending:
            _, not_done = wait_futures(pending, timeout)
            if not_done:
                raise RequestTimeout(f"{len(not_done)} add(s) not acknowledged within {timeout}s")
        if self._failed:
            exc, self._failed = self._failed[0], []
            raise exc
