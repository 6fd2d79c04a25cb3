"""`guardtune publish`: a learned or random policy that verify accepts and finetune enforces."""

import json

import pytest
import torch
from safetensors.torch import load_file

from guardtune.cli import app
from guardtune.data import export_digits
from guardtune.learn.freezeasguard import LearnerConfig
from guardtune.publish import publish
from guardtune.signing import generate_key, public_pem
from guardtune.train import TrainConfig, finetune
from tests.conftest import combined_output
from tests.policy_helpers import copy_model


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
    trained = finetune(folders[0], tmp_path / "run", str(model),
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
