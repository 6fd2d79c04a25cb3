"""Keys, DSSE envelopes and signature verification for freeze policies.

A signed policy is a DSSE envelope (github.com/secure-systems-lab/dsse): the canonical policy
bytes as `payload`, the payload type `application/vnd.guardtune.freeze-policy+json`, and one or
more signatures over the pre-authentication encoding PAE(type, body). Keys are Ed25519 (the
default) or ECDSA P-256 with SHA-256, handled by `cryptography`; a key's id is the sha256 of its
DER SubjectPublicKeyInfo. The keyid in an envelope is only a hint: verification tries the
signature against the trusted keys themselves, so a spoofed keyid gains nothing.

This module signs and verifies bytes; what the bytes mean is `trust.policy`'s business, and
binding them to a model is `trust.verify`'s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from guardtune import atomic
from guardtune.contract import read_small_file
from guardtune.errors import DataError, PolicyError, SignatureError
from guardtune.trust.policy import PAYLOAD_TYPE, strict_json_loads

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
KEY_TYPES = ("ed25519", "ecdsa-p256")
PASSPHRASE_ENV = "GUARDTUNE_KEY_PASSPHRASE"
_SUPPORTED = "only Ed25519 and ECDSA P-256 keys are supported"


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: 'DSSEv1 <len> <type> <len> <body>'."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(body), body)


# ----------------------------------------------------------------------------- keys


def generate_key(key_type: str = "ed25519") -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise DataError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def key_id(public_key: PublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def public_pem(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_keypair(
    prefix: Path, key_type: str = "ed25519", passphrase: bytes | None = None
) -> tuple[Path, Path, str]:
    """Write PREFIX.key (0600, PKCS#8, encrypted if a passphrase is given) and PREFIX.pub."""
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():  # a dangling link would be written through
            raise DataError(f"{path} already exists; keys are never overwritten")
    key = generate_key(key_type)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never clobber a key that appeared meanwhile; 0600 from the first byte.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise DataError(f"cannot create {private_path} ({error.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        atomic.write_bytes(public_path, public_pem(key.public_key()))
    except OSError as error:
        private_path.unlink(missing_ok=True)  # half a key pair is no key pair
        raise DataError(f"cannot write the key pair at {prefix} ({error.strerror})") from None
    return private_path, public_path, key_id(key.public_key())


@dataclass(frozen=True)
class KeygenResult:
    """A publisher key pair written by `guardtune keygen`."""

    private_key: Path
    public_key: Path
    keyid: str
    key_type: str
    encrypted: bool


def create_keypair(
    prefix: Path, *, key_type: str = "ed25519", passphrase: bytes | None = None
) -> KeygenResult:
    """`write_keypair`, reported: the files, the key id, and whether the private key is sealed."""
    private_path, public_path, keyid = write_keypair(prefix, key_type, passphrase)
    return KeygenResult(private_path, public_path, keyid, key_type, bool(passphrase))


def _read_key_file(path: Path, what: str) -> bytes:
    """A key file's bytes: a missing, special or unreadable file is bad input (exit 3); what
    the bytes say is checked by the caller (exit 5: a key that cannot be trusted)."""
    try:
        return read_small_file(path, what)
    except FileNotFoundError as error:
        raise DataError(f"no {what} at {path}") from error


def load_private_key(path: Path, passphrase: bytes | None = None) -> PrivateKey:
    data = _read_key_file(path, "private key")
    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as error:  # encrypted but no passphrase, or the reverse
        raise SignatureError(
            f"private key {path} needs a passphrase"
            if passphrase is None
            else f"private key {path} is not encrypted; drop the passphrase",
            hint=f"set {PASSPHRASE_ENV}" if passphrase is None else None,
        ) from error
    except ValueError as error:
        if b"ENCRYPTED" in data:
            raise SignatureError(f"wrong passphrase for private key {path}") from error
        raise SignatureError(f"{path} is not a PEM private key") from error
    except UnsupportedAlgorithm as error:  # a key type or cipher cryptography does not know
        raise SignatureError(f"{path}: {_SUPPORTED}") from error
    return _check_key_type(key, path)


def load_public_key(path: Path) -> PublicKey:
    data = _read_key_file(path, "public key")
    if data.count(b"-----BEGIN") > 1:  # the PEM loader would read the first and drop the rest
        raise SignatureError(f"{path} holds more than one key", hint="put one public key per file")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as error:
        raise SignatureError(f"{path} is not a PEM public key") from error
    except UnsupportedAlgorithm as error:  # a key type cryptography does not know
        raise SignatureError(f"{path}: {_SUPPORTED}") from error
    return _check_key_type(key, path)


def _check_key_type(key, path: Path):
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return key
    raise SignatureError(f"{path}: {_SUPPORTED}")


def _sign(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def _verifies(key: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# ----------------------------------------------------------------------------- envelopes


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self) -> bytes:
        import json

        value = {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures
            ],
        }
        return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "policy envelope") -> Envelope:
        raw = strict_json_loads(data, where)
        if not isinstance(raw, dict):
            raise PolicyError(f"{where} must be a JSON object")
        unknown = sorted(set(raw) - {"payload", "payloadType", "signatures"})
        if unknown:
            raise PolicyError(f"{where} has unknown field '{unknown[0]}'")
        for name, kind in (("payload", str), ("payloadType", str), ("signatures", list)):
            if not isinstance(raw.get(name), kind):
                raise PolicyError(f"{where} is missing '{name}' or it has the wrong type")
        signatures = []
        for index, entry in enumerate(raw["signatures"]):
            if not isinstance(entry, dict) or set(entry) - {"keyid", "sig"}:
                raise PolicyError(f"{where}: signature {index} has unknown fields")
            if not isinstance(entry.get("sig"), str) or not isinstance(entry.get("keyid", ""), str):
                raise PolicyError(f"{where}: signature {index} is malformed")
            signatures.append(Signature(entry.get("keyid", ""), _b64decode(entry["sig"], where)))
        if not signatures:
            raise PolicyError(f"{where} carries no signature")
        return cls(raw["payloadType"], _b64decode(raw["payload"], where), tuple(signatures))


def _b64decode(text: str, where: str) -> bytes:
    """DSSE allows standard and URL-safe base64; both are accepted, strictly."""
    try:
        normalised = text.replace("-", "+").replace("_", "/")
        return base64.b64decode(normalised + "=" * (-len(normalised) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise PolicyError(f"{where} contains invalid base64") from error


def sign_payload(
    payload: bytes, keys: list[PrivateKey], payload_type: str = PAYLOAD_TYPE
) -> Envelope:
    message = pae(payload_type, payload)
    signatures = tuple(Signature(key_id(k.public_key()), _sign(k, message)) for k in keys)
    return Envelope(payload_type, payload, signatures)


@dataclass(frozen=True)
class TrustedKey:
    keyid: str
    key: PublicKey
    source: Path


def verify_envelope(
    envelope: Envelope, trusted: list[TrustedKey], payload_type: str = PAYLOAD_TYPE
) -> TrustedKey:
    """Return the trusted key that signed the envelope; SignatureError/PolicyError otherwise."""
    if envelope.payload_type != payload_type:
        raise PolicyError(
            f"payloadType is {envelope.payload_type!r}, not a guardtune freeze policy "
            f"({payload_type})"
        )
    if not trusted:
        raise SignatureError(
            "no trusted keys to verify the policy with",
            hint="pass --trusted publisher.pub or add the key to the trust folder",
        )
    message = pae(envelope.payload_type, envelope.payload)
    for signature in envelope.signatures:
        for candidate in trusted:  # never trust the unauthenticated keyid to pick the key
            if _verifies(candidate.key, signature.sig, message):
                return candidate
    keyids = ", ".join(s.keyid[:16] or "(none)" for s in envelope.signatures)
    claimed = {s.keyid for s in envelope.signatures} & {t.keyid for t in trusted}
    if claimed:
        raise SignatureError(
            f"signature does not verify although it names trusted key {sorted(claimed)[0][:16]}: "
            "the policy was altered after signing or the keyid is spoofed"
        )
    raise SignatureError(
        f"policy is signed by key {keyids}, which is not trusted or the signature is invalid",
        hint="get the publisher's public key and pass it with --trusted",
    )
