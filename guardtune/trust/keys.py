"""Which public keys a user trusts to sign freeze policies.

Trusted keys come from `--trusted FILE` options and from trust folders of `*.pub` files:
`$GUARDTUNE_TRUSTED_DIR` (or `~/.config/guardtune/trusted/` when it is unset) and the project's
`policies/trusted/`, which holds the publisher key of the embedded model's policy. A key that is
not in one of these places is not trusted, whatever a policy claims.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from guardtune.trust.signing import TrustedKey, key_id, load_public_key

PROJECT_TRUST_DIR = Path(__file__).resolve().parents[2] / "policies" / "trusted"
TRUST_ENV = "GUARDTUNE_TRUSTED_DIR"


def user_trust_dir() -> Path:
    if os.environ.get(TRUST_ENV):
        return Path(os.environ[TRUST_ENV]).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser()
    return config_home / "guardtune" / "trusted"


def trust_dirs() -> list[Path]:
    return [user_trust_dir(), PROJECT_TRUST_DIR]


def load_trusted(files: Iterable[Path] = (), use_trust_dirs: bool = True) -> list[TrustedKey]:
    """Every trusted key, each once; unreadable key files are DataErrors, never skipped."""
    paths = list(files)
    if use_trust_dirs:
        for folder in trust_dirs():
            if folder.is_dir():
                paths.extend(sorted(folder.glob("*.pub")))
    keys: dict[str, TrustedKey] = {}
    for path in paths:
        public = load_public_key(Path(path))
        keys.setdefault(key_id(public), TrustedKey(key_id(public), public, Path(path)))
    return list(keys.values())
