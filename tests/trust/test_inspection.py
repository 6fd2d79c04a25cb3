import json

from PIL import Image

from guardtune.cli import app
from guardtune.trust.build import sign_policy_file
from tests.conftest import combined_output
from tests.policy_helpers import copy_model, fresh_key, make_policy


def test_policy_show_reports_blocks_and_draws_a_heatmap(runner, tmp_path):
    model = copy_model(tmp_path)
    path = sign_policy_file(make_policy(model), [fresh_key()], model / "guardtune-policy.json")
    plot = tmp_path / "heatmap.png"
    report_path = tmp_path / "show.json"
    args = ["policy", "show", str(path), "--plot", str(plot), "--json", str(report_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, combined_output(result)
    report = json.loads(report_path.read_text())
    blocks = {row["block"]: row for row in report["blocks"]}
    order = list(blocks)
    assert order[0] == "conv_in" and order[-1] == "conv_out"
    assert blocks["conv_in"]["frozen_tensors"] == 1
    assert blocks["mid_block"]["frozen_tensors"] == 1
    assert blocks["up_blocks.0"]["frozen_tensors"] == 0
    assert sum(b["tensors"] for b in blocks.values()) == len(
        make_policy(model).model["unet"].tensors
    )
    with Image.open(plot) as image:
        assert image.width > 400 and image.height > 150
    assert "mid_block" in result.stdout


def test_policy_sign_from_a_mask_file_then_verify(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDTUNE_TRUSTED_DIR", str(tmp_path / "trusted"))
    model = copy_model(tmp_path)
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "trusted" / "pub")]).exit_code == 0
    (tmp_path / "mask.txt").write_text("mid_block.resnets.0.conv1.weight\nconv_in.weight\n")
    args = ["policy", "sign", "--mask", str(tmp_path / "mask.txt"), "--model", str(model)]
    args += ["--key", str(tmp_path / "trusted" / "pub.key"), "--json", str(tmp_path / "s.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, combined_output(result)
    assert json.loads((tmp_path / "s.json").read_text())["frozen_tensors"] == 2
    assert (model / "guardtune-policy.json").is_file()
    verified = runner.invoke(app, ["policy", "verify", "--model", str(model)])
    assert verified.exit_code == 0, combined_output(verified)


def test_policy_sign_refuses_unknown_tensors_with_exit_4(runner, tmp_path):
    model = copy_model(tmp_path)
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    (tmp_path / "mask.json").write_text('["unet.not_a_tensor"]')
    args = ["policy", "sign", "--mask", str(tmp_path / "mask.json"), "--model", str(model)]
    result = runner.invoke(app, [*args, "--key", str(tmp_path / "k.key")])
    assert result.exit_code == 4
    assert "unet.not_a_tensor" in combined_output(result)
    assert not (model / "guardtune-policy.json").exists()


def test_nothing_is_signed_into_the_installed_package_by_default(runner, tmp_path):
    from guardtune.resolve import EMBEDDED_DIR

    shipped = (EMBEDDED_DIR / "guardtune-policy.json").read_bytes()
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    (tmp_path / "mask.txt").write_text("conv_in.weight\n")
    args = ["policy", "sign", "--mask", str(tmp_path / "mask.txt")]
    args += ["--key", str(tmp_path / "k.key")]
    result = runner.invoke(app, args)
    assert result.exit_code == 3 and "--out" in combined_output(result)
    assert (EMBEDDED_DIR / "guardtune-policy.json").read_bytes() == shipped
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 0 and (tmp_path / "p.json").is_file()
