"""Model fingerprints: which exact tensors a policy was made for.

A fingerprint identifies weights, not files. Every tensor is hashed over its fully qualified
name (`unet.down_blocks.0...`), dtype, shape and raw little-endian bytes; a component's root
digest is the sha256 of its sorted (name, digest) lines. The same tensors give the same
fingerprint whether they sit in a diffusers folder, a single guardtune `.safetensors` file or
in memory, and any changed byte changes it.

Which tensors a model is made of is the resolver's answer (`guardtune.resolve`), so what is
fingerprinted is what `load_pipeline` loads. Files are hashed zero-copy from an mmap by a
thread pool (hashlib releases the GIL on large buffers); `read_and_hash` copies each tensor
out once and hashes the copy, so the bytes a loader keeps are the bytes that were hashed.
Called by `policy sign/verify`, `finetune`, the loader and `audit`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from guardtune.contract import COMPONENTS
from guardtune.errors import DataError, ModelMismatchError
from guardtune.ldm import is_ldm_checkpoint, ldm_components
from guardtune.resolve import ModelSource, resolve_folder
from guardtune.rowranges import Ranges, height
from guardtune.tensorfile import (
    SAFETENSORS_TO_TORCH,
    TORCH_TO_SAFETENSORS,
    TensorRecord,
    mapped,
    read_header,
)

ALGORITHM = "sha256-tensor-v1"
_DOMAIN = b"guardtune-tensor-v1\x00"


@dataclass(frozen=True)
class ComponentFingerprint:
    """Digests of one component's tensors (names fully qualified) and their root digest."""

    algorithm: str
    root: str
    tensors: dict[str, str]


@dataclass(frozen=True)
class ModelBinding:
    """What a policy binds of a model: every tensor of its components and (policies of schema 2
    on) the sha256 of every configuration file the loader parses, by its name in the folder:
    model_index.json, the components' configs, the scheduler's and every tokenizer file.
    `configs` is None where they are not bound (a schema 1 policy, a single-file model)."""

    components: dict[str, ComponentFingerprint]
    configs: dict[str, str] | None = None


def tensor_digest(name: str, dtype: str, shape: Iterable[int], data: memoryview | bytes) -> str:
    digest = hashlib.sha256(_DOMAIN)
    digest.update(f"{name}\x00{dtype}\x00{','.join(map(str, shape))}\x00".encode())
    digest.update(data)
    return digest.hexdigest()


_ROWS_DOMAIN = b"guardtune-rows-v1\x00"


def rows_digest(
    name: str, dtype: str, shape: tuple[int, ...], ranges: Ranges, data: memoryview | bytes
) -> str:
    """sha256 of the frozen rows of one tensor: its name, dtype, shape, the ranges, then the
    bytes of each range in order. `data` is the whole tensor's row-major bytes, so a range of
    rows is one contiguous slice of it (read zero-copy from an mmap)."""
    rows = height(shape)
    row_bytes = len(data) // rows if rows else 0
    spans = ";".join(f"{start}-{stop}" for start, stop in ranges)
    digest = hashlib.sha256(_ROWS_DOMAIN)
    digest.update(f"{name}\x00{dtype}\x00{','.join(map(str, shape))}\x00{spans}\x00".encode())
    view = memoryview(data)
    for start, stop in ranges:
        digest.update(view[start * row_bytes : stop * row_bytes])
    return digest.hexdigest()


def record_rows_digest(record: TensorRecord, ranges: Ranges, name: str | None = None) -> str:
    """`rows_digest` of a tensor in a safetensors file, under `name` (default its own)."""
    with mapped({record.path}) as views:
        data = views[record.path][record.start : record.end]
        try:
            return rows_digest(name or record.name, record.dtype, record.shape, ranges, data)
        finally:
            data.release()


def tensor_rows_digest(name: str, tensor: torch.Tensor, dtype: str, ranges: Ranges) -> str:
    """`rows_digest` of an in-memory tensor, cast to the stored `dtype` first (exact for the
    upcast weights training holds)."""
    stored = tensor.detach().to("cpu", SAFETENSORS_TO_TORCH[dtype]).contiguous()
    raw = stored.reshape(-1).view(torch.uint8).numpy()
    return rows_digest(name, dtype, tuple(stored.shape), ranges, raw.data)


def root_digest(tensors: dict[str, str]) -> str:
    digest = hashlib.sha256(ALGORITHM.encode() + b"\x00")
    for name in sorted(tensors):
        digest.update(f"{name}\x00{tensors[name]}\n".encode())
    return digest.hexdigest()


def hash_records(records: list[TensorRecord], workers: int | None = None) -> dict[str, str]:
    """Digest every record's bytes in parallel, zero-copy from the mapped files."""
    workers = workers or min(32, os.cpu_count() or 1)
    # Largest first, so no big tensor is left alone at the end of the pool.
    ordered = sorted(records, key=lambda r: r.end - r.start, reverse=True)
    with mapped({r.path for r in records}) as views, ThreadPoolExecutor(workers) as pool:

        def work(record: TensorRecord) -> tuple[str, str]:
            data = views[record.path][record.start : record.end]
            try:
                return record.name, tensor_digest(record.name, record.dtype, record.shape, data)
            finally:
                data.release()

        return dict(pool.map(work, ordered))


def fingerprint_records(records: list[TensorRecord]) -> ComponentFingerprint:
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise DataError("duplicate tensor names across the component's files")
    return fingerprint_of(hash_records(records))


def fingerprint_of(digests: dict[str, str]) -> ComponentFingerprint:
    """A component's fingerprint from its tensors' digests."""
    return ComponentFingerprint(ALGORITHM, root_digest(digests), dict(sorted(digests.items())))


def model_tensors(
    source: ModelSource, components: Iterable[str] | None = None
) -> dict[str, list[TensorRecord]]:
    """Tensor records per component, names prefixed `component.`, for a folder or single file.

    `components=None` means every component that holds weights (a single file: `COMPONENTS`).
    """
    result: dict[str, list[TensorRecord]] = {}
    if source.kind == "single_file":
        records = read_header(source.path)
        if is_ldm_checkpoint(records):
            if source.config_dir is None:
                raise DataError(f"{source.path.name} needs --model-config")
            parts = ldm_components(source.path, source.config_dir)
            wanted = tuple(parts) if components is None else tuple(components)
            absent = [name for name in wanted if name not in parts]
            if absent:
                raise DataError(f"{source.path.name}: an original checkpoint has no {absent[0]}")
            return {name: parts[name] for name in wanted}
        components = COMPONENTS if components is None else components
        for component in components:
            part = [r for r in records if r.name.startswith(f"{component}.")]
            if not part:
                raise DataError(f"{source.path}: no '{component}.*' tensors")
            result[component] = part
        return result
    manifest = resolve_folder(source.path, source.variant, source.root)
    for component in manifest.weighted if components is None else components:
        if component not in manifest.components:
            raise DataError(f"{source.label} has no {component}")
        result[component] = list(manifest.components[component].tensors)
    return result


def model_configs(source: ModelSource) -> dict[str, str] | None:
    """The configuration files of a folder, as `ModelBinding.configs` binds them; None for a
    single file, whose configs are whatever `--model-config` folder accompanies it."""
    if source.kind == "single_file":
        return None
    return resolve_folder(source.path, source.variant, source.root).config_digests()


def fingerprint_model(
    source: ModelSource, components: Iterable[str] | None = None
) -> dict[str, ComponentFingerprint]:
    """Fingerprint each component of a model as stored on disk."""
    return fingerprint_components(model_tensors(source, components))


def fingerprint_components(
    records: dict[str, list[TensorRecord]],
) -> dict[str, ComponentFingerprint]:
    """Fingerprint each component's records (as `model_tensors` lists them)."""
    return {name: fingerprint_records(part) for name, part in records.items()}


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
    return fingerprint_of(tensors)


def read_and_hash(
    records: Iterable[TensorRecord], workers: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each record's tensor, copied out of its file, and the digest of exactly that copy."""
    records = sorted(records, key=lambda r: r.end - r.start, reverse=True)
    for record in records:
        if record.dtype not in SAFETENSORS_TO_TORCH:
            raise DataError(f"{record.path}: tensor {record.name} has dtype {record.dtype}")
    workers = workers or min(32, os.cpu_count() or 1)
    with mapped({r.path for r in records}) as views, ThreadPoolExecutor(workers) as pool:

        def work(record: TensorRecord) -> tuple[str, torch.Tensor, str]:
            owned = torch.empty(record.end - record.start, dtype=torch.uint8)
            if record.end > record.start:
                source = views[record.path][record.start : record.end]
                try:
                    owned.numpy()[:] = source  # one copy; what is hashed is what is kept
                finally:
                    source.release()
            digest = tensor_digest(record.name, record.dtype, record.shape, owned.numpy().data)
            tensor = owned.view(SAFETENSORS_TO_TORCH[record.dtype]).reshape(record.shape)
            return record.name, tensor, digest

        done = list(pool.map(work, records))
    return {name: tensor for name, tensor, _ in done}, {name: digest for name, _, digest in done}


def compare_binding(
    expected: ModelBinding,
    components: dict[str, ComponentFingerprint],
    configs: dict[str, str] | None,
) -> None:
    """ModelMismatchError naming the first tensor or configuration file that differs."""
    compare_fingerprints(expected.components, components)
    compare_configs(expected.configs, configs)


def compare_configs(expected: dict[str, str] | None, actual: dict[str, str] | None) -> None:
    """ModelMismatchError naming the first configuration file that differs, is missing or is
    extra (a tokenizer file added beside the bound ones changes what loads)."""
    if expected is None:
        return
    if actual is None:
        raise ModelMismatchError(
            "the policy binds the model's configuration files, and a single .safetensors file "
            "has none of its own",
            hint="use the model folder the policy was published for",
        )
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problem = "is missing"
        elif name not in expected:
            problem = "is not in the policy's model"
        elif expected[name] != actual[name]:
            problem = "differs"
        else:
            continue
        raise ModelMismatchError(
            f"model does not match the policy: {name} {problem}",
            hint="use the exact model folder the policy was published for",
        )


def compare_fingerprints(
    expected: dict[str, ComponentFingerprint], actual: dict[str, ComponentFingerprint]
) -> None:
    """ModelMismatchError naming the first component and tensor that differ; a component with
    weights that the policy does not bind (SDXL's second text encoder under a policy made
    without it) is a mismatch too."""
    unbound = sorted(set(actual) - set(expected))
    if unbound:
        raise ModelMismatchError(
            f"model does not match the policy: its {unbound[0]} is not bound by the policy",
            hint="use the exact model the policy was published for",
        )
    for component, want in sorted(expected.items()):
        have = actual.get(component)
        if have is None:
            raise ModelMismatchError(f"the model has no {component}, which the policy covers")
        if have.root == want.root:
            continue
        missing = sorted(set(want.tensors) - set(have.tensors))
        if missing:
            raise ModelMismatchError(
                f"model does not match the policy: tensor {missing[0]} is missing "
                f"({len(missing)} missing in {component})"
            )
        added = sorted(set(have.tensors) - set(want.tensors))
        if added:
            raise ModelMismatchError(
                f"model does not match the policy: tensor {added[0]} is not in the policy's model "
                f"({len(added)} extra in {component})"
            )
        changed = sorted(n for n in want.tensors if want.tensors[n] != have.tensors[n])
        raise ModelMismatchError(
            f"model does not match the policy: tensor {changed[0]} digest differs "
            f"({len(changed)} of {len(want.tensors)} tensors of {component} differ)",
            hint="use the exact weights the policy was published for",
        )
