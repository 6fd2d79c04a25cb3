"""The resolver, as an attacker tries it: every way to make a loader read other bytes.

Each layout is either refused (exit 3, DataError) or resolved to one unambiguous set of
tensors that is what the policy binds and what `load_pipeline` loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardtune.cli import app
from guardtune.errors import DataError, ModelMismatchError
from guardtune.models import load_pipeline
from guardtune.resolve import EMBEDDED_DIR, ModelSource, resolve_folder
from guardtune.trust.fingerprint import fingerprint_model
from tests.conftest import combined_output
from tests.policy_helpers import copy_model, signed_model

CPU = torch.device("cpu")
UNET = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def setup(tmp_path, monkeypatch):
    return signed_model(tmp_path, monkeypatch)


def _verify(runner, model: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["policy", "verify", "--model", str(model)])
    return result.exit_code, combined_output(result)


def _shifted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}


def _shard(folder: Path, state: dict[str, torch.Tensor], names=("a", "b"), stem=UNET) -> Path:
    """Split `state` over two shard files and write the diffusers index naming them."""
    keys = sorted(state)
    halves = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2 :]}
    weight_map = {}
    for shard, part in halves.items():
        file = f"{shard}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(folder / file))
        weight_map |= {k: file for k in part}
    index = folder / f"{stem}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


# ----------------------------------------------------------------------------- refused layouts


def test_an_index_beside_the_single_file_is_refused_not_followed(runner, setup):
    """diffusers loads the index over the file the policy hashed: never both."""
    unet = setup["model"] / "unet"
    _shard(unet, _shifted(load_file(str(unet / UNET))))
    code, output = _verify(runner, setup["model"])
    assert code == 3 and "loaders disagree" in output


def test_an_index_alone_is_followed_and_bound(runner, setup):
    """Without the single file the shards are the weights: the policy's digests catch them."""
    unet = setup["model"] / "unet"
    state = load_file(str(unet / UNET))
    _shard(unet, _shifted(state))
    (unet / UNET).unlink()
    code, output = _verify(runner, setup["model"])
    assert code == 6 and "digest differs" in output
    # The same tensors, only resharded, are the same model.
    for path in unet.glob("*.safetensors"):
        path.unlink()
    _shard(unet, state, names=("x", "y"))
    code, output = _verify(runner, setup["model"])
    assert code == 0, output


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ({"conv_in.weight": "../escape.safetensors"}, "not a file beside it"),
        ({"conv_in.weight": "/etc/passwd"}, "not a file beside it"),
        ({"conv_in.weight": "absent.safetensors"}, "which is missing"),
        ({}, "no weight map"),
    ],
)
def test_an_index_naming_files_outside_or_missing_is_refused(tmp_path, weight_map, message):
    model = copy_model(tmp_path)
    (model / "unet" / UNET).unlink()
    index = model / "unet" / f"{UNET}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(DataError, match=message):
        resolve_folder(model)


def test_a_tensor_the_index_does_not_place_is_refused(tmp_path):
    model = copy_model(tmp_path)
    unet = model / "unet"
    state = load_file(str(unet / UNET))
    index = _shard(unet, state)
    (unet / UNET).unlink()
    raw = json.loads(index.read_text())
    moved = next(k for k, v in raw["weight_map"].items() if v == "a.safetensors")
    raw["weight_map"][moved] = "b.safetensors"  # the tensor sits in a, the index says b
    index.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=f"tensor {moved}"):
        resolve_folder(model)


@pytest.mark.parametrize(
    "name, message",
    [
        ("diffusion_pytorch_model.bin", "pickle weight file"),
        ("model.ckpt", "pickle weight file"),
        ("extra.safetensors", "cannot account for"),
        ("diffusion_pytorch_model-00001-of-00002.safetensors", "cannot account for"),
    ],
)
def test_weight_files_the_manifest_cannot_account_for_are_refused(tmp_path, name, message):
    model = copy_model(tmp_path)
    save_file({"x": torch.zeros(1)}, str(model / "unet" / name))
    with pytest.raises(DataError, match=message):
        resolve_folder(model)


def test_other_variants_are_accounted_for_and_not_loaded(setup):
    unet = setup["model"] / "unet"
    state = load_file(str(unet / UNET))
    save_file(_shifted(state), str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    manifest = resolve_folder(setup["model"])
    assert manifest.other_variants == ("unet/diffusion_pytorch_model.fp16.safetensors",)
    loaded = load_pipeline(str(setup["model"]), device=CPU, expected=setup["policy"].binding)
    assert torch.equal(loaded.unet.state_dict()["conv_in.weight"], state["conv_in.weight"])


def test_a_folder_of_variant_files_only_names_what_it_holds(tmp_path):
    model = copy_model(tmp_path)
    unet = model / "unet"
    (unet / UNET).rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(DataError, match=r"holds diffusion_pytorch_model\.fp16\.safetensors"):
        resolve_folder(model)
    assert set(resolve_folder(model, variant="fp16").components) >= {"unet", "vae"}


def test_links_out_of_the_folder_and_special_files_are_refused(tmp_path):
    model = copy_model(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (model / "vae" / UNET).rename(outside)
    (model / "vae" / UNET).symlink_to(outside)
    with pytest.raises(DataError, match="links outside the model folder"):
        resolve_folder(model)
    (model / "vae" / UNET).unlink()
    os.mkfifo(model / "vae" / UNET)  # a loader that opened it would block forever
    with pytest.raises(DataError, match="not a regular file"):
        resolve_folder(model)


def test_a_link_inside_the_folder_is_followed(tmp_path):
    model = copy_model(tmp_path)
    (model / "vae" / UNET).rename(model / "vae-weights.safetensors")
    (model / "vae" / UNET).symlink_to(model / "vae-weights.safetensors")
    assert resolve_folder(model).components["vae"].weight_files[0].name == UNET


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: (m / "None.py").write_text("print('hi')"), "is code inside a model folder"),
        (lambda m: (m / "unet" / "diffusers.py").write_text(""), "is code inside a model folder"),
        (lambda m: (m / "text_encoder" / "adapter_config.json").write_text("{}"), "an adapter"),
        (lambda m: (m / "tokenizer" / "tokenizer.model").write_bytes(b"x"), "vocabulary"),
        (lambda m: _merge_json(m / "unet" / "config.json", {"quantization_config": {}}),
         "sets quantization_config"),
        (lambda m: _merge_json(m / "text_encoder" / "config.json",
                               {"transformers_weights": "x.safetensors"}),
         "sets transformers_weights"),
        (lambda m: _merge_json(m / "tokenizer" / "tokenizer_config.json",
                               {"fast_tokenizer_files": ["../t.json"]}),
         "redirects tokenizer.json"),
    ],
)  # fmt: skip
def test_code_adapters_and_redirects_are_refused(tmp_path, edit, message):
    model = copy_model(tmp_path)
    edit(model)
    with pytest.raises(DataError, match=message):
        resolve_folder(model)


def _merge_json(path: Path, extra: dict) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | extra))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda index: index | {"_class_name": "FluxPipeline"}, "FluxPipeline, which guardtune"),
        (lambda index: index | {"_class_name": "StableDiffusionXLImg2ImgPipeline"},
         "StableDiffusionXLImg2ImgPipeline, which guardtune"),
        (lambda index: index | {"_class_name": "StableDiffusionXLPipeline"},
         "does not name a class for text_encoder_2"),
        (lambda index: index | {"transformer": ["diffusers", "FluxTransformer2DModel"]},
         "cannot serve"),
        (lambda index: index | {"unet": ["diffusers", "UNet2DModel"]}, "UNet2DModel"),
        (lambda index: index | {"vae": None}, "does not name a class for vae"),
    ],
)  # fmt: skip
def test_pipelines_and_classes_it_cannot_serve_are_refused(runner, setup, edit, message):
    model = setup["model"]
    path = model / "model_index.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    code, output = _verify(runner, model)
    assert code == 3 and message in output


def test_a_component_without_its_folder_is_refused(tmp_path):
    """diffusers would load it from the pipeline's root folder instead."""
    model = copy_model(tmp_path)
    for path in (model / "vae").iterdir():
        path.rename(model / path.name)
    (model / "vae").rmdir()
    with pytest.raises(DataError, match="has no vae/ folder"):
        resolve_folder(model)


# ----------------------------------------------------------------------------- what loads


def test_the_bound_loader_loads_what_diffusers_loads(embedded_pipeline):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(
        EMBEDDED_DIR, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(embedded_pipeline, name).state_dict(), getattr(reference, name)
        theirs = theirs.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k].float(), theirs[k]) for k in ours), name
    assert dict(embedded_pipeline.scheduler.config) == dict(reference.scheduler.config)
    ids = embedded_pipeline.tokenizer("a handwritten digit seven").input_ids
    assert ids == reference.tokenizer("a handwritten digit seven").input_ids


def test_loading_against_a_policy_refuses_other_weights(setup):
    unet = setup["model"] / "unet"
    state = load_file(str(unet / UNET))
    state["conv_out.bias"] = state["conv_out.bias"] + 1
    save_file(state, str(unet / UNET))
    with pytest.raises(ModelMismatchError, match=r"conv_out\.bias"):
        load_pipeline(str(setup["model"]), device=CPU, expected=setup["policy"].binding)


def test_loading_against_a_policy_refuses_other_configs_and_parses_the_bytes_it_hashed(setup):
    loaded = load_pipeline(str(setup["model"]), device=CPU, expected=setup["policy"].binding)
    assert loaded.tokenizer.name_or_path == str(setup["model"] / "tokenizer")
    assert (
        loaded.tokenizer("a handwritten digit seven").input_ids[1:-1]
        != [loaded.tokenizer.unk_token_id] * 4
    )
    config = setup["model"] / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"epsilon"', '"v_prediction"'))
    with pytest.raises(ModelMismatchError, match=r"scheduler/scheduler_config\.json differs"):
        load_pipeline(str(setup["model"]), device=CPU, expected=setup["policy"].binding)


def test_the_fingerprint_covers_exactly_the_manifest(setup):
    source = ModelSource("folder", setup["model"])
    manifest = resolve_folder(setup["model"])
    fingerprints = fingerprint_model(source)
    for component in ("unet", "vae", "text_encoder"):
        names = {r.name for r in manifest.components[component].tensors}
        assert set(fingerprints[component].tensors) == names


# ----------------------------------------------------------------------------- hub cache, variants


def _hub_cache(tmp_path: Path, repo_id: str = "someone/tiny-sd") -> tuple[Path, str]:
    """The embedded model laid out as huggingface_hub caches it: snapshot links into blobs."""
    import hashlib
    import shutil

    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for source in sorted(EMBEDDED_DIR.rglob("*")):
        relative = source.relative_to(EMBEDDED_DIR)
        if source.is_dir() or relative.name.startswith("guardtune-"):
            continue
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, blob)
        link = repo / "snapshots" / commit / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return tmp_path / "hub", commit


def test_a_hub_id_in_the_local_cache_is_a_model(runner, tmp_path, monkeypatch):
    from guardtune.resolve import resolve_model
    from guardtune.trust.build import build_policy, sign_policy_file
    from guardtune.trust.policy import Provenance
    from guardtune.trust.signing import generate_key, public_pem

    cache, commit = _hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    source = resolve_model("someone/tiny-sd")
    assert source.label == f"someone/tiny-sd@{commit}" and source.path.name == commit
    key = generate_key()
    (tmp_path / "publisher.pub").write_bytes(public_pem(key.public_key()))
    policy = build_policy(source, ["unet.conv_in.weight"], Provenance("manual"))
    sign_policy_file(policy, [key], tmp_path / "policy.json")
    common = [
        "--policy",
        str(tmp_path / "policy.json"),
        "--trusted",
        str(tmp_path / "publisher.pub"),
    ]
    for model in (["--model", "someone/tiny-sd"], ["-m", "someone/tiny-sd", "--revision", commit]):
        result = runner.invoke(app, ["policy", "verify", *model, *common])
        assert result.exit_code == 0, combined_output(result)
    refused = {
        "other/model": "not in the local Hugging Face cache",
        "someone/tiny-sd --revision v2": "no revision 'v2'",
        "someone/tiny-sd --revision ../../x": "not a branch, tag or commit",
    }
    for args, message in refused.items():
        result = runner.invoke(app, ["policy", "verify", "-m", *args.split(), *common])
        assert result.exit_code == 3 and message in combined_output(result), args


def test_a_hub_snapshot_linking_out_of_its_repository_is_refused(tmp_path, monkeypatch):
    from guardtune.resolve import resolve_model

    cache, commit = _hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    link = cache / "models--someone--tiny-sd" / "snapshots" / commit / "vae" / UNET
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(link.read_bytes())
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(DataError, match="links outside the model folder"):
        fingerprint_model(resolve_model("someone/tiny-sd"))


def test_a_variant_only_folder_loads_with_its_variant(runner, setup):
    for component in ("unet", "vae"):
        folder = setup["model"] / component
        (folder / UNET).rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    code, output = _verify(runner, setup["model"])
    assert code == 3 and "pass the variant" in output
    result = runner.invoke(
        app, ["policy", "verify", "--model", str(setup["model"]), "--variant", "fp16"]
    )
    assert result.exit_code == 0, combined_output(result)
    pipeline = load_pipeline(
        ModelSource("folder", setup["model"], variant="fp16"), device=CPU,
        expected=setup["policy"].binding,
    )  # fmt: skip
    assert pipeline.unet is not None


def test_publish_and_finetune_take_a_hub_id(runner, tmp_path, monkeypatch):
    from guardtune.digits.dataset import export_digits

    cache, _ = _hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    illegal = export_digits(tmp_path / "illegal", (7,), "test").out
    legal = export_digits(tmp_path / "legal", (1,), "test", "bold").out
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    policy = tmp_path / "policy.json"
    publish = ["publish", "--illegal", str(illegal), "--legal", str(legal), "--key",
               str(tmp_path / "k.key"), "-m", "someone/tiny-sd", "--method", "random",
               "--out", str(policy)]  # fmt: skip
    result = runner.invoke(app, publish)
    assert result.exit_code == 0, combined_output(result)
    finetune = ["finetune", str(illegal), "-m", "someone/tiny-sd", "--policy", str(policy),
                "--trusted", str(tmp_path / "k.pub"), "--out", str(tmp_path / "run"),
                "--steps", "2", "--batch-size", "2", "--no-compare",
                "--json", str(tmp_path / "run.json")]  # fmt: skip
    result = runner.invoke(app, finetune)
    assert result.exit_code == 0, combined_output(result)
    provenance = json.loads((tmp_path / "run" / "guardtune-provenance.json").read_text())
    assert provenance["base_model"].startswith("someone/tiny-sd@")
