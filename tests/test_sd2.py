"""A tiny SD 2.x-style pipeline (v-prediction, linear attention projections, per-block head
dims) through every command: the same code path as SD 1.x, with the velocity as target."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from guardtune.cli import app
from guardtune.resolve import EMBEDDED_DIR
from tests.conftest import combined_output


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd2")
    model = root / "model"
    shutil.copytree(EMBEDDED_DIR, model, ignore=shutil.ignore_patterns("unet", "guardtune-*"))
    config = json.loads((EMBEDDED_DIR / "unet" / "config.json").read_text())
    config |= {"use_linear_projection": True, "attention_head_dim": [2, 4, 4],
               "upcast_attention": True}  # fmt: skip
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    unet.save_pretrained(model / "unet")
    scheduler = model / "scheduler" / "scheduler_config.json"
    settings = json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}
    scheduler.write_text(json.dumps(settings))
    return model


def _run(runner, *args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, combined_output(result)
    return combined_output(result)


def test_sd2_style_model_in_every_command(runner, sd2, scenario, tmp_path):
    data, legal = scenario.data, scenario.legal
    trusted = ("--trusted", str(scenario.public))
    _run(runner, "publish", "--illegal", str(data), "--legal", str(legal), "--key",
         str(scenario.key), "-m", str(sd2), "--method", "random",
         "--ratio", "0.3")  # fmt: skip
    _run(runner, "policy", "verify", "-m", str(sd2), *trusted)
    _run(runner, "policy", "show", str(sd2 / "guardtune-policy.json"), "-m", str(sd2))
    _run(runner, "finetune", str(data), "-m", str(sd2), *trusted, "--out", str(tmp_path / "run"),
         "--steps", "2", "--batch-size", "2", "--no-compare")  # fmt: skip
    _run(runner, "audit", str(tmp_path / "run"), *trusted)
    _run(runner, "generate", "-m", str(tmp_path / "run" / "model"), "--prompt",
         "a handwritten digit seven", "--num", "2", "--num-inference-steps", "2",
         "--out", str(tmp_path / "g.png"))  # fmt: skip
    report = tmp_path / "evaluate.json"
    _run(runner, "evaluate", "--illegal", str(data), "--legal", str(legal), "-m", str(sd2),
         *trusted, "--methods", "full,freezeasguard", "--user-steps", "1", "--seeds", "1",
         "--samples", "2", "--json", str(report), "--work-dir", str(tmp_path / "ev"))  # fmt: skip
    result = json.loads(report.read_text())
    assert result["scorer"] == "loss" and {r["method"] for r in result["summary"]} == {
        "full",
        "freezeasguard",
    }
    finetuned = json.loads((tmp_path / "run" / "model" / "scheduler" / "scheduler_config.json")
                           .read_text())  # fmt: skip
    assert finetuned["prediction_type"] == "v_prediction"
