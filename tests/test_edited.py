"""`guardtune.edited`: the combined defence's model copy refuses what it cannot write faithfully."""

import pytest
import torch

from guardtune.edited import write_edited
from guardtune.errors import DataError
from guardtune.resolve import ModelSource, resolve_model
from guardtune.tensorfile import load_record
from guardtune.trust.fingerprint import model_tensors
from tests.policy_helpers import copy_model

NAME = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture
def base(tmp_path):
    return resolve_model(str(copy_model(tmp_path)))


def test_an_edited_copy_differs_from_its_base_in_the_edited_tensor_only(base, tmp_path):
    records = {r.name: r for r in model_tensors(base, ("unet",))["unet"]}
    weight = load_record(records[f"unet.{NAME}"]).float()
    edited = write_edited(base, {NAME: weight + 0.5}, tmp_path / "edited")
    new = {r.name: load_record(r) for r in model_tensors(edited, ("unet",))["unet"]}
    assert set(new) == set(records)
    changed = {n for n, r in records.items() if not torch.equal(load_record(r), new[n])}
    assert changed == {f"unet.{NAME}"}
    stored = records[f"unet.{NAME}"]
    # Written in the dtype the base stores it in, rounded once.
    assert new[f"unet.{NAME}"].dtype == load_record(stored).dtype
    assert torch.equal(new[f"unet.{NAME}"], (weight + 0.5).to(load_record(stored).dtype))


def test_refusals_leave_nothing_behind(base, tmp_path):
    out = tmp_path / "edited"
    with pytest.raises(DataError, match="the edit names nope, which is not a UNet tensor"):
        write_edited(base, {"nope": torch.zeros(1)}, out)
    with pytest.raises(DataError, match=f"the edit changes the shape of {NAME}"):
        write_edited(base, {NAME: torch.zeros(1)}, out)
    single = ModelSource("single_file", tmp_path / "model.safetensors")
    with pytest.raises(DataError, match="give the base as a folder"):
        write_edited(single, {}, out)
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="edited already exists and is not empty"):
        write_edited(base, {}, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
