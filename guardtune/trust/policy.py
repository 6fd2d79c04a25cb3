"""The freeze policy: the signed value a publisher ships beside a model.

`FreezePolicy` says which tensors must stay frozen (fully qualified names such as
`unet.down_blocks.0.attentions.0.proj_in.weight`) and, from schema 3, which rows (output
channels) of other tensors (`FrozenRows`), binds them to the exact weights through the model
fingerprint, and records how it was made. It is a frozen dataclass with canonical JSON
(sorted keys, fixed separators: identical inputs give identical bytes) and a strict parser: an
unknown, missing or mistyped field is a PolicyError (exit 4). The JSON Schema shipped in the
package (`json_schema()`) describes the same format for other tools.

Signing (`guardtune.trust.signing`) wraps the canonical bytes in a DSSE envelope; this module knows
nothing of keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from guardtune import rowranges
from guardtune.errors import PolicyError
from guardtune.rowranges import Ranges
from guardtune.trust.fingerprint import ALGORITHM, ComponentFingerprint, ModelBinding, root_digest

# The newest schema. Schema 2 adds `configs`, the binding of every configuration file the
# loader parses; schema 3 adds `frozen_rows`, tensors frozen in part. A policy is written in the
# lowest schema that can say it (a per-tensor policy stays schema 2, which older guardtune
# versions read); schema 1 policies (tensors only) still verify, and say so.
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


def json_schema(version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The JSON Schema of a policy payload of `version`, as shipped in the package."""
    name = f"freeze-policy.v{version}.schema.json"
    return json.loads((resources.files("guardtune") / "assets" / "schema" / name).read_text())


PAYLOAD_TYPE = "application/vnd.guardtune.freeze-policy+json"


@dataclass(frozen=True)
class FrozenRows:
    """Part of one tensor that must stay frozen: rows (dim 0, output channels) of `height`.

    `digest` is the sha256-rows-v1 digest of exactly those rows as stored (`rows_digest`), so
    the guard and `audit` check them without reading the base again. The ranges never cover
    every row: a tensor frozen whole is listed in `frozen_tensors`.
    """

    height: int
    ranges: Ranges
    digest: str

    @property
    def count(self) -> int:
        return rowranges.count(self.ranges)

    @property
    def share(self) -> float:
        """The part of the tensor frozen: frozen rows over all its rows."""
        return self.count / self.height


@dataclass(frozen=True)
class FrozenShare:
    """How much of the UNet the policy freezes, by parameter count and by tensor count (a
    tensor frozen in part counts as the share of its rows)."""

    parameters: float
    tensors: float

    @classmethod
    def of(
        cls,
        numel: dict[str, int],
        frozen: Iterable[str],
        rows: dict[str, FrozenRows] | None = None,
    ) -> FrozenShare:
        """The share `frozen` (and `rows`) is of the UNet tensors in `numel` (6 places)."""
        frozen = set(frozen)
        parts = {n: r.share for n, r in (rows or {}).items() if n not in frozen}
        parameters: float = sum(numel.get(name, 0) for name in frozen)
        parameters += sum(numel.get(name, 0) * part for name, part in parts.items())
        tensors = len(frozen) + sum(parts.values())
        return cls(
            round(parameters / max(1, sum(numel.values())), 6),
            round(tensors / max(1, len(numel)), 6),
        )


@dataclass(frozen=True)
class Provenance:
    """How the policy was made: method, its hyperparameters, data digests, tool version."""

    method: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, str] = field(default_factory=dict)  # role -> sha256 of the data set
    tool_version: str = ""


@dataclass(frozen=True)
class FreezePolicy:
    schema_version: int
    model: dict[str, ComponentFingerprint]  # component -> fingerprint
    frozen_tensors: tuple[str, ...]
    frozen_share: FrozenShare
    provenance: Provenance
    created_at: str  # UTC, ISO 8601 with a trailing Z
    expires_at: str | None = None
    # Schema 2: sha256 of each configuration file by its name in the model folder; None where
    # not bound (every schema 1 policy, and a policy made for a single .safetensors file).
    configs: dict[str, str] | None = None
    # Schema 3: tensors frozen in part, by name (none of them in frozen_tensors).
    frozen_rows: dict[str, FrozenRows] = field(default_factory=dict)

    @property
    def binding(self) -> ModelBinding:
        return ModelBinding(self.model, self.configs)

    def to_dict(self) -> dict[str, Any]:
        fields = {
            "schema_version": self.schema_version,
            "model": {
                name: {"algorithm": c.algorithm, "root": c.root, "tensors": dict(c.tensors)}
                for name, c in self.model.items()
            },
            "frozen_tensors": list(self.frozen_tensors),
            "frozen_share": {
                "parameters": self.frozen_share.parameters,
                "tensors": self.frozen_share.tensors,
            },
            "provenance": {
                "method": self.provenance.method,
                "hyperparameters": self.provenance.hyperparameters,
                "datasets": self.provenance.datasets,
                "tool_version": self.provenance.tool_version,
            },
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }
        if self.schema_version >= 2:
            fields["configs"] = self.configs
        if self.schema_version >= 3:
            fields["frozen_rows"] = {
                name: {"height": r.height, "ranges": [list(p) for p in r.ranges],
                       "digest": r.digest}
                for name, r in self.frozen_rows.items()
            }  # fmt: skip
        return fields

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, no insignificant whitespace, UTF-8."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> FreezePolicy:
        return policy_from_dict(strict_json_loads(data, "policy"))

    def is_expired(self, now: datetime | None = None) -> bool:
        if self.expires_at is None:
            return False
        return (now or datetime.now(timezone.utc)) >= parse_time(self.expires_at, "expires_at")

    @property
    def frozen_components(self) -> tuple[str, ...]:
        names = [*self.frozen_tensors, *self.frozen_rows]
        return tuple(sorted({name.split(".", 1)[0] for name in names}))


# ----------------------------------------------------------------------------- strict parsing


def strict_json_loads(data: bytes | str, what: str) -> Any:
    """json.loads that rejects duplicate keys and non-standard constants (NaN, Infinity)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise PolicyError(f"{what} has duplicate field '{duplicates[0]}'")
        return dict(pairs)

    def no_constants(name: str) -> Any:
        raise PolicyError(f"{what} contains {name}, which is not valid JSON")

    try:
        value = json.loads(data, object_pairs_hook=no_duplicates, parse_constant=no_constants)
        # What parses must write back: no lone surrogate ("\ud800"), no 1e999 read as infinity.
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise PolicyError(f"{what} contains a lone surrogate, which is not valid Unicode") from None
    except ValueError as error:  # bad JSON or UTF-8, a number out of range
        raise PolicyError(f"{what} is not valid JSON ({error})") from error
    except RecursionError:  # Python's parser gives up on very deep nesting
        raise PolicyError(f"{what} is nested too deeply to be a policy") from None
    return value


def _fields(value: Any, where: str, required: dict[str, type | tuple[type, ...]]) -> dict:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be an object")
    unknown = sorted(set(value) - set(required))
    if unknown:
        raise PolicyError(f"{where} has unknown field '{unknown[0]}'")
    missing = sorted(set(required) - set(value))
    if missing:
        raise PolicyError(f"{where} is missing field '{missing[0]}'")
    for key, expected in required.items():
        item = value[key]
        # bool is an int in Python; a JSON true is never a valid number here.
        if isinstance(item, bool) and bool not in _as_tuple(expected):
            raise PolicyError(f"{where}.{key} has the wrong type (boolean)")
        if not isinstance(item, expected):
            raise PolicyError(f"{where}.{key} has the wrong type ({type(item).__name__})")
    return value


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _hex_digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise PolicyError(f"{where} must be a lowercase sha256 hex digest")
    return value


_UTC_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")


def parse_time(value: str, where: str) -> datetime:
    """An RFC 3339 UTC time, `2026-01-31T12:00:00Z`: nothing else (no offsets, no dates alone)."""
    if not _UTC_TIME.fullmatch(value):
        raise PolicyError(f"{where} must be a UTC time like 2026-01-31T12:00:00Z, got {value!r}")
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=timezone.utc)
    except ValueError as error:
        raise PolicyError(f"{where} is not a valid time ({value!r})") from error


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _share(value: Any, where: str) -> float:
    if not 0 <= value <= 1:  # before float(): an integer past float's range overflows
        raise PolicyError(f"{where} must be between 0 and 1")
    return float(value)


_TOP_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "model": dict,
    "frozen_tensors": list,
    "frozen_share": dict,
    "provenance": dict,
    "created_at": str,
    "expires_at": (str, type(None)),
}


def policy_from_dict(raw: Any) -> FreezePolicy:
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if (
        isinstance(version, int)
        and not isinstance(version, bool)
        and version not in (READABLE_VERSIONS)
    ):
        raise PolicyError(
            f"policy schema_version {version} is not supported "
            f"(this guardtune reads {', '.join(map(str, READABLE_VERSIONS))})",
            hint="upgrade guardtune",
        )
    required = dict(_TOP_FIELDS)
    if version in (2, 3):
        required["configs"] = (dict, type(None))
    if version == 3:
        required["frozen_rows"] = dict
    top = _fields(raw, "policy", required)
    model: dict[str, ComponentFingerprint] = {}
    if not top["model"]:
        raise PolicyError("policy.model names no component")
    for name, component in top["model"].items():
        where = f"policy.model.{name}"
        entry = _fields(component, where, {"algorithm": str, "root": str, "tensors": dict})
        if entry["algorithm"] != ALGORITHM:
            raise PolicyError(f"{where}.algorithm {entry['algorithm']!r} is not supported")
        tensors = {}
        for tensor_name, digest in entry["tensors"].items():
            if not tensor_name.startswith(f"{name}."):
                raise PolicyError(f"{where}.tensors has {tensor_name!r} outside the component")
            tensors[tensor_name] = _hex_digest(digest, f"{where}.tensors[{tensor_name}]")
        root = _hex_digest(entry["root"], f"{where}.root")
        if root_digest(tensors) != root:
            raise PolicyError(f"{where}.root does not match its tensor digests")
        model[name] = ComponentFingerprint(entry["algorithm"], root, dict(sorted(tensors.items())))
    frozen = top["frozen_tensors"]
    if not all(isinstance(n, str) for n in frozen):
        raise PolicyError("policy.frozen_tensors must be a list of tensor names")
    if len(set(frozen)) != len(frozen):
        raise PolicyError("policy.frozen_tensors lists a tensor twice")
    if list(frozen) != sorted(frozen):
        raise PolicyError("policy.frozen_tensors must be sorted")
    known = {t for c in model.values() for t in c.tensors}
    for tensor_name in frozen:
        if tensor_name not in known:
            raise PolicyError(f"policy freezes {tensor_name}, which the model fingerprint lacks")
    rows = _frozen_rows(top.get("frozen_rows", {}), known, set(frozen))
    share = _fields(
        top["frozen_share"],
        "policy.frozen_share",
        {"parameters": (int, float), "tensors": (int, float)},
    )
    prov = _fields(
        top["provenance"],
        "policy.provenance",
        {"method": str, "hyperparameters": dict, "datasets": dict, "tool_version": str},
    )
    for role, digest in prov["datasets"].items():
        _hex_digest(digest, f"policy.provenance.datasets.{role}")
    created = parse_time(top["created_at"], "policy.created_at")
    if top["expires_at"] is not None:
        expires = parse_time(top["expires_at"], "policy.expires_at")
        if expires <= created:
            raise PolicyError("policy.expires_at is not after policy.created_at")
    return FreezePolicy(
        schema_version=top["schema_version"],
        model=model,
        frozen_tensors=tuple(frozen),
        frozen_share=FrozenShare(
            _share(share["parameters"], "policy.frozen_share.parameters"),
            _share(share["tensors"], "policy.frozen_share.tensors"),
        ),
        provenance=Provenance(
            prov["method"], prov["hyperparameters"], prov["datasets"], prov["tool_version"]
        ),
        created_at=top["created_at"],
        expires_at=top["expires_at"],
        configs=_configs(top.get("configs")),
        frozen_rows=rows,
    )


def _frozen_rows(value: dict[str, Any], known: set[str], whole: set[str]) -> dict[str, FrozenRows]:
    """Tensors frozen in part: known tensors, not also frozen whole, with canonical ranges."""
    rows = {}
    for name, entry in sorted(value.items()):
        where = f"policy.frozen_rows[{name}]"
        if name not in known:
            raise PolicyError(f"policy freezes rows of {name}, which the model fingerprint lacks")
        if name in whole:
            raise PolicyError(f"{where}: {name} is frozen whole and in part")
        entry = _fields(entry, where, {"height": int, "ranges": list, "digest": str})
        height = entry["height"]
        if height < 1:
            raise PolicyError(f"{where}.height must be at least 1")
        problem = rowranges.problem(entry["ranges"], height)
        if problem is not None:
            raise PolicyError(f"{where}.ranges: {problem}")
        ranges = tuple((start, stop) for start, stop in entry["ranges"])
        if rowranges.count(ranges) == height:
            raise PolicyError(f"{where} covers every row; list {name} in frozen_tensors")
        rows[name] = FrozenRows(height, ranges, _hex_digest(entry["digest"], f"{where}.digest"))
    return rows


def _configs(value: dict[str, Any] | None) -> dict[str, str] | None:
    """Configuration file digests: names relative to the model folder, inside it."""
    if value is None:
        return None
    for name, digest in value.items():
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise PolicyError(f"policy.configs names {name!r}, which is not a file in a folder")
        _hex_digest(digest, f"policy.configs[{name}]")
    if "model_index.json" not in value:
        raise PolicyError("policy.configs does not bind model_index.json")
    return dict(sorted(value.items()))
