import pytest
from diffusers import UNet2DConditionModel

from guardtune.enforce.freeze import freeze_for_training, frozen_unet_names, lora_target_modules
from guardtune.errors import PolicyError
from tests.policy_helpers import FROZEN, copy_model, make_policy


@pytest.fixture(scope="module")
def policy_and_unet(tmp_path_factory):
    model = copy_model(tmp_path_factory.mktemp("m"))
    return make_policy(model), UNet2DConditionModel.from_pretrained(model / "unet")


def test_exactly_the_unfrozen_unet_parameters_train(policy_and_unet):
    policy, unet = policy_and_unet
    frozen = frozen_unet_names(policy)
    assert frozen == {n.removeprefix("unet.") for n in FROZEN}
    summary, hold = freeze_for_training(unet, frozen)
    assert hold.parameters == 0  # a per-tensor policy holds no rows
    for name, parameter in unet.named_parameters():
        assert parameter.requires_grad == (name not in frozen), name
    assert summary.frozen_tensors == 3
    assert summary.frozen_params == sum(
        p.numel() for n, p in unet.named_parameters() if n in frozen
    )
    assert 0 < summary.frozen_share < 1


def test_unknown_frozen_name_is_a_policy_error(policy_and_unet):
    _, unet = policy_and_unet
    with pytest.raises(PolicyError, match="does not have"):
        freeze_for_training(unet, {"down_blocks.7.weight"})


def test_lora_never_wraps_a_frozen_projection(policy_and_unet):
    _, unet = policy_and_unet
    all_targets = lora_target_modules(unet, set())
    assert all_targets and all(
        t.endswith(("to_q", "to_k", "to_v", "to_out.0")) for t in all_targets
    )
    frozen = {f"{all_targets[0]}.weight"}
    assert lora_target_modules(unet, frozen) == all_targets[1:]
