"""The on-disk contract: the provenance record round-trips and refuses what it cannot trust."""

from __future__ import annotations

import json
import re

import pytest

from guardtune.contract import RunProvenance, weight_files


def _record() -> RunProvenance:
    return RunProvenance(
        tool_version="guardtune 0.1.0",
        base_model="digits",
        base_fingerprint={"unet": "ab" * 32},
        policy_sha256="cd" * 32,
        signer_keyid="ef" * 32,
        data_sha256="01" * 32,
        config={"steps": 2, "lora": False},
        mode="full",
        frozen_tensor_digests={"unet.conv_in.weight": ("F32", "23" * 32)},
    )


def test_provenance_round_trips_as_canonical_json():
    record = _record()
    text = record.to_json()
    assert RunProvenance.from_json(text) == record
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: "[1, 2]", "not an object"),
        (lambda raw: "{" * 100_000, "not valid JSON"),
        (lambda raw: raw | {"extra": 1}, "unknown field extra"),
        (lambda raw: {k: v for k, v in raw.items() if k != "mode"}, "has no mode"),
        (lambda raw: raw | {"base_fingerprint": ["x"]}, "base_fingerprint has the wrong type"),
        (lambda raw: raw | {"frozen_tensor_digests": {"a": "F32"}}, "not (dtype, digest)"),
    ],
)
def test_provenance_from_an_untrusted_file_fails_with_a_reason(mutate, message):
    raw = json.loads(_record().to_json())
    changed = mutate(raw)
    text = changed if isinstance(changed, str) else json.dumps(changed)
    with pytest.raises(ValueError, match=re.escape(message)):
        RunProvenance.from_json(text)


def test_weight_files_separates_variants(tmp_path):
    for name in ("a.safetensors", "a.fp16.safetensors", "b.bf16.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    plain, variants = weight_files(tmp_path)
    assert [p.name for p in plain] == ["a.safetensors"]
    assert [p.name for p in variants] == ["a.fp16.safetensors", "b.bf16.safetensors"]


def test_small_files_are_read_only_when_regular_and_small(tmp_path):
    import os

    from guardtune.contract import read_small_file
    from guardtune.errors import DataError, PolicyError

    (tmp_path / "mask.txt").write_bytes(b"unet.conv_in.weight\n")
    assert read_small_file(tmp_path / "mask.txt", "mask", limit=20) == b"unet.conv_in.weight\n"
    with pytest.raises(PolicyError, match=re.escape(f"mask {tmp_path / 'mask.txt'} is larger")):
        read_small_file(tmp_path / "mask.txt", "mask", PolicyError, limit=19)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match="is not a regular file"):
        read_small_file(tmp_path / "fifo", "provenance")
    with pytest.raises(DataError, match="is not a regular file"):
        read_small_file(tmp_path, "key")
    with pytest.raises(FileNotFoundError):
        read_small_file(tmp_path / "missing", "mask")
