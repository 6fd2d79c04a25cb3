"""Fuzzing the freeze-policy parser (`FreezePolicy.from_json`), alone and past the signature.

Inputs: a valid policy (the embedded model's, rebuilt for a private copy) with one or two
mutations: a value anywhere replaced by hostile JSON (huge integers, lone surrogates, wrong
types, deep nesting), a field removed or added, a key renamed; also whole documents of any
shape. Each payload is re-signed by the trusted test key, so the checks after the signature run.

Property: PolicyError (exit 4) or a policy that round-trips through its canonical JSON; through
the CLI (`policy verify`, `policy show`) the exit code is 0 or a named one, never 1.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardtune.errors import PolicyError
from guardtune.trust.policy import FreezePolicy
from guardtune.trust.signing import Envelope, TrustedKey, key_id, sign_payload, verify_envelope
from tests.fuzz.support import (
    Raw,
    any_text,
    dumps,
    fuzz,
    invoke,
    json_documents,
    json_values,
    only_named_errors,
    timeout,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Places inside a JSON value, the root included; of a big container only three children
    (the fingerprint's hundreds of tensor digests would drown every other field)."""
    paths = [prefix]
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = list(enumerate(value)) if isinstance(value, list) else []
    for key, child in items if len(items) <= 10 else items[:3]:
        paths += _paths(child, (*prefix, key))
    return paths


# Numbers a policy field may be given: past float's range, negative, fractions, booleans.
numbers = st.sampled_from([10**400, Raw("1e999"), -1, 2, 0.5, True])


def _near(old: Any) -> st.SearchStrategy:
    """A replacement for `old`: anything, or something close to it."""
    if isinstance(old, str):
        return any_text.map(old.__add__) | any_text.map(lambda t: t + old) | json_values()
    if isinstance(old, int | float) and not isinstance(old, bool):
        return numbers
    return json_values()


@st.composite
def mutated_policies(draw, valid: dict) -> bytes:
    policy = copy.deepcopy(valid)
    paths = _paths(valid)
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(paths))
        if not path:  # the root itself
            policy = draw(json_values())
            continue
        parent, last = policy, path[-1]
        try:
            for step in path[:-1]:
                parent = parent[step]
            parent[last]  # still there after an earlier mutation?
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "rename"]))
        if action == "replace":
            parent[last] = draw(_near(parent[last]))
        elif action == "delete" and isinstance(parent, dict):
            del parent[last]
        elif action == "add" and isinstance(parent[last], dict):
            parent[last][draw(any_text)] = draw(json_values())
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(any_text | any_text.map(str(last).__add__))] = parent.pop(last)
    return dumps(policy).encode()


def _payloads(valid: dict) -> st.SearchStrategy[bytes]:
    return mutated_policies(valid) | json_documents()


def _parse(payload: bytes) -> FreezePolicy | None:
    with only_named_errors():
        return FreezePolicy.from_json(payload)
    return None  # a PolicyError


def _check_policy(payload: bytes) -> None:
    policy = _parse(payload)
    if policy is not None:  # what parses is a policy guardtune can write back and use
        assert FreezePolicy.from_json(policy.to_json()) == policy
        policy.is_expired()


@timeout(0.5)
@fuzz()
@given(data=st.data())
def test_policy_parser_refuses_or_returns_a_policy_that_round_trips(signed_setup, data):
    valid = signed_setup["policy"].to_dict()
    payload = data.draw(_payloads(valid), label="payload")
    key = signed_setup["key"]
    trusted = [TrustedKey(key_id(key.public_key()), key.public_key(), signed_setup["pub"])]
    envelope = Envelope.from_json(sign_payload(payload, [key]).to_json())
    assert verify_envelope(envelope, trusted).source == signed_setup["pub"]
    _check_policy(envelope.payload)


def _with_rows(valid: dict) -> dict:
    """A schema 3 policy: rows of two tensors frozen beside the whole ones (digests made up:
    the parser checks their form; verification checks them against the model)."""
    unfrozen = [n for n in valid["model"]["unet"]["tensors"] if n not in valid["frozen_tensors"]]
    rows = {name: {"height": 8, "ranges": [[0, 2], [5, 7]], "digest": "ab" * 32}
            for name in unfrozen[:2]}  # fmt: skip
    return valid | {"schema_version": 3, "frozen_rows": rows}


@timeout(0.5)
@fuzz()
@given(data=st.data())
def test_a_rows_policy_parses_or_is_refused(signed_setup, data):
    valid = _with_rows(signed_setup["policy"].to_dict())
    assert FreezePolicy.from_json(dumps(valid).encode()).frozen_rows  # the seed parses
    _check_policy(data.draw(mutated_policies(valid), label="payload"))


@timeout(1.0)
@fuzz(deadline=None)
@given(data=st.data())
def test_policy_commands_exit_with_a_named_code(signed_setup, tmp_path, data):
    valid = signed_setup["policy"].to_dict()
    payload = data.draw(_payloads(valid), label="payload")
    path = tmp_path / "policy.json"
    path.write_bytes(sign_payload(payload, [signed_setup["key"]]).to_json())
    model, pub, env = signed_setup["model"], signed_setup["pub"], signed_setup["env"]
    invoke(["policy", "verify", "-m", model, "--policy", path, "--trusted", pub], **env)
    invoke(["policy", "show", path, "-m", model], **env)


# ----------------------------------------------------------------------------- regressions
# Minimal inputs the fuzzer found; each escaped as a bare Python exception or broke the round trip.


def _edited(policy: dict, path: tuple, value: Any) -> bytes:
    edited = copy.deepcopy(policy)
    parent = edited
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return dumps(edited).encode()


def test_a_share_past_floats_range_is_a_policy_error(signed_setup):
    # OverflowError: float(10**400)
    payload = _edited(signed_setup["policy"].to_dict(), ("frozen_share", "parameters"), 10**400)
    with pytest.raises(PolicyError, match=r"between 0 and 1"):
        FreezePolicy.from_json(payload)


def test_a_lone_surrogate_is_a_policy_error(signed_setup):
    valid = signed_setup["policy"].to_dict()
    tensors = {**valid["model"]["unet"]["tensors"], "unet.\ud800": "0" * 64}
    for payload in (
        _edited(valid, ("model", "unet", "tensors"), tensors),  # UnicodeEncodeError in the root
        _edited(valid, ("provenance", "method"), "\ud800"),  # parsed, but to_json() raised
    ):
        with pytest.raises(PolicyError, match=r"lone surrogate"):
            FreezePolicy.from_json(payload)


def test_a_number_read_as_infinity_is_a_policy_error(signed_setup):
    # 1e999 parsed as inf, so the canonical JSON held Infinity and did not parse back.
    payload = _edited(signed_setup["policy"].to_dict(), ("provenance", "hyperparameters"),
                      {"p": Raw("1e999")})  # fmt: skip
    with pytest.raises(PolicyError, match=r"not valid JSON"):
        FreezePolicy.from_json(payload)
