import pytest
import torch
from diffusers import UNet2DConditionModel

from guardtune.enforce.guard import FrozenDigests
from guardtune.errors import IntegrityError
from guardtune.resolve import ModelSource
from guardtune.trust.fingerprint import model_tensors
from tests.policy_helpers import FROZEN, copy_model, make_policy


@pytest.fixture
def guard_and_unet(tmp_path):
    model = copy_model(tmp_path)
    policy = make_policy(model)
    records = {r.name: r for r in model_tensors(ModelSource("folder", model), ("unet",))["unet"]}
    guard = FrozenDigests.from_policy(policy.frozen_tensors, policy.model["unet"].tensors, records)
    # Training runs in fp32 on CPU; the stored weights are fp16.
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32)
    return guard, unet


def test_untouched_upcast_weights_pass(guard_and_unet):
    guard, unet = guard_and_unet
    assert guard.check(unet) == len(FROZEN)


def test_a_changed_frozen_tensor_is_an_integrity_error(guard_and_unet):
    guard, unet = guard_and_unet
    with torch.no_grad():
        dict(unet.named_parameters())["conv_in.weight"][0, 0, 0, 0] += 1e-3
    with pytest.raises(IntegrityError, match=r"unet\.conv_in\.weight"):
        guard.check(unet)


def test_changes_to_unfrozen_tensors_are_allowed(guard_and_unet):
    guard, unet = guard_and_unet
    with torch.no_grad():
        dict(unet.named_parameters())["conv_out.weight"].add_(0.1)
    assert guard.check(unet) == len(FROZEN)
