import pytest
import torch

from guardtune.digits.dataset import (
    BASE_CLASSES,
    STYLES,
    apply_style,
    load_digits,
    parse_classes,
    prompt_for,
)


def test_train_and_test_splits_never_overlap_and_cover_everything():
    train = load_digits(tuple(range(10)), "train")
    test = load_digits(tuple(range(10)), "test")
    everything = load_digits(tuple(range(10)), "all")
    assert set(train.source_index.tolist()).isdisjoint(test.source_index.tolist())
    assert len(train) + len(test) == len(everything) == 1797
    for digit in range(10):  # every class is represented in the held-out split
        assert (test.labels == digit).sum() >= 30


def test_images_are_32x32_in_unit_range_with_dark_background():
    data = load_digits((7,), "test")
    assert data.images.shape[1:] == (1, 32, 32)
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert float(data.images[:, :, :2, :].max()) == 0.0  # the 2-pixel margin stays empty
    assert set(data.labels.tolist()) == {7}


@pytest.mark.parametrize("style", [s for s in STYLES if s != "plain"])
def test_styles_change_the_strokes(style):
    plain = load_digits((3,), "test").images
    styled = apply_style(plain, style)
    assert styled.shape == plain.shape
    assert not torch.allclose(styled, plain)
    if style == "bold":
        assert float(styled.mean()) > 1.3 * float(plain.mean())


def test_unknown_style_and_split_are_rejected():
    with pytest.raises(ValueError, match="style"):
        apply_style(torch.zeros(1, 1, 32, 32), "wobbly")
    with pytest.raises(ValueError, match="split"):
        load_digits((1,), "validation")


def test_parse_classes_and_prompts():
    assert parse_classes("7,9") == (7, 9)
    assert parse_classes("0-6") == BASE_CLASSES
    assert parse_classes("9, 1-2") == (1, 2, 9)
    for bad in ("", "10", "a", "-1"):
        with pytest.raises(ValueError):
            parse_classes(bad)
    assert prompt_for(7) == "a handwritten digit seven"
