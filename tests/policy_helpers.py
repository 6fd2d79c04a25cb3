"""Helpers for the policy tests: a private copy of the embedded model and signed policies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from guardtune.resolve import EMBEDDED_DIR, ModelSource
from guardtune.trust.build import build_policy
from guardtune.trust.policy import FreezePolicy, Provenance
from guardtune.trust.signing import PrivateKey, generate_key, public_pem, sign_payload

FROZEN = [
    "unet.mid_block.resnets.0.conv1.weight",
    "unet.down_blocks.1.attentions.0.proj_in.weight",
    "unet.conv_in.weight",
]


def copy_model(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(EMBEDDED_DIR, target, ignore=shutil.ignore_patterns("guardtune-policy.json"))
    return target


def make_policy(model_dir: Path, expires_at: str | None = None) -> FreezePolicy:
    policy = build_policy(
        ModelSource("folder", model_dir), FROZEN, Provenance("manual", {"p": 0.1}), expires_at
    )
    return policy


def trust(tmp_path: Path, key: PrivateKey) -> Path:
    folder = tmp_path / "trusted"
    folder.mkdir(exist_ok=True)
    path = folder / f"key{len(list(folder.iterdir()))}.pub"
    path.write_bytes(public_pem(key.public_key()))
    return path


def write_signed(path: Path, payload: bytes, key: PrivateKey, **kw) -> Path:
    path.write_bytes(sign_payload(payload, [key], **kw).to_json())
    return path


def edit_payload(policy: FreezePolicy, **changes) -> bytes:
    raw = policy.to_dict()
    raw.update(changes)
    return json.dumps(raw, sort_keys=True).encode()


def fresh_key() -> PrivateKey:
    return generate_key()


def signed_model(tmp_path: Path, monkeypatch) -> dict:
    """A private model copy with its signed policy beside it; the signer's key is trusted."""
    from guardtune.trust.build import sign_policy_file

    monkeypatch.setenv("GUARDTUNE_TRUSTED_DIR", str(tmp_path / "trusted"))
    model = copy_model(tmp_path)
    key = fresh_key()
    trust(tmp_path, key)
    policy = make_policy(model)
    path = sign_policy_file(policy, [key], model / "guardtune-policy.json")
    return {"model": model, "key": key, "policy": policy, "path": path}
