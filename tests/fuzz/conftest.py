"""Shared fixtures of the fuzz tests; the property and the settings profile are in support.py.

Hypothesis's own files (its caches) go to the temp folder, never into the repository.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from guardtune.trust.build import sign_policy_file
from guardtune.trust.signing import generate_key, public_pem
from tests.policy_helpers import copy_model, make_policy

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "guardtune-hypothesis")


@pytest.fixture(scope="session")
def signed_setup(tmp_path_factory) -> dict:
    """A private copy of the embedded model, its policy signed by a fresh key, and that key's
    public half: the trust chain that fuzzed policies, keys and LoRA files are checked against."""
    root = tmp_path_factory.mktemp("fuzz-model")
    model = copy_model(root)
    key = generate_key()
    pub = root / "publisher.pub"
    pub.write_bytes(public_pem(key.public_key()))
    policy = make_policy(model)
    path = sign_policy_file(policy, [key], model / "guardtune-policy.json")
    empty_trust = root / "no-trusted-keys"
    empty_trust.mkdir()
    return {
        "root": root, "model": model, "key": key, "pub": pub, "policy": policy, "path": path,
        # Only --trusted counts: no key of the user's own trust folder joins in.
        "env": {"GUARDTUNE_TRUSTED_DIR": str(empty_trust)},
    }  # fmt: skip
