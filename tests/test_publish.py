"""`guardtune publish`: a learned or random policy that verify accepts and finetune enforces."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from guardtune.cli import app
from guardtune.digits.dataset import export_digits
from guardtune.learn.freezeasguard import LearnerConfig
from guardtune.publish import publish
from guardtune.training.config import TrainConfig
from guardtune.training.finetune import finetune
from guardtune.training.rundir import RUN_LOCK
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
    # While another run holds the work folder, a resume into it is refused.
    workdir = tmp_path / "runs" / "publish" / "model"
    other = os.open(workdir / RUN_LOCK, os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        busy = runner.invoke(app, [*args, "--resume"])
    finally:
        os.close(other)
    assert busy.exit_code == 3
    message = "work folder runs/publish/model is in use by another guardtune run"
    assert message in combined_output(busy)
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


def test_the_combined_defence_ships_an_edited_model_that_evaluate_compares(
    runner, folders, tmp_path
):
    from guardtune.errors import DataError, ModelMismatchError
    from guardtune.evaluate.run import EvaluateConfig, evaluate
    from guardtune.resolve import ModelSource, resolve_model
    from guardtune.trust.verify import verify_policy

    model = copy_model(tmp_path)
    key = generate_key()
    pub = tmp_path / "publisher.pub"
    pub.write_bytes(public_pem(key.public_key()))
    edited = tmp_path / "edited"
    config = LearnerConfig(ratio=0.3, relearn_steps=2, rounds=2, user_steps=1, batch_size=2)
    with pytest.raises(DataError, match="writes an edited model"):
        publish([folders[0]], [folders[1]], [key], str(model), method="freezeasguard+uce",
                config=config, show_progress=False)  # fmt: skip
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("the user's")
    with pytest.raises(DataError, match="occupied already exists and is not empty"):
        publish([folders[0]], [folders[1]], [key], str(model), method="freezeasguard+uce",
                config=config, show_progress=False, edited_out=occupied)  # fmt: skip
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    result = publish([folders[0]], [folders[1]], [key], str(model), method="freezeasguard+uce",
                     config=config, show_progress=False, edited_out=edited)  # fmt: skip
    assert result.policy == edited / "guardtune-policy.json"
    # The edit is UCE's: cross-attention keys and values, nothing else; other parts byte-equal.
    base = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    new = load_file(str(edited / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = {n for n in base if not torch.equal(base[n], new[n])}
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    assert all(new[n].dtype == base[n].dtype for n in base)
    for part in ("vae", "text_encoder"):
        (file,) = (model / part).glob("*.safetensors")
        assert (edited / part / file.name).read_bytes() == file.read_bytes()
    # Its policy binds the edited weights: it verifies there and not on the base.
    verified = verify_policy(resolve_model(str(edited)), None, (pub,), False)
    uce = verified.policy.provenance.hyperparameters["uce"]
    assert verified.policy.provenance.method == "freezeasguard+uce"
    assert uce["erase"] == ["a handwritten digit seven"] and uce["base"] == str(model)
    with pytest.raises(ModelMismatchError):
        verify_policy(ModelSource("folder", model), result.policy, (pub,), False)
    # evaluate starts the user from the edited weights, with the policy's tensors frozen.
    tiny = EvaluateConfig(methods=("full", "freezeasguard+uce"), steps=(1,), seeds=1,
                          samples=1, scorer="loss")  # fmt: skip
    evaluation = evaluate([folders[0]], [folders[1]], str(model), trusted=(pub,), config=tiny,
                          show_progress=False, workdir=tmp_path / "work",
                          combined=edited)  # fmt: skip
    assert evaluation.frozen_share["freezeasguard+uce"] == pytest.approx(
        result.frozen_share_parameters, abs=1e-6
    )
    with pytest.raises(DataError, match=r"freezeasguard\+uce needs the edited model"):
        evaluate([folders[0]], [folders[1]], str(model), trusted=(pub,), config=tiny,
                 show_progress=False, workdir=tmp_path / "work")  # fmt: skip
    # An edited model signed by a trusted key, but of another base, is not compared.
    other = copy_model(tmp_path / "other")
    vae = other / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(vae))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, str(vae))
    with pytest.raises(DataError, match=r"edited is not an edit of .*other/model: its vae differs"):
        evaluate([folders[0]], [folders[1]], str(other), trusted=(pub,), config=tiny,
                 show_progress=False, workdir=tmp_path / "work2", combined=edited)  # fmt: skip


def test_a_channel_mask_with_a_horizon_signs_a_rows_policy_that_verifies(runner, folders, tmp_path):
    from guardtune.resolve import ModelSource
    from guardtune.trust.verify import verify_policy

    model = copy_model(tmp_path)
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    args = _tiny_publish_args(folders, tmp_path / "k.key", model)
    args += ["--granularity", "channel", "--horizon", "4", "--json", str(tmp_path / "r.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, combined_output(result)
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["tensors_in_part"] > 0 and 0.3 <= record["frozen_share_parameters"] < 0.31
    policy = verify_policy(ModelSource("folder", model), None, (tmp_path / "k.pub",), False).policy
    assert policy.schema_version == 3 and len(policy.frozen_rows) == record["tensors_in_part"]
    assert policy.provenance.hyperparameters["granularity"] == "channel"
    assert policy.provenance.hyperparameters["horizon"] == 4
    log = json.loads(Path(record["log"]).read_text())
    assert {f"unet.{n}" for n in log["frozen_rows"]} == set(policy.frozen_rows)
    refused = runner.invoke(app, [*args[:-2], "--method", "random"])
    assert refused.exit_code == 3 and "needs freezeasguard" in combined_output(refused)
