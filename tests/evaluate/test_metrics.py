"""Scorers and the held-out loss: they measure what they claim on real and made-up images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guardtune.digits.dataset import STYLES, load_digits, prompt_for
from guardtune.errors import DataError
from guardtune.evaluate.metrics import ClipScorer, DigitScorer, frechet_distance, make_scorer
from tests.evaluate.zero_unet import ZeroUNet, expected_target


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(features, features + 2.0)
    assert shifted == pytest.approx(8 * 4.0, rel=1e-6)


def test_digit_scorer_recognises_real_digits_and_their_style():
    scorer = DigitScorer()
    plain = load_digits((7,), "test").images.repeat(1, 3, 1, 1)
    bold = load_digits((7,), "test", "bold").images.repeat(1, 3, 1, 1)
    prompts = [prompt_for(7)] * plain.shape[0]
    same = scorer.score(plain, prompts, prompts, plain)
    assert same["recognisability"] > 0.9 and same["quality"] > 0.8
    assert same["reference_style"] == STYLES.index("plain")
    assert same["frechet"] < scorer.score(plain, prompts, prompts, bold)["frechet"]
    wrong = scorer.score(plain, [prompt_for(1)] * len(prompts), prompts, plain)
    assert wrong["recognisability"] < 0.1
    with pytest.raises(DataError, match="naming one digit"):
        scorer.score(plain[:1], ["a photo of a cat"], prompts, plain)


@pytest.mark.parametrize("style", ["slant", "outline", "bold"])
def test_digit_scorer_judges_the_style_against_the_real_styled_images(style):
    # Slant and outline have about plain's ink: only a judge that looks at the strokes themselves
    # can tell that a model drawing plain digits has not learned them.
    scorer = DigitScorer()
    test = load_digits(tuple(range(10)), "test")
    plain = test.images.repeat(1, 3, 1, 1)
    styled = load_digits(tuple(range(10)), "test", style).images.repeat(1, 3, 1, 1)
    prompts = [prompt_for(int(d)) for d in test.labels]
    learned = scorer.score(styled, prompts, prompts, styled)
    assert learned["reference_style"] == STYLES.index(style)
    assert learned["style_agreement_reference"] >= 0.9
    assert learned["in_style"] >= 0.9 and learned["quality"] >= 0.85
    # Plain digits judged against the styled real ones: recognised, but not in style.
    not_learned = scorer.score(plain, prompts, prompts, styled)
    assert not_learned["recognisability"] > 0.9
    assert not_learned["in_style"] <= 0.1 and not_learned["quality"] <= 0.1


def test_clip_scorer_loads_a_local_folder_and_scores(tmp_path, embedded_pipeline):
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=len(embedded_pipeline.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        eos_token_id=embedded_pipeline.tokenizer.eos_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(tmp_path / "clip")
    embedded_pipeline.tokenizer.save_pretrained(tmp_path / "clip")
    scorer = make_scorer(f"clip:{tmp_path / 'clip'}")
    assert isinstance(scorer, ClipScorer)
    images = torch.rand(6, 3, 32, 32)
    prompts = [prompt_for(7)] * 3 + [prompt_for(9)] * 3
    result = scorer.score(images, prompts, prompts, torch.rand(6, 3, 32, 32))
    assert 0 <= result["recognisability"] <= 1 and 0 <= result["quality"] <= 1
    assert result["frechet"] >= 0
    with pytest.raises(DataError, match="not a CLIP model folder"):
        make_scorer(f"clip:{tmp_path / 'nothing'}")
    with pytest.raises(DataError, match="unknown scorer"):
        make_scorer("fid")


def test_held_out_losses_pose_the_same_problems_to_every_model(embedded_pipeline):
    from diffusers import DDPMScheduler

    from guardtune.evaluate.metrics import held_out_losses

    scheduler = DDPMScheduler.from_config(embedded_pipeline.scheduler.config)
    unet = embedded_pipeline.unet
    latents = torch.randn(40, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = torch.randn(40, 32, 64, generator=torch.Generator().manual_seed(1))
    first = held_out_losses(unet, scheduler, latents, states)
    assert first.shape == (40,) and torch.equal(
        first, held_out_losses(unet, scheduler, latents, states)
    )
    weight = unet.conv_out.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(0.0)  # predicts only the bias: the loss goes up
        assert held_out_losses(unet, scheduler, latents, states).mean() > first.mean()
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_held_out_loss_targets_what_the_scheduler_predicts(prediction_type):
    from diffusers import DDPMScheduler

    from guardtune.evaluate.metrics import held_out_losses

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    latents = torch.randn(5, 4, 8, 8)
    losses = held_out_losses(ZeroUNet(), scheduler, latents, torch.randn(5, 3, 8))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1234))
    target = expected_target(scheduler, latents, noise, torch.linspace(0, 999, 5).long())
    assert torch.allclose(losses, target.pow(2).mean(dim=(1, 2, 3)))
