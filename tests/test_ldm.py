"""Original Stable Diffusion (LDM) single files: written under LDM names, read back by diffusers,
and used as `--model` by publish, verify, finetune and audit, bound byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardtune.cli import app
from guardtune.contract import LDM_UNET_PREFIX
from guardtune.errors import DataError
from guardtune.ldm import LDM_VAE_PREFIX, _openclip_state, family, ldm_components, ldm_state
from guardtune.resolve import EMBEDDED_DIR
from tests.conftest import combined_output

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def original(tmp_path_factory, embedded_pipeline) -> Path:
    path = tmp_path_factory.mktemp("ldm") / "digits.safetensors"
    state = ldm_state(embedded_pipeline)
    state["model_ema.decay"] = torch.tensor(0.9999)  # what released checkpoints also carry
    save_file(state, str(path))
    return path


def _run(runner, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, combined_output(result)
    return combined_output(result)


def test_written_names_are_the_ones_diffusers_reads(original, embedded_pipeline):
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_single_file(
        str(original), config=str(EMBEDDED_DIR), local_files_only=True, torch_dtype=torch.float32
    )
    for name in ("unet", "vae", "text_encoder"):
        ours, read = (
            getattr(embedded_pipeline, name).state_dict(),
            getattr(theirs, name).state_dict(),
        )
        assert ours.keys() == read.keys(), name
        assert all(torch.equal(ours[k].float(), read[k].float()) for k in ours), name


def test_every_tensor_of_the_file_is_bound(original):
    parts = ldm_components(original, EMBEDDED_DIR)
    names = {r.name for records in parts.values() for r in records}
    assert len(names) == len(load_file(str(original)))
    assert "unet.conv_in.weight" in names and "checkpoint.model_ema.decay" in names
    assert not any(n.startswith(f"unet.{LDM_UNET_PREFIX}") for n in names)


def test_an_original_checkpoint_as_model_in_every_command(runner, original, scenario, tmp_path):
    data, legal = scenario.data, scenario.legal
    model = ("-m", original, "--model-config", EMBEDDED_DIR)
    policy = tmp_path / "policy.json"
    trusted = ("--trusted", scenario.public, "--policy", policy)
    _run(runner, "publish", "--illegal", data, "--legal", legal, "--key", scenario.key,
         *model, "--method", "random", "--ratio", "0.3", "--out", policy)  # fmt: skip
    output = _run(runner, "policy", "verify", *model, *trusted)
    assert "not bound" in output and "single .safetensors file" in output
    run = tmp_path / "run"
    _run(runner, "finetune", data, *model, *trusted, "--out", run, "--steps", "2",
         "--batch-size", "2", "--no-compare")  # fmt: skip
    payload = json.loads((run / "guardtune-provenance.json").read_text())
    assert payload["base_fingerprint"].keys() == {"unet", "checkpoint"}
    _run(runner, "audit", run, "--base", original, "--model-config", EMBEDDED_DIR, *trusted)
    # One byte of the VAE (bound as `checkpoint`) or of a UNet tensor: the policy no longer fits.
    state = load_file(str(original))
    vae_key = next(k for k in state if k.startswith(LDM_VAE_PREFIX))
    state[vae_key] = state[vae_key] + 1
    edited = tmp_path / "edited.safetensors"
    save_file(state, str(edited))
    output = _run(runner, "policy", "verify", "-m", edited, "--model-config", EMBEDDED_DIR,
                  *trusted, code=6)  # fmt: skip
    assert f"checkpoint.{vae_key}" in output
    _run(runner, "finetune", data, "-m", edited, "--model-config", EMBEDDED_DIR, *trusted,
         "--out", tmp_path / "refused", "--steps", "1", "--no-compare", code=6)  # fmt: skip


def test_the_text_encoder_decides_between_the_sd1_and_sd2_layouts(embedded_pipeline):
    def pipeline(hidden_act: str, second: object = None) -> SimpleNamespace:
        encoder = SimpleNamespace(config=SimpleNamespace(hidden_act=hidden_act))
        return SimpleNamespace(text_encoder=encoder, text_encoder_2=second)

    # The embedded model, and test_sd2's model (v-prediction, linear projections), keep CLIP.
    assert family(embedded_pipeline) == family(pipeline("quick_gelu")) == "sd1"
    assert family(pipeline("gelu")) == "sd2"
    assert family(pipeline("quick_gelu", second=object())) == "sdxl"


def test_a_text_encoder_tensor_without_an_openclip_name_is_an_error():
    layer = "text_model.encoder.layers.0.self_attn"
    weights = {f"{layer}.{p}_proj.weight": torch.zeros(2, 2) for p in "qkv"}
    fused = _openclip_state(weights, "m.")
    assert fused["m.transformer.resblocks.0.attn.in_proj_weight"].shape == (6, 2)
    unknown = "text encoder tensor extra.weight has no OpenCLIP name"
    with pytest.raises(DataError, match=re.escape(unknown)):
        _openclip_state(weights | {"extra.weight": torch.zeros(1)}, "m.")
    del weights[f"{layer}.k_proj.weight"]
    with pytest.raises(DataError, match=re.escape("text encoder layer 0 lacks self_attn.k_proj")):
        _openclip_state(weights, "m.")
