"""The fine-tune options diffusers and kohya users expect, each doing what it says."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from guardtune.cli import app
from guardtune.digits.dataset import export_digits
from guardtune.errors import UsageError
from guardtune.training.config import TrainConfig
from guardtune.training.finetune import finetune
from tests.conftest import combined_output
from tests.policy_helpers import FROZEN, signed_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return export_digits(tmp_path_factory.mktemp("data") / "sevens", (7,), "test").out


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    return signed_model(tmp_path, monkeypatch)["model"]


def _unet(folder):
    return load_file(str(next((folder / "model" / "unet").glob("*.safetensors"))))


def test_epochs_set_the_step_count_from_the_data(guarded, data, tmp_path):
    examples = len(list(data.glob("*.png")))
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-3)
    result = finetune(data, tmp_path / "run", model=str(guarded), config=config, compare=False,
                      show_progress=False)  # fmt: skip
    assert result.steps == -(-2 * examples // 8) == len(result.losses)
    with pytest.raises(UsageError, match=re.escape("--steps and --epochs are alternatives")):
        TrainConfig(steps=5, epochs=1)


def test_steps_and_epochs_together_are_exit_2(runner, data, tmp_path):
    result = runner.invoke(app, ["finetune", str(data), "--out", str(tmp_path / "o"),
                                 "--steps", "3", "--epochs", "1"])  # fmt: skip
    assert result.exit_code == 2
    assert "--steps and --epochs are alternatives: give one" in combined_output(result)
    assert not (tmp_path / "o").exists()


def test_ema_writes_the_average_and_resumes_exactly(guarded, data, tmp_path):
    base = TrainConfig(steps=4, batch_size=2, lr=1e-2, checkpoint_every=2)
    averaged = TrainConfig(steps=4, batch_size=2, lr=1e-2, checkpoint_every=2, use_ema=True,
                           ema_decay=0.5)  # fmt: skip
    plain = finetune(data, tmp_path / "plain", model=str(guarded), config=base, compare=False,
                     show_progress=False)  # fmt: skip
    finetune(data, tmp_path / "ema", model=str(guarded), config=averaged, compare=False,
             show_progress=False)  # fmt: skip
    a, b = _unet(tmp_path / "plain"), _unet(tmp_path / "ema")
    base_state = load_file(str(next((guarded / "unet").glob("*.safetensors"))))
    frozen = [n.removeprefix("unet.") for n in FROZEN]
    assert all(torch.equal(b[n], base_state[n].to(b[n].dtype)) for n in frozen)
    trained = [n for n in a if n not in frozen and not torch.equal(a[n], base_state[n])]
    # The average lags the weights: between the start and where plain training ended.
    name = trained[0]
    assert not torch.equal(a[name], b[name]) and not torch.equal(b[name], base_state[name])
    assert plain.losses  # the same trajectory: EMA only changes what is written
    # Resuming from the step-2 checkpoint (which carries the average) ends in the same file.
    checkpoint = tmp_path / "ema" / "checkpoints" / "step-000002"
    assert (checkpoint / "ema.safetensors").is_file()
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(checkpoint, resumed / "checkpoints" / "step-000002")
    shutil.copy(tmp_path / "ema" / "guardtune-run.json", resumed)
    finetune(data, resumed, model=str(guarded), config=averaged, resume="latest", compare=False,
             show_progress=False)  # fmt: skip
    c = _unet(resumed)
    assert all(torch.equal(b[n], c[n]) for n in b)


def test_validation_grids_are_written_every_n_steps_and_at_the_end(runner, guarded, data,
                                                                   tmp_path):  # fmt: skip
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", str(data), "--model", str(guarded), "--out", str(out), "--steps", "3",
        "--batch-size", "2", "--no-compare", "--validation-prompt", "a photo of the digit 7",
        "--validation-prompt", "a photo of the digit 1", "--validation-steps", "2",
        "--num-validation-images", "3",
    ])  # fmt: skip
    assert result.exit_code == 0, combined_output(result)
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000003.png"]
    with Image.open(out / "validation" / "step-000003.png") as grid:
        assert grid.size == (3 * 32, 2 * 32)  # a row per prompt, a column per image
    assert "validation grid:" in combined_output(result)


def test_noise_offset_changes_the_noise_and_zero_is_the_plain_objective(embedded_pipeline):
    from diffusers import DDPMScheduler

    from guardtune.training.loss import diffusion_loss

    unet = embedded_pipeline.unet
    scheduler = DDPMScheduler.from_config(embedded_pipeline.scheduler.config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = diffusion_loss(unet, scheduler, latents, states, torch.Generator().manual_seed(1))
        zero = diffusion_loss(unet, scheduler, latents, states, torch.Generator().manual_seed(1),
                              noise_offset=0.0)  # fmt: skip
        offset = diffusion_loss(unet, scheduler, latents, states,
                                torch.Generator().manual_seed(1), noise_offset=0.1)  # fmt: skip
    assert torch.equal(plain, zero) and not torch.equal(plain, offset)


def test_report_to_a_tracker_that_is_not_installed_is_exit_2(runner, data, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    result = runner.invoke(app, ["finetune", str(data), "--out", str(tmp_path / "o"),
                                 "--report-to", "wandb"])  # fmt: skip
    assert result.exit_code == 2
    assert "--report-to wandb needs the wandb package: pip install it" in combined_output(result)
    result = runner.invoke(app, ["finetune", str(data), "--report-to", "mlflow"])
    assert result.exit_code == 2
    assert "--report-to must be one of none, tensorboard, wandb, not 'mlflow'" in (
        combined_output(result)
    )


def test_report_to_tensorboard_logs_loss_and_lr(guarded, data, tmp_path):
    # accelerate's TensorBoard tracker writes through tensorboardX (a dev dependency) when
    # tensorboard itself is absent.
    config = TrainConfig(steps=2, batch_size=2, report_to="tensorboard")
    finetune(data, tmp_path / "run", model=str(guarded), config=config, compare=False,
             show_progress=False)  # fmt: skip
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


def test_aspect_ratio_buckets_train_wide_and_tall_images_by_epochs(runner, guarded, tmp_path):
    import json

    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, size in (("wide", (64, 32)), ("tall", (32, 64)), ("square", (40, 40))):
        Image.new("RGB", size, (200, 30, 30)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} red image")
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", str(folder), "--model", str(guarded), "--out", str(out), "--enable-bucket",
        "--epochs", "2", "--batch-size", "2", "--no-compare", "--json", str(tmp_path / "r.json"),
    ])  # fmt: skip
    assert result.exit_code == 0, combined_output(result)
    # Three shapes, three buckets of one image: three batches per epoch, never mixed.
    assert json.loads((tmp_path / "r.json").read_text())["steps"] == 6
    trained = _unet(out)
    base_state = load_file(str(next((guarded / "unet").glob("*.safetensors"))))
    assert all(torch.equal(trained[n.removeprefix("unet.")], base_state[n.removeprefix("unet.")])
               for n in FROZEN)  # fmt: skip
    refused = runner.invoke(app, [
        "finetune", str(folder), "--model", str(guarded), "--out", str(tmp_path / "no"),
        "--enable-bucket", "--min-bucket-reso", "128", "--max-bucket-reso", "64",
    ])  # fmt: skip
    assert refused.exit_code == 2
    assert "--min-bucket-reso 128 is above --max-bucket-reso 64" in combined_output(refused)
    assert not (tmp_path / "no").exists()
