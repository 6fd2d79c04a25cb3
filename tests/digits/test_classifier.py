import torch

from guardtune.digits.classifier import (
    held_out_accuracy,
    load_classifier,
    recognition,
    to_classifier_input,
    train_classifier,
)
from guardtune.digits.dataset import load_digits


def test_shipped_classifier_recognises_held_out_digits_in_every_style():
    classifier = load_classifier()
    assert held_out_accuracy(classifier) > 0.95
    for style in ("bold", "slant"):
        test = load_digits(tuple(range(10)), "test", style)
        rgb = test.images.expand(-1, 3, -1, -1)  # pipeline output is RGB
        assert recognition(classifier, rgb, test.labels).mean > 0.9


def test_recognition_counts_per_class():
    classifier = load_classifier()
    test = load_digits((0, 1), "test")
    wrong = torch.where(test.labels == 0, 1, 0)  # swap the labels: nothing is recognised
    assert recognition(classifier, test.images, wrong).mean < 0.1
    scores = recognition(classifier, test.images, test.labels)
    assert set(scores.per_class) == {0, 1}


def test_blank_images_are_not_digits_of_every_class():
    classifier = load_classifier()
    blank = torch.zeros(10, 3, 32, 32)
    assert recognition(classifier, blank, torch.arange(10)).mean <= 0.2
    assert to_classifier_input(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 32, 32)


def test_training_beats_chance_after_a_few_epochs():
    _, accuracy = train_classifier(epochs=5, seed=0)
    assert accuracy > 0.4  # chance is 0.1
