"""PSOptimizer: a torch.optim.Optimizer whose update rule runs on the parameter servers.

`step()` pushes each parameter group's gradients (flattened into one buffer) to that
group's table, where the server's updater (sgd, momentum, adagrad, adam, ...) applies
them and keeps the optimizer state; then it pulls the fresh weights into the parameters
in place. Every worker's gradients update the same weights: asynchronous data-parallel
SGD (or SSP/BSP, by the tables' consistency model).
"""

from __future__ import annotations

import functools
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

import multiverso_py as mv
from multiverso_py.errors import InvalidArgument
from multiverso_py.torch.flat import FlatBuffer, group_by_server_dtype, table_consistency, table_dtype_name
from multiverso_py.updaters import check_updater, updater_class

# Keys of a param group that are read on every step; every other updater option is fixed
# when the group's table is created (the server holds it).
PER_STEP = ("lr", "weight_decay")


@dataclass
class _Slot:
    """One table of a param group: the group's parameters of one stored dtype."""

    table: mv.ArrayTable
    params: list[torch.Tensor]
    weights: FlatBuffer  # pulled weights, received straight into its host buffer
    grads: FlatBuffer  # gathered gradients, pushed from its host buffer


class PSOptimizer(torch.optim.Optimizer):
    """Optimize `params` with a server-side updater (SPEC section 4).

        model = Net()
        opt = PSOptimizer(model.parameters(), updater="adam", lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()          # push gradients, the server updates, pull the weights

    Constructing it is collective (every worker, same order as other tables). Each param
    group gets one flat ArrayTable per stored dtype, initialized from the master worker's
    (worker 0's) parameters, which every worker's parameters take before the
    constructor returns. `options` are the updater's (momentum, betas, eps, alpha, beta,
    l1, l2, lam); a param group may override them and `updater` for its own table.

    Per step, `param_groups[i]["lr"]` is sent with the push (so LR schedulers work) and
    `weight_decay` is added to the gradient on the worker (L2, as torch.optim.SGD and
    Adam do). Other options are fixed once the group's table exists; changing one
    raises. Parameters whose `grad` is None are skipped (their optimizer state on the
    server is untouched, as torch does).

    overlap=True hides the round trip: step() pushes, starts the pull and returns; the
    weights it pulls land in the parameters at the next step(). Each gradient is then
    computed on weights one update old (like asynchronous SGD with one step of delay,
    which a job of several workers has anyway), so results differ from a local
    optimizer's; call pull() before evaluating or saving. The default (False) waits,
    and with one worker gives what the torch optimizer gives.
    """

    def __init__(self, params: Iterable[Any], updater: str = "sgd", lr: Optional[float] = None,
                 weight_decay: float = 0.0, *, name: Optional[str] = None, overlap: bool = False,
                 consistency: Optional[str] = None, staleness: Optional[int] = None, **options: Any):
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidArgument(f"name must be a non-empty string or None, got {name!r}")
        cls = updater_class(updater)
        if not cls.has_lr:
            raise InvalidArgument(f"PSOptimizer needs an updater with a learning rate, not {updater!r}; "
                                  "to push raw deltas use ParamManager or an ArrayTable")
        resolved = check_updater(updater, {**options, **({} if lr is None else {cls.lr_option: lr})})
        defaults = {"updater": updater, "lr": resolved.pop(cls.lr_option), "weight_decay": weight_decay, **resolved}
        self._name = name
        self.overlap = bool(overlap)
        self._consistency = {"consistency": consistency, "staleness": staleness}
        self._pushes: list[tuple[_Slot, Future]] = []  # in flight
        self._pulls: list[tuple[_Slot, Future]] = []  # in flight; their weights land in the parameters later
        self._option_keys = tuple(resolved)
        self._slots: list[list[_Slot]] = []
        self._created: list[dict] = []  # per group: the updater and options its tables were made with
        self._raw: list[dict] = []  # per group: those settings as the group spells them (a fast check per step)
        self._ready = False
        super().__init__(params, defaults)
        self._ready = True
        for group in self.param_groups:
            self._add_tables(group)

    # ------------------------------------------------------------ groups and tables

    def add_param_group(self, param_group: dict) -> None:
        """As torch's; after construction it creates the group's tables, so (being
        collective) every worker must add the same groups in the same order."""
        super().add_param_group(param_group)
        if self._ready:
            self._add_tables(self.param_groups[-1])

    def _server_options(self, group: dict) -> dict:
        """What a group's tables apply: its updater and that updater's options (lr included)."""
        cls = updater_class(group["updater"])
        if not cls.has_lr:
            raise InvalidArgument(f"PSOptimizer needs an updater with a learning rate, not {group['updater']!r}")
        options = {k: group[k] for k in self._option_keys if k in cls.option_specs}
        _check_per_step(group)
        return {"updater": group["updater"],
                "options": check_updater(group["updater"], {**options, cls.lr_option: group["lr"]})}

    def _add_tables(self, group: dict) -> None:
        index = len(self._slots)
        created = self._server_options(group)
        params = group["params"]
        for p in params:
            if not p.is_leaf:
                raise InvalidArgument("PSOptimizer can only optimize leaf tensors (model parameters)")
        master = mv.is_master_worker()
        slots = []
        for dtype, named in group_by_server_dtype([(f"group {index} param {i}", p) for i, p in enumerate(params)]
                                                  ).items():
            tensors = [p for _, p in named if p.numel()]
            if not tensors:
                continue
            weights, grads = FlatBuffer(tensors, dtype), FlatBuffer(tensors, dtype)
            table_name = None if self._name is None else f"{self._name}/group{index}/{table_dtype_name(dtype)}"
            table = mv.ArrayTable(weights.numel, table_dtype_name(dtype), name=table_name,
                                  init_value=weights.gather() if master else None,
                                  updater=created["updater"], **self._consistency, **created["options"])
            if table_consistency(table) == "bsp" and not self.overlap:
                raise InvalidArgument(
                    "under BSP the servers hold a step's push until every worker called mv.clock(), so the pull "
                    "right after it can never return the updated weights: create the PSOptimizer with "
                    "overlap=True (each pull then lands at the next step, after the clock)")
            slots.append(_Slot(table, tensors, weights, grads))
        self._slots.append(slots)
        self._created.append(created)
        self._raw.append({k: group.get(k) for k in ("updater", *self._option_keys)})
        self._start_pulls(slots)  # everyone starts from the master's values
        self._land()
        if not self.overlap:  # nothing reads the parameters while a pull is in flight: pulls land in them
            for slot in slots:
                slot.weights.hold()

    @property
    def tables(self) -> list[list[mv.ArrayTable]]:
        """Per param group, its tables (one per stored dtype)."""
        return [[s.table for s in slots] for slots in self._slots]

    # ------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Push the gradients (with each group's current lr), let the servers update,
        and pull the new weights into the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._wait_pushes()  # their buffers are about to be refilled (done long ago: pulls came after them)
        self._land()  # with overlap: the previous step's pull, which had a whole step to arrive
        # One table and nothing to overlap: its round trip may run on this thread (multiverso_py.direct)
        alone = not self.overlap and sum(map(len, self._slots)) == 1
        for index, (group, slots) in enumerate(zip(self.param_groups, self._slots)):
            self._check_unchanged(index, group)
            for slot in slots:
                self._push_pull(slot, group, alone)
        if not self.overlap:
            self._land()
            self._wait_pushes()
        return loss

    @torch.no_grad()
    def pull(self) -> None:
        """Load the servers' current weights into the parameters, e.g. after mv.barrier()
        at the end of training to see every worker's updates (and, with overlap=True,
        this worker's last step)."""
        self._wait_pushes()
        self._land()
        self._start_pulls(self._all_slots())
        self._land()

    def _all_slots(self) -> list[_Slot]:
        return [slot for slots in self._slots for slot in slots]

    def _push_pull(self, slot: _Slot, group: dict, alone: bool = False) -> None:
        """Push a slot's gradients and start the pull of its weights: one round trip when
        every parameter has a gradient (add_get: the server updates, then replies with
        the new weights; synchronous when `alone`), an add of those that have one and a
        get otherwise."""
        grads = [_gradient(p, group["weight_decay"]) for p in slot.params]
        present = [g is not None for g in grads]
        flat = slot.grads.gather(grads) if any(present) else None  # sent without copying; untouched until done
        if all(present):
            slot.weights.wait_copies_out()
            add_get = functools.partial(slot.table.add_get_async, flat, lr=group["lr"], out=slot.weights.array)
            self._pulls.append((slot, _completed(slot.table._call(add_get)) if alone else add_get()))
            return
        if flat is not None:
            index = slot.grads.indices_of(present)  # only the parameters that have gradients
            self._pushes.append((slot, slot.table.add_async(flat[index], index, lr=group["lr"])))
        self._start_pulls([slot])

    def _wait_pushes(self) -> None:
        pushes, self._pushes = self._pushes, []
        for slot, future in pushes:
            slot.table._wait(future)  # raises a failed push

    def _start_pulls(self, slots: list[_Slot]) -> None:
        for slot in slots:
            slot.weights.wait_copies_out()
            self._pulls.append((slot, slot.table.get_async(out=slot.weights.array)))

    def _land(self) -> None:
        """Wait for the pulls in flight and copy their weights into the parameters."""
        pulls, self._pulls = self._pulls, []
        for slot, future in pulls:
            slot.table._wait(future)
            slot.weights.scatter()

    def _check_unchanged(self, index: int, group: dict) -> None:
        _check_per_step(group)
        raw = {k: group.get(k) for k in ("updater", *self._option_keys)}
        if raw == self._raw[index]:
            return  # the usual case, without validating the options again
        now, created = _fixed(self._server_options(group)), _fixed(self._created[index])
        if now != created:
            raise InvalidArgument(f"param group {index}'s updater settings changed from {created} to {now}; the "
                                  f"server fixed them when it created the group's table (only "
                                  f"{' and '.join(PER_STEP)} can change between steps)")
        self._raw[index] = raw  # the same settings, spelled differently (a tuple for a list)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: "state" is empty (the optimizer state, e.g. Adam's moments and
        step counts, lives on the servers and in their checkpoints) and "param_groups"
        holds each group's hyperparameters (lr, weight_decay, updater and its options,
        plus what LR schedulers add), so a resumed run continues its schedule. "ps"
        names each group's tables and the updater settings the servers apply."""
        state = super().state_dict()
        state["ps"] = [{"tables": [s.table.name for s in slots], **created}
                       for slots, created in zip(self._slots, self._created)]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the groups' hyperparameters (lr, weight_decay, scheduler fields). The
        updater and its options cannot change (the servers apply them): a state dict
        with others raises InvalidArgument."""
        saved = state_dict.get("ps")
        if saved is not None:
            if len(saved) != len(self._created):
                raise InvalidArgument(f"the state dict has {len(saved)} param groups, this optimizer "
                                      f"{len(self._created)}")
            for index, (entry, created) in enumerate(zip(saved, self._created)):
                try:
                    theirs = _fixed(entry)
                except (AttributeError, KeyError, TypeError, InvalidArgument):
                    raise InvalidArgument(f"state_dict['ps'][{index}] is not what PSOptimizer.state_dict() "
                                          "writes") from None
                if theirs != _fixed(created):
                    raise InvalidArgument(f"param group {index} was saved with {theirs}, but its table applies "
                                          f"{_fixed(created)}; create the optimizer with the saved settings")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "ps"})
        for index, group in enumerate(self.param_groups):
            self._check_unchanged(index, group)


def _fixed(created: dict) -> tuple[str, dict]:
    """A group's updater and the options that cannot change (all but the learning rate)."""
    lr_option = updater_class(created["updater"]).lr_option
    return created["updater"], {k: v for k, v in created["options"].items() if k != lr_option}


def _check_per_step(group: dict) -> None:
    lr, decay = group["lr"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        lr = group["lr"] = float(lr)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise InvalidArgument(f"lr must be a number > 0, got {lr!r}")
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or decay < 0:
        raise InvalidArgument(f"weight_decay must be a number >= 0, got {decay!r}")


def _completed(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _gradient(p: torch.Tensor, weight_decay: float) -> Optional[torch.Tensor]:
    grad = p.grad
    if grad is None:
        return None
    if grad.is_sparse:
        grad = grad.to_dense()  # the table is dense; multiverso_py.torch.Embedding pushes sparse rows itself
    return grad.add(p, alpha=weight_decay) if weight_decay else grad
