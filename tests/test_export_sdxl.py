"""Exports of SD 2.x and SDXL runs: kohya LoRAs in the naming kohya's SDXL scripts write, and
original single files in each family's layout (OpenCLIP text encoders, SDXL's label_emb and
`conditioner.embedders`), each loaded by diffusers to the run's model and accepted by the
audit, which still catches a frozen tensor changed inside the export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from guardtune.cli import app
from guardtune.contract import LORA_FILE, POLICY_FILE, PROVENANCE_METADATA_KEY
from guardtune.resolve import EMBEDDED_DIR, ModelSource
from guardtune.training.config import TrainConfig
from guardtune.training.finetune import finetune
from tests import sdxl_model
from tests.conftest import combined_output
from tests.policy_helpers import fresh_key, trust

CPU = torch.device("cpu")
# Frozen in the tiny SDXL: the added-embedding MLP (LDM `label_emb.0.0`), an attention
# projection that LoRA must leave alone, and a resnet weight.
ADD_EMBEDDING = "unet.add_embedding.linear_1.weight"
FROZEN_TO_Q = "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"
SDXL_FROZEN = [ADD_EMBEDDING, f"unet.{FROZEN_TO_Q}.weight", "unet.mid_block.resnets.0.conv1.weight"]
SD2_FROZEN = ["unet.conv_in.weight", "unet.down_blocks.1.attentions.0.proj_in.weight"]
# The tiny SDXL's layers_per_block is 1: down block 1, layer 0 is LDM input block 1 + 1 * 2.
FROZEN_TO_Q_KOHYA = "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q"


def _sign(model: Path, frozen: list[str], root: Path) -> None:
    from guardtune.trust.build import build_policy, sign_policy_file
    from guardtune.trust.policy import Provenance

    key = fresh_key()
    trust(root, key)
    policy = build_policy(ModelSource("folder", model), frozen, Provenance("manual", {"p": 0.1}))
    sign_policy_file(policy, [key], model / POLICY_FILE)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from guardtune.digits.dataset import export_digits

    root = tmp_path_factory.mktemp("export-xl")
    export_digits(root / "sevens", (7,), "test")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("GUARDTUNE_TRUSTED_DIR", str(root / "trusted"))
        yield root


@pytest.fixture(scope="module")
def sdxl(root):
    """A signed tiny SDXL and two runs on it: a full fine-tune and a LoRA one."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        # Real SDXL encoders differ in width (768 and 1280), and diffusers' from_single_file
        # tells the first from the second by it: the tiny one must differ too.
        monkeypatch.setattr(sdxl_model, "_TEXT_2_HIDDEN", 48)
        model = sdxl_model.make_tiny_sdxl(root / "sdxl")
    _sign(model, SDXL_FROZEN, root)
    common = dict(model=str(model), compare=False, show_progress=False)
    data = root / "sevens"
    finetune(data, root / "xl-full", config=TrainConfig(steps=1, batch_size=2, lr=1e-3), **common)
    lora = TrainConfig(steps=1, batch_size=2, lora=True, rank=2, lr=1e-2)
    finetune(data, root / "xl-lora", config=lora, **common)
    return {"model": model, "full": root / "xl-full", "lora": root / "xl-lora"}


@pytest.fixture(scope="module")
def sd2(root):
    """A signed tiny SD 2.x (OpenCLIP-style GELU text encoder, linear projections,
    v-prediction) and a full fine-tune of it."""
    from diffusers import UNet2DConditionModel

    model = root / "sd2"
    shutil.copytree(EMBEDDED_DIR, model, ignore=shutil.ignore_patterns("unet", "guardtune-*"))
    text = model / "text_encoder" / "config.json"
    text.write_text(json.dumps(json.loads(text.read_text()) | {"hidden_act": "gelu"}))
    config = json.loads((EMBEDDED_DIR / "unet" / "config.json").read_text())
    config |= {"use_linear_projection": True, "attention_head_dim": [2, 4, 4]}
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(model / "unet")
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(
        json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"})
    )
    _sign(model, SD2_FROZEN, root)
    finetune(root / "sevens", root / "sd2-full", model=str(model), compare=False,
             show_progress=False, config=TrainConfig(steps=1, batch_size=2, lr=1e-3))  # fmt: skip
    return {"model": model, "full": root / "sd2-full"}


def _run(runner, *args, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, combined_output(result)
    return combined_output(result)


def _audit(runner, path: Path, base: Path, tmp_path: Path, *extra: str, code: int = 0) -> dict:
    report = tmp_path / "audit.json"
    _run(runner, "audit", path, "--base", base, "--json", report, *extra, code=code)
    return json.loads(report.read_text())


def _problems(report: dict) -> dict[str, str]:
    return {v["tensor"]: v["problem"] for v in report["violations"]}


def _resaved(path: Path, out: Path, edit) -> Path:
    """`path`'s tensors, edited, written to `out` with the same metadata (provenance)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    edit(state)
    save_file(state, str(out), metadata=metadata)
    return out


def _sdxl_prediction(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    states = torch.randn(1, 8, unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(1, sdxl_model._PROJECTION_DIM, generator=generator)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    conditioning = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), states, added_cond_kwargs=conditioning).sample


def _text_outputs(pipeline) -> list[torch.Tensor]:
    """Each text encoder's hidden states and pooled (or projected) output for one prompt."""
    ids = torch.tensor([[pipeline.tokenizer.bos_token_id, 5, 17, 42, 9, 300]])
    outputs: list[torch.Tensor] = []
    for encoder in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if encoder is not None:
            with torch.no_grad():
                outputs += encoder(ids).to_tuple()[:2]
    return outputs


# ----------------------------------------------------------------------------- SDXL, kohya


def test_sdxl_kohya_lora_has_original_names_loads_as_the_run_did_and_passes_the_audit(
    runner, sdxl, tmp_path
):
    from guardtune.models import load_pipeline

    out = tmp_path / "kohya.safetensors"
    _run(runner, "export", sdxl["lora"], "--to", "kohya", "--out", out)
    with safe_open(str(out), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert PROVENANCE_METADATA_KEY in metadata
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    # kohya's SDXL scripts name UNet modules as the original (sgm) UNet does.
    assert not any(part in k for k in keys for part in ("down_blocks", "mid_block", "up_blocks"))
    stem = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= set(keys)
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0.alpha" in keys
    assert not any(k.startswith(FROZEN_TO_Q_KOHYA) for k in keys)
    source = load_pipeline(str(sdxl["model"]), device=CPU)
    source.load_lora_weights(str(sdxl["lora"]), weight_name=LORA_FILE)
    exported = load_pipeline(str(sdxl["model"]), device=CPU)
    exported.load_lora_weights(str(tmp_path), weight_name=out.name)
    expected = _sdxl_prediction(source.unet)
    assert torch.allclose(expected, _sdxl_prediction(exported.unet), atol=1e-6)
    plain = load_pipeline(str(sdxl["model"]), device=CPU)
    assert not torch.allclose(expected, _sdxl_prediction(plain.unet), atol=1e-6)
    report = _audit(runner, out, sdxl["model"], tmp_path)
    assert report["naming"] == "kohya" and report["provenance"]["status"] == "consistent"
    assert report["counts"]["adapted modules"] == len(keys) // 3


def test_sdxl_kohya_lora_on_a_frozen_module_fails_the_audit(runner, sdxl, tmp_path):
    out = tmp_path / "kohya.safetensors"
    _run(runner, "export", sdxl["lora"], "--to", "kohya", "--out", out)

    def adapt_frozen(state: dict) -> None:
        state[f"{FROZEN_TO_Q_KOHYA}.lora_down.weight"] = torch.ones(2, 64)
        state[f"{FROZEN_TO_Q_KOHYA}.lora_up.weight"] = torch.ones(64, 2)
        state[f"{FROZEN_TO_Q_KOHYA}.alpha"] = torch.tensor(2.0)

    attacked = _resaved(out, tmp_path / "attacked.safetensors", adapt_frozen)
    report = _audit(runner, attacked, sdxl["model"], tmp_path, code=7)
    assert _problems(report) == {f"unet.{FROZEN_TO_Q}.weight": "lora-on-frozen"}


def test_sdxl_kohya_export_needs_the_base_its_provenance_names(runner, sdxl, tmp_path):
    from guardtune.contract import PROVENANCE_FILE

    run = tmp_path / "moved"
    shutil.copytree(sdxl["lora"], run)
    gone = str(tmp_path / "gone")

    def rename_base(metadata: dict) -> dict:
        claims = json.loads(metadata[PROVENANCE_METADATA_KEY]) | {"base_model": gone}
        return metadata | {PROVENANCE_METADATA_KEY: json.dumps(claims)}

    with safe_open(str(run / LORA_FILE), framework="pt") as handle:
        metadata = rename_base(handle.metadata())
    save_file(load_file(str(run / LORA_FILE)), str(run / LORA_FILE), metadata=metadata)
    (run / PROVENANCE_FILE).write_text(metadata[PROVENANCE_METADATA_KEY])
    out = tmp_path / "kohya.safetensors"
    output = _run(runner, "export", run, "--to", "kohya", "--out", out, code=3)
    assert f"the base model {gone} that the run's provenance names is not here" in output
    assert not out.exists()


# ----------------------------------------------------------------------------- SDXL, single file


def test_sdxl_single_file_loads_as_the_run_did_and_passes_the_audit(runner, sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from guardtune.models import load_pipeline

    out = tmp_path / "full.safetensors"
    _run(runner, "export", sdxl["full"], "--to", "single-file", "--out", out)
    with safe_open(str(out), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert PROVENANCE_METADATA_KEY in metadata
    assert {
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias",
        "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight",
        "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.text_projection",
        "first_stage_model.decoder.conv_in.weight",
    } <= keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(out), config=str(sdxl["model"]), local_files_only=True, torch_dtype=torch.float32
    )
    run = load_pipeline(str(sdxl["full"] / "model"), device=CPU)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(run, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert torch.equal(_sdxl_prediction(run.unet), _sdxl_prediction(loaded.unet))
    for ours, theirs in zip(_text_outputs(run), _text_outputs(loaded), strict=True):
        assert torch.equal(ours, theirs)
    report = _audit(runner, out, sdxl["model"], tmp_path, "--strict")
    assert report["naming"] == "original-sd" and report["provenance"]["status"] == "consistent"
    assert report["counts"]["identical"] == len(SDXL_FROZEN)


def test_sdxl_single_file_with_a_frozen_tensor_changed_or_dropped_fails_the_audit(
    runner, sdxl, tmp_path
):
    out = tmp_path / "full.safetensors"
    _run(runner, "export", sdxl["full"], "--to", "single-file", "--out", out)
    label_emb = "model.diffusion_model.label_emb.0.0.weight"

    def change(state: dict) -> None:
        state[label_emb] = state[label_emb] * 1.01

    attacked = _resaved(out, tmp_path / "changed.safetensors", change)
    report = _audit(runner, attacked, sdxl["model"], tmp_path, code=7)
    assert _problems(report) == {ADD_EMBEDDING: "changed"}
    assert report["violations"][0]["key"] == label_emb
    dropped = _resaved(out, tmp_path / "dropped.safetensors", lambda state: state.pop(label_emb))
    report = _audit(runner, dropped, sdxl["model"], tmp_path, code=7)
    assert _problems(report) == {ADD_EMBEDDING: "missing"}


# ----------------------------------------------------------------------------- SD 2.x


def test_sd2_single_file_has_an_openclip_text_encoder_diffusers_reads_and_passes_the_audit(
    runner, sd2, tmp_path
):
    from diffusers import StableDiffusionPipeline

    from guardtune.models import load_pipeline

    out = tmp_path / "sd2.safetensors"
    _run(runner, "export", sd2["full"], "--to", "single-file", "--out", out)
    with safe_open(str(out), framework="pt") as handle:
        names = list(handle.keys())
        keys = {k: handle.get_slice(k).get_shape() for k in names}
    assert keys["cond_stage_model.model.token_embedding.weight"] == [1078, 64]
    assert keys["cond_stage_model.model.positional_embedding"] == [32, 64]
    assert keys["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == [192, 64]
    assert keys["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias"] == [192]
    assert "cond_stage_model.model.ln_final.bias" in keys
    assert "cond_stage_model.model.transformer.resblocks.1.mlp.c_proj.weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    loaded = StableDiffusionPipeline.from_single_file(
        str(out), config=str(sd2["model"]), local_files_only=True, torch_dtype=torch.float32
    )
    run = load_pipeline(str(sd2["full"] / "model"), device=CPU)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(run, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    for ours, theirs in zip(_text_outputs(run), _text_outputs(loaded), strict=True):
        assert torch.equal(ours, theirs)
    report = _audit(runner, out, sd2["model"], tmp_path, "--strict")
    assert report["naming"] == "original-sd" and report["provenance"]["status"] == "consistent"
