"""The fine-tune recipe: enforcement, outputs, refusals, checkpoints and resume."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from guardtune.cli import app
from guardtune.contract import LORA_FILE, PROVENANCE_FILE
from guardtune.digits.dataset import export_digits
from guardtune.errors import DataError, IntegrityError
from guardtune.models import load_pipeline
from guardtune.training.config import TrainConfig
from guardtune.training.finetune import finetune
from tests.conftest import combined_output
from tests.policy_helpers import FROZEN, copy_model, signed_model

SMALL = TrainConfig(steps=4, batch_size=4, lr=1e-3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return export_digits(tmp_path_factory.mktemp("data") / "sevens", (7,), "train").out


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """A model copy whose signed policy sits beside it, signed by a trusted key."""
    return signed_model(tmp_path, monkeypatch)["model"]


def _unet_state(folder):
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def _frozen_unchanged(base_state, trained_state) -> bool:
    names = [n.removeprefix("unet.") for n in FROZEN]
    return all(torch.equal(trained_state[n].to(base_state[n].dtype), base_state[n]) for n in names)


def test_full_finetune_keeps_frozen_tensors_bit_identical(guarded, data, tmp_path):
    result = finetune(data, tmp_path / "run", model=str(guarded), config=SMALL, compare=False,
                      show_progress=False)  # fmt: skip
    out = tmp_path / "run" / "model"
    base, trained = _unet_state(guarded), _unet_state(out)
    assert _frozen_unchanged(base, trained)
    moved = [n for n in base if not torch.equal(trained[n].to(base[n].dtype), base[n])]
    assert len(moved) > 100  # the unfrozen tensors did train
    assert result.freeze.frozen_tensors == len(FROZEN)
    assert (out / "guardtune-policy.json").read_bytes() == (
        guarded / "guardtune-policy.json"
    ).read_bytes()
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["mode"] == "full" and len(provenance["frozen_tensor_digests"]) == len(FROZEN)
    assert load_pipeline(str(out), device=torch.device("cpu")).unet is not None
    assert len(result.losses) == SMALL.steps


def test_lora_finetune_writes_a_file_diffusers_loads(guarded, data, tmp_path, embedded_pipeline):
    config = TrainConfig(steps=3, batch_size=4, lora=True, rank=4, lr=1e-2)
    finetune(
        data,
        tmp_path / "lora",
        model=str(guarded),
        config=config,
        compare=False,
        show_progress=False,
    )
    path = tmp_path / "lora" / LORA_FILE
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    assert keys and all(k.startswith("unet.") for k in keys)
    assert json.loads(metadata["guardtune_provenance"])["mode"] == "lora"
    frozen_modules = {n.removeprefix("unet.").rsplit(".", 1)[0] for n in FROZEN}
    assert not any(m in k for k in keys for m in frozen_modules)
    pipeline = load_pipeline(str(guarded), device=torch.device("cpu"))

    def sample():
        generator = torch.Generator().manual_seed(0)
        prompt = "a handwritten digit seven"
        return pipeline(prompt, num_inference_steps=2, generator=generator, output_type="np").images

    before = sample()
    pipeline.load_lora_weights(str(tmp_path / "lora"))
    after = sample()
    assert abs(before - after).max() > 1e-4  # the adapter is live
    base = _unet_state(guarded)
    assert all(torch.equal(pipeline.unet.state_dict()[n].half(), base[n]) for n in
               (f.removeprefix("unet.") for f in FROZEN))  # fmt: skip


def _cli(runner, *args):
    result = runner.invoke(app, ["finetune", *map(str, args), "--steps", "2", "--batch-size", "2",
                                 "--no-compare"])  # fmt: skip
    return result.exit_code, combined_output(result)


def test_model_without_policy_needs_no_policy_flag(runner, data, tmp_path):
    model = copy_model(tmp_path)
    code, output = _cli(runner, data, "--model", model, "--out", tmp_path / "a")
    assert code == 4 and "no freeze policy" in output
    assert not (tmp_path / "a").exists()
    code, output = _cli(runner, data, "--model", model, "--out", tmp_path / "b", "--no-policy")
    assert code == 0, output
    assert "none (--no-policy)" in output
    assert re.search(r"encode (\d+)/\1", output)  # the up-front encoding shows its progress


def test_setting_a_shipped_policy_aside_must_be_named_and_is_recorded(runner, guarded, data,
                                                                     tmp_path):  # fmt: skip
    from guardtune.resolve import ModelSource
    from guardtune.trust.build import build_policy, sign_policy_file
    from guardtune.trust.policy import Provenance
    from guardtune.trust.signing import generate_key, public_pem

    # Another trusted signer's policy freezing one tensor, passed instead of the shipped one.
    other_key = generate_key()
    (tmp_path / "trusted" / "other.pub").write_bytes(public_pem(other_key.public_key()))
    lax = build_policy(ModelSource("folder", guarded), ["unet.conv_in.weight"], Provenance("m"))
    sign_policy_file(lax, [other_key], tmp_path / "lax.json")
    for bypass in (["--no-policy"], ["--policy", tmp_path / "lax.json"]):
        code, output = _cli(runner, data, "--model", guarded, "--out", tmp_path / "a", *bypass)
        assert code == 4 and "--ignore-shipped-policy" in output, bypass
        assert not (tmp_path / "a").exists()
    code, output = _cli(runner, data, "--model", guarded, "--out", tmp_path / "b", "--no-policy",
                        "--ignore-shipped-policy")  # fmt: skip
    assert code == 0, output
    assert "set aside" in output
    provenance = json.loads((tmp_path / "b" / PROVENANCE_FILE).read_text())
    shipped = (guarded / "guardtune-policy.json").read_bytes()
    assert provenance["ignored_policy_sha256"] == hashlib.sha256(shipped).hexdigest()
    report = tmp_path / "audit.json"
    result = runner.invoke(app, ["audit", str(tmp_path / "b"), "--base", str(guarded),
                                 "--json", str(report)])  # fmt: skip
    assert result.exit_code == 7  # every tensor trained: the frozen ones moved
    assert json.loads(report.read_text())["provenance"]["status"] == "shipped policy ignored"
    # The shipped policy passed explicitly is no bypass.
    code, output = _cli(runner, data, "--model", guarded, "--out", tmp_path / "c",
                        "--policy", guarded / "guardtune-policy.json")  # fmt: skip
    assert code == 0, output


def test_untrusted_and_mismatched_policies_are_refused(
    runner, guarded, data, tmp_path, monkeypatch
):
    monkeypatch.setenv("GUARDTUNE_TRUSTED_DIR", str(tmp_path / "nobody"))
    code, _ = _cli(runner, data, "--model", guarded, "--out", tmp_path / "a")
    assert code == 5
    monkeypatch.setenv("GUARDTUNE_TRUSTED_DIR", str(tmp_path / "trusted"))
    other = copy_model(tmp_path / "x")
    state = _unet_state(other)
    state["conv_out.bias"] = state["conv_out.bias"] + 1
    save_file(state, str(next((other / "unet").glob("*.safetensors"))))
    policy = guarded / "guardtune-policy.json"
    code, output = _cli(runner, data, "--model", other, "--policy", policy, "--out", tmp_path / "b")
    assert code == 6 and "conv_out.bias" in output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_data_is_exit_3(runner, guarded, tmp_path):
    (tmp_path / "empty").mkdir()
    code, output = _cli(runner, tmp_path / "empty", "--model", guarded, "--out", tmp_path / "o")
    assert code == 3 and "no images" in output


def test_a_moved_frozen_tensor_stops_the_run_with_exit_7_and_no_output(
    guarded, data, tmp_path, monkeypatch
):
    import guardtune.training.finetune as train

    real_loss = train.diffusion_loss

    def loss_that_also_tampers(unet, *args, **kwargs):
        with torch.no_grad():  # a bug or an attack moving a frozen weight behind the optimizer
            unet.conv_in.weight.add_(1e-3)
        return real_loss(unet, *args, **kwargs)

    monkeypatch.setattr(train, "diffusion_loss", loss_that_also_tampers)
    config = TrainConfig(steps=4, batch_size=2, lr=1e-3)
    with pytest.raises(IntegrityError, match=r"unet\.conv_in\.weight"):
        finetune(data, tmp_path / "run", model=str(guarded), config=config, compare=False,
                 show_progress=False)  # fmt: skip
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "run" / PROVENANCE_FILE).exists()


def test_killed_run_resumes_to_the_same_weights(guarded, data, tmp_path):
    config = TrainConfig(steps=30, batch_size=4, lr=1e-3, checkpoint_every=5)
    reference = finetune(data, tmp_path / "straight", model=str(guarded), config=config,
                         compare=False, show_progress=False)  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    command = [sys.executable, "-m", "guardtune.cli", "finetune", str(data),
               "--model", str(guarded), "--out", str(tmp_path / "killed"), "--steps", "30",
               "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "5",
               "--no-compare"]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not list(checkpoints.glob("step-00001[05]")):
        if process.poll() is not None:
            break
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(checkpoints.glob("step-*")), "the run died before its first checkpoint"
    assert not (tmp_path / "killed" / "model").exists()
    resumed = finetune(data, tmp_path / "killed", model=str(guarded), config=config,
                       resume="latest", compare=False, show_progress=False)  # fmt: skip
    assert 0 < resumed.resumed_from < 30
    # The log reads as one run: the interrupted run's rows up to its checkpoint, then the rest.
    with (tmp_path / "killed" / "train_log.csv").open() as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == list(range(1, 31))
    a = _unet_state(tmp_path / "straight" / "model")
    b = _unet_state(tmp_path / "killed" / "model")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert reference.losses[-1] == resumed.losses[-1]


CHECKPOINTED = TrainConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2)


def _checkpointed_run(guarded, data, out: Path) -> Path:
    """A finished 4-step run of CHECKPOINTED; its checkpoint at step 2."""
    finetune(data, out, model=str(guarded), config=CHECKPOINTED, compare=False,
             show_progress=False)  # fmt: skip
    return out / "checkpoints" / "step-000002"


def test_tampered_or_foreign_checkpoints_are_refused(guarded, data, tmp_path):
    checkpoint = _checkpointed_run(guarded, data, tmp_path / "run")
    with pytest.raises(DataError, match="another run"):
        other = TrainConfig(steps=4, batch_size=2, lr=5e-4, checkpoint_every=2)
        finetune(data, tmp_path / "run", model=str(guarded), config=other, resume="latest",
                 compare=False, show_progress=False)  # fmt: skip
    tensors = checkpoint / "trainable.safetensors"
    data_bytes = bytearray(tensors.read_bytes())
    data_bytes[-1] ^= 0xFF
    tensors.write_bytes(bytes(data_bytes))
    with pytest.raises(DataError, match="corrupt or was modified"):
        finetune(data, tmp_path / "run", model=str(guarded), config=CHECKPOINTED,
                 resume=str(checkpoint), compare=False, show_progress=False)  # fmt: skip


def test_an_edited_step_counter_is_refused(guarded, data, tmp_path):
    checkpoint = _checkpointed_run(guarded, data, tmp_path / "run")
    state = json.loads((checkpoint / "state.json").read_text())
    state["step"] = 3  # resume one step further than the weights and optimizer got
    (checkpoint / "state.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match=r"state\.json says step 3 but its folder name says 2"):
        finetune(data, tmp_path / "run", model=str(guarded), config=CHECKPOINTED,
                 resume=str(checkpoint), compare=False, show_progress=False)  # fmt: skip
    renamed = checkpoint.rename(checkpoint.with_name("step-000003"))
    with pytest.raises(DataError, match=r"state\.json says step 3 but its LR schedule says 2"):
        finetune(data, tmp_path / "run", model=str(guarded), config=CHECKPOINTED,
                 resume=str(renamed), compare=False, show_progress=False)  # fmt: skip


def test_a_finished_run_or_a_file_is_never_written_over(runner, guarded, data, tmp_path):
    code, output = _cli(runner, data, "--model", guarded, "--out", tmp_path / "run")
    assert code == 0, output
    weights = next((tmp_path / "run" / "model" / "unet").glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    code, output = _cli(runner, data, "--model", guarded, "--out", tmp_path / "run")
    assert code == 3 and "holds a finished run" in output
    assert weights.stat().st_mtime_ns == written
    (tmp_path / "notes").write_text("mine")
    code, output = _cli(runner, data, "--model", guarded, "--out", tmp_path / "notes")
    assert code == 3 and "is a file, not a folder" in output
    assert (tmp_path / "notes").read_text() == "mine"


def test_two_process_ddp_run_keeps_frozen_tensors(guarded, data, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "guardtune.cli",
               "finetune", str(data), "--model", str(guarded), "--out", str(tmp_path / "ddp"),
               "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--no-compare",
               "--json", str(tmp_path / "ddp.json")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "ddp.json").read_text())["processes"] == 2
    assert _frozen_unchanged(_unet_state(guarded), _unet_state(tmp_path / "ddp" / "model"))


def test_savings_report_compares_with_an_unfrozen_probe(runner, guarded, data, tmp_path):
    report = tmp_path / "report.json"
    args = ["finetune", str(data), "--model", str(guarded), "--out", str(tmp_path / "o"),
            "--steps", "2", "--batch-size", "2", "--report", str(report)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, combined_output(result)
    values = json.loads(report.read_text())
    for key in ("frozen_tensors", "frozen_params", "total_params", "memory_saving",
                "time_saving", "measurement"):  # fmt: skip
        assert key in values
    assert set(values["peak_memory_bytes"]) == {"frozen", "unfrozen"}
    assert set(values["step_time_s"]) == {"frozen", "unfrozen"}
    assert values["frozen_tensors"] == len(FROZEN)
    optimizer = values["analytic_bytes"]["optimizer_state"]
    assert optimizer["unfrozen"] - optimizer["frozen"] == 8 * values["frozen_params"]
    assert "What freezing saved" in result.stdout


def test_generate_with_a_lora_file(runner, guarded, data, tmp_path):
    config = TrainConfig(steps=2, batch_size=2, lora=True, lr=1e-2)
    finetune(
        data,
        tmp_path / "lora",
        model=str(guarded),
        config=config,
        compare=False,
        show_progress=False,
    )
    grids = []
    for extra in ([], ["--lora", str(tmp_path / "lora" / LORA_FILE)]):
        out = tmp_path / f"g{len(grids)}.png"
        args = ["generate", "--model", str(guarded), "--prompt", "a handwritten digit seven",
                "--num", "2", "--num-inference-steps", "3", "--out", str(out), *extra]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, combined_output(result)
        grids.append(out.read_bytes())
    assert grids[0] != grids[1]


def test_checkpoint_smuggling_a_frozen_tensor_is_an_integrity_violation(guarded, data, tmp_path):
    checkpoint = _checkpointed_run(guarded, data, tmp_path / "run")
    tensors = load_file(str(checkpoint / "trainable.safetensors"))
    tensors["conv_in.weight"] = torch.zeros(_unet_state(guarded)["conv_in.weight"].shape)
    save_file(tensors, str(checkpoint / "trainable.safetensors"))
    state = json.loads((checkpoint / "state.json").read_text())  # a careful forger fixes digests
    digest = hashlib.sha256((checkpoint / "trainable.safetensors").read_bytes()).hexdigest()
    state["files"]["trainable.safetensors"] = digest
    (checkpoint / "state.json").write_text(json.dumps(state))
    with pytest.raises(IntegrityError, match=r"unet\.conv_in\.weight"):
        finetune(data, tmp_path / "run", model=str(guarded), config=CHECKPOINTED,
                 resume=str(checkpoint), compare=False, show_progress=False)  # fmt: skip


def test_eight_bit_adamw_from_bitsandbytes(guarded, data, tmp_path):
    config = TrainConfig(steps=2, batch_size=2, lr=1e-3, optimizer="adamw8bit")
    result = finetune(data, tmp_path / "run", model=str(guarded), config=config, compare=False,
                      show_progress=False)  # fmt: skip
    assert _frozen_unchanged(_unet_state(guarded), _unet_state(tmp_path / "run" / "model"))
    assert result.losses and all(loss == loss for loss in result.losses)  # no NaN


def test_dreambooth_prior_preservation_snr_and_checkpointing(guarded, tmp_path):
    instance = tmp_path / "instance"
    classes = export_digits(tmp_path / "class", (3,), "test").out
    export_digits(instance, (7,), "test")
    (instance / "metadata.jsonl").unlink()  # a DreamBooth folder is just images
    config = TrainConfig(steps=2, batch_size=2, lr=1e-3, snr_gamma=5.0,
                         gradient_checkpointing=True, prior_loss_weight=0.5)  # fmt: skip
    result = finetune(instance, tmp_path / "run", model=str(guarded), config=config,
                      instance_prompt="a photo of sks digit", class_data=classes,
                      compare=False, show_progress=False)  # fmt: skip
    assert len(result.losses) == 2 and all(loss > 0 for loss in result.losses)
    provenance = json.loads((tmp_path / "run" / PROVENANCE_FILE).read_text())
    assert provenance["config"]["snr_gamma"] == 5.0
    assert _frozen_unchanged(_unet_state(guarded), _unet_state(tmp_path / "run" / "model"))


def test_lora_run_resumes_to_the_same_adapter(guarded, data, tmp_path):
    config = TrainConfig(steps=4, batch_size=2, lora=True, lr=1e-2, checkpoint_every=2)
    finetune(
        data, tmp_path / "a", model=str(guarded), config=config, compare=False, show_progress=False
    )
    finetune(
        data, tmp_path / "b", model=str(guarded), config=config, compare=False, show_progress=False
    )
    (tmp_path / "b" / LORA_FILE).unlink()
    resumed = finetune(data, tmp_path / "b", model=str(guarded), config=config, resume="latest",
                       compare=False, show_progress=False)  # fmt: skip
    assert resumed.resumed_from == 2
    a, b = load_file(str(tmp_path / "a" / LORA_FILE)), load_file(str(tmp_path / "b" / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_encoded_latents_are_contiguous_so_partly_frozen_convs_train(embedded_pipeline, data):
    """oneDNN's conv backward crashed on the VAE's channels-last latents under a partial freeze."""
    from diffusers import DDPMScheduler

    from guardtune.data import ImageCaptionDataset, scan_folder
    from guardtune.learn.binarize import freeze_top, random_scores
    from guardtune.training.encode import EncodedData
    from guardtune.training.loss import diffusion_loss

    encoded = EncodedData(embedded_pipeline, ImageCaptionDataset(scan_folder(data), 32),
                          torch.device("cpu"))  # fmt: skip
    latents, states = encoded.batch(16, torch.Generator().manual_seed(0))
    assert latents.is_contiguous() and states.is_contiguous()
    unet = embedded_pipeline.unet
    numel = {n: p.numel() for n, p in unet.named_parameters()}
    frozen = set(freeze_top(random_scores(list(numel), 0), numel, 0.5, "parameters"))
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    try:
        for name, parameter in unet.named_parameters():
            parameter.requires_grad_(name not in frozen)
        scheduler = DDPMScheduler.from_config(embedded_pipeline.scheduler.config)
        loss = diffusion_loss(unet, scheduler, latents, states, torch.Generator(), None)
        loss.backward()
        grads = {n for n, p in unet.named_parameters() if p.grad is not None}
        assert grads == set(numel) - frozen
    finally:
        unet.load_state_dict(base)
        unet.requires_grad_(False)
        unet.zero_grad(set_to_none=True)


def test_encoded_sets_concatenate_with_their_own_captions(embedded_pipeline, data, tmp_path):
    from guardtune.data import ImageCaptionDataset, scan_folder
    from guardtune.training.encode import EncodedData

    nines = export_digits(tmp_path / "nines", (9,), "test").out
    parts = [
        EncodedData(embedded_pipeline, ImageCaptionDataset(scan_folder(f), 32), torch.device("cpu"))
        for f in (data, nines)
    ]
    joined = EncodedData.concat(parts)
    assert len(joined) == len(parts[0]) + len(parts[1])
    # Every example keeps its own caption's text states: 7s say seven, 9s say nine.
    first, last = joined.caption_row[0], joined.caption_row[-1]
    assert torch.equal(joined.embeddings[first], parts[0].embeddings[parts[0].caption_row[0]])
    assert torch.equal(joined.embeddings[last], parts[1].embeddings[parts[1].caption_row[-1]])
    assert not torch.equal(joined.embeddings[first], joined.embeddings[last])


def test_a_failed_savings_probe_leaves_the_run_written_and_says_why(guarded, data, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    import guardtune.training.finetune as recipe
    from guardtune.errors import GuardtuneError

    def out_of_memory(*args, **kwargs):
        raise GuardtuneError("the savings probe failed: CUDA out of memory")

    monkeypatch.setattr(recipe, "measure_savings", out_of_memory)
    result = finetune(data, tmp_path / "run", model=str(guarded), config=SMALL,
                      show_progress=False)  # fmt: skip
    assert result.savings is None
    assert result.savings_missing == "the savings probe failed: CUDA out of memory"
    assert (tmp_path / "run" / "model" / PROVENANCE_FILE).is_file()


def test_adam_options_reach_the_optimizer_and_old_checkpoints_are_pruned(guarded, data, tmp_path):
    from guardtune.training.config import build_optimizer

    config = TrainConfig(adam_beta1=0.8, adam_beta2=0.99, adam_weight_decay=0.1, adam_epsilon=1e-6)
    group = build_optimizer([torch.nn.Parameter(torch.zeros(2))], config).param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.8, 0.99), 0.1, 1e-6)
    assert config.digest() == TrainConfig(**{**config.__dict__, "checkpoints_total_limit": 5}
                                          ).digest()  # fmt: skip
    pruned = TrainConfig(steps=6, batch_size=2, checkpoint_every=1, checkpoints_total_limit=3)
    finetune(data, tmp_path / "run", model=str(guarded), config=pruned, compare=False,
             show_progress=False)  # fmt: skip
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000003", "step-000004", "step-000005"]
