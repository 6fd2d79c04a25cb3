"""Fuzzing the DSSE envelope parser (`Envelope.from_json`) and its verification.

Inputs: any bytes; hostile JSON documents; envelopes whose fields are missing, mistyped, extra
or carry bad base64 (junk characters, non-ASCII, wrong padding, URL-safe); and valid envelopes
signed by a trusted key, then mutated (payload, payloadType, keyid, signature bytes).

Property: `from_json` returns an envelope with at least one signature, or raises PolicyError
(exit 4); `verify_envelope` returns the trusted key or raises PolicyError or SignatureError
(exit 5), and succeeds only for the payload and type that were really signed.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardtune.errors import PolicyError
from guardtune.trust.policy import PAYLOAD_TYPE
from guardtune.trust.signing import (
    Envelope,
    TrustedKey,
    generate_key,
    key_id,
    sign_payload,
    verify_envelope,
)
from tests.fuzz.support import dumps, fuzz, json_documents, json_values, only_named_errors, timeout

KEYS = [generate_key("ed25519"), generate_key("ecdsa-p256")]
TRUSTED = [TrustedKey(key_id(k.public_key()), k.public_key(), None) for k in KEYS]  # type: ignore[arg-type]

base64_texts = st.one_of(
    st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
    st.binary(max_size=80).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.text(alphabet="ABCxyz019+/-_=", max_size=20),  # padding and alphabet in odd places
    st.text(max_size=20),  # anything, non-ASCII included
)
missing = st.just(None)  # the field is left out


def _field(valid: st.SearchStrategy) -> st.SearchStrategy:
    return valid | json_values() | missing


signature_entries = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"keyid": _field(st.text(max_size=8)), "sig": _field(base64_texts)}
    ),
    json_values(),
)


@st.composite
def envelopes(draw) -> bytes:
    raw = {
        "payload": draw(_field(base64_texts)),
        "payloadType": draw(_field(st.just(PAYLOAD_TYPE) | st.text(max_size=8))),
        "signatures": draw(_field(st.lists(signature_entries, max_size=3))),
    }
    raw = {k: v for k, v in raw.items() if v is not None}
    if draw(st.booleans()):
        raw.update(draw(st.dictionaries(st.text(max_size=8), json_values(), max_size=2)))
    return dumps(raw).encode()


def _check_parse(data: bytes) -> None:
    with only_named_errors():
        envelope = Envelope.from_json(data)
        assert isinstance(envelope.payload, bytes) and isinstance(envelope.payload_type, str)
        assert envelope.signatures and all(isinstance(s.sig, bytes) for s in envelope.signatures)
        verify_envelope(envelope, TRUSTED)


@timeout(0.2)
@fuzz()
@given(data=json_documents() | envelopes())
def test_envelope_parser_refuses_or_returns_a_signed_envelope(data):
    _check_parse(data)


@st.composite
def mutated_signed(draw) -> tuple[bytes, bytes, str]:
    """A validly signed envelope, then one mutation; also what was really signed."""
    payload = draw(st.binary(max_size=64))
    key = draw(st.sampled_from(KEYS))
    raw = json.loads(sign_payload(payload, [key]).to_json())
    signature = raw["signatures"][0]
    sig = base64.b64decode(signature["sig"])
    mutation = draw(
        st.sampled_from(["none", "flip", "truncate", "extend", "payload", "type", "keyid", "swap"])
    )
    # ECDSA signatures vary in length from run to run: positions are drawn independently of it.
    i = draw(st.integers(0, 2**16)) % len(sig)
    if mutation == "flip":
        sig = sig[:i] + bytes([sig[i] ^ draw(st.integers(1, 255))]) + sig[i + 1 :]
    elif mutation == "truncate":
        sig = sig[:i]
    elif mutation == "extend":
        sig += draw(st.binary(min_size=1, max_size=8))
    elif mutation == "payload":
        raw["payload"] = base64.b64encode(
            payload + draw(st.binary(min_size=1, max_size=4))
        ).decode()
    elif mutation == "type":
        raw["payloadType"] = draw(st.text(max_size=60).filter(lambda t: t != PAYLOAD_TYPE))
    elif mutation == "keyid":
        signature["keyid"] = draw(st.sampled_from([t.keyid for t in TRUSTED]) | st.text())
    elif mutation == "swap":  # the other trusted key's id, the same signature
        other = next(t for t in TRUSTED if t.keyid != signature["keyid"])
        signature["keyid"] = other.keyid
    signature["sig"] = base64.b64encode(sig).decode()
    return json.dumps(raw).encode(), payload, PAYLOAD_TYPE


@timeout(0.2)
@fuzz()
@given(case=mutated_signed())
def test_a_mutated_envelope_verifies_only_for_what_was_signed(case):
    data, signed_payload, signed_type = case
    with only_named_errors():
        envelope = Envelope.from_json(data)
        signer = verify_envelope(envelope, TRUSTED)
        assert signer in TRUSTED
        assert (envelope.payload, envelope.payload_type) == (signed_payload, signed_type)


def test_an_integer_too_long_to_convert_is_a_policy_error():
    # Found by the fuzzer: json.loads raised a bare ValueError (more than 4300 digits).
    with pytest.raises(PolicyError, match=r"not valid JSON"):
        Envelope.from_json(b"1" * 5000)
