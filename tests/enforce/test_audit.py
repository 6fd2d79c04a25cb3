"""`guardtune audit`: compliant derivatives pass, every kind of violation is caught and named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from guardtune.cli import app
from guardtune.contract import LORA_FILE, PROVENANCE_FILE
from guardtune.digits.dataset import export_digits
from guardtune.enforce.audit import audit
from guardtune.enforce.keynames import LDM_UNET_PREFIX, diffusers_to_ldm_unet
from guardtune.errors import SignatureError
from guardtune.resolve import ModelSource
from guardtune.training.config import TrainConfig
from guardtune.training.finetune import finetune
from guardtune.trust.build import build_policy, sign_policy_file
from guardtune.trust.policy import Provenance
from guardtune.trust.signing import generate_key, public_pem
from tests.conftest import combined_output
from tests.policy_helpers import FROZEN, copy_model

# One attention projection is frozen too, so that a LoRA can break the policy.
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
POLICY_FROZEN = [*FROZEN, f"unet.{TO_Q}.weight"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An fp32 copy of the embedded model, its signed policy, and two compliant derivatives."""
    root = tmp_path_factory.mktemp("audit")
    model = copy_model(root)
    unet_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    # fp32 values that fp16 cannot hold, so that an fp16 copy really rounds.
    noise = torch.Generator().manual_seed(0)
    state = {k: v.float() for k, v in load_file(str(unet_file)).items()}
    state = {k: v + 1e-4 * torch.randn(v.shape, generator=noise) for k, v in state.items()}
    save_file(state, str(unet_file))
    key = generate_key()
    pub = root / "publisher.pub"
    pub.write_bytes(public_pem(key.public_key()))
    policy = build_policy(ModelSource("folder", model), POLICY_FROZEN, Provenance("manual"))
    sign_policy_file(policy, [key], model / "guardtune-policy.json")
    data = export_digits(root / "data", (7,), "train").out
    common = dict(model=str(model), trusted=(pub,), compare=False, show_progress=False)
    finetune(data, root / "full", config=TrainConfig(steps=2, batch_size=4, lr=1e-3), **common)
    lora = TrainConfig(steps=2, batch_size=4, lora=True, rank=4, lr=1e-2)
    finetune(data, root / "lora", config=lora, **common)
    return {"root": root, "model": model, "pub": pub, "unet_file": unet_file}


def _audit(setup, derivative, *extra):
    args = ["audit", str(derivative), "--base", str(setup["model"]), "--trusted", str(setup["pub"])]
    json_path = setup["root"] / "audit.json"
    json_path.unlink(missing_ok=True)
    result = CliRunner().invoke(app, [*args, *extra, "--json", str(json_path)])
    report = json.loads(json_path.read_text()) if json_path.exists() else None
    return result, report


def _problems(report) -> dict[str, str]:
    return {v["tensor"]: v["problem"] for v in report["violations"]}


def _unet_copy(setup, tmp_path, edit) -> Path:
    """A derivative folder: the base model with its UNet state dict edited."""
    derivative = tmp_path / "derivative"
    shutil.copytree(setup["model"], derivative)
    target = derivative / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(target))
    edit(state)
    save_file(state, str(target))
    return derivative


def test_compliant_full_finetune_passes_with_consistent_provenance(setup):
    result, report = _audit(setup, setup["root"] / "full", "--strict")
    assert result.exit_code == 0, combined_output(result)
    assert report["kind"] == "full" and report["violations"] == []
    assert report["counts"]["identical"] == len(POLICY_FROZEN)  # fp32 base, fp32 output
    provenance = report["provenance"]
    assert provenance["present"] and provenance["consistent"] and provenance["problems"] == []


def test_compliant_lora_from_finetune_passes(setup):
    result, report = _audit(setup, setup["root"] / "lora" / LORA_FILE)
    assert result.exit_code == 0, combined_output(result)
    assert report["kind"] == "lora" and report["counts"]["adapted modules"] > 0
    assert report["provenance"]["consistent"] is True
    assert "metadata" in report["provenance"]["where"]


def test_a_hand_edited_frozen_tensor_is_named_with_its_change(setup, tmp_path):
    name = FROZEN[0].removeprefix("unet.")
    derivative = _unet_copy(setup, tmp_path, lambda s: s[name].view(-1)[:5].add_(0.01))
    result, report = _audit(setup, derivative)
    assert result.exit_code == 7
    assert _problems(report) == {FROZEN[0]: "changed"}
    assert "5 of" in report["violations"][0]["detail"]
    assert FROZEN[0] in combined_output(result) and "violates the policy" in combined_output(result)


def test_an_unfrozen_change_is_fine_but_a_missing_or_renamed_frozen_tensor_is_not(setup, tmp_path):
    renamed, dropped = FROZEN[1].removeprefix("unet."), FROZEN[2].removeprefix("unet.")

    def edit(state):
        state["up_blocks.0.resnets.0.conv1.weight"].add_(1.0)  # not frozen
        state[renamed + "_v2"] = state.pop(renamed)
        del state[dropped]

    result, report = _audit(setup, _unet_copy(setup, tmp_path, edit))
    assert result.exit_code == 7
    assert _problems(report) == {FROZEN[1]: "renamed", FROZEN[2]: "missing"}
    assert renamed + "_v2" in report["violations"][0]["detail"] + report["violations"][1]["detail"]


def test_fp16_cast_passes_unless_strict_and_lossless_upcast_passes_strict(setup, tmp_path):
    state = load_file(str(setup["unet_file"]))
    half = tmp_path / "unet-fp16.safetensors"  # a bare UNet state dict, diffusers naming
    save_file({k: v.half() for k, v in state.items()}, str(half))
    result, report = _audit(setup, half)
    assert result.exit_code == 0, combined_output(result)
    assert report["counts"]["cast"] == len(POLICY_FROZEN)
    result, report = _audit(setup, half, "--strict")
    assert result.exit_code == 7 and set(_problems(report).values()) == {"cast"}
    wide = tmp_path / "unet-fp64.safetensors"
    save_file({f"unet.{k}": v.double() for k, v in state.items()}, str(wide))
    result, report = _audit(setup, wide, "--strict")
    assert result.exit_code == 0 and report["counts"]["lossless"] == len(POLICY_FROZEN)


def test_original_sd_checkpoint_is_mapped_to_policy_names(setup, tmp_path):
    state = load_file(str(setup["unet_file"]))
    to_ldm = diffusers_to_ldm_unet(state)
    original = {LDM_UNET_PREFIX + to_ldm[k]: v for k, v in state.items()}
    original["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # other components
    path = tmp_path / "original.safetensors"
    save_file(original, str(path))
    result, report = _audit(setup, path, "--strict")
    assert result.exit_code == 0 and report["naming"] == "original-sd", combined_output(result)
    frozen = FROZEN[0].removeprefix("unet.")
    original[LDM_UNET_PREFIX + to_ldm[frozen]].mul_(1.5)
    save_file(original, str(path))
    result, report = _audit(setup, path)
    assert result.exit_code == 7 and _problems(report) == {FROZEN[0]: "changed"}
    assert report["violations"][0]["key"] == LDM_UNET_PREFIX + to_ldm[frozen]


@pytest.mark.parametrize("naming", ["peft", "kohya"])
def test_lora_on_a_frozen_module_is_caught_in_both_namings(setup, tmp_path, naming):
    lora = load_file(str(setup["root"] / "lora" / LORA_FILE))
    assert not any(TO_Q in k for k in lora)  # finetune itself never adapts a frozen module
    down, up = torch.zeros(4, 64), torch.zeros(64, 4)
    if naming == "peft":
        extra = {f"unet.{TO_Q}.lora_A.weight": down, f"unet.{TO_Q}.lora_B.weight": up}
    else:
        stem = "lora_unet_" + TO_Q.replace(".", "_")
        extra = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                 f"{stem}.alpha": torch.tensor(4.0)}  # fmt: skip
    path = tmp_path / f"{naming}.safetensors"
    save_file({**lora, **extra}, str(path))
    result, report = _audit(setup, path)
    assert result.exit_code == 7
    assert _problems(report) == {f"unet.{TO_Q}.weight": "lora-on-frozen"}


def test_unmappable_lora_key_fails_closed(setup, tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"lora_unet_secret_block_proj.lora_down.weight": torch.zeros(2, 2)}, str(path))
    result, report = _audit(setup, path)
    assert result.exit_code == 7 and _problems(report) == {"?": "unmapped"}


def _lora_with_claims(setup, path: Path, edit) -> Path:
    source = setup["root"] / "lora" / LORA_FILE
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    claims = json.loads(metadata["guardtune_provenance"])
    edit(claims)
    metadata["guardtune_provenance"] = json.dumps(claims)
    save_file(load_file(str(source)), str(path), metadata=metadata)
    return path


def test_provenance_of_another_policy_or_base_is_reported_and_a_lie_is_forged(setup, tmp_path):
    other = _lora_with_claims(setup, tmp_path / "other.safetensors",
                              lambda claims: claims.update(policy_sha256="0" * 64))  # fmt: skip
    result, report = _audit(setup, other)
    assert result.exit_code == 0, combined_output(result)  # the adapters themselves comply
    assert report["provenance"]["status"] == "other policy"

    def lie(claims):
        name = next(iter(claims["frozen_tensor_digests"]))
        claims["frozen_tensor_digests"][name][1] = "0" * 64

    forged = _lora_with_claims(setup, tmp_path / "forged.safetensors", lie)
    result, report = _audit(setup, forged)
    assert result.exit_code == 7 and report["provenance"]["status"] == "forged"
    assert _problems(report) == {"provenance": "forged provenance"}
    assert "not the base's" in report["violations"][0]["detail"]
    assert "FORGED" in combined_output(result)
    # A full derivative's provenance file is read the same way.
    folder = tmp_path / "full"
    shutil.copytree(setup["root"] / "full" / "model", folder)
    claims = json.loads((folder / PROVENANCE_FILE).read_text())
    claims["base_fingerprint"]["unet"] = "f" * 64
    (folder / PROVENANCE_FILE).write_text(json.dumps(claims))
    result, report = _audit(setup, folder)
    assert result.exit_code == 0 and report["provenance"]["status"] == "other base"
    (folder / PROVENANCE_FILE).write_text("{" * 10_000)
    result, report = _audit(setup, folder)
    assert result.exit_code == 7 and report["provenance"]["status"] == "forged"


def test_without_base_the_provenances_base_is_used_if_it_is_here(setup, tmp_path):
    trusted = ["--trusted", str(setup["pub"])]
    result = CliRunner().invoke(app, ["audit", str(setup["root"] / "full"), *trusted])
    assert result.exit_code == 0, combined_output(result)
    assert str(setup["model"]) in combined_output(result)

    def move(claims):
        claims["base_model"] = "/nowhere/model"

    elsewhere = _lora_with_claims(setup, tmp_path / "elsewhere.safetensors", move)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(setup["root"] / "lora" / LORA_FILE)), str(bare))
    for derivative in (elsewhere, bare):
        result = CliRunner().invoke(app, ["audit", str(derivative), *trusted])
        assert result.exit_code == 2 and "--base" in combined_output(result), derivative


def test_policy_that_does_not_verify_stops_the_audit(setup, tmp_path):
    stranger = tmp_path / "stranger.pub"
    stranger.write_bytes(public_pem(generate_key().public_key()))
    with pytest.raises(SignatureError):  # the publisher's key is not among the trusted ones
        audit(setup["root"] / "full", str(setup["model"]), trusted_files=[stranger],
              use_trust_dirs=False)  # fmt: skip
    result = CliRunner().invoke(
        app, ["audit", str(setup["root"] / "full"), "--base", str(setup["model"])]
    )
    assert result.exit_code == 5, combined_output(result)
    result, _ = _audit(setup, tmp_path / "nothing-here")
    assert result.exit_code == 3 and "not found" in combined_output(result)


# ----------------------------------------------------------------------------- every artefact


def _frozen_edited(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = FROZEN[0].removeprefix("unet.")
    return state | {name: state[name] + 0.5}


def test_an_index_redirecting_the_weights_is_a_violation(setup, tmp_path):
    """diffusers loads an index over the single file: the audit refuses to guess which."""
    derivative = _unet_copy(setup, tmp_path, lambda state: None)
    unet = derivative / "unet"
    state = _frozen_edited(load_file(str(unet / "diffusion_pytorch_model.safetensors")))
    save_file(state, str(unet / "edited.safetensors"))
    weight_map = {name: "edited.safetensors" for name in state}
    index = {"metadata": {}, "weight_map": weight_map}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    result, report = _audit(setup, derivative)
    assert result.exit_code == 7
    assert _problems(report) == {"?": "unaccountable"}
    assert "loaders disagree" in report["violations"][0]["detail"]
    (unet / "diffusion_pytorch_model.safetensors").unlink()  # now the index is the weights
    result, report = _audit(setup, derivative)
    assert result.exit_code == 7 and _problems(report) == {FROZEN[0]: "changed"}


def test_every_variant_is_audited(setup, tmp_path):
    derivative = _unet_copy(setup, tmp_path, lambda state: None)
    unet = derivative / "unet"
    state = _frozen_edited(load_file(str(unet / "diffusion_pytorch_model.safetensors")))
    save_file({k: v.half() for k, v in state.items()},
              str(unet / "diffusion_pytorch_model.fp16.safetensors"))  # fmt: skip
    result, report = _audit(setup, derivative)
    assert result.exit_code == 7 and _problems(report) == {FROZEN[0]: "changed"}
    assert "weights (fp16)" in report["violations"][0]["key"]
    assert report["counts"]["identical"] == len(POLICY_FROZEN)  # the plain set is compliant


def test_pickles_and_unknown_weight_files_are_violations(setup, tmp_path):
    for name in ("diffusion_pytorch_model.bin", "more.safetensors"):
        derivative = _unet_copy(setup, tmp_path / name, lambda state: None)
        (derivative / "unet" / name).write_bytes(b"\x00" * 16)
        result, report = _audit(setup, derivative)
        assert result.exit_code == 7 and _problems(report) == {"?": "unaccountable"}, name


def test_a_frozen_tensor_stored_as_integers_is_changed_not_cast(setup, tmp_path):
    name = FROZEN[0].removeprefix("unet.")
    derivative = _unet_copy(setup, tmp_path, lambda s: s.update({name: s[name].to(torch.int8)}))
    result, report = _audit(setup, derivative)
    assert result.exit_code == 7 and _problems(report) == {FROZEN[0]: "changed"}
    assert "not a floating-point type" in report["violations"][0]["detail"]


def test_a_lora_file_beside_the_pipeline_is_audited_too(setup, tmp_path):
    derivative = _unet_copy(setup, tmp_path, lambda state: None)
    key = f"lora_unet_{TO_Q.replace('.', '_')}"
    lora = {
        f"{key}.lora_down.weight": torch.zeros(4, 32),
        f"{key}.lora_up.weight": torch.zeros(32, 4),
    }
    save_file(lora, str(derivative / "pytorch_lora_weights.safetensors"))
    result, report = _audit(setup, derivative)
    assert result.exit_code == 7
    assert _problems(report) == {f"unet.{TO_Q}.weight": "lora-on-frozen"}
    assert report["kind"] == "full+lora"


def test_a_provenance_record_that_is_no_regular_file_is_refused_unread(setup, tmp_path):
    import os

    derivative = tmp_path / "derivative"
    shutil.copytree(setup["root"] / "full" / "model", derivative)
    (derivative / PROVENANCE_FILE).unlink()
    os.mkfifo(derivative / PROVENANCE_FILE)  # reading it would block forever
    result, _ = _audit(setup, derivative)
    assert result.exit_code == 3 and "is not a regular file" in combined_output(result)


def _violations(report) -> list[tuple[str, str]]:
    return sorted((v["problem"], v["key"] or v["tensor"]) for v in report["violations"])


def test_full_weights_in_a_file_with_an_adapter_key_are_audited_in_any_naming(setup, tmp_path):
    state = load_file(str(setup["unet_file"]))
    name = FROZEN[0].removeprefix("unet.")
    state[name] = state[name] + 1.0
    to_ldm = diffusers_to_ldm_unet(state)
    for label, tensors in {
        "original": {LDM_UNET_PREFIX + to_ldm[k]: v for k, v in state.items()},
        "bare": dict(state),
    }.items():
        # One LoRA-looking key must not turn a checkpoint into a LoRA whose weights go unread.
        tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(1.0)
        path = tmp_path / f"{label}.safetensors"
        save_file(tensors, str(path))
        result, report = _audit(setup, path)
        assert result.exit_code == 7 and _problems(report) == {FROZEN[0]: "changed"}, label


def test_a_checkpoint_holding_the_unet_under_two_namings_is_unaccountable(setup, tmp_path):
    state = load_file(str(setup["unet_file"]))
    to_ldm = diffusers_to_ldm_unet(state)
    tensors = {LDM_UNET_PREFIX + to_ldm[k]: v for k, v in state.items()}
    tensors[FROZEN[0]] = state[FROZEN[0].removeprefix("unet.")] + 1.0  # a second copy, changed
    path = tmp_path / "two.safetensors"
    save_file(tensors, str(path))
    result, report = _audit(setup, path)
    assert result.exit_code == 7
    assert _problems(report) == {"?": "unaccountable", FROZEN[0]: "changed"}


def test_keys_a_loader_may_apply_that_name_no_base_tensor_are_violations(setup, tmp_path):
    norm = "down_blocks.1.resnets.0.norm1"
    lora = load_file(str(setup["root"] / "lora" / LORA_FILE))
    extra = {
        f"unet.{norm}.w_norm": torch.ones(32),  # ComfyUI adds these to the norm's weight
        f"{norm}.b_norm": torch.ones(32),
        "lora_prior_unet_input_blocks_3_0_in_layers_0.w_norm": torch.ones(32),
    }
    path = tmp_path / "lora.safetensors"
    save_file({**lora, **extra}, str(path))
    result, report = _audit(setup, path)
    assert result.exit_code == 7
    assert _violations(report) == sorted(("unmapped", k) for k in extra)
    # The same keys beside full weights: a LoRA loader handed the file would apply them.
    state = load_file(str(setup["unet_file"]))
    save_file({**state, f"{norm}.w_norm": torch.ones(32)}, str(path))
    result, report = _audit(setup, path)
    assert result.exit_code == 7
    assert _violations(report) == [("unaccountable", f"{norm}.w_norm")]


def test_a_pickle_beside_the_pipeline_is_unaccountable(setup, tmp_path):
    derivative = _unet_copy(setup, tmp_path, lambda state: None)
    # diffusers' load_lora_weights(folder) falls back to reading this pickle
    (derivative / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04N.")
    result, report = _audit(setup, derivative)
    assert result.exit_code == 7 and _problems(report) == {"?": "unaccountable"}
    assert report["violations"][0]["key"].endswith("pytorch_lora_weights.bin")
