"""A tiny SDXL pipeline through every command: two text encoders (both bound by the policy),
pooled text embeddings and size conditioning, full and LoRA fine-tunes under a learned policy,
the audit of each, sampling from each, and `policy show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardtune.cli import app
from guardtune.contract import LORA_FILE
from guardtune.training.conditioning import is_sdxl, unet_inputs
from tests.conftest import combined_output
from tests.sdxl_model import make_tiny_sdxl


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


def _run(runner, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, combined_output(result)
    return combined_output(result)


def test_the_conditioning_carries_pooled_embeddings_and_time_ids(sdxl):
    from guardtune.models import load_pipeline
    from guardtune.training.conditioning import encode_captions

    pipeline = load_pipeline(str(sdxl), device=torch.device("cpu"))
    assert is_sdxl(pipeline.unet) and pipeline.text_encoder_2 is not None
    # Each tokenizer is loaded from its own folder's bytes (settings included).
    assert pipeline.tokenizer_2.model_max_length == pipeline.tokenizer.model_max_length == 32
    packed = encode_captions(pipeline, ["a handwritten digit seven"], torch.device("cpu"), 32)
    states, _, pooled, _ = pipeline.encode_prompt(
        ["a handwritten digit seven"], device="cpu", num_images_per_prompt=1,
        do_classifier_free_guidance=False,
    )  # fmt: skip
    inputs = unet_inputs(pipeline.unet, packed)
    assert torch.equal(inputs["encoder_hidden_states"], states)
    assert torch.equal(inputs["added_cond_kwargs"]["text_embeds"], pooled)
    assert inputs["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    latents = torch.randn(1, 4, 8, 8)
    ours = pipeline.unet(latents, torch.tensor([10]), **inputs).sample
    add_time_ids = pipeline._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), dtype=torch.float32,
        text_encoder_projection_dim=pooled.shape[-1],
    )  # fmt: skip
    theirs = pipeline.unet(latents, torch.tensor([10]), encoder_hidden_states=states,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids}
                           ).sample  # fmt: skip
    assert torch.equal(ours, theirs)


def test_sdxl_in_every_command(runner, sdxl, scenario, tmp_path):
    data, legal = scenario.data, scenario.legal
    trusted = ("--trusted", str(scenario.public))
    _run(runner, "publish", "--illegal", str(data), "--legal", str(legal), "--key",
         str(scenario.key), "-m", str(sdxl), "--ratio", "0.3", "--relearn-steps", "2",
         "--mask-updates", "2", "--user-steps-per-update", "1", "--batch-size", "2")  # fmt: skip
    policy = json.loads(_payload(sdxl))
    assert set(policy["model"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert {"text_encoder_2/config.json", "tokenizer_2/tokenizer.json"} <= set(policy["configs"])
    output = _run(runner, "policy", "verify", "-m", str(sdxl), *trusted)
    assert "files bound" in output
    _run(runner, "policy", "show", str(sdxl / "guardtune-policy.json"), "-m", str(sdxl),
         "--plot", str(tmp_path / "heat.png"))  # fmt: skip
    assert (tmp_path / "heat.png").stat().st_size > 0
    for mode in ((), ("--lora", "--rank", "2")):
        run = tmp_path / ("lora" if mode else "full")
        _run(runner, "finetune", str(data), "-m", str(sdxl), *trusted, "--out", str(run),
             "--steps", "2", "--batch-size", "2", "--no-compare", *mode)  # fmt: skip
        artefact = run / LORA_FILE if mode else run
        _run(runner, "audit", str(artefact), "--base", str(sdxl), *trusted)
    frozen = set(policy["frozen_tensors"])
    base = load_file(str(sdxl / "unet" / "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(tmp_path / "full" / "model" / "unet" /
                          "diffusion_pytorch_model.safetensors"))  # fmt: skip
    assert all(torch.equal(base[n[5:]], tuned[n[5:]]) for n in frozen)
    assert any(not torch.equal(base[n], tuned[n]) for n in base if f"unet.{n}" not in frozen)
    _run(runner, "generate", "-m", str(tmp_path / "full" / "model"), "--prompt",
         "a handwritten digit seven", "--num", "2", "--num-inference-steps", "2",
         "--out", str(tmp_path / "g.png"))  # fmt: skip
    _run(runner, "generate", "-m", str(sdxl), "--lora", str(tmp_path / "lora" / LORA_FILE),
         "--prompt", "a handwritten digit seven", "--num", "1", "--num-inference-steps", "2",
         "--out", str(tmp_path / "l.png"))  # fmt: skip
    # An edited frozen tensor in the derivative is caught.
    weights = tmp_path / "full" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    name = sorted(frozen)[0][5:]
    state[name] = state[name] + 1
    save_file(state, str(weights))
    _run(runner, "audit", str(tmp_path / "full"), "--base", str(sdxl), *trusted, code=7)


def _payload(model: Path) -> bytes:
    import base64

    envelope = json.loads((model / "guardtune-policy.json").read_text())
    return base64.b64decode(envelope["payload"])


def test_a_policy_that_leaves_the_second_text_encoder_unbound_does_not_verify(
    runner, sdxl, tmp_path
):
    import shutil

    from guardtune.resolve import ModelSource
    from guardtune.trust.build import build_policy, sign_policy_file
    from guardtune.trust.policy import Provenance
    from guardtune.trust.signing import generate_key, public_pem

    model = tmp_path / "model"
    shutil.copytree(sdxl, model, ignore=shutil.ignore_patterns("guardtune-*"))
    policy = build_policy(ModelSource("folder", model), ["unet.conv_in.weight"],
                          Provenance("manual"))  # fmt: skip
    model_without = {k: v for k, v in policy.model.items() if k != "text_encoder_2"}
    from dataclasses import replace

    old_style = replace(policy, schema_version=1, model=model_without, configs=None)
    key = generate_key()
    (tmp_path / "k.pub").write_bytes(public_pem(key.public_key()))
    sign_policy_file(old_style, [key], model / "guardtune-policy.json")
    output = _run(runner, "policy", "verify", "-m", str(model), "--trusted",
                  str(tmp_path / "k.pub"), code=6)  # fmt: skip
    assert "its text_encoder_2 is not bound by the policy" in output
