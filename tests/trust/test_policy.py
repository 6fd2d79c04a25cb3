import json
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest

from guardtune.errors import PolicyError
from guardtune.trust.policy import FreezePolicy, json_schema
from tests.policy_helpers import FROZEN, copy_model, make_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> FreezePolicy:
    return make_policy(copy_model(tmp_path_factory.mktemp("m")))


def test_canonical_json_round_trips_byte_for_byte(policy):
    data = policy.to_json()
    assert FreezePolicy.from_json(data) == policy
    assert FreezePolicy.from_json(data).to_json() == data
    canonical = json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    assert data == canonical  # sorted keys, no insignificant whitespace
    assert list(json.loads(data)) == sorted(json.loads(data))


def test_policy_records_what_it_freezes(policy):
    assert policy.frozen_tensors == tuple(sorted(FROZEN))
    assert 0 < policy.frozen_share.parameters < 0.2
    assert policy.frozen_share.tensors == pytest.approx(3 / len(policy.model["unet"].tensors), 1e-4)
    assert policy.provenance.tool_version.startswith("guardtune ")
    assert policy.frozen_components == ("unet",)


def test_payload_matches_the_published_json_schema(policy):
    schema = json_schema(policy.schema_version)
    jsonschema.validate(json.loads(policy.to_json()), schema)
    broken = json.loads(policy.to_json()) | {"surprise": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    escaping = json.loads(policy.to_json())
    escaping["configs"]["../model_index.json"] = "0" * 64
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(escaping, schema)


def test_a_new_policy_binds_every_configuration_file_the_loader_parses(policy):
    assert policy.schema_version == 2
    assert set(policy.configs) == {
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "unet/config.json", "vae/config.json", "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    }  # fmt: skip


def test_schema_1_policies_still_parse_and_bind_no_configs():
    envelope = json.loads((Path(__file__).parents[1] / "golden" / "policy-v1.json").read_text())
    from guardtune.trust.signing import Envelope

    payload = Envelope.from_json(json.dumps(envelope).encode()).payload
    old = FreezePolicy.from_json(payload)
    assert old.schema_version == 1 and old.configs is None and old.binding.configs is None
    assert old.to_json() == payload  # a schema 1 policy writes back byte for byte
    jsonschema.validate(json.loads(payload), json_schema(1))


def _mutations(raw: dict) -> dict[str, dict]:
    unet = raw["model"]["unet"]
    first = next(iter(unet["tensors"]))
    mutations = {
        "unknown top-level field": raw | {"comment": "hi"},
        "missing field": {k: v for k, v in raw.items() if k != "provenance"},
        "mistyped field": raw | {"schema_version": "1"},
        "boolean as number": raw | {"schema_version": True},
        "newer schema": raw | {"schema_version": 3},
        "configs missing": {k: v for k, v in raw.items() if k != "configs"},
        "configs outside the folder": raw | {"configs": raw["configs"] | {"../x.json": "0" * 64}},
        "configs absolute": raw | {"configs": raw["configs"] | {"/etc/x.json": "0" * 64}},
        "configs without model_index": raw
        | {"configs": {k: v for k, v in raw["configs"].items() if k != "model_index.json"}},
        "configs in a schema 1 policy": raw | {"schema_version": 1},
        "unknown nested field": raw | {"frozen_share": raw["frozen_share"] | {"bytes": 3}},
        "share out of range": raw | {"frozen_share": {"parameters": 1.5, "tensors": 0.1}},
        "unsorted frozen list": raw | {"frozen_tensors": sorted(FROZEN, reverse=True)},
        "frozen tensor not in model": raw | {"frozen_tensors": sorted([*FROZEN, "unet.nope"])},
        "bad digest": raw | {"model": {"unet": unet | {"root": "XYZ"}}},
        "root does not match": raw
        | {
            "model": raw["model"]
            | {"unet": unet | {"tensors": unet["tensors"] | {first: "0" * 64}}}
        },
        "unknown algorithm": raw | {"model": raw["model"] | {"unet": unet | {"algorithm": "md5"}}},
        "time without zone": raw | {"created_at": "2026-01-01T00:00:00"},
    }
    assert set(mutations) == set(CASES)
    return mutations


CASES = [
    "unknown top-level field", "missing field", "mistyped field", "boolean as number",
    "newer schema", "configs missing", "configs outside the folder", "configs absolute",
    "configs without model_index", "configs in a schema 1 policy", "unknown nested field",
    "share out of range", "unsorted frozen list",
    "frozen tensor not in model", "bad digest", "root does not match", "unknown algorithm",
    "time without zone",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_strict_parsing_rejects(policy, case):
    broken = _mutations(json.loads(policy.to_json()))[case]
    with pytest.raises(PolicyError):
        FreezePolicy.from_json(json.dumps(broken))


def test_duplicate_fields_and_nan_are_rejected(policy):
    text = policy.to_json().decode()
    duplicated = text.replace('"created_at"', '"created_at":"2026-01-01T00:00:00Z","created_at"', 1)
    with pytest.raises(PolicyError, match="duplicate"):
        FreezePolicy.from_json(duplicated)
    with pytest.raises(PolicyError):
        FreezePolicy.from_json(text.replace('"parameters":', '"parameters":NaN,"x":', 1))


def test_expiry(policy):
    from dataclasses import replace

    expiring = replace(policy, expires_at="2030-01-01T00:00:00Z")
    assert not expiring.is_expired(datetime(2029, 12, 31, tzinfo=timezone.utc))
    assert expiring.is_expired(datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert not policy.is_expired()
