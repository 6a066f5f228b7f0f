"""Checkpoints on disk, and reading them back without any server.

A checkpoint is a directory `<root>/<n>/` holding one safetensors file per server (every
partition's values and updater state, plus metadata) and a `manifest.json` (the tables'
specs and layouts, the job's shape and clocks). It is written into `<n>.tmp/`, each file
fsynced, the directory renamed, and only then `<root>/LATEST` replaced (atomically) to
name it: an interrupted checkpoint never replaces a good one.

    tables = multiverso_py.checkpoint.load("ckpt")   # plain numpy, no job needed
    tables["embeddings"].values, tables["embeddings"].keys, tables["w"].state["m"]

The files are standard safetensors (8-byte header length, a JSON header, raw
little-endian tensors), written straight from the arrays without an in-memory copy.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from multiverso_py.errors import InvalidArgument

FORMAT = "multiverso-py checkpoint 1"
KEEP = 2  # complete checkpoints kept under a root; older ones are removed
_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64", "int8": "I8", "int32": "I32", "int64": "I64",
           "uint8": "U8", "uint64": "U64", "bool": "BOOL"}
_NUMPY = {code: np.dtype(name) for name, code in _DTYPES.items()}


# ---------------------------------------------------------------- safetensors files


def write_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    """Write a safetensors file and fsync it. Metadata values travel as JSON strings."""
    header: dict[str, Any] = {"__metadata__": {k: json.dumps(v) for k, v in metadata.items()}}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        nbytes = array.nbytes
        header[name] = {"dtype": _DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        arrays.append(array)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for array in arrays:
            f.write(memoryview(array.reshape(-1)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors (read-only memory maps of the file) and metadata of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    metadata = {k: json.loads(v) for k, v in header.pop("__metadata__", {}).items()}
    start = 8 + length
    whole = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) > start else np.empty(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        lo, hi = info["data_offsets"]
        tensors[name] = whole[start + lo:start + hi].view(_NUMPY[info["dtype"]]).reshape(info["shape"])
    return tensors, metadata


# ---------------------------------------------------------------- directories


def new_checkpoint_dir(root: str) -> tuple[Path, int]:
    """A fresh `<root>/<n>.tmp/` to write checkpoint n into."""
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    done = [int(p.name) for p in base.iterdir() if p.name.isdigit()]
    number = max(done, default=0) + 1
    tmp = base / f"{number}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp, number


def publish(tmp: Path, manifest: dict) -> Path:
    """Write the manifest, then make the checkpoint in `tmp` the latest, atomically."""
    base, number = tmp.parent, int(tmp.name.split(".")[0])
    with open(tmp / "manifest.json", "w") as f:
        json.dump({"format": FORMAT, **manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = base / str(number)
    os.rename(tmp, final)
    pointer = base / "LATEST.tmp"
    pointer.write_text(str(number))
    os.replace(pointer, base / "LATEST")
    _fsync_dir(base)
    for old in sorted((int(p.name) for p in base.iterdir() if p.name.isdigit()), reverse=True)[KEEP:]:
        shutil.rmtree(base / str(old), ignore_errors=True)
    return final


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest(root: str) -> Path:
    """The directory of the latest complete checkpoint under root (or root itself, when it
    is one)."""
    base = Path(root)
    if (base / "manifest.json").exists():
        return base
    try:
        return base / (base / "LATEST").read_text().strip()
    except OSError:
        raise InvalidArgument(f"{root!r} holds no checkpoint (no LATEST file); was mv.checkpoint() "
                              "given this path?") from None


def read_manifest(root: str) -> tuple[Path, dict]:
    folder = latest(root)
    with open(folder / "manifest.json") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise InvalidArgument(f"{folder} is not a {FORMAT!r} checkpoint")
    return folder, manifest


# ---------------------------------------------------------------- loading without a job


@dataclass
class TableData:
    """One table of a checkpoint, assembled from its partitions."""

    name: str
    spec: dict
    values: np.ndarray  # the table's content (KV: one row per key, in `keys` order)
    keys: Optional[np.ndarray] = None  # KV tables: the keys, int64
    # updater state, row-aligned with values; state only some partitions hold (a dcasgd
    # backup of a worker that pulled part of the table) is left out
    state: dict[str, np.ndarray] = field(default_factory=dict)


def partition_arrays(folder: Path, manifest: dict, name: str) -> dict[int, dict[str, np.ndarray]]:
    """{partition: {array name: array}} of one table, from the server files."""
    entry = manifest["tables"][name]
    out: dict[int, dict[str, np.ndarray]] = {}
    for file in sorted(set(entry["files"].values())):
        tensors, _ = read_tensors(folder / file)
        prefix = f"t{entry['id']}/"
        for key, array in tensors.items():
            if key.startswith(prefix):
                pid, array_name = key[len(prefix):].split("/", 1)
                out.setdefault(int(pid[1:]), {})[array_name] = array
    return out


def load(root: str) -> dict[str, TableData]:
    """Every table of the latest checkpoint under root, as numpy arrays."""
    folder, manifest = read_manifest(root)
    tables = {}
    for name, entry in manifest["tables"].items():
        parts = partition_arrays(folder, manifest, name)
        ordered = [parts[p] for p in sorted(parts)]
        values = _join([p["data"] for p in ordered])
        # state every partition holds: joined by partition it lines up with the values
        state_names = sorted(k for k in ordered[0] if k.startswith("state/") and all(k in p for p in ordered))
        state = {k[len("state/"):]: _join([p[k] for p in ordered]) for k in state_names}
        keys = _join([p["keys"] for p in ordered]).view(np.int64) if entry["spec"]["kind"] == "kv" else None
        if entry["spec"]["kind"] != "kv":
            values = values.reshape(entry["spec"]["shape"])
        tables[name] = TableData(name, entry["spec"], values, keys, state)
    return tables


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if len(arrays) != 1 else np.array(arrays[0])


class _CallableModule(types.ModuleType):
    """The contract names both mv.checkpoint(path) (take one) and
    multiverso_py.checkpoint.load(path) (read one): this module is both."""

    def __call__(self, path: str) -> str:
        from multiverso_py.api import checkpoint

        return checkpoint(path)


sys.modules[__name__].__class__ = _CallableModule
