import base64
import json
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from guardtune.cli import app
from guardtune.errors import DataError, PolicyError, SignatureError
from guardtune.trust.signing import (
    Envelope,
    TrustedKey,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    pae,
    sign_payload,
    verify_envelope,
    write_keypair,
)
from tests.conftest import combined_output


def test_pae_matches_the_dsse_spec_example():
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_the_spec_test_vector_signature_verifies_over_our_pae():
    # DSSE protocol.md test vector: ECDSA P-256, signature as raw r||s.
    x = 46950820868899156662930047687818585632848591499744589407958293238635476079160
    y = 5640078356564379163099075877009565129882514886557779369047442380624545832820
    public = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    raw = base64.b64decode(
        "A3JqsQGtVsJ2O2xqrI5IcnXip5GToJ3F+FnZ+O88SjtR6rDAajabZKciJTfUiHqJPcIAriEGAHTVeCUjW2JIZA=="
    )
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    envelope = Envelope("http://example.com/HelloWorld", b"hello world", ())
    from guardtune.trust.signing import Signature

    envelope = Envelope(envelope.payload_type, envelope.payload, (Signature("", der),))
    trusted = TrustedKey(key_id(public), public, None)  # type: ignore[arg-type]
    assert verify_envelope(envelope, [trusted], "http://example.com/HelloWorld") is trusted


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa-p256"])
def test_sign_and_verify_round_trip_for_both_key_types(key_type):
    key = generate_key(key_type)
    envelope = sign_payload(b'{"a":1}', [key])
    parsed = Envelope.from_json(envelope.to_json())
    assert parsed == envelope
    trusted = TrustedKey(key_id(key.public_key()), key.public_key(), None)  # type: ignore[arg-type]
    assert verify_envelope(parsed, [trusted]).keyid == envelope.signatures[0].keyid


def test_url_safe_base64_is_accepted_too():
    key = generate_key()
    envelope = sign_payload(b"\xfb\xff" * 20, [key])
    raw = json.loads(envelope.to_json())
    raw["payload"] = base64.urlsafe_b64encode(envelope.payload).decode().rstrip("=")
    assert Envelope.from_json(json.dumps(raw).encode()).payload == envelope.payload


def test_envelope_parsing_is_strict():
    good = json.loads(sign_payload(b"x", [generate_key()]).to_json())
    for broken in (
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "signatures"},
        {**good, "signatures": []},
        {**good, "payload": "***"},
        {**good, "signatures": [{"sig": "AA==", "keyid": "k", "cert": "x"}]},
    ):
        with pytest.raises(PolicyError):
            Envelope.from_json(json.dumps(broken).encode())
    duplicated = b'{"payload": "eA==", "payload": "eQ==", "payloadType": "t", "signatures": []}'
    with pytest.raises(PolicyError, match="duplicate"):
        Envelope.from_json(duplicated)


def test_keygen_writes_private_key_0600_and_never_overwrites(runner, tmp_path):
    prefix = tmp_path / "keys" / "publisher"
    result = runner.invoke(app, ["keygen", "--out", str(prefix)])
    assert result.exit_code == 0, combined_output(result)
    private, public = prefix.with_suffix(".key"), prefix.with_suffix(".pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = private.read_bytes()
    again = runner.invoke(app, ["keygen", "--out", str(prefix)])
    assert again.exit_code == 3
    assert "never overwritten" in combined_output(again)
    assert private.read_bytes() == before
    assert key_id(load_private_key(private).public_key()) == key_id(load_public_key(public))


def test_passphrase_protected_key(tmp_path, monkeypatch):
    private, _, keyid = write_keypair(tmp_path / "k", "ecdsa-p256", b"s3cret")
    assert b"ENCRYPTED" in private.read_bytes()
    monkeypatch.delenv("GUARDTUNE_KEY_PASSPHRASE", raising=False)
    with pytest.raises(SignatureError, match="needs a passphrase"):
        load_private_key(private)
    with pytest.raises(SignatureError, match="wrong passphrase"):
        load_private_key(private, b"guess")
    monkeypatch.setenv("GUARDTUNE_KEY_PASSPHRASE", "s3cret")
    assert key_id(load_private_key(private).public_key()) == keyid


def test_keygen_with_passphrase_from_environment(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDTUNE_KEY_PASSPHRASE", "pw")
    result = runner.invoke(app, ["keygen", "--out", str(tmp_path / "k"), "--passphrase"])
    assert result.exit_code == 0, combined_output(result)
    assert b"ENCRYPTED" in (tmp_path / "k.key").read_bytes()


def test_unsupported_curve_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "p384.pub"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(SignatureError, match="P-256"):
        load_public_key(path)


def test_keygen_through_a_dangling_link_or_under_a_file_is_exit_3_and_writes_nothing(
    runner, tmp_path
):
    (tmp_path / "a.key").symlink_to(tmp_path / "nowhere")
    result = runner.invoke(app, ["keygen", "--out", str(tmp_path / "a")])
    assert result.exit_code == 3 and "already exists" in combined_output(result)
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "a.pub").exists()
    (tmp_path / "file").write_text("not a folder")
    result = runner.invoke(app, ["keygen", "--out", str(tmp_path / "file" / "k")])
    assert result.exit_code == 3 and "cannot create" in combined_output(result)


def test_a_public_key_file_must_hold_one_regular_key(tmp_path):
    import os

    from guardtune.trust.signing import generate_key, load_public_key, public_pem

    two = tmp_path / "two.pub"
    two.write_bytes(public_pem(generate_key().public_key()) * 2)
    with pytest.raises(SignatureError, match="more than one key"):
        load_public_key(two)
    (tmp_path / "junk.pub").write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n")
    with pytest.raises(SignatureError, match="is not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")
    os.mkfifo(tmp_path / "fifo.pub")  # reading it would block forever
    with pytest.raises(DataError, match="not a regular file"):
        load_public_key(tmp_path / "fifo.pub")
