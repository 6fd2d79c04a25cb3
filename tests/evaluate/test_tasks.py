"""Task folders: every n-th image held out for scoring, and the folders' names told apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardtune.data import Example, FolderScan
from guardtune.digits.dataset import export_digits
from guardtune.errors import DataError
from guardtune.evaluate.tasks import _split, load_tasks


def _scan(count: int) -> FolderScan:
    examples = tuple(Example(Path(f"{i}.png"), f"caption {i}") for i in range(count))
    return FolderScan(Path("task"), "metadata", examples)


def test_every_nth_image_is_held_out():
    kept, held = _split(_scan(11), every=5)
    assert [e.caption for e in held.examples] == ["caption 4", "caption 9"]
    assert len(kept) == 9 and not set(kept.examples) & set(held.examples)


def test_a_folder_too_small_to_hold_images_out_is_refused():
    with pytest.raises(DataError, match="needs at least 5 images"):
        _split(_scan(4), every=5)


def test_tasks_need_distinct_folder_names(embedded_pipeline, tmp_path):
    illegal = export_digits(tmp_path / "a" / "digits", (7,), "test").out
    legal = export_digits(tmp_path / "b" / "digits", (1,), "test").out
    with pytest.raises(DataError, match="distinct names"):
        load_tasks(embedded_pipeline, [illegal], [legal], every=5, resolution=32)
