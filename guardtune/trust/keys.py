"""Which public keys a user trusts to sign freeze policies.

Trusted keys come from `--trusted FILE` options, from the user's trust folder of `*.pub` files
(`$GUARDTUNE_TRUSTED_DIR`, or `~/.config/guardtune/trusted/` when it is unset) and from the keys
built into the package: the publisher key of the embedded model's policy. Built-in keys are
package data read by name through `importlib.resources`, never by listing a folder, so a file
dropped beside them in an installation is not trusted. A key that is not in one of these places
is not trusted, whatever a policy claims.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from guardtune.trust.signing import TrustedKey, key_id, load_public_key

TRUST_ENV = "GUARDTUNE_TRUSTED_DIR"
# The public halves of the keys that sign the policies shipped in the package.
BUILTIN_KEYS = ("guardtune-digits.pub",)


def user_trust_dir() -> Path:
    if os.environ.get(TRUST_ENV):
        return Path(os.environ[TRUST_ENV]).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser()
    return config_home / "guardtune" / "trusted"


def builtin_key(name: str) -> TrustedKey:
    """One of `BUILTIN_KEYS`, read from the installed package."""
    resource = resources.files("guardtune") / "assets" / "trusted" / name
    with resources.as_file(resource) as path:
        public = load_public_key(path)
        return TrustedKey(key_id(public), public, path)


def load_trusted(files: Iterable[Path] = (), use_trust_dirs: bool = True) -> list[TrustedKey]:
    """Every trusted key, each once; unreadable key files are DataErrors, never skipped.

    `use_trust_dirs=False` trusts only `files`: neither the user's folder nor the built-in keys.
    """
    keys: dict[str, TrustedKey] = {}
    paths = [Path(path) for path in files]
    if use_trust_dirs and user_trust_dir().is_dir():
        paths.extend(sorted(user_trust_dir().glob("*.pub")))
    for path in paths:
        public = load_public_key(path)
        keys.setdefault(key_id(public), TrustedKey(key_id(public), public, path))
    if use_trust_dirs:
        for name in BUILTIN_KEYS:
            trusted = builtin_key(name)
            keys.setdefault(trusted.keyid, trusted)
    return list(keys.values())
