import json

import numpy as np
from PIL import Image

from guardtune.cli import app
from tests.conftest import combined_output


def _generate(runner, tmp_path, name, seed, *extra):
    out = tmp_path / f"{name}.png"
    args = ["generate", "--prompt", "a handwritten digit three", "--num", "4",
            "--num-inference-steps", "5"]  # fmt: skip
    result = runner.invoke(app, [*args, "--seed", str(seed), "--out", str(out), *extra])
    assert result.exit_code == 0, combined_output(result)
    return np.asarray(Image.open(out))


def test_same_seed_same_grid_other_seed_other_grid(runner, tmp_path):
    first = _generate(runner, tmp_path, "a", 1)
    again = _generate(runner, tmp_path, "b", 1)
    other = _generate(runner, tmp_path, "c", 2)
    assert first.shape == (64, 64, 3)  # 2x2 grid of 32x32 images
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.std() > 10  # a picture, not a flat field


def test_out_dir_single_images_and_json(runner, tmp_path):
    single = tmp_path / "single"
    report = tmp_path / "gen.json"
    grid = _generate(runner, tmp_path, "g", 3, "--out-dir", str(single), "--json", str(report))
    files = sorted(single.glob("*.png"))
    assert len(files) == 4
    assert np.array_equal(np.asarray(Image.open(files[0])), grid[:32, :32])
    data = json.loads(report.read_text())
    assert data["num"] == 4 and data["seed"] == 3 and len(data["files"]) == 4


def test_generate_rejects_a_non_png_output(runner, tmp_path):
    args = ["generate", "--prompt", "x", "--num-inference-steps", "1",
            "--out", str(tmp_path / "grid.jpg")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 3
    assert "png" in combined_output(result)
    assert not (tmp_path / "grid.jpg").exists()


def test_sampling_shows_its_progress_step_by_step(runner, tmp_path):
    out = tmp_path / "p.png"
    args = ["generate", "--prompt", "a handwritten digit three", "--num", "2",
            "--num-inference-steps", "3"]  # fmt: skip
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, combined_output(result)
    # Not a terminal here: the bar becomes lines, the last one at the final denoising step.
    assert "generate 3/3" in combined_output(result)
