"""The style classifier: the shipped asset names the style of real digits, and the recipe runs."""

from __future__ import annotations

import torch

from guardtune.digits.dataset import STYLES, apply_style, load_digits
from guardtune.digits.style import (
    ASSET,
    StyleClassifier,
    load_style_classifier,
    main,
    predict_styles,
    reference_style,
    train_style_classifier,
)


def test_shipped_style_classifier_names_the_style_of_held_out_digits():
    model = load_style_classifier()
    test = load_digits(tuple(range(10)), "test")
    for index, style in enumerate(STYLES):
        rgb = apply_style(test.images, style).expand(-1, 3, -1, -1)  # pipeline output is RGB
        accuracy = float((predict_styles(model, rgb) == index).float().mean())
        assert accuracy >= 0.9, f"{style}: {accuracy:.3f}"


def test_reference_style_is_the_majority_and_says_how_sure_it_is():
    model = load_style_classifier()
    plain = load_digits((3,), "test").images
    mixed = torch.cat([apply_style(plain, "outline"), apply_style(plain[:5], "bold")])
    found = reference_style(model, mixed)
    assert found.name == "outline"
    assert 0.7 < found.agreement < 0.95  # the five bold ones disagree


def test_training_runs_at_tiny_settings_and_is_seeded(tmp_path):
    first, accuracy = train_style_classifier(epochs=1, seed=0, max_images=256)
    second, _ = train_style_classifier(epochs=1, seed=0, max_images=256)
    assert isinstance(first, StyleClassifier) and set(accuracy) == set(STYLES)
    assert first(torch.zeros(3, 1, 32, 32)).shape == (3, len(STYLES))
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    out = tmp_path / "style.safetensors"
    main(["--epochs", "1", "--max-images", "128", "--out", str(out)])
    assert out.is_file() and out.stat().st_size < 150_000
    assert ASSET.stat().st_size < 150_000
    loaded = load_style_classifier(out)
    assert loaded(torch.zeros(2, 1, 32, 32)).shape == (2, len(STYLES))
