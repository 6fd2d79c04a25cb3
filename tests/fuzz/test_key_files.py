"""Fuzzing the key-file readers: `load_public_key`, `load_private_key` and `load_trusted`.

Inputs: any bytes; PEM armour around junk; real keys (Ed25519, ECDSA P-256, and kinds guardtune
does not take: RSA, P-384, Ed448, X25519) with flipped bytes or cut short; two keys in one
file; a private key where a public one is expected and the reverse; encrypted private keys with
and without the right passphrase.

Property: a key of a supported kind, or DataError (exit 3) or SignatureError (exit 5); through
`policy verify --trusted FILE` the exit code is 0 or a named one, and 0 only for the real key.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from hypothesis import given
from hypothesis import strategies as st

from guardtune.errors import SignatureError
from guardtune.trust.keys import load_trusted
from guardtune.trust.signing import PASSPHRASE_ENV, load_private_key, load_public_key, public_pem
from tests.fuzz.support import fuzz, invoke, only_named_errors, timeout

PEM = serialization.Encoding.PEM
PASSPHRASE = b"fuzz passphrase"
PRIVATE_KEYS = [
    ed25519.Ed25519PrivateKey.generate(),
    ec.generate_private_key(ec.SECP256R1()),
    ec.generate_private_key(ec.SECP384R1()),
    rsa.generate_private_key(public_exponent=65537, key_size=1024),
    ed448.Ed448PrivateKey.generate(),
    x25519.X25519PrivateKey.generate(),
]


def _private_pem(key, passphrase: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, encryption)


def _public_pem(key) -> bytes:
    return key.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


REAL_FILES = [
    *(_public_pem(k) for k in PRIVATE_KEYS),
    *(_private_pem(k) for k in PRIVATE_KEYS),
    *(_private_pem(k, PASSPHRASE) for k in PRIVATE_KEYS[:2]),
    _private_pem(PRIVATE_KEYS[1]).replace(b"PRIVATE KEY", b"EC PRIVATE KEY"),  # wrong label
]
LABELS = ["PUBLIC KEY", "PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "EC PRIVATE KEY", "RSA PUBLIC KEY"]


def _armoured(label: str, body: bytes, headers: str = "") -> bytes:
    text = base64.b64encode(body).decode()
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {label}-----\n{headers}{lines}\n-----END {label}-----\n".encode()


@st.composite
def mutated(draw, pem: bytes) -> bytes:
    """A real key file with a byte flipped, cut short, doubled, or its DER body altered."""
    how = draw(st.sampled_from(["as is", "flip", "cut", "double", "body", "junk after"]))
    if how == "flip":
        i = draw(st.integers(0, len(pem) - 1))
        return pem[:i] + bytes([pem[i] ^ draw(st.integers(1, 255))]) + pem[i + 1 :]
    if how == "cut":
        return pem[: draw(st.integers(0, len(pem) - 1))]
    if how == "double":  # two keys in one file
        return pem + draw(st.sampled_from(REAL_FILES))
    if how == "body":
        label = pem.split(b"-----")[1].removeprefix(b"BEGIN ").decode()
        der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
        i = draw(st.integers(0, len(der)))
        return _armoured(label, der[:i] + draw(st.binary(max_size=4)) + der[i + 1 :])
    if how == "junk after":
        return pem + draw(st.binary(max_size=32))
    return pem


key_files = st.one_of(
    st.binary(max_size=200),
    st.builds(_armoured, st.sampled_from(LABELS), st.binary(max_size=120)),
    st.builds(
        _armoured,
        st.sampled_from(LABELS),
        st.binary(max_size=60),
        st.sampled_from(["Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\n", "X: y\n\n"]),
    ),
    st.sampled_from(REAL_FILES).flatmap(mutated),
)
passphrases = st.sampled_from([None, PASSPHRASE, b"wrong", b""])


@timeout(0.2)
@fuzz()
@given(data=key_files, passphrase=passphrases)
def test_key_readers_return_a_supported_key_or_a_named_error(
    tmp_path, monkeypatch, data, passphrase
):
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    path = tmp_path / "fuzz.pem"
    path.write_bytes(data)
    with only_named_errors():
        public = load_public_key(path)
        assert isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
    with only_named_errors():
        private = load_private_key(path, passphrase)
        assert isinstance(private, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    with only_named_errors():
        trusted = load_trusted([path], use_trust_dirs=False)
        assert [t.source for t in trusted] == [path]


@timeout(1.0)
@fuzz(deadline=None)
@given(data=key_files)
def test_policy_verify_with_a_fuzzed_trusted_key_exits_with_a_named_code(
    signed_setup, tmp_path, data
):
    path = tmp_path / "fuzz.pub"
    path.write_bytes(data)
    args = ["policy", "verify", "-m", signed_setup["model"], "--trusted", path]
    result = invoke(args, **signed_setup["env"])
    if result.exit_code == 0:  # only the publisher's own key verifies its policy
        assert public_pem(load_public_key(path)) == signed_setup["pub"].read_bytes()


def test_a_key_of_an_unknown_algorithm_is_a_signature_error(tmp_path, monkeypatch):
    # Found by the fuzzer: an Ed25519 key whose algorithm OID was altered made cryptography
    # raise UnsupportedAlgorithm ("Unknown key type"), which escaped both readers.
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    der = base64.b64decode("MCowBQYDK2VwAyEA" + "A" * 43 + "=")  # SubjectPublicKeyInfo, Ed25519
    path = tmp_path / "odd.pem"
    path.write_bytes(_armoured("PUBLIC KEY", der.replace(b"\x2b\x65\x70", b"\x2b\x65\x7f")))
    with pytest.raises(SignatureError, match=r"only Ed25519 and ECDSA P-256"):
        load_public_key(path)
    private = _private_pem(PRIVATE_KEYS[0]).decode().splitlines()
    der = base64.b64decode("".join(private[1:-1])).replace(b"\x2b\x65\x70", b"\x2b\x65\x7f")
    path.write_bytes(_armoured("PRIVATE KEY", der))
    with pytest.raises(SignatureError, match=r"only Ed25519 and ECDSA P-256"):
        load_private_key(path)
