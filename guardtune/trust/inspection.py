"""Inspecting a policy: where it freezes, block by block (`guardtune policy show`).

Reads the envelope and payload strictly but does not check the signature (that is `policy
verify`); the per-block parameter counts come from the model's safetensors headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guardtune.blocks import BlockShare, plot_heatmap, shares_by_block
from guardtune.resolve import ModelSource, resolve_model
from guardtune.trust.fingerprint import model_tensors
from guardtune.trust.policy import FreezePolicy
from guardtune.trust.verify import read_envelope


@dataclass(frozen=True)
class PolicyReport:
    policy: Path
    method: str
    signer_keyids: tuple[str, ...]
    frozen_share_parameters: float
    frozen_share_tensors: float
    blocks: tuple[BlockShare, ...]
    plot: Path | None


def describe_policy(
    policy_path: Path, model: str | ModelSource = "digits", model_config: Path | None = None,
    plot: Path | None = None,
) -> PolicyReport:  # fmt: skip
    envelope = read_envelope(policy_path)
    policy = FreezePolicy.from_json(envelope.payload)
    beside = policy_path.parent / "model_index.json"
    source = resolve_model(str(policy_path.parent) if beside.is_file() else model, model_config)
    numel = {r.name: r.numel for r in model_tensors(source, ("unet",))["unet"]}
    frozen = set(policy.frozen_tensors)
    parts = {name: rows.share for name, rows in policy.frozen_rows.items()}
    blocks = tuple(shares_by_block(numel, frozen, parts=parts))
    if plot is not None:
        title = f"Frozen by {policy_path.name}: {policy.frozen_share.parameters:.0%} of parameters"
        plot_heatmap(numel, frozen, plot, title, parts)
    return PolicyReport(
        policy_path,
        policy.provenance.method,
        tuple(s.keyid for s in envelope.signatures),
        policy.frozen_share.parameters,
        policy.frozen_share.tensors,
        blocks,
        plot,
    )
