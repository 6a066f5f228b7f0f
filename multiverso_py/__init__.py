"""multiverso_py: a parameter server for Python training code.

    import multiverso_py as mv
    with mv.init():                      # embedded job; or mv.init("host:port")
        w = mv.ArrayTable(10)
        w.add(np.ones(10))
        print(w.get())
"""

from multiverso_py import checkpoint  # a module you can call: mv.checkpoint(path), and checkpoint.load(path)
from multiverso_py.api import (
    Job,
    barrier,
    clock,
    init,
    is_master_worker,
    servers_num,
    shutdown,
    worker_id,
    workers_num,
)
from multiverso_py.errors import (
    AuthFailed,
    ConnectFailed,
    ConnectionLost,
    IndexOutOfRange,
    InvalidArgument,
    MultiversoError,
    NotInitialized,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    TableNotFound,
    TableSpecMismatch,
)
from multiverso_py.tables.array import ArrayTable
from multiverso_py.tables.kv import KVTable
from multiverso_py.tables.matrix import MatrixTable
from multiverso_py.tables.sparse_matrix import SparseMatrixTable

__version__ = "0.1.0"

__all__ = [
    "init", "shutdown", "worker_id", "workers_num", "servers_num", "is_master_worker", "barrier", "clock", "checkpoint", "Job",
    "ArrayTable", "MatrixTable", "SparseMatrixTable", "KVTable",
    "MultiversoError", "InvalidArgument", "IndexOutOfRange", "ConnectFailed", "ConnectionLost", "RequestTimeout",
    "TableSpecMismatch", "TableNotFound", "NotInitialized", "ProtocolError", "RemoteError", "AuthFailed",
]
