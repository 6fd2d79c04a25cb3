import json

import torch

from guardtune.embedded import BuildConfig, build
from guardtune.models import EMBEDDED_DIR, load_pipeline


def test_build_runs_end_to_end_at_a_few_steps(tmp_path):
    config = BuildConfig(
        classifier_epochs=1, vae_steps=3, unet_steps=3, batch_size=8, eval_samples_per_class=1,
        eval_steps=2, classes=(0, 1),
    )  # fmt: skip
    report = build(tmp_path / "model", config, tmp_path / "classifier.safetensors")
    assert report.vocab_size > 512
    assert set(report.recognition_per_class) == {0, 1}
    assert (tmp_path / "classifier.safetensors").is_file()
    saved = json.loads((tmp_path / "model" / "build_report.json").read_text())
    assert saved["config"]["unet_steps"] == 3
    pipeline = load_pipeline(str(tmp_path / "model"), device=torch.device("cpu"))
    assert pipeline.vae.config.scaling_factor == report.scaling_factor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.safetensors", "model"]


def test_shipped_build_report_meets_the_quality_bar():
    report = json.loads((EMBEDDED_DIR / "build_report.json").read_text())
    assert report["config"]["classes"] == [0, 1, 2, 3, 4, 5, 6]
    assert report["recognition_mean"] >= 0.9
    assert min(report["recognition_per_class"].values()) >= 0.75
