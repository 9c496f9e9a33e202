"""safetensors on disk, one tensor at a time: a lazy reader that checks headers, and a streaming
sharded writer with ``model.safetensors.index.json``.

The format: 8 bytes little-endian header length N, N bytes of JSON header
(``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative to
the end of the header), then the raw little-endian tensor bytes. Reading parses the header ourselves
(no weights are touched), so a truncated or corrupt file is reported with the file and tensor names,
and each tensor is read with one ``readinto`` into its own buffer (no mmap: resident memory stays at
the tensors being converted). The files are the ones ``safetensors.safe_open`` reads and writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from m1_jax.convert.errors import CheckpointError
from m1_jax.convert.wording import count

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}
# dtype names as in config.json / ModelConfig <-> safetensors names
NAME_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
ST_TO_NAME = {v: k for k, v in NAME_TO_ST.items()}


def st_dtype(dtype) -> str:
    """safetensors dtype string of a numpy / jax dtype or dtype name."""
    if isinstance(dtype, str) and dtype in NAME_TO_ST:
        return NAME_TO_ST[dtype]
    dt = np.dtype(dtype)
    if dt not in NP_TO_ST:
        raise CheckpointError(f"dtype {dt} cannot be stored in safetensors")
    return NP_TO_ST[dt]


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / an int -> bytes (decimal units as transformers: 1GB = 10**9)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected an int or a size like '5GB', '500MB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    return int(float(m.group(1)) * base**power)


class TensorInfo:
    __slots__ = ("key", "dtype", "shape", "begin", "end", "file")

    def __init__(self, key: str, dtype: str, shape: tuple, begin: int, end: int, file: str):
        self.key, self.dtype, self.shape, self.begin, self.end, self.file = key, dtype, shape, begin, end, file

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def __repr__(self) -> str:
        return f"TensorInfo({self.key!r}, {self.dtype}, {self.shape}, file={os.path.basename(self.file)!r})"


def read_header(file: str) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse and check one file's header: ``({key: TensorInfo}, __metadata__, data_start)``.

    Raises ``CheckpointError`` naming the file (and tensor) for a truncated or corrupt file.
    """
    try:
        size = os.path.getsize(file)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot open safetensors file ({e.strerror})") from None
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file: {size} bytes, "
                                  f"shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file: header length {n} but the "
                                  f"file has {size} bytes")
        blob = f.read(n)
    try:
        header = json.loads(blob)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header (not valid JSON: {e})") from None
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    for key, h in header.items():
        try:
            dtype, shape, (begin, end) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor {key!r}: {h!r}") from None
        if dtype not in ST_TO_NP:
            raise CheckpointError(f"{file}: tensor {key!r} has unknown dtype {dtype!r}")
        want = math.prod(shape) * ST_TO_NP[dtype].itemsize
        if end - begin != want or begin < 0:
            raise CheckpointError(f"{file}: corrupt safetensors header: tensor {key!r} ({dtype}, shape {shape}) "
                                  f"needs {want} bytes but its data_offsets {[begin, end]} span {end - begin}")
        if end > data_len:
            raise CheckpointError(f"{file}: truncated safetensors file: tensor {key!r} ends at byte "
                                  f"{data_start + end} but the file has {size} bytes")
        out[key] = TensorInfo(key, dtype, shape, data_start + begin, data_start + end, file)
    return out, meta, data_start


def read_tensor(info: TensorInfo, handle=None) -> np.ndarray:
    """Read one tensor into a fresh numpy array (bf16 as ``ml_dtypes.bfloat16``)."""
    arr = np.empty(info.shape, ST_TO_NP[info.dtype])
    buf = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")
    own = handle is None
    f = open(info.file, "rb") if own else handle
    try:
        f.seek(info.begin)
        got = f.readinto(buf) if arr.size else 0
    finally:
        if own:
            f.close()
    if got != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated safetensors file: tensor {info.key!r} needs {info.nbytes} "
                              f"bytes, read {got}")
    return arr


class SafetensorsFolder:
    """A checkpoint folder: ``config.json``, ``model.safetensors.index.json`` (optional) and the files.

    ``tensors`` maps every key to its ``TensorInfo`` (headers only; nothing else is read). With
    ``headers=False`` only the index is read (``tensors`` is then empty and ``index_keys`` holds the
    keys), for folders whose weight files are absent (``--dry-run`` of an index).
    """

    def __init__(self, path: str, *, headers: bool = True):
        self.path = path
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory (expected a HF checkpoint folder)")
        self.config = read_json(os.path.join(path, "config.json"), what="config.json")
        index_file = os.path.join(path, INDEX_NAME)
        self.index: dict[str, str] | None = None
        if os.path.isfile(index_file):
            idx = read_json(index_file, what=INDEX_NAME)
            if not isinstance(idx.get("weight_map"), dict):
                raise CheckpointError(f"{index_file}: no 'weight_map' object")
            self.index = dict(idx["weight_map"])
            files = sorted(set(self.index.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_NAME}")
        self.files = [os.path.join(path, f) for f in files]
        self.index_keys = list(self.index) if self.index is not None else []
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        if headers:
            self._read_headers()

    def missing_files(self) -> list[str]:
        return [f for f in self.files if not os.path.isfile(f)]

    def _read_headers(self) -> None:
        missing = self.missing_files()
        if missing:
            raise CheckpointError(f"{self.path}: {count(len(missing), 'weight file')} named in {INDEX_NAME} "
                                  f"{'does' if len(missing) == 1 else 'do'} not exist, e.g. "
                                  f"{os.path.basename(missing[0])!r}")
        for file in self.files:
            infos, meta, _ = read_header(file)
            self.metadata[file] = meta
            for key, info in infos.items():
                if key in self.tensors:
                    raise CheckpointError(f"{file}: tensor {key!r} is also in "
                                          f"{os.path.basename(self.tensors[key].file)}")
                if self.index is not None and self.index.get(key) != os.path.basename(file):
                    where = self.index.get(key)
                    raise CheckpointError(
                        f"{file}: tensor {key!r} is not listed for this file in {INDEX_NAME} "
                        + (f"(the index says {where!r})" if where else "(the index does not list it)"))
                self.tensors[key] = info
        if self.index is not None:
            absent = [k for k in self.index if k not in self.tensors]
            if absent:
                raise CheckpointError(f"{self.path}: {INDEX_NAME} lists tensor {absent[0]!r} in "
                                      f"{self.index[absent[0]]!r} but that file has no such tensor "
                                      f"({len(absent)} such tensors)")
        self.index_keys = list(self.tensors)

    @property
    def keys(self) -> list[str]:
        return list(self.tensors) if self.tensors else list(self.index_keys)


def read_json(file: str, *, what: str) -> dict:
    if not os.path.isfile(file):
        raise CheckpointError(f"{os.path.dirname(file) or '.'}: no {what}")
    try:
        with open(file) as f:
            out = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return out


class TensorReader:
    """Reads tensors of a ``SafetensorsFolder`` one at a time, keeping a few files open."""

    def __init__(self, folder: SafetensorsFolder, max_open: int = 8):
        self.folder = folder
        self._handles: dict[str, object] = {}
        self._max_open = max_open

    def read(self, key: str) -> np.ndarray:
        info = self.folder.tensors[key]
        h = self._handles.pop(info.file, None)
        if h is None:
            h = open(info.file, "rb")
        self._handles[info.file] = h  # most recently used last
        while len(self._handles) > self._max_open:
            old = next(iter(self._handles))
            self._handles.pop(old).close()
        return read_tensor(info, h)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------- writing
def plan_shards(entries: Iterable[tuple[str, tuple, str]], max_shard_size: int) -> list[list[tuple[str, tuple, str]]]:
    """Split ``(key, shape, st_dtype)`` entries, in order, into files of at most ``max_shard_size`` bytes
    (a tensor larger than that gets a file of its own), as transformers does."""
    shards: list[list] = [[]]
    size = 0
    for key, shape, dtype in entries:
        n = math.prod(shape) * ST_TO_NP[dtype].itemsize
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((key, tuple(shape), dtype))
        size += n
    return shards


def _header_bytes(entries, metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    off = 0
    for key, shape, dtype in entries:
        n = math.prod(shape) * ST_TO_NP[dtype].itemsize
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


class ShardedWriter:
    """Writes a planned list of tensors, in order, one at a time, into
    ``model-0000i-of-0000n.safetensors`` files in ``out_dir`` plus the index.

    Each file's header is written up front from the plan; ``write(key, array)`` checks that ``key`` is
    the next planned tensor with the planned shape and dtype, then appends its bytes.
    """

    def __init__(self, out_dir: str, entries: list[tuple[str, tuple, str]], max_shard_size: int | str,
                 metadata: dict | None = None):
        self.out_dir = out_dir
        self.shards = plan_shards(entries, parse_size(max_shard_size))
        n = len(self.shards)
        self.names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self._pos = 0
        self._file = None
        self._file_idx = -1
        self.total_size = sum(math.prod(s) * ST_TO_NP[d].itemsize for _, s, d in entries)

    def __iter__(self) -> Iterator[tuple[str, tuple, str]]:
        """The planned ``(key, shape, st_dtype)`` in writing order."""
        return (e for _, e in self._order)

    def write(self, key: str, arr: np.ndarray) -> None:
        if self._pos >= len(self._order):
            raise CheckpointError(f"writing tensor {key!r}: all planned tensors were already written")
        i, (want_key, shape, dtype) = self._order[self._pos]
        if key != want_key:
            raise CheckpointError(f"writing tensor {key!r}: expected {want_key!r} next")
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"writing tensor {key!r}: shape {tuple(arr.shape)}, expected {shape}")
        if st_dtype(arr.dtype) != dtype:
            raise CheckpointError(f"writing tensor {key!r}: dtype {st_dtype(arr.dtype)}, expected {dtype}")
        if i != self._file_idx:
            self._close_file()
            self._file = open(os.path.join(self.out_dir, self.names[i]), "wb")
            self._file.write(_header_bytes(self.shards[i], self.metadata))
            self._file_idx = i
        arr = np.ascontiguousarray(arr)
        if arr.size:
            self._file.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self._pos += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Close the last file and write the index; raises if a planned tensor was never written."""
        if self._pos != len(self._order):
            raise CheckpointError(f"{self.out_dir}: only {self._pos} of {len(self._order)} tensors were written; "
                                  f"next missing: {self._order[self._pos][1][0]!r}")
        self._close_file()
        weight_map = {key: self.names[i] for i, (key, _, _) in self._order}
        with open(os.path.join(self.out_dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=2)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
