"""Verifying a signed freeze policy against trusted keys and the exact model weights.

The one place where the trust chain is checked, in this order, failing closed at the first
problem: envelope well-formed (exit 4) -> signed by a trusted key (5) -> payload a valid policy
(4) -> not expired (4) -> model fingerprint equal to the policy's (6, naming the first tensor
that differs). `policy verify`, `finetune` and `audit` all go through `verify_policy`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from guardtune.contract import POLICY_FILE
from guardtune.errors import PolicyError
from guardtune.resolve import ModelSource, resolve_model
from guardtune.trust.fingerprint import compare_fingerprints, fingerprint_model
from guardtune.trust.keys import load_trusted
from guardtune.trust.policy import FreezePolicy
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
            self.policy.expires_at,
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


def default_policy_path(source: ModelSource) -> Path:
    """A model folder carries its policy beside model_index.json."""
    if source.kind == "single_file":
        raise PolicyError(
            f"a single-file model ({source.path.name}) has no policy beside it",
            hint="pass --policy",
        )
    return source.path / POLICY_FILE


def read_envelope(path: Path) -> Envelope:
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise PolicyError(f"no freeze policy at {path}", hint="pass --policy") from error
    except OSError as error:
        raise PolicyError(f"cannot read policy {path} ({error.strerror})") from error
    return Envelope.from_json(data, where=f"policy {path.name}")


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
    caller, which must load the model with `load_pipeline(..., expected=policy.model)`: the
    loader hashes what it loads, so the weights are read once instead of twice."""
    source = model if isinstance(model, ModelSource) else resolve_model(model, model_config)
    path = Path(policy_path) if policy_path is not None else default_policy_path(source)
    envelope = read_envelope(path)
    signer = verify_envelope(envelope, load_trusted(trusted_files, use_trust_dirs))
    policy = FreezePolicy.from_json(envelope.payload)
    if policy.is_expired(now):
        raise PolicyError(f"policy {path.name} expired at {policy.expires_at}")
    if fingerprint:
        actual = fingerprint_model(source, tuple(policy.model))  # a corrupt file: DataError
        compare_fingerprints(policy.model, actual)
    return VerifiedPolicy(policy, path, signer.keyid, signer.source, source.label)
