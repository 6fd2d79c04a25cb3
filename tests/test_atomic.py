import json

import pytest

from guardtune import atomic


def test_write_json_is_canonical_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "out" / "result.json"
    atomic.write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_staged_dir_keeps_the_old_folder_when_the_writer_fails(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic.staged_dir(target) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_staged_dir_replaces_the_folder_on_success(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic.staged_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_outputs_get_ordinary_permissions(tmp_path):
    import os

    path = tmp_path / "x.txt"
    atomic.write_text(path, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
