import pytest
import torch
from safetensors.torch import load_file, save_file

from guardtune.errors import DataError
from guardtune.models import load_pipeline, save_single_file
from guardtune.resolve import EMBEDDED_DIR, resolve_model

CPU = torch.device("cpu")


def _same_unet(a, b) -> bool:
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_embedded_model_is_a_complete_sd_pipeline(embedded_pipeline):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = embedded_pipeline
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.dtype == torch.float32  # fp16 on disk, fp32 on CPU
    # The scaling factor was measured on the data, not copied from SD.
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)


def test_shipped_weights_fit_the_size_budget():
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert total < 20 * 2**20


def test_load_from_a_diffusers_folder(embedded_pipeline, tmp_path):
    embedded_pipeline.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(str(tmp_path / "model"), device=CPU)
    assert _same_unet(loaded, embedded_pipeline)


def test_load_from_a_single_safetensors_file(embedded_pipeline, tmp_path):
    path = tmp_path / "model.safetensors"
    save_single_file(embedded_pipeline, path)
    loaded = load_pipeline(str(path), config_dir=EMBEDDED_DIR, device=CPU)
    assert _same_unet(loaded, embedded_pipeline)
    assert not (tmp_path / ".model.safetensors.partial").exists()


def test_single_file_from_another_architecture_is_refused(embedded_pipeline, tmp_path):
    path = tmp_path / "model.safetensors"
    save_single_file(embedded_pipeline, path)
    state = load_file(str(path))
    state.pop(next(k for k in state if k.startswith("unet.")))
    save_file(state, str(path))
    with pytest.raises(DataError, match="does not fit the unet"):
        load_pipeline(str(path), config_dir=EMBEDDED_DIR, device=CPU)


def test_bad_model_arguments_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"model_index\.json"):
        resolve_model(str(tmp_path))
    ckpt = tmp_path / "x.safetensors"
    ckpt.write_bytes(b"garbage")
    with pytest.raises(DataError, match="component configs"):
        resolve_model(str(ckpt))
    with pytest.raises(DataError, match="not a readable safetensors"):
        load_pipeline(str(ckpt), config_dir=EMBEDDED_DIR, device=CPU)
    other = tmp_path / "x.ckpt"
    other.write_bytes(b"pickle")
    with pytest.raises(DataError, match="safetensors"):
        resolve_model(str(other))


def test_broken_folder_is_a_data_error(embedded_pipeline, tmp_path):
    embedded_pipeline.save_pretrained(tmp_path / "model")
    weights = next((tmp_path / "model" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"diffusion_pytorch_model\.safetensors: corrupt"):
        load_pipeline(str(tmp_path / "model"), device=CPU)
