"""Exports for other tools: a kohya-named LoRA and an original single file, each loaded by
diffusers to the same model as the run it came from, and each accepted by the audit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from guardtune.cli import app
from guardtune.contract import LORA_FILE, PROVENANCE_METADATA_KEY
from guardtune.training.config import TrainConfig
from guardtune.training.finetune import finetune
from tests.conftest import combined_output
from tests.policy_helpers import signed_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A signed model and two runs on it: a full fine-tune and a LoRA one."""
    from guardtune.digits.dataset import export_digits

    root = tmp_path_factory.mktemp("export")
    monkeypatch = pytest.MonkeyPatch()
    signed = signed_model(root, monkeypatch)
    data = export_digits(root / "sevens", (7,), "test").out
    common = dict(model=str(signed["model"]), compare=False, show_progress=False)
    finetune(data, root / "full", config=TrainConfig(steps=2, batch_size=2, lr=1e-3), **common)
    lora = TrainConfig(steps=2, batch_size=2, lora=True, rank=2, lr=1e-2)
    finetune(data, root / "lora", config=lora, **common)
    yield {"root": root, "model": signed["model"]}
    monkeypatch.undo()


def _run(runner, *args, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, combined_output(result)
    return combined_output(result)


def _prediction(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    states = torch.randn(1, 32, pipeline.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipeline.unet(latents, torch.tensor([500]), states).sample


def test_kohya_lora_loads_as_the_run_did_and_passes_the_audit(runner, runs, tmp_path):
    from guardtune.models import load_pipeline

    out = tmp_path / "kohya.safetensors"
    _run(runner, "export", runs["root"] / "lora", "--to", "kohya", "--out", out)
    with safe_open(str(out), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys) and PROVENANCE_METADATA_KEY in metadata
    # kohya names SD 1.x/2.x modules as diffusers does (SDXL ones by original names).
    assert any(k.startswith("lora_unet_down_blocks_") for k in keys)
    assert not any("input_blocks" in k or "output_blocks" in k for k in keys)
    source = load_pipeline(str(runs["model"]), device=CPU)
    source.load_lora_weights(str(runs["root"] / "lora"), weight_name=LORA_FILE)
    exported = load_pipeline(str(runs["model"]), device=CPU)
    exported.load_lora_weights(str(tmp_path), weight_name=out.name)
    assert torch.allclose(_prediction(source), _prediction(exported), atol=1e-6)
    assert not torch.allclose(_prediction(source), _prediction(load_pipeline(
        str(runs["model"]), device=CPU)), atol=1e-6)  # fmt: skip
    report = tmp_path / "audit.json"
    _run(runner, "audit", out, "--base", runs["model"], "--json", report)
    result = json.loads(report.read_text())
    assert result["naming"] == "kohya" and result["provenance"]["status"] == "consistent"


def test_single_file_loads_as_the_run_did_and_passes_the_audit(runner, runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from guardtune.models import load_pipeline

    out = tmp_path / "full.safetensors"
    _run(runner, "export", runs["root"] / "full", "--to", "single-file", "--out", out)
    loaded = StableDiffusionPipeline.from_single_file(
        str(out), config=str(runs["model"]), local_files_only=True, torch_dtype=torch.float32
    )
    run = load_pipeline(str(runs["root"] / "full" / "model"), device=CPU)
    ours, theirs = run.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    report = tmp_path / "audit.json"
    _run(runner, "audit", out, "--base", runs["model"], "--strict", "--json", report)
    result = json.loads(report.read_text())
    assert result["naming"] == "original-sd" and result["provenance"]["status"] == "consistent"


def test_exports_refuse_what_they_cannot_write(runner, runs, tmp_path):
    out = tmp_path / "x.safetensors"
    _run(runner, "export", runs["root"] / "full", "--to", "kohya", "--out", out, code=3)
    _run(runner, "export", runs["root"] / "lora", "--to", "single-file", "--out", out, code=3)
    _run(runner, "export", runs["root"] / "lora", "--to", "ckpt", "--out", out, code=2)
    _run(runner, "export", runs["root"] / "lora", "--to", "kohya", "--out", tmp_path / "x.pt",
         code=2)  # fmt: skip
    assert not out.exists()


def test_finetune_saves_as_kohya_directly_and_the_export_passes_the_audit(runner, runs,
                                                                             tmp_path):  # fmt: skip
    from guardtune.export import SAVED_NAMES

    data, run = runs["root"] / "sevens", tmp_path / "run"
    common = ("finetune", data, "-m", runs["model"], "--steps", "1", "--batch-size", "2",
              "--no-compare")  # fmt: skip
    output = _run(runner, *common, "--out", run, "--save-as", "kohya", code=2)
    assert "--save-as kohya writes LoRA adapters" in output and not run.exists()
    _run(runner, *common, "--out", run, "--lora", "--rank", "2", "--save-as", "kohya")
    exported = run / SAVED_NAMES["kohya"]
    with safe_open(str(exported), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    report = tmp_path / "audit.json"
    _run(runner, "audit", exported, "--base", runs["model"], "--json", report)
    assert json.loads(report.read_text())["provenance"]["status"] == "consistent"
