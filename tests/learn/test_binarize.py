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


def test_freeze_top_rows_reaches_the_share_and_reports_whole_tensors():
    from guardtune.learn.binarize import freeze_top_rows

    scores = {"a": [3.0, 0.0], "b": [2.0, 2.0, 2.0], "c": [1.0]}
    row_sizes = {"a": 10, "b": 5, "c": 20}  # 20 + 15 + 20 = 55 parameters
    # Down the ranking until the share is reached: a's row 0 (10), then b's row 0 (15 >= 11).
    assert freeze_top_rows(scores, row_sizes, 0.2) == ([], {"a": ((0, 1),), "b": ((0, 1),)})
    # b's rows all chosen: b is frozen whole, as c (45 >= 27.5); a only in part.
    assert freeze_top_rows(scores, row_sizes, 0.5) == (["b", "c"], {"a": ((0, 1),)})
    whole, rows = freeze_top_rows(scores, row_sizes, 0.9)  # 55 >= 49.5: everything
    assert (whole, rows) == (["a", "b", "c"], {})
    # Ties go by name, then row: one ranking, one answer.
    tied = {"x": [1.0, 1.0], "w": [1.0, 1.0]}
    assert freeze_top_rows(tied, {"x": 1, "w": 1}, 0.25) == ([], {"w": ((0, 1),)})
    assert freeze_top_rows(tied, {"x": 1, "w": 1}, 0.75) == (["w"], {"x": ((0, 1),)})
    spread = {"v": [0.0, 5.0, 1.0, 5.0, 4.0]}  # chosen rows 1, 3, 4: two ranges, canonical
    assert freeze_top_rows(spread, {"v": 2}, 0.5) == ([], {"v": ((1, 2), (3, 5))})
    with pytest.raises(ValueError):
        freeze_top_rows(scores, row_sizes, 0.0)
