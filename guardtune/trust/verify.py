"""Verifying a signed freeze policy against trusted keys and the exact model weights.

The one place where the trust chain is checked, in this order, failing closed at the first
problem: envelope well-formed (exit 4) -> signed by a trusted key (5) -> payload a valid policy
(4) -> not expired (4) -> model fingerprint equal to the policy's (6, naming the first tensor
that differs) and, for policies of schema 2, every configuration file the loader parses equal
to the one signed (6, naming the file). `policy verify`, `finetune` and `audit` all go through
`verify_policy`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from guardtune.contract import POLICY_FILE, read_small_file
from guardtune.errors import DataError, PolicyError
from guardtune.resolve import ModelSource, resolve_model
from guardtune.rowranges import height
from guardtune.tensorfile import TensorRecord
from guardtune.trust.fingerprint import (
    compare_binding,
    fingerprint_components,
    model_configs,
    model_tensors,
    record_rows_digest,
)
from guardtune.trust.keys import load_trusted
from guardtune.trust.policy import FreezePolicy, FrozenShare, parse_time
from guardtune.trust.signing import Envelope, verify_envelope


@dataclass(frozen=True)
class VerifiedPolicy:
    """A policy whose signature, validity and model binding have all been checked."""

    policy: FreezePolicy
    policy_path: Path
    signer_keyid: str
    signer_key_file: Path
    model: str

    def summary(self) -> VerificationSummary:
        return VerificationSummary(
            self.policy_path, self.model, self.signer_keyid, self.signer_key_file,
            len(self.policy.frozen_tensors), self.policy.frozen_share.parameters,
            self.policy.expires_at, self.policy.schema_version,
            len(self.policy.configs) if self.policy.configs is not None else None,
            len(self.policy.frozen_rows),
        )  # fmt: skip


@dataclass(frozen=True)
class VerificationSummary:
    """What `guardtune policy verify` reports: the checked policy, its signer and its reach."""

    policy: Path
    model: str
    signer_keyid: str
    signer_key_file: Path
    frozen_tensors: int
    frozen_share_parameters: float
    expires_at: str | None
    schema_version: int
    bound_configs: int | None  # configuration files bound; None: not bound
    tensors_in_part: int = 0  # tensors of which only some rows are frozen


def default_policy_path(source: ModelSource) -> Path:
    """A model folder carries its policy beside model_index.json."""
    if source.kind == "single_file":
        raise PolicyError(
            f"a single-file model ({source.path.name}) has no policy beside it",
            hint="pass --policy",
        )
    return source.path / POLICY_FILE


def policy_output_path(source: ModelSource, out: Path | None) -> Path:
    """Where a new policy goes: `out`, or beside the model's model_index.json.

    Never into guardtune's own package by default: the embedded model's folder is part of
    the installation, and a policy written there would replace the one it ships.
    """
    if out is not None:
        return Path(out)
    if source.kind == "embedded":
        raise DataError(
            "the embedded model lives inside guardtune's package; its policy is not rewritten",
            hint="pass --out for the new policy",
        )
    if source.kind == "single_file":
        raise PolicyError(
            f"a single-file model ({source.path.name}) has no folder to hold a policy",
            hint="pass --out",
        )
    return source.path / POLICY_FILE


def read_envelope(path: Path) -> Envelope:
    try:
        data = read_small_file(path, "policy", PolicyError)
    except FileNotFoundError as error:
        raise PolicyError(f"no freeze policy at {path}", hint="pass --policy") from error
    return Envelope.from_json(data, where=f"policy {path.name}")


# How far a publisher's clock may run ahead of the verifier's.
CLOCK_SKEW = timedelta(minutes=5)


def _check_frozen(policy: FreezePolicy, unet_records: list[TensorRecord], path: Path) -> None:
    """The frozen list names UNet tensors of the model, and its signed share is its true share.

    One rule for every command: a policy that `finetune` or `audit` would refuse does not
    verify either, and a share a reader would trust cannot differ from the list it summarises.
    """
    unet = policy.model.get("unet")
    if unet is None:
        raise PolicyError(f"policy {path.name} does not fingerprint a UNet")
    outside = [n for n in [*policy.frozen_tensors, *policy.frozen_rows] if n not in unet.tensors]
    if outside:
        raise PolicyError(f"policy {path.name} freezes {outside[0]}, which is not a UNet tensor")
    records = {r.name: r for r in unet_records}
    numel = {name: r.numel for name, r in records.items()}
    if set(numel) != set(unet.tensors):  # another model: the fingerprint says which tensor
        return
    for name, rows in policy.frozen_rows.items():
        # The row digests are what the guard and audit compare against: they must be this
        # model's rows, not merely well-formed (the tensor digest binds the whole tensor).
        record = records[name]
        if (
            rows.height != height(record.shape)
            or record_rows_digest(record, rows.ranges) != rows.digest
        ):
            raise PolicyError(
                f"policy {path.name} freezes rows of {name} that are not this model's rows"
            )
    actual = FrozenShare.of(numel, policy.frozen_tensors, policy.frozen_rows)
    share = policy.frozen_share
    if (
        abs(share.parameters - actual.parameters) > 1e-6
        or abs(share.tensors - actual.tensors) > 1e-6
    ):
        raise PolicyError(
            f"policy {path.name} states a frozen share of {share.parameters:.1%} of parameters, "
            f"but its list freezes {actual.parameters:.1%}"
        )


def verify_policy(
    model: str | ModelSource = "digits",
    policy_path: Path | None = None,
    trusted_files: Iterable[Path] = (),
    use_trust_dirs: bool = True,
    model_config: Path | None = None,
    now: datetime | None = None,
    fingerprint: bool = True,
) -> VerifiedPolicy:
    """Every check above. With `fingerprint=False` the binding to the weights is left to the
    caller, which must load the model with `load_pipeline(..., expected=policy.binding)`: the
    loader hashes what it loads, so the weights are read once instead of twice."""
    source = model if isinstance(model, ModelSource) else resolve_model(model, model_config)
    path = Path(policy_path) if policy_path is not None else default_policy_path(source)
    envelope = read_envelope(path)
    signer = verify_envelope(envelope, load_trusted(trusted_files, use_trust_dirs))
    policy = FreezePolicy.from_json(envelope.payload)
    if policy.is_expired(now):
        raise PolicyError(f"policy {path.name} expired at {policy.expires_at}")
    current = now or datetime.now(timezone.utc)
    if parse_time(policy.created_at, "created_at") > current + CLOCK_SKEW:
        raise PolicyError(f"policy {path.name} was created in the future ({policy.created_at})")
    records = model_tensors(source)  # every component with weights; a corrupt file: DataError
    if fingerprint:
        compare_binding(policy.binding, fingerprint_components(records), model_configs(source))
    _check_frozen(policy, records.get("unet", []), path)
    return VerifiedPolicy(policy, path, signer.keyid, signer.source, source.label)
