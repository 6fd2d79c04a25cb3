import pytest
import torch
from safetensors.torch import load_file, save_file

from guardtune.errors import DataError
from guardtune.models import save_single_file
from guardtune.resolve import EMBEDDED_DIR, ModelSource, resolve_model
from guardtune.tensorfile import read_header
from guardtune.trust.fingerprint import fingerprint_model, fingerprint_state_dict, hash_records


def test_folder_single_file_and_memory_give_the_same_fingerprint(embedded_pipeline, tmp_path):
    folder = fingerprint_model(resolve_model("digits"))
    fp16 = embedded_pipeline.to(torch.float16)
    try:
        path = tmp_path / "model.safetensors"
        save_single_file(fp16, path)
        single = fingerprint_model(ModelSource("single_file", path, EMBEDDED_DIR))
        memory = fingerprint_state_dict("unet", fp16.unet.state_dict())
    finally:
        embedded_pipeline.to(torch.float32)
    assert single == folder
    assert memory == folder["unet"]
    assert set(folder) == {"unet", "text_encoder", "vae"}
    assert all(name.startswith("unet.") for name in folder["unet"].tensors)


def test_any_changed_byte_changes_the_digest(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    base = fingerprint_state_dict("unet", tensors)
    changed = dict(tensors, a=tensors["a"].clone())
    changed["a"].view(torch.int32)[0, 0] += 1  # one ulp
    assert fingerprint_state_dict("unet", changed).tensors["unet.a"] != base.tensors["unet.a"]
    assert fingerprint_state_dict("unet", changed).root != base.root
    # Same bytes, other shape or dtype: other digest.
    reshaped = dict(tensors, a=tensors["a"].reshape(3, 2))
    assert fingerprint_state_dict("unet", reshaped).tensors["unet.a"] != base.tensors["unet.a"]


def test_parallel_hashing_equals_one_worker():
    records = read_header(next((EMBEDDED_DIR / "unet").glob("*.safetensors")))
    assert hash_records(records, workers=1) == hash_records(records, workers=4)


def test_read_header_matches_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"x": torch.randn(3, 5, dtype=torch.float16), "y": torch.zeros(2, dtype=torch.int64)}
    save_file(tensors, str(path))
    records = {r.name: r for r in read_header(path)}
    assert records["x"].shape == (3, 5) and records["x"].dtype == "F16"
    data = path.read_bytes()
    assert data[records["y"].start : records["y"].end] == bytes(8 * 2)
    assert set(load_file(str(path))) == set(records)


@pytest.mark.parametrize("cut", [4, 40, -3])
def test_truncated_or_corrupt_files_are_data_errors(tmp_path, cut):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.randn(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(DataError, match=r"m\.safetensors"):
        read_header(path)


def test_garbage_header_is_a_data_error(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes((10).to_bytes(8, "little") + b"not json!!" + bytes(10))
    with pytest.raises(DataError):
        read_header(path)
