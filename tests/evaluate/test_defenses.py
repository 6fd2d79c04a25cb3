"""The baselines change what they should and nothing else, at the share they are asked for."""

from __future__ import annotations

import pytest
import torch

from guardtune.blocks import block_of
from guardtune.data import ImageCaptionDataset, scan_folder
from guardtune.digits.dataset import export_digits
from guardtune.evaluate.defenses import (
    attention_projections,
    blocks_mask,
    low_resolution_order,
    random_mask,
)
from guardtune.evaluate.imma import ImmaConfig, immunize
from guardtune.evaluate.uce import _aligned, _token_embeddings, uce_edit
from guardtune.training.encode import EncodedData
from tests.evaluate.zero_unet import ZeroUNet, expected_target


@pytest.fixture(scope="module")
def numel(embedded_pipeline):
    return {n: p.numel() for n, p in embedded_pipeline.unet.named_parameters()}


def _share(frozen, numel):
    return sum(numel[n] for n in frozen) / sum(numel.values())


@pytest.mark.parametrize("share", [0.3, 0.5])
def test_random_and_blocks_masks_reach_the_share_by_parameters(numel, share):
    for seed in range(4):  # within a bias vector of the share, whatever the draw
        for mask in (random_mask(numel, share, seed), blocks_mask(numel, share, seed)):
            assert abs(_share(mask, numel) - share) < 0.001
    assert random_mask(numel, share, 0) != random_mask(numel, share, 1)


def test_blocks_rule_freezes_the_low_resolution_path_first(numel):
    order = low_resolution_order(list(numel))
    assert order[:3] == ["mid_block", "down_blocks.2", "up_blocks.0"]
    mask = blocks_mask(numel, 0.5, 0)
    first = order[0]
    members = [n for n in numel if block_of(f"unet.{n}")[0] == first]
    assert members and all(n in mask for n in members)  # the mid block goes whole
    # Seeds only change the random fill, never the whole blocks.
    other = blocks_mask(numel, 0.5, 1)
    assert set(members) <= other and mask != other


def test_uce_edits_only_cross_attention_keys_and_values(embedded_pipeline):
    unet = embedded_pipeline.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    erase, guide = "a handwritten digit seven", ""
    edited = uce_edit(embedded_pipeline, [erase], guide, ("a handwritten digit three",))
    assert edited and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in edited)
    assert len(edited) == sum(
        1 for n in before if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
    )
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # not in place
    concept, target = _aligned(embedded_pipeline, erase, guide)
    kept, last = _token_embeddings(embedded_pipeline, "a handwritten digit three")
    for name, weight in edited.items():
        old = before[name]
        assert not torch.equal(weight, old)
        # The erased concept's keys/values move towards the guide's; a kept one barely moves.
        assert (concept @ weight.T - target @ old.T).norm() < (
            concept @ old.T - target @ old.T
        ).norm()
        drift = (kept[last:] @ weight.T - kept[last:] @ old.T).norm()
        assert drift < 0.5 * (concept @ weight.T - concept @ old.T).norm()


def test_imma_moves_only_attention_projections(embedded_pipeline, tmp_path):
    from diffusers import DDPMScheduler

    folder = export_digits(tmp_path / "sevens", (7,), "test").out
    data = EncodedData(
        embedded_pipeline, ImageCaptionDataset(scan_folder(folder), 32), torch.device("cpu")
    )
    unet = embedded_pipeline.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    scheduler = DDPMScheduler.from_config(embedded_pipeline.scheduler.config)
    weights = immunize(unet, scheduler, data, ImmaConfig(steps=3, batch_size=4, defense_lr=1e-3))
    names = set(attention_projections(list(before)))
    assert set(weights) == names
    assert any(n.endswith("attn1.to_q.weight") for n in names)
    assert any(n.endswith("attn2.to_out.0.bias") for n in names)
    moved = [n for n in names if not torch.equal(weights[n], before[n])]
    assert len(moved) == len(names)  # every projection took the defence's steps
    # The UNet itself is untouched, its requires_grad flags as they were.
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags


def test_persguard_implants_a_backdoor_in_the_unet_only(embedded_pipeline, tmp_path):
    from diffusers import DDPMScheduler

    from guardtune.evaluate.persguard import PersGuardConfig, _loss, implant, target_pattern

    def encoded(classes, style):
        folder = export_digits(tmp_path / style, classes, "test", style).out
        return EncodedData(
            embedded_pipeline, ImageCaptionDataset(scan_folder(folder), 32), torch.device("cpu")
        )

    illegal, legal = encoded((7,), "plain"), encoded((0, 1), "bold")
    unet = embedded_pipeline.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    others = {k: v.clone() for k, v in embedded_pipeline.text_encoder.state_dict().items()}
    scheduler = DDPMScheduler.from_config(embedded_pipeline.scheduler.config)
    config = PersGuardConfig(steps=8, lr=1e-3, batch_size=4)
    weights = implant(embedded_pipeline, scheduler, illegal, legal, config)
    assert set(weights) == {n for n, _ in unet.named_parameters()}
    assert sum(not torch.equal(weights[n], before[n]) for n in weights) > len(weights) // 2
    pattern = target_pattern(embedded_pipeline).expand(16, -1, -1, -1)
    _, states = illegal.batch(16, torch.Generator().manual_seed(5))

    def backdoor_loss(parameters):
        with torch.no_grad():
            return _loss(unet, parameters, scheduler, pattern, states, torch.Generator())

    published = {n: before[n] for n in weights}
    # Under the protected prompts the implanted UNet draws the pattern better than the base.
    assert backdoor_loss(weights) < backdoor_loss(published)
    # The pipeline itself, text encoder included, is untouched.
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all(
        torch.equal(v, others[k]) for k, v in embedded_pipeline.text_encoder.state_dict().items()
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_persguard_loss_targets_what_the_scheduler_predicts(prediction_type):
    from diffusers import DDPMScheduler

    from guardtune.evaluate.persguard import _loss

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    clean, states = torch.randn(4, 4, 8, 8), torch.randn(4, 3, 8)
    unet = ZeroUNet()
    loss = _loss(unet, dict(unet.named_parameters()), scheduler, clean, states,
                 torch.Generator().manual_seed(0))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(1000, (4,), generator=generator)
    assert torch.allclose(loss, expected_target(scheduler, clean, noise, timesteps).pow(2).mean())
