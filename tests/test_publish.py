"""`guardtune publish`: a learned or random policy that verify accepts and finetune enforces."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from guardtune.cli import app
from guardtune.digits.dataset import export_digits
from guardtune.learn.freezeasguard import LearnerConfig
from guardtune.publish import publish
from guardtune.training.config import TrainConfig
from guardtune.training.finetune import finetune
from guardtune.trust.signing import generate_key, public_pem
from tests.conftest import combined_output
from tests.policy_helpers import copy_model


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # publish checkpoints into ./runs/publish/<model>


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish-data")
    illegal = export_digits(root / "illegal", (7,), "test").out
    legal = export_digits(root / "legal", (0, 1), "test", "bold").out
    return illegal, legal


def test_learned_policy_verifies_and_finetune_enforces_it(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDTUNE_TRUSTED_DIR", str(tmp_path / "trusted"))
    model = copy_model(tmp_path)
    key = generate_key()
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / "publisher.pub").write_bytes(public_pem(key.public_key()))
    config = LearnerConfig(ratio=0.3, relearn_steps=3, rounds=4, user_steps=2, batch_size=2)
    result = publish([folders[0]], [folders[1]], [key], str(model), config=config,
                     show_progress=False)  # fmt: skip
    assert result.policy == model / "guardtune-policy.json"
    assert 0.3 <= result.frozen_share_parameters < 0.6
    log = json.loads(result.log.read_text())
    assert len(log["history"]) == 4 and result.curve is not None and result.curve.is_file()
    # The model folder's weights were not touched by learning.
    trained = finetune(folders[0], tmp_path / "run", model=str(model),
                       config=TrainConfig(steps=2, batch_size=2, lr=1e-3),
                       compare=False, show_progress=False)  # fmt: skip
    assert trained.freeze.frozen_tensors == result.frozen_tensors
    frozen = [n.removeprefix("unet.") for n in log["frozen"]]
    base = load_file(str(next((model / "unet").glob("*.safetensors"))))
    tuned = load_file(str(next((tmp_path / "run" / "model" / "unet").glob("*.safetensors"))))
    assert all(torch.equal(tuned[n].half(), base[n]) for n in frozen)


def test_random_method_from_the_cli_signs_a_policy_of_the_requested_share(
    runner, folders, tmp_path
):
    model = copy_model(tmp_path)
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    args = ["publish", "--illegal", str(folders[0]), "--legal", str(folders[1]), "--key",
            str(tmp_path / "k.key"), "--model", str(model), "--method", "random", "--ratio", "0.5",
            "--share-by", "tensors", "--json", str(tmp_path / "r.json")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, combined_output(result)
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0.5 <= report["frozen_share_tensors"] < 0.51
    verify = ["policy", "verify", "--model", str(model), "--trusted", str(tmp_path / "k.pub")]
    assert runner.invoke(app, verify).exit_code == 0


def test_publish_rejects_bad_options(runner, folders, tmp_path):
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    base = ["publish", "--illegal", str(folders[0]), "--legal", str(folders[1]),
            "--key", str(tmp_path / "k.key"), "--model", str(copy_model(tmp_path))]  # fmt: skip
    assert runner.invoke(app, [*base, "--ratio", "1.5"]).exit_code == 3
    assert runner.invoke(app, [*base, "--method", "magic"]).exit_code == 3


def test_cli_defaults_are_the_learners_defaults():
    import inspect

    from guardtune.cli import publish as command

    defaults = {k: v.default for k, v in inspect.signature(command).parameters.items()}
    config = LearnerConfig()
    assert defaults["ratio"] == config.ratio and defaults["share_by"] == config.share_by
    assert defaults["relearn_steps"] == config.relearn_steps and defaults["steps"] == config.rounds
    assert defaults["user_steps_per_update"] == config.user_steps
    assert defaults["user_lr"] == config.user_lr and defaults["mask_lr"] == config.mask_lr
    assert defaults["user_reset_every"] == config.user_reset_every
    assert defaults["batch_size"] == config.batch_size and defaults["seed"] == config.seed


def _tiny_publish_args(folders, key: Path, model: Path) -> list[str]:
    return ["publish", "--illegal", str(folders[0]), "--legal", str(folders[1]), "--key", str(key),
            "--model", str(model), "--relearn-steps", "2", "--mask-updates", "3",
            "--user-steps-per-update", "1", "--user-reset-every", "2",
            "--batch-size", "2"]  # fmt: skip


def test_a_second_run_needs_resume_and_resume_re_signs_the_same_mask(runner, folders, tmp_path):
    model = copy_model(tmp_path)
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    args = _tiny_publish_args(folders, tmp_path / "k.key", model)
    first = runner.invoke(app, [*args, "--json", str(tmp_path / "first.json")])
    assert first.exit_code == 0, combined_output(first)
    again = runner.invoke(app, args)
    assert again.exit_code == 3 and "--resume" in combined_output(again)
    resumed = runner.invoke(app, [*args, "--resume", "--json", str(tmp_path / "second.json")])
    assert resumed.exit_code == 0, combined_output(resumed)
    logs = [json.loads(Path(json.loads((tmp_path / f).read_text())["log"]).read_text())
            for f in ("first.json", "second.json")]  # fmt: skip
    assert logs[0]["frozen"] == logs[1]["frozen"] and len(logs[1]["history"]) == 3
    # The relearned weights (two model copies) are not left behind on disk.
    assert not list((tmp_path / "runs" / "publish").glob("*/*.safetensors"))


def test_two_processes_learn_one_mask_and_one_policy(folders, tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    model = copy_model(tmp_path)
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # Each rank draws its own batches: the learner raises if their masks differ at the end.
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "guardtune.cli",
               *_tiny_publish_args(folders, tmp_path / "k.key", model),
               "--json", str(tmp_path / "ddp.json")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("Published policy") == 1  # rank 1 learns but does not report
    log = json.loads(Path(json.loads((tmp_path / "ddp.json").read_text())["log"]).read_text())
    assert len(log["history"]) == 3 and log["frozen"]
    verify = ["policy", "verify", "--model", str(model), "--trusted", str(tmp_path / "k.pub")]
    assert runner.invoke(app, verify).exit_code == 0
