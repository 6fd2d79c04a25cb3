"""The safetensors file format: headers parsed strictly, tensors located, read and mapped.

A `TensorRecord` says where one tensor's bytes are (file, byte range, dtype, shape). The
header parser refuses anything that does not fit the file, so a record can be trusted to point
inside it. Used by the resolver (which files a model is made of), the fingerprint (hashing
those bytes), the loader and the audit.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from guardtune.errors import DataError

_MAX_HEADER_BYTES = 100 * 2**20

TORCH_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
SAFETENSORS_TO_TORCH = {code: dtype for dtype, code in TORCH_TO_SAFETENSORS.items()}
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
_ITEM_BYTES |= {"U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor's bytes are: a slice of a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> list[TensorRecord]:
    """Parse a safetensors header strictly; DataError naming the file if it is not valid."""
    return _parse_header(path)[0]


def read_header_and_metadata(path: Path) -> tuple[list[TensorRecord], dict[str, str]]:
    """The tensors, as `read_header`, and the header's `__metadata__` strings (may be empty)."""
    records, metadata = _parse_header(path)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DataError(f"{path}: corrupt safetensors metadata")
    return records, metadata


def _parse_header(path: Path) -> tuple[list[TensorRecord], object]:
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) != 8:
                raise DataError(f"{path}: truncated safetensors file (no header)")
            (length,) = struct.unpack("<Q", raw_length)
            if length > _MAX_HEADER_BYTES or 8 + length > size:
                raise DataError(f"{path}: corrupt safetensors header length")
            header = json.loads(handle.read(length))
            json.dumps(header, ensure_ascii=False).encode("utf-8")  # no lone surrogate ("\ud800")
    except (OSError, ValueError) as error:  # ValueError: bad JSON or UTF-8, too-long integers
        raise DataError(f"{path}: not a readable safetensors file ({error})") from error
    except RecursionError:
        raise DataError(f"{path}: safetensors header nested too deeply") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: corrupt safetensors header")
    base = 8 + length
    records = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise DataError(f"{path}: corrupt header entry for tensor {name}") from error
        if not _valid_shape(shape):
            raise DataError(f"{path}: tensor {name} has an invalid shape")
        expected = math.prod(shape) * _ITEM_BYTES.get(dtype, 0)
        if dtype not in _ITEM_BYTES or end - start != expected or base + end > size or start < 0:
            raise DataError(f"{path}: tensor {name} does not fit the file (truncated or corrupt)")
        records.append(TensorRecord(name, dtype, shape, path, base + start, base + end))
    return records, header.get("__metadata__", {})


def _valid_shape(shape: tuple[int, ...]) -> bool:
    """Dimensions that, like their running product, fit int64: what torch can hold."""
    numel = 1
    for dimension in shape:
        numel *= dimension
        if not 0 <= dimension < 2**63 or numel >= 2**63:
            return False
    return True


@contextmanager
def mapped(paths: Iterable[Path]) -> Iterator[dict[Path, memoryview]]:
    handles, maps, views = [], [], {}
    try:
        for path in paths:
            handle = path.open("rb")
            handles.append(handle)
            if path.stat().st_size == 0:
                views[path] = memoryview(b"")
                continue
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            maps.append(mapped)
            views[path] = memoryview(mapped)
        yield views
    finally:
        for view in views.values():
            view.release()
        for mapped in maps:
            mapped.close()
        for handle in handles:
            handle.close()


def load_record(record: TensorRecord) -> torch.Tensor:
    """One tensor's values, read from its file (a copy: only this tensor is in memory)."""
    dtype = SAFETENSORS_TO_TORCH.get(record.dtype)
    if dtype is None:
        raise DataError(f"{record.path}: tensor {record.name} has unsupported dtype {record.dtype}")
    data = bytearray(record.end - record.start)
    with record.path.open("rb") as handle:
        handle.seek(record.start)
        if handle.readinto(data) != len(data):
            raise DataError(f"{record.path}: truncated at tensor {record.name}")
    if not data:
        return torch.empty(record.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(record.shape)


def renamed(record: TensorRecord, name: str) -> TensorRecord:
    """The same bytes under another name (digests include the name)."""
    return TensorRecord(name, record.dtype, record.shape, record.path, record.start, record.end)
