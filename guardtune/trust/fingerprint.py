"""Model fingerprints: which exact tensors a policy was made for.

A fingerprint identifies weights, not files. Every tensor is hashed over its fully qualified
name (`unet.down_blocks.0...`), dtype, shape and raw little-endian bytes; a component's root
digest is the sha256 of its sorted (name, digest) lines. The same tensors give the same
fingerprint whether they sit in a diffusers folder, a single guardtune `.safetensors` file or
in memory, and any changed byte changes it.

Files are read zero-copy: the safetensors header is parsed here and each tensor's bytes are a
slice of an mmap, hashed by a thread pool (hashlib releases the GIL on large buffers). Called by
`policy sign/verify`, `finetune` (before training) and `audit` (on derivatives).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from guardtune.contract import COMPONENTS, LDM_UNET_PREFIX, weight_files
from guardtune.errors import DataError
from guardtune.models import ModelSource

ALGORITHM = "sha256-tensor-v1"
_DOMAIN = b"guardtune-tensor-v1\x00"
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
class ComponentFingerprint:
    """Digests of one component's tensors (names fully qualified) and their root digest."""

    algorithm: str
    root: str
    tensors: dict[str, str]


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


def tensor_digest(name: str, dtype: str, shape: Iterable[int], data: memoryview | bytes) -> str:
    digest = hashlib.sha256(_DOMAIN)
    digest.update(f"{name}\x00{dtype}\x00{','.join(map(str, shape))}\x00".encode())
    digest.update(data)
    return digest.hexdigest()


def root_digest(tensors: dict[str, str]) -> str:
    digest = hashlib.sha256(ALGORITHM.encode() + b"\x00")
    for name in sorted(tensors):
        digest.update(f"{name}\x00{tensors[name]}\n".encode())
    return digest.hexdigest()


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable safetensors file ({error})") from error
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
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path}: corrupt header entry for tensor {name}") from error
        expected = math.prod(shape) * _ITEM_BYTES.get(dtype, 0)
        if dtype not in _ITEM_BYTES or end - start != expected or base + end > size or start < 0:
            raise DataError(f"{path}: tensor {name} does not fit the file (truncated or corrupt)")
        records.append(TensorRecord(name, dtype, shape, path, base + start, base + end))
    return records, header.get("__metadata__", {})


@contextmanager
def _mapped(paths: Iterable[Path]) -> Iterator[dict[Path, memoryview]]:
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


def hash_records(records: list[TensorRecord], workers: int | None = None) -> dict[str, str]:
    """Digest every record's bytes in parallel, zero-copy from the mapped files."""
    workers = workers or min(32, os.cpu_count() or 1)
    # Largest first, so no big tensor is left alone at the end of the pool.
    ordered = sorted(records, key=lambda r: r.end - r.start, reverse=True)
    with _mapped({r.path for r in records}) as views, ThreadPoolExecutor(workers) as pool:

        def work(record: TensorRecord) -> tuple[str, str]:
            data = views[record.path][record.start : record.end]
            try:
                return record.name, tensor_digest(record.name, record.dtype, record.shape, data)
            finally:
                data.release()

        return dict(pool.map(work, ordered))


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


def fingerprint_records(records: list[TensorRecord]) -> ComponentFingerprint:
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise DataError("duplicate tensor names across the component's files")
    tensors = hash_records(records)
    return ComponentFingerprint(ALGORITHM, root_digest(tensors), dict(sorted(tensors.items())))


def component_files(folder: Path) -> list[Path]:
    """The safetensors files diffusers would load for a component folder (shards included)."""
    plain, _ = weight_files(folder)
    if not plain:
        raise DataError(f"{folder}: no .safetensors weights", hint="save with safe_serialization")
    return plain


def model_tensors(
    source: ModelSource, components: Iterable[str] = COMPONENTS
) -> dict[str, list[TensorRecord]]:
    """Tensor records per component, names prefixed `component.`, for a folder or single file."""
    result: dict[str, list[TensorRecord]] = {}
    if source.kind == "single_file":
        records = read_header(source.path)
        if any(r.name.startswith(LDM_UNET_PREFIX) for r in records):
            raise DataError(
                f"{source.path.name} is an original-format SD checkpoint, whose tensor names "
                "differ from diffusers'",
                hint="save it as a diffusers folder (save_pretrained) and use that folder",
            )
        for component in components:
            part = [r for r in records if r.name.startswith(f"{component}.")]
            if not part:
                raise DataError(f"{source.path}: no '{component}.*' tensors")
            result[component] = part
        return result
    for component in components:
        folder = source.path / component
        result[component] = [
            renamed(record, f"{component}.{record.name}")
            for path in component_files(folder)
            for record in read_header(path)
        ]
    return result


def fingerprint_model(
    source: ModelSource, components: Iterable[str] = COMPONENTS
) -> dict[str, ComponentFingerprint]:
    """Fingerprint each component of a model as stored on disk."""
    return {
        name: fingerprint_records(records)
        for name, records in model_tensors(source, components).items()
    }


def fingerprint_state_dict(component: str, state: dict[str, torch.Tensor]) -> ComponentFingerprint:
    """Fingerprint in-memory tensors (e.g. a LoRA-merged or just-trained module)."""
    tensors = {}
    for key, tensor in state.items():
        dtype = TORCH_TO_SAFETENSORS.get(tensor.dtype)
        if dtype is None:
            raise DataError(f"tensor {key} has dtype {tensor.dtype}, which cannot be fingerprinted")
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        name = f"{component}.{key}"
        tensors[name] = tensor_digest(name, dtype, tuple(tensor.shape), raw.data)
    return ComponentFingerprint(ALGORITHM, root_digest(tensors), dict(sorted(tensors.items())))


def renamed(record: TensorRecord, name: str) -> TensorRecord:
    """The same bytes under another name (digests include the name)."""
    return TensorRecord(name, record.dtype, record.shape, record.path, record.start, record.end)
