import json

import torch

from guardtune.digits.build import BuildConfig, build
from guardtune.models import load_pipeline
from guardtune.resolve import EMBEDDED_DIR


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


def test_shipped_policy_is_the_learned_one_for_the_documented_scenario(tmp_path):
    """The shipped policy verifies with the committed key and was learned on the scenario's data."""
    from guardtune.data import scan_folder
    from guardtune.digits.build import POLICY_ILLEGAL, POLICY_PUBLIC, POLICY_RATIO
    from guardtune.digits.dataset import BASE_CLASSES, export_digits
    from guardtune.learn.freezeasguard import LearnerConfig
    from guardtune.training.encode import data_digest
    from guardtune.trust.verify import verify_policy

    verified = verify_policy("digits", trusted_files=[POLICY_PUBLIC], use_trust_dirs=False)
    provenance = verified.policy.provenance
    assert provenance.method == "freezeasguard"
    expected = {**LearnerConfig().__dict__, "ratio": POLICY_RATIO}
    # Learned before the channel and horizon options existed; their defaults are that learner.
    unrecorded = set(expected) - set(provenance.hyperparameters)
    assert unrecorded <= {"granularity", "horizon"}
    assert LearnerConfig().granularity == "tensor" and LearnerConfig().horizon is None
    assert provenance.hyperparameters == {k: v for k, v in expected.items() if k not in unrecorded}
    assert abs(verified.policy.frozen_share.parameters - POLICY_RATIO) < 0.02
    illegal = export_digits(tmp_path / "illegal", POLICY_ILLEGAL, "train").out
    legal = export_digits(tmp_path / "legal", BASE_CLASSES, "train", "bold").out
    assert provenance.datasets == {
        "illegal": data_digest(scan_folder(illegal)),
        "legal": data_digest(scan_folder(legal)),
    }
