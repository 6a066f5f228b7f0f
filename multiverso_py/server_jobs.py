"""What a server runs for each table request: the partitions it touches, the turns that
serialise requests per partition, and the job that applies a request on the thread pool
and replies from the event loop."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from multiverso_py import shm
from multiverso_py.consistency import TableClock
from multiverso_py.cores import LoopCore, current_cpu
from multiverso_py.errors import MultiversoError, ProtocolError, code_for
from multiverso_py.polling import yield_cpu
from multiverso_py.protocol import Frame, MsgType, pack_parts
from multiverso_py.tables.base import TableSpec
from multiverso_py.transport import Connection

if TYPE_CHECKING:
    from multiverso_py.server import Server

log = logging.getLogger(__name__)

READS = frozenset({MsgType.GET, MsgType.ADD_GET})  # requests whose replies carry the partitions' values


class TablePool:
    """The threads that run a server's table jobs. A job goes to the thread that went
    idle last, through that thread's own queue, so each job wakes exactly one thread,
    and a steady stream of small requests keeps one thread busy, its cache warm. Jobs
    that arrive while every thread is busy wait in a backlog that threads drain, in
    order, before going idle. (One queue that all threads wait on wakes more than one:
    with two threads, a small get cost the pool 7.8 context switches, against 3.3 with
    one thread. A ThreadPoolExecutor, besides, makes a Future and a work item and takes
    three locks per job.) Having woken a thread, the submitter yields its CPU and the GIL
    (sched_yield), so the thread starts at once where the kernel woke it on the waker's
    core (it usually does), instead of waiting for the event loop to sleep and then for
    the GIL; its reply is queued before the loop looks for events again, so no wake-up
    of the loop carries it. Counted from /proc over 20,000 small gets, the server's
    threads switched about 2 times a get instead of 6.4 (the loop slept 0.0-0.3 times
    instead of 2.1), and a small get went from 78-80 µs to 69-73 µs (alternating runs;
    in the dense benchmark's process from 79-105 µs to 69-72 µs). A thread woken on a
    core of its own just starts; the yield then costs a system call. A thread whose small
    jobs keep running on another core than the loop's moves itself there (see
    multiverso_py.cores). A job reports its own errors; one that escapes is logged. The
    threads are daemons: a job still running when the process exits is cut off
    (checkpoints are written to a temporary folder and renamed, so none is left half
    written)."""

    def __init__(self, threads: int, name: str):
        self._lock = threading.Lock()
        self._backlog: deque[Callable[[], None]] = deque()  # jobs that found no idle thread
        self._inboxes = [queue.SimpleQueue() for _ in range(threads)]  # one waiter each: a put wakes it alone
        self._idle: list[queue.SimpleQueue] = list(self._inboxes)  # of idle threads, the last to go idle at the end
        self._closed = False
        self.loop_cpu = -1  # the submitter's (the event loop's) core at the last submit
        self.cores: list[LoopCore] = [LoopCore() for _ in range(threads)]
        self._threads = [threading.Thread(target=self._serve, args=(inbox, self.cores[i]), name=f"{name}_{i}",
                                          daemon=True)
                         for i, inbox in enumerate(self._inboxes)]
        for thread in self._threads:
            thread.start()

    def busy(self) -> bool:
        """Whether a thread is running a job (read without the lock: a hint)."""
        return len(self._idle) < len(self._inboxes)

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                return
            if not self._idle:
                self._backlog.append(job)
                return
            inbox = self._idle.pop()
        self.loop_cpu = current_cpu()
        inbox.put(job)
        yield_cpu()  # let the woken thread start now (see the class's docstring)

    def shutdown(self) -> None:
        """Jobs that have not started are dropped; running ones finish."""
        with self._lock:
            self._closed = True
            self._backlog.clear()
        for inbox in self._inboxes:
            inbox.put(None)

    def _serve(self, inbox: queue.SimpleQueue[Optional[Callable[[], None]]], core: LoopCore) -> None:
        job = inbox.get()
        while job is not None and not self._closed:
            start = time.perf_counter()
            try:
                job()
            except Exception:
                log.exception("a table job failed")
            core.job_done(time.perf_counter() - start, self.loop_cpu)  # see multiverso_py.cores
            with self._lock:
                job = self._backlog.popleft() if self._backlog else None
                if job is None:
                    self._idle.append(inbox)
            if job is None:  # waits holding no job: a finished one's request may hold a worker's segment
                job = inbox.get()


class Turns:
    """Gives each job its turn on every partition it touches, in arrival order: a job runs
    once it is first in line on all of them and leaves every line when done. Jobs join
    their lines whole, on the event loop, so all lines agree on one order and no two
    jobs can wait for each other. Jobs on disjoint partitions run in parallel."""

    def __init__(self, pool: TablePool):
        self._pool = pool
        self._lock = threading.Lock()

    def arrive(self, job: "Job") -> None:
        with self._lock:
            job.waiting = len(job.partitions)
            for partition in job.partitions:
                partition.line.append(job)
                if len(partition.line) == 1:
                    job.waiting -= 1
            ready = job.waiting == 0
        if ready:
            self._pool.submit(job.run)

    def leave(self, job: "Job") -> None:
        ready = []
        with self._lock:
            for partition in job.partitions:
                partition.line.popleft()
                if partition.line:
                    successor = partition.line[0]
                    successor.waiting -= 1
                    if successor.waiting == 0:
                        ready.append(successor)
        for successor in ready:
            self._pool.submit(successor.run)


@dataclass
class Partition:
    shard: Any
    line: deque = field(default_factory=deque)  # jobs waiting for their turn here, the running one first
    applied: dict[int, int] = field(default_factory=dict)  # client id -> last applied seq


@dataclass
class Table:
    spec: TableSpec
    map_version: int
    partitions: dict[int, Partition]
    clock: TableClock


class Job:
    """One table request, run on the pool once it has its turn on all its partitions.

    Its parts run in message order. An add or set already applied to a partition (same
    client, sequence number not newer) is skipped there: a retry applies once. An
    add-get reads each part's rows right after adding to them. A read replies with views
    of the partitions, not copies, and keeps its turn until the reply has been handed to
    the kernel, so no add changes the data on its way out."""

    def __init__(self, server: "Server", conn: Connection, frame: Frame, parts: list, partitions: list[Partition],
                 segment: Optional[memoryview] = None):
        self.server, self.conn, self.frame = server, conn, frame
        self.segment = segment  # a get's reply goes into the worker's shared memory when it fits
        self.in_segment = False
        self.parts = parts  # (pid, partition, args, arrays)
        self.partitions = partitions  # each once
        self.waiting = 0
        self.results: list[Any] = []
        self.error: Optional[BaseException] = None
        self.acknowledged = False  # a held add is acknowledged when held, not when applied

    def own_arrays(self) -> None:
        """Copy the request's arrays out of the worker's shared memory, which it may reuse
        once this request is acknowledged."""
        self.parts = [(pid, partition, args, [a.copy() for a in arrays]) for pid, partition, args, arrays in self.parts]

    def acknowledge(self) -> None:
        parts, _ = pack_parts([(pid, {}, []) for pid, _, _, _ in self.parts])
        self.conn.send(MsgType.REPLY, self.frame.req_id, {"parts": parts})
        self.acknowledged = True
        self.server.flow.finished(self.conn)  # held adds wait for clocks, which must still get through

    def run(self) -> None:
        op, body = self.frame.type, self.frame.body
        client, seq = body["client"], body["seq"]
        writes = op is not MsgType.GET
        fresh = {id(p) for p in self.partitions if not writes or seq > p.applied.get(client, -1)}
        # A get gathers its rows straight into the worker's segment. An add-get's reply
        # goes over its own request's arrays, which are still being read: placed after.
        area = shm.ReplyArea(self.segment) if self.segment is not None and op is MsgType.GET else None
        try:
            for pid, partition, args, arrays in self.parts:
                shard = partition.shard
                if op is MsgType.GET:
                    result = shard.get(args, arrays, area.empty if area is not None else np.empty)
                else:
                    result = {}, []
                    if id(partition) in fresh:  # not applied here before: a retry applies once
                        result = (shard.set if op is MsgType.SET else shard.add)(args, arrays)
                    if op is MsgType.ADD_GET:  # then read the rows just added to ([values] or [index, values])
                        result = shard.get(args, arrays[:-1])
                self.results.append((pid, *result))
        except Exception as exc:  # reported to the caller as an ERROR reply
            self._log_failure(exc, pid)
            self.error = exc
        if self.segment is not None and self.error is None:
            placed = shm.place(self.segment, self.results, area)
            self.in_segment = placed is not None
            self.results = placed or self.results
        # Queue the reply before giving up the turn: a later request on these partitions
        # must not be answered before this one.
        self.server.loop.call_soon_threadsafe(self.reply)
        if writes:
            for partition in self.partitions:
                if id(partition) in fresh:
                    partition.applied[client] = seq
            self.server.buffers.release(self.frame.buffers)  # applied: nothing reads them any more
        if op not in READS:
            self.server.turns.leave(self)

    def _log_failure(self, exc: Exception, pid: int) -> None:
        what = f"{self.frame.type.name} on table {self.frame.body['table']} partition {pid}"
        if isinstance(exc, (MultiversoError, ValueError, IndexError)):
            log.warning("bad %s from %s: %s", what, self.conn.peer, exc)
        else:
            log.exception("%s failed", what)

    def reply(self) -> None:
        if self.acknowledged:
            return  # a failure was logged; the worker, told of success already, has moved on
        self.server.flow.finished(self.conn)
        if self.error is None:
            try:
                parts, buffers = pack_parts(self.results)
                if self.in_segment:
                    self.conn.send(MsgType.REPLY, self.frame.req_id, {"parts": parts, "shm": True})
                else:
                    self.conn.send(MsgType.REPLY, self.frame.req_id, {"parts": parts}, buffers)
            except ProtocolError as exc:  # a reply over the frame limit: say so, and free the turn
                log.warning("cannot reply to %s from %s: %s", self.frame.type.name, self.conn.peer, exc)
                self.error = exc
        if self.error is not None:
            self.conn.send_error(self.frame.req_id, code_for(self.error), str(self.error))
        if self.frame.type in READS:
            self.server.after_flush(self.conn, lambda: self.server.turns.leave(self))
        self.server.polling.resume()
