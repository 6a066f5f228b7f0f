"""Table types. Each module holds one type whole: its layout (how it is partitioned), its
server-side shard and its worker-side handle. Registering a type is one line here."""

from __future__ import annotations

from types import ModuleType

from multiverso_py.tables import array, kv, matrix, sparse_matrix
from multiverso_py.tables.base import TableSpec

TABLE_TYPES: dict[str, ModuleType] = {
    "array": array,
    "matrix": matrix,
    "sparse_matrix": sparse_matrix,
    "kv": kv,
}


def table_type(kind: str) -> ModuleType:
    try:
        return TABLE_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown table kind {kind!r}") from None


def layout(spec: TableSpec, num_servers: int) -> dict:
    return table_type(spec.kind).layout(spec, num_servers)


def make_shard(spec: TableSpec, layout: dict, pid: int):
    return table_type(spec.kind).make_shard(spec, layout, pid)
