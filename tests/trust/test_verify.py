"""The tamper matrix: every way to break the trust chain, each with its exit code."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardtune.cli import app
from guardtune.resolve import EMBEDDED_DIR
from guardtune.trust.build import sign_policy_file
from guardtune.trust.signing import Envelope, Signature, public_pem
from tests.conftest import combined_output
from tests.policy_helpers import (
    edit_payload,
    fresh_key,
    signed_model,
    write_signed,
)

GOLDEN = Path(__file__).parents[1] / "golden"


@pytest.fixture
def setup(tmp_path, monkeypatch):
    return signed_model(tmp_path, monkeypatch)


def verify(runner, model: Path, *extra: str):
    result = runner.invoke(app, ["policy", "verify", "--model", str(model), *extra])
    return result.exit_code, combined_output(result)


def _unet_file(model: Path) -> Path:
    return next((model / "unet").glob("*.safetensors"))


def _edit_unet(model: Path, edit) -> None:
    path = _unet_file(model)
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_valid_policy_verifies_and_names_its_signer(runner, setup):
    code, output = verify(runner, setup["model"])
    assert code == 0, output
    assert "Policy verified" in output
    assert setup["path"].exists()


def test_payload_byte_flipped(runner, setup):
    envelope = Envelope.from_json(setup["path"].read_bytes())
    payload = bytearray(envelope.payload)
    payload[len(payload) // 2] ^= 0x01
    setup["path"].write_bytes(
        Envelope(envelope.payload_type, bytes(payload), envelope.signatures).to_json()
    )
    code, output = verify(runner, setup["model"])
    assert code == 5 and "altered after signing" in output


def test_frozen_list_edited_after_signing(runner, setup):
    envelope = Envelope.from_json(setup["path"].read_bytes())
    fewer = edit_payload(setup["policy"], frozen_tensors=sorted(setup["policy"].frozen_tensors)[:1])
    setup["path"].write_bytes(Envelope(envelope.payload_type, fewer, envelope.signatures).to_json())
    code, _ = verify(runner, setup["model"])
    assert code == 5


def test_signature_from_another_key(runner, setup):
    write_signed(setup["path"], setup["policy"].to_json(), fresh_key())
    code, output = verify(runner, setup["model"])
    assert code == 5 and "not trusted" in output


def test_untrusted_key_even_when_passed_nowhere(runner, setup, tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDTUNE_TRUSTED_DIR", str(tmp_path / "empty"))
    code, output = verify(runner, setup["model"])
    assert code == 5, output


def test_trusted_option_adds_a_key(runner, setup, tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDTUNE_TRUSTED_DIR", str(tmp_path / "empty"))
    pub = tmp_path / "publisher.pub"
    pub.write_bytes(public_pem(setup["key"].public_key()))
    code, output = verify(runner, setup["model"], "--trusted", str(pub))
    assert code == 0, output


def test_keyid_spoofed_to_a_trusted_key(runner, setup):
    attacker = fresh_key()
    forged = Envelope.from_json(
        write_signed(setup["path"], setup["policy"].to_json(), attacker).read_bytes()
    )
    trusted_id = (
        Envelope.from_json(
            write_signed(
                setup["path"].with_suffix(".orig"), setup["policy"].to_json(), setup["key"]
            ).read_bytes()
        )
        .signatures[0]
        .keyid
    )
    spoofed = Envelope(
        forged.payload_type, forged.payload, (Signature(trusted_id, forged.signatures[0].sig),)
    )
    setup["path"].write_bytes(spoofed.to_json())
    code, output = verify(runner, setup["model"])
    assert code == 5 and "spoofed" in output


def test_policy_for_another_model(runner, setup, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(EMBEDDED_DIR, other, ignore=shutil.ignore_patterns("guardtune-policy.json"))
    _edit_unet(
        other,
        lambda s: s.update({k: torch.randn_like(v.float()).to(v.dtype) for k, v in s.items()}),
    )
    code, output = verify(runner, other, "--policy", str(setup["path"]))
    assert code == 6 and "does not match" in output


def test_one_tensor_changed_by_one_ulp(runner, setup):
    name = "mid_block.resnets.0.conv1.bias"

    def nudge(state):
        state[name] = state[name].clone()
        state[name].view(torch.int16)[0] += 1

    _edit_unet(setup["model"], nudge)
    code, output = verify(runner, setup["model"])
    assert code == 6
    assert f"unet.{name}" in output and "digest differs" in output


def test_tensor_renamed(runner, setup):
    _edit_unet(
        setup["model"], lambda s: s.update({"conv_in.weight_renamed": s.pop("conv_in.weight")})
    )
    code, output = verify(runner, setup["model"])
    assert code == 6 and "unet.conv_in.weight" in output and "missing" in output


def test_tensor_added(runner, setup):
    _edit_unet(setup["model"], lambda s: s.update({"backdoor.weight": torch.zeros(3)}))
    code, output = verify(runner, setup["model"])
    assert code == 6 and "unet.backdoor.weight" in output


def test_tensor_removed(runner, setup):
    _edit_unet(setup["model"], lambda s: s.pop("conv_out.bias"))
    code, output = verify(runner, setup["model"])
    assert code == 6 and "unet.conv_out.bias" in output


@pytest.mark.parametrize("damage", ["truncate", "corrupt header"])
def test_truncated_or_corrupt_safetensors(runner, setup, damage):
    path = _unet_file(setup["model"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    code, output = verify(runner, setup["model"])
    assert code == 3 and "safetensors" in output


def test_expired_policy(runner, setup):
    expired = dataclasses.replace(
        setup["policy"], created_at="2019-01-01T00:00:00Z", expires_at="2020-01-01T00:00:00Z"
    )
    sign_policy_file(expired, [setup["key"]], setup["path"])
    code, output = verify(runner, setup["model"])
    assert code == 4 and "expired" in output


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"created_at": "2099-01-01T00:00:00Z"}, "created in the future"),
        ({"created_at": "2026-01-01T00:00:00+14:00Z"}, "must be a UTC time"),
        ({"created_at": "2026-01-01"}, "must be a UTC time"),
        ({"expires_at": "2025-01-01T00:00:00Z", "created_at": "2026-01-01T00:00:00Z"},
         "not after policy.created_at"),
        ({"frozen_tensors": []}, "frozen share of"),
        ({"frozen_share": {"parameters": 0.5, "tensors": 0.01}}, "frozen share of 50.0%"),
        ({"frozen_tensors": ["text_encoder.embeddings.token_embedding.weight"]},
         "which is not a UNet tensor"),
    ],
)  # fmt: skip
def test_signed_fields_must_make_sense(runner, setup, changes, message):
    write_signed(setup["path"], edit_payload(setup["policy"], **changes), setup["key"])
    code, output = verify(runner, setup["model"])
    assert code == 4 and message in output, output


def test_wrong_payload_type(runner, setup):
    write_signed(
        setup["path"], setup["policy"].to_json(), setup["key"], payload_type="application/json"
    )
    code, output = verify(runner, setup["model"])
    assert code == 4 and "payloadType" in output


def test_unknown_field_in_a_signed_payload(runner, setup):
    write_signed(setup["path"], edit_payload(setup["policy"], note="hi"), setup["key"])
    code, output = verify(runner, setup["model"])
    assert code == 4 and "unknown field 'note'" in output


def test_duplicate_field_in_a_signed_payload(runner, setup):
    text = setup["policy"].to_json().decode()
    twice = text.replace('"created_at":', '"created_at":"2026-01-01T00:00:00Z","created_at":', 1)
    write_signed(setup["path"], twice.encode(), setup["key"])
    code, output = verify(runner, setup["model"])
    assert code == 4 and "duplicate" in output


def test_duplicate_or_unknown_envelope_fields(runner, setup):
    raw = json.loads(setup["path"].read_text())
    setup["path"].write_text(json.dumps(raw | {"extra": True}))
    assert verify(runner, setup["model"])[0] == 4
    text = json.dumps(raw)
    setup["path"].write_text(text.replace('"payloadType"', '"payloadType": "x", "payloadType"', 1))
    code, output = verify(runner, setup["model"])
    assert code == 4 and "duplicate" in output


def test_missing_policy(runner, setup):
    setup["path"].unlink()
    code, output = verify(runner, setup["model"])
    assert code == 4 and "no freeze policy" in output


def test_golden_policy_of_this_version_still_verifies(runner, monkeypatch, tmp_path):
    """Signed once by guardtune 0.1.0 over the embedded model; never regenerate it."""
    monkeypatch.setenv("GUARDTUNE_TRUSTED_DIR", str(tmp_path / "none"))
    args = [
        "--policy",
        str(GOLDEN / "policy-v1.json"),
        "--trusted",
        str(GOLDEN / "publisher-v1.pub"),
    ]
    code, output = verify(runner, EMBEDDED_DIR, *args)
    assert code == 0, output
    assert "not bound" in output and "schema 1 policy" in output


def test_a_deeply_nested_policy_file_is_exit_4(runner, setup):
    setup["path"].write_bytes(b"[" * 100_000 + b"]" * 100_000)
    code, output = verify(runner, setup["model"])
    assert code == 4 and "nested too deeply" in output


def test_a_policy_that_is_no_regular_file_or_too_large_is_refused_unread(runner, setup, tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.json")  # reading it would block forever
    code, output = verify(runner, setup["model"], "--policy", str(tmp_path / "fifo.json"))
    assert code == 4 and "is not a regular file" in output
    huge = tmp_path / "huge.json"
    with huge.open("wb") as handle:  # sparse: 65 MiB on paper, nothing on disk
        handle.truncate(65 << 20)
    code, output = verify(runner, setup["model"], "--policy", str(huge))
    assert code == 4 and "larger than 64 MiB" in output


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes, indent=2))


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("scheduler/scheduler_config.json", lambda p: _edit_json(p, prediction_type="sample")),
        ("unet/config.json", lambda p: _edit_json(p, upcast_attention=True)),
        ("model_index.json", lambda p: _edit_json(p, requires_safety_checker=True)),
        ("tokenizer/vocab.json", lambda p: p.write_text(p.read_text().replace('"a', '"b', 1))),
        ("tokenizer/added_tokens.json", lambda p: p.write_text('{"sks": 49408}')),
    ],
)
def test_every_configuration_file_is_bound(runner, setup, name, edit):
    edit(setup["model"] / name)
    code, output = verify(runner, setup["model"])
    assert code == 6, output
    problem = "is not in the policy's model" if name.endswith("added_tokens.json") else "differs"
    assert f"model does not match the policy: {name} {problem}" in output


def test_a_new_policy_says_what_it_binds(runner, setup):
    code, output = verify(runner, setup["model"])
    assert code == 0 and "10 files bound" in output
