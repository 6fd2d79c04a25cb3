import pytest

from guardtune.learn.binarize import fill_to_share, freeze_top, random_scores


def test_freeze_top_reaches_the_share_by_parameters_or_tensors():
    numel = {"a": 100, "b": 10, "c": 10, "d": 880}
    scores = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    assert freeze_top(scores, numel, 0.1, "parameters") == ["a"]
    assert freeze_top(scores, numel, 0.11, "parameters") == ["a", "b"]
    assert freeze_top(scores, numel, 0.5, "tensors") == ["a", "b"]
    with pytest.raises(ValueError):
        freeze_top(scores, numel, 1.5, "parameters")


def test_random_scores_are_seeded_permutations():
    names = [f"t{i}" for i in range(20)]
    assert random_scores(names, 1) == random_scores(names, 1)
    assert random_scores(names, 1) != random_scores(names, 2)
    assert sorted(random_scores(names, 3).values()) == [float(-r) for r in range(19, -1, -1)]


def test_fill_to_share_does_not_overshoot_with_a_large_tensor():
    numel = {"a": 10, "big": 500, "b": 10, "c": 10, "d": 470}
    order = ["a", "big", "b", "c", "d"]
    # Freezing down the order would take a + big = 51%; filling skips big and stays at 30%.
    assert freeze_top({n: -i for i, n in enumerate(order)}, numel, 0.3, "parameters") == [
        "a",
        "big",
    ]
    assert fill_to_share(order, numel, 0.03) == {"a", "b", "c"}
    # The tensor landing closest to the target joins when it beats stopping short.
    assert fill_to_share(order, numel, 0.45) == {"a", "b", "c", "d"}  # 50%, 5 over: not 3%
    assert fill_to_share(order, numel, 0.3, frozenset({"b"})) >= {"b"}
