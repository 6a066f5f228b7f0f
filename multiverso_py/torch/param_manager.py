"""ParamManager: Multiverso's parameter manager for any nn.Module. The module's
parameters (and optionally its buffers) live on the parameter server; each worker trains
its own copy and `sync()` merges: it pushes what changed locally since the last sync and
pulls everyone's merged values back into the module, in place."""

from __future__ import annotations

from typing import Optional

from torch import nn

import multiverso_py as mv
from multiverso_py.errors import InvalidArgument
from multiverso_py.torch.flat import FlatBuffer, group_by_server_dtype, table_consistency, table_dtype_name


class ParamManager:
    """Keeps `module`'s parameters (and its buffers, with buffers=True) in the parameter
    server, one flat ArrayTable with the "add" updater per stored dtype (float32 holds
    float32, float16 and bfloat16 tensors; float64, int32 and int64 have their own).

    Constructing it is collective: every worker builds it, in the same order relative to
    other tables. The master worker's (worker 0's) values are the tables' initial content
    and are loaded into every worker's module before the constructor returns.

    `sync()` adds this worker's change since the last sync to the tables and loads the
    merged values into the module, in place: with N workers each step's changes sum, as
    in Multiverso. It costs one push and one pull message per table and server.

    Under BSP (consistency="bsp", here or as the job's default) the servers hold an add
    until every worker finished its clock, and a get sees no add of its own clock: so
    sync() pulls first, then pushes. The module then holds the values of the earlier
    clocks (the same on every worker) and this sync's change comes back, merged, with
    the first sync after the next mv.clock(). Sync once per clock: a second sync in the
    same clock would pull values that lack the first one's change.
    """

    def __init__(self, module: nn.Module, name: Optional[str] = None, buffers: bool = False, *,
                 consistency: Optional[str] = None, staleness: Optional[int] = None):
        if not isinstance(module, nn.Module):
            raise InvalidArgument(f"ParamManager needs a torch.nn.Module, got {type(module).__name__}")
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidArgument(f"name must be a non-empty string or None, got {name!r}")
        named = list(module.named_parameters())
        if buffers:
            named += list(module.named_buffers())
        named = [(n, t) for n, t in named if t.numel()]
        if not named:
            what = "parameters or buffers" if buffers else "parameters"
            raise InvalidArgument(f"{type(module).__name__} has no {what} to keep in the parameter server")
        self.module = module
        self.names = [n for n, _ in named]
        self._tables: list[mv.ArrayTable] = []
        self._now: list[FlatBuffer] = []  # the module's values, gathered for a push
        self._synced: list[FlatBuffer] = []  # the values of the last sync, as the module holds them
        master = mv.is_master_worker()
        for dtype, group in group_by_server_dtype(named).items():
            tensors = [t for _, t in group]
            now, synced = FlatBuffer(tensors, dtype), FlatBuffer(tensors, dtype)
            table_name = None if name is None else f"{name}/{table_dtype_name(dtype)}"
            initial = now.gather() if master else None  # only the master's initial values are sent
            self._tables.append(mv.ArrayTable(now.numel, table_dtype_name(dtype), name=table_name,
                                              init_value=initial, updater="add", consistency=consistency,
                                              staleness=staleness))
            self._now.append(now)
            self._synced.append(synced)
        self._bsp = any(table_consistency(t) == "bsp" for t in self._tables)
        self._pull()

    @property
    def tables(self) -> list[mv.ArrayTable]:
        """The ArrayTables holding the module, one per stored dtype."""
        return list(self._tables)

    def sync(self) -> None:
        """Push the module's change since the last sync, then pull the merged values
        into the module's tensors in place (under BSP: pull, then push; see the class)."""
        deltas = []
        for now, synced in zip(self._now, self._synced):
            delta = now.gather()
            delta -= synced.array
            deltas.append(delta)
        if self._bsp:
            self._pull()
        # add_async sends each delta without copying: its buffer is not touched until done.
        pushes = [table.add_async(delta) for table, delta in zip(self._tables, deltas)]
        if not self._bsp:
            self._pull()
        for table, future in zip(self._tables, pushes):
            table._wait(future)  # raises a failed push

    def _pull(self) -> None:
        pulls = []
        for table, synced in zip(self._tables, self._synced):
            synced.wait_copies_out()
            pulls.append(table.get_async(out=synced.array))
        for table, future, synced in zip(self._tables, pulls, self._synced):
            table._wait(future)
            synced.scatter()
            if not synced.exact:
                # bfloat16/float16 tensors round what they were given: remember what
                # they hold, or every sync would push the rounding error back.
                synced.gather()

    def __repr__(self) -> str:
        tables = ", ".join(f"{t.name}[{t.size}]" for t in self._tables)
        return f"ParamManager({type(self.module).__name__}, {len(self.names)} tensors in {tables})"
