"""Freeze masks: reading what publishers produce and turning it into a signed policy.

A mask names the UNet tensors to freeze. Three formats are read: a text file with one tensor
name per line, a JSON list of names, and the 0/1 CSV over `unet.parameters()` order that the
FreezeAsGuard reference code writes (one value per parameter tensor). Names may be fully
qualified (`unet.conv_in.weight`) or bare UNet names (`conv_in.weight`).

`sign_policy` is the one way a frozen list becomes a signed policy file: `publish` calls it with
the mask it learned, and `sign_mask` (what `policy sign` runs) with a mask file's names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guardtune import __version__, atomic, rowranges
from guardtune.contract import read_small_file
from guardtune.errors import PolicyError
from guardtune.resolve import ModelSource, resolve_model
from guardtune.rowranges import Ranges
from guardtune.trust.fingerprint import (
    fingerprint_records,
    model_configs,
    model_tensors,
    record_rows_digest,
)
from guardtune.trust.policy import (
    SCHEMA_VERSION,
    FreezePolicy,
    FrozenRows,
    FrozenShare,
    Provenance,
    parse_time,
    utc_now,
)
from guardtune.trust.signing import PrivateKey, key_id, load_private_key, sign_payload
from guardtune.trust.verify import policy_output_path

_CSV_TOKEN = re.compile(r"[\s,;]+")


def unet_parameter_order(source: ModelSource) -> list[str]:
    """UNet parameter names in `unet.parameters()` order, from the config alone (meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    config_dir = source.config_dir if source.kind == "single_file" else source.path
    assert config_dir is not None
    config = UNet2DConditionModel.load_config(config_dir, subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [f"unet.{name}" for name, _ in unet.named_parameters()]


def read_mask(path: Path, source: ModelSource) -> list[str]:
    """Tensor names (fully qualified) from a mask file in any of the three formats."""
    try:
        text = read_small_file(path, "mask", PolicyError).decode("utf-8")
    except FileNotFoundError as error:
        raise PolicyError(f"no mask file at {path}") from error
    except UnicodeDecodeError as error:
        raise PolicyError(f"mask {path} is not UTF-8 text") from error
    stripped = text.strip()
    if not stripped:
        raise PolicyError(f"mask {path} is empty")
    if stripped.startswith("["):
        try:
            names = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise PolicyError(f"mask {path} is not a valid JSON list ({error.msg})") from error
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PolicyError(f"mask {path} must be a JSON list of tensor names")
        return [_qualify(n) for n in names]
    tokens = [t for t in _CSV_TOKEN.split(stripped) if t]
    if all(_is_bit(t) for t in tokens):
        order = unet_parameter_order(source)
        if len(tokens) != len(order):
            raise PolicyError(
                f"mask {path} has {len(tokens)} values but the UNet has {len(order)} parameter "
                "tensors; a 0/1 mask needs one value per tensor in unet.parameters() order"
            )
        return [name for name, bit in zip(order, tokens, strict=True) if float(bit) >= 0.5]
    lines = [line.strip() for line in text.splitlines()]
    return [_qualify(line) for line in lines if line and not line.startswith("#")]


def _is_bit(token: str) -> bool:
    return token in {"0", "1", "0.0", "1.0"}


def _qualify(name: str) -> str:
    name = name.strip()
    return name if name.split(".", 1)[0] in ("unet", "text_encoder", "vae") else f"unet.{name}"


def build_policy(
    source: ModelSource,
    frozen_names: Iterable[str],
    provenance: Provenance,
    expires_at: str | None = None,
    frozen_rows: dict[str, Ranges] | None = None,
) -> FreezePolicy:
    """An unsigned policy: the frozen tensors, and rows of others (`frozen_rows`, fully
    qualified names -> row ranges), bound to the model's fingerprint (unknown: exit 4)."""
    records = model_tensors(source)
    frozen = set(frozen_names)
    unet = {r.name: r for r in records["unet"]}
    unknown = [n for n in sorted({*frozen, *(frozen_rows or {})}) if n not in unet]
    if unknown:
        raise PolicyError(
            f"mask names {unknown[0]}, which is not a UNet tensor of this model "
            f"({len(unknown)} unknown names)"
        )
    rows = {}
    for name, ranges in sorted((frozen_rows or {}).items()):
        record = unet[name]
        rows_in = rowranges.height(record.shape)
        problem = rowranges.problem(ranges, rows_in)
        if problem is not None:
            raise PolicyError(f"mask freezes rows of {name}: {problem}")
        if name in frozen or rowranges.count(ranges) == rows_in:
            frozen.add(name)  # every row: the tensor is frozen whole
            continue
        rows[name] = FrozenRows(rows_in, tuple(ranges), record_rows_digest(record, ranges))
    if not frozen and not rows:
        raise PolicyError("the mask freezes no tensor")
    return FreezePolicy(
        # The lowest schema that says it: per-tensor policies stay readable by older versions.
        schema_version=SCHEMA_VERSION if rows else 2,
        model={name: fingerprint_records(part) for name, part in records.items()},
        frozen_tensors=tuple(sorted(frozen)),
        frozen_share=FrozenShare.of({name: r.numel for name, r in unet.items()}, frozen, rows),
        frozen_rows=rows,
        provenance=Provenance(
            provenance.method,
            provenance.hyperparameters,
            provenance.datasets,
            provenance.tool_version or f"guardtune {__version__}",
        ),
        created_at=utc_now(),
        expires_at=expires_at,
        configs=model_configs(source),
    )


def sign_policy_file(policy: FreezePolicy, keys: list[PrivateKey], out: Path) -> Path:
    envelope = sign_payload(policy.to_json(), keys)
    atomic.write_bytes(out, envelope.to_json())
    return out


@dataclass(frozen=True)
class SignedPolicy:
    """A policy signed and written: where, how much of the UNet it freezes, and who signed it."""

    policy: Path
    frozen_tensors: int
    frozen_share_parameters: float
    frozen_share_tensors: float
    signers: tuple[str, ...]  # key ids, in signing order
    tensors_in_part: int = 0  # tensors of which the policy freezes some rows (schema 3)


def sign_policy(
    source: ModelSource,
    frozen_names: Iterable[str],
    provenance: Provenance,
    keys: list[PrivateKey],
    out: Path,
    expires_at: str | None = None,
    frozen_rows: dict[str, Ranges] | None = None,
) -> SignedPolicy:
    """Bind `frozen_names` (and `frozen_rows`) to the model's fingerprint, sign with every key,
    write to `out`."""
    policy = build_policy(source, frozen_names, provenance, expires_at, frozen_rows)
    sign_policy_file(policy, keys, out)
    share = policy.frozen_share
    signers = tuple(key_id(k.public_key()) for k in keys)
    return SignedPolicy(out, len(policy.frozen_tensors), share.parameters, share.tensors, signers,
                        len(policy.frozen_rows))  # fmt: skip


def sign_mask(
    mask: Path,
    key_files: Sequence[Path],
    *,
    model: str | ModelSource = "digits",
    model_config: Path | None = None,
    out: Path | None = None,
    expires_at: str | None = None,
    method: str = "manual",
) -> SignedPolicy:
    """`guardtune policy sign`: a mask file signed as the policy of `model`.

    Written to `out`, by default beside the model's model_index.json. The cheap checks (the
    model, the expiry, the keys and their passphrases) come before fingerprinting the model.
    """
    source = resolve_model(model, model_config)
    if expires_at is not None:
        parse_time(expires_at, "--expires")
    keys = [load_private_key(path) for path in key_files]
    target = policy_output_path(source, out)
    provenance = Provenance(method, {"mask_file": mask.name})
    return sign_policy(source, read_mask(mask, source), provenance, keys, target, expires_at)
