"""The mask learner's pieces, and whole runs on the embedded model: resume and two ranks."""

import json

import pytest
import torch

from guardtune.errors import DataError
from guardtune.learn.freezeasguard import (
    LearnerConfig,
    RoundLog,
    _average,
    _Checkpoint,
    _FlatDot,
    _InBackward,
    _resume,
    _Store,
    learn_mask,
)


def test_flat_dot_equals_per_tensor_inner_products():
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(shape, generator=generator) for shape in ((3, 4), (5,), (2, 2, 2))]
    b = [torch.randn(t.shape, generator=generator) for t in a]
    expected = torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)])
    assert torch.allclose(_FlatDot(a)([t.clone() for t in a], b), expected, atol=1e-6)
    in_buckets = _FlatDot(a, bucket=10)([t.clone() for t in a], b)  # 12 | 5 | 8 values
    assert len(_FlatDot(a, bucket=10).groups) == 3
    assert torch.allclose(in_buckets, expected, atol=1e-6)


def _reference_user_step(model, theta_d, optimizer, x, mask, applied):
    """The user step as one multi-tensor computation, outside backward."""
    params = list(model.parameters())
    grads = list(torch.autograd.grad(model(x).pow(2).mean(), params))
    with torch.no_grad():
        torch._foreach_mul_(grads, (mask - 1.0).tolist())
        for d, g in zip(theta_d, grads, strict=True):
            d.grad = g
        for p, d, k in zip(params, theta_d, (1.0 - applied).tolist(), strict=True):
            p.add_(d, alpha=k)
        optimizer.step()
        for p, d, k in zip(params, theta_d, (1.0 - mask).tolist(), strict=True):
            p.sub_(d, alpha=k)
            d.grad = None


def test_steps_in_backward_equal_one_multi_tensor_step():
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    theta_d = [torch.randn_like(p) * 0.1 for p in model.parameters()]
    reference_d = [d.clone() for d in theta_d]
    optimizer = torch.optim.Adam(reference_d, lr=1e-2, fused=True)
    steps = _InBackward(list(model.parameters()), theta_d, world=1, large=20)
    assert steps.large == [0, 2] and steps.small == [1, 3]  # weights in hooks, biases after
    steps.restart_user(1e-2)
    x = torch.randn(5, 8)
    applied, mask = torch.tensor([0.2, 0.5, 0.8, 0.3]), torch.tensor([0.1, 0.5, 0.9, 0.3])
    for _ in range(2):  # the second step uses Adam's state
        steps.user_step(model(x).pow(2).mean(), mask, applied)
        _reference_user_step(reference, reference_d, optimizer, x, mask, applied)
        applied = mask
    for got, want in zip([*model.parameters(), *theta_d],
                         [*reference.parameters(), *reference_d], strict=True):  # fmt: skip
        assert torch.allclose(got, want, atol=1e-7, rtol=0)
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind

    inner = steps.inner_products(model(x).sum())
    grads = torch.autograd.grad(reference(x).sum(), list(reference.parameters()))
    expected = torch.stack([(g * d).sum() for g, d in zip(grads, reference_d, strict=True)])
    assert torch.allclose(inner, expected, atol=1e-6)
    steps.remove()  # without the hooks, gradients stay where autograd puts them
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_average_is_a_no_op_on_one_process():
    tensors = [torch.arange(3.0), torch.ones(2, 2)]
    _average(tensors, world=1)
    assert torch.equal(tensors[0], torch.arange(3.0)) and torch.equal(tensors[1], torch.ones(2, 2))


def _mean_of_two_ranks(rank: int, store_path: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.FileStore(store_path, 2), rank=rank, world_size=2
    )
    tensors = [torch.full((3,), float(rank)), torch.full((2, 70), 10.0 * rank)]
    _average(tensors, world=2, bucket=100)  # two buckets: 3 + 140 values > 100
    torch.save(tensors, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_average_takes_the_mean_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "averaged")
    mp.spawn(_mean_of_two_ranks, args=(str(tmp_path / "store"), out), nprocs=2)
    for rank in (0, 1):
        first, second = torch.load(f"{out}.{rank}")
        assert torch.equal(first, torch.full((3,), 0.5))
        assert torch.equal(second, torch.full((2, 70), 5.0))


def _checkpoint(round_index: int, fingerprint: str = "key") -> _Checkpoint:
    logits = -1.0 - torch.rand(7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    history = tuple(RoundLog(r, 0.1 + r / 3, 0.2 + r / 7, 0.3) for r in range(round_index))
    return _Checkpoint(fingerprint, round_index, logits, 1 / 3, history)


def test_a_checkpoint_reads_back_exactly(tmp_path):
    written = _checkpoint(2)
    written.save(tmp_path / "state.json")
    read = _Checkpoint.load(tmp_path / "state.json")
    assert torch.equal(read.logits, written.logits) and read.logits.dtype == torch.float64
    assert (read.fingerprint, read.round, read.mean_square, read.history) == (
        written.fingerprint, written.round, written.mean_square, written.history
    )  # fmt: skip


def test_resume_needs_the_same_settings_and_the_relearned_weights(tmp_path):
    config, store, state = LearnerConfig(rounds=5), _Store(tmp_path), tmp_path / "state.json"
    assert _resume(state, "key", store, config) is None  # nothing to resume: start afresh
    _checkpoint(2).save(state)
    with pytest.raises(DataError, match="other settings"):
        _resume(state, "another key", store, config)
    with pytest.raises(DataError, match=r"relearned\.safetensors is missing"):
        _resume(state, "key", store, config)
    _checkpoint(5).save(state)  # a finished run needs no weights to return its mask
    assert _resume(state, "key", store, config).round == 5


@pytest.fixture(scope="module")
def task(embedded_pipeline, tmp_path_factory):
    from diffusers import DDPMScheduler

    from guardtune.data import ImageCaptionDataset, scan_folder
    from guardtune.digits.dataset import export_digits
    from guardtune.training.encode import EncodedData

    root = tmp_path_factory.mktemp("learn-data")

    def encoded(classes, style):
        folder = export_digits(root / style, classes, "test", style).out
        return EncodedData(embedded_pipeline, ImageCaptionDataset(scan_folder(folder), 32),
                           torch.device("cpu"))  # fmt: skip

    scheduler = DDPMScheduler.from_config(embedded_pipeline.scheduler.config)
    base = {k: v.clone() for k, v in embedded_pipeline.unet.state_dict().items()}
    yield embedded_pipeline.unet, scheduler, encoded((7,), "plain"), encoded((0, 1), "bold")
    embedded_pipeline.unet.load_state_dict(base)
    embedded_pipeline.unet.requires_grad_(False)


TINY = LearnerConfig(relearn_steps=2, rounds=5, user_steps=2, user_reset_every=2, batch_size=2)


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_mask(task, tmp_path):
    unet, scheduler, illegal, legal = task
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    whole = learn_mask(unet, scheduler, illegal, legal, TINY, workdir=tmp_path / "whole")

    rounds = []

    def kill_in_round_four(advance: int = 1, **fields: float) -> None:
        if "share" in fields:
            rounds.append(fields)
            if len(rounds) == 4:  # after the checkpoint taken at the restart of round 2
                raise _Killed

    unet.load_state_dict(base)
    with pytest.raises(_Killed):
        learn_mask(unet, scheduler, illegal, legal, TINY, kill_in_round_four, tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["round"] == 2
    unet.load_state_dict(base)  # a new process: theta_pre from the model again
    resumed = learn_mask(unet, scheduler, illegal, legal, TINY, workdir=tmp_path / "cut",
                         resume=True)  # fmt: skip
    assert resumed.logits == whole.logits
    assert resumed.frozen == whole.frozen and len(resumed.history) == TINY.rounds


def test_resume_refuses_a_checkpoint_of_other_settings(task, tmp_path):
    unet, scheduler, illegal, legal = task
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    learn_mask(unet, scheduler, illegal, legal, TINY, workdir=tmp_path)
    unet.load_state_dict(base)
    other = LearnerConfig(**{**TINY.__dict__, "ratio": 0.5})
    with pytest.raises(DataError, match="other settings"):
        learn_mask(unet, scheduler, illegal, legal, other, workdir=tmp_path, resume=True)
