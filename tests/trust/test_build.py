import json

import pytest

from guardtune.errors import PolicyError
from guardtune.resolve import ModelSource, resolve_model
from guardtune.trust.build import build_policy, read_mask, unet_parameter_order
from guardtune.trust.policy import Provenance

SOURCE = resolve_model("digits")


def test_parameter_order_covers_every_unet_tensor():
    from guardtune.trust.fingerprint import model_tensors

    order = unet_parameter_order(SOURCE)
    stored = {r.name for r in model_tensors(SOURCE, ("unet",))["unet"]}
    assert set(order) == stored
    assert order[0] == "unet.conv_in.weight"  # module order, not alphabetical


def test_text_json_and_csv_masks_name_the_same_tensors(tmp_path):
    order = unet_parameter_order(SOURCE)
    chosen = [order[0], order[5], order[-1]]
    (tmp_path / "m.txt").write_text(
        "# frozen\n" + "\n".join(n.removeprefix("unet.") for n in chosen)
    )
    (tmp_path / "m.json").write_text(json.dumps(chosen))
    bits = ["1" if n in chosen else "0" for n in order]
    (tmp_path / "m.csv").write_text(",".join(bits) + "\n")
    (tmp_path / "lines.csv").write_text("\n".join(bits))
    for name in ("m.txt", "m.json", "m.csv", "lines.csv"):
        assert sorted(read_mask(tmp_path / name, SOURCE)) == sorted(chosen), name


def test_csv_of_the_wrong_length_is_a_policy_error(tmp_path):
    (tmp_path / "m.csv").write_text("1,0,1")
    with pytest.raises(PolicyError, match="one value per tensor"):
        read_mask(tmp_path / "m.csv", SOURCE)


@pytest.mark.parametrize("content", ["", "{not a list}", '{"a": 1}', "[1, 2]"])
def test_malformed_masks(tmp_path, content):
    (tmp_path / "m").write_text(content)
    with pytest.raises(PolicyError):
        names = read_mask(tmp_path / "m", SOURCE)
        build_policy(SOURCE, names, Provenance("manual"))


def test_unknown_tensor_names_are_refused():
    with pytest.raises(PolicyError, match=r"unet\.down_blocks\.9\.nothing"):
        build_policy(SOURCE, ["unet.conv_in.weight", "unet.down_blocks.9.nothing"], Provenance("m"))
    with pytest.raises(PolicyError, match="freezes no tensor"):
        build_policy(SOURCE, [], Provenance("m"))


def test_single_file_models_need_the_config_folder(tmp_path):
    source = ModelSource("single_file", tmp_path / "x.safetensors", SOURCE.path)
    assert unet_parameter_order(source) == unet_parameter_order(SOURCE)
