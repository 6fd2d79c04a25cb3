"""The mask learner's pieces, per tensor and per channel, and whole runs on the embedded model:
resume, the attacker's horizon, and two ranks."""

import dataclasses
import json

import pytest
import torch

from guardtune.errors import DataError
from guardtune.learn import freezeasguard
from guardtune.learn.freezeasguard import (
    LearnerConfig,
    RoundLog,
    _average,
    _Checkpoint,
    _FlatDot,
    _follow,
    _InBackward,
    _resume,
    _schedule,
    _Store,
    _Units,
    learn_mask,
)
from guardtune.rowranges import count


def test_flat_dot_equals_per_tensor_inner_products():
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(shape, generator=generator) for shape in ((3, 4), (5,), (2, 2, 2))]
    b = [torch.randn(t.shape, generator=generator) for t in a]
    expected = torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)])
    assert torch.allclose(_FlatDot(a)([t.clone() for t in a], b), expected, atol=1e-6)
    in_buckets = _FlatDot(a, bucket=10)([t.clone() for t in a], b)  # 12 | 5 | 8 values
    assert len(_FlatDot(a, bucket=10).groups) == 3
    assert torch.allclose(in_buckets, expected, atol=1e-6)


def test_flat_dot_sums_per_row():
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(shape, generator=generator) for shape in ((3, 4), (5,), (2, 2, 2), ())]
    b = [torch.randn(t.shape, generator=generator) for t in a]
    rows = [t.shape[0] if t.dim() else 1 for t in a]  # a 0-d tensor is one row
    expected = torch.cat(
        [(x * y).reshape(r, -1).sum(1) for x, y, r in zip(a, b, rows, strict=True)]
    )
    assert expected.shape == (3 + 5 + 2 + 1,)
    got = _FlatDot(a, rows=rows)([t.clone() for t in a], b)
    assert torch.allclose(got, expected, atol=1e-6)
    in_buckets = _FlatDot(a, bucket=10, rows=rows)([t.clone() for t in a], b)
    assert torch.allclose(in_buckets, expected, atol=1e-6)


class _Tiny(torch.nn.Module):
    """Every kind of row: a convolution's output channels, norm and bias entries, a linear layer's
    output features, a 0-d gain. With `large=50` the convolution's weight (108 values) goes in
    the backward's hooks, the linear weight (24) with the small tensors after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 6, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 6)
        self.head = torch.nn.Linear(6, 4)
        self.gain = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.conv(x))).mean(dim=(2, 3))) * self.gain


def _tiny_problem(seed: int = 0):
    """A tiny model at theta_ft, its theta_d, an input, and its rows."""
    torch.manual_seed(seed)
    model = _Tiny()
    with torch.no_grad():  # norms' weights start at one: move them off it
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theta_d = [torch.randn_like(p) * 0.1 for p in model.parameters()]
    return model, theta_d, torch.randn(3, 2, 5, 5)


def _row_mask(units: _Units, seed: int) -> torch.Tensor:
    return torch.rand(units.count, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)  # fmt: skip


def test_inner_products_per_row_equal_plain_torch():
    model, theta_d, x = _tiny_problem()
    params = list(model.parameters())
    units = _Units(params, by_row=True)
    assert units.rows == [1, 6, 6, 6, 6, 4, 4] and units.count == 33  # the gain first
    assert units.size.tolist() == [1.0] + [18.0] * 6 + [1.0] * 18 + [6.0] * 4 + [1.0] * 4
    steps = _InBackward(params, [d.clone() for d in theta_d], world=1, large=50, units=units)
    assert steps.large == [1]  # the convolution's weight, in a hook; the rest after
    inner = steps.inner_products(model(x).pow(2).sum())
    steps.remove()
    grads = torch.autograd.grad(model(x).pow(2).sum(), params)
    expected = torch.cat([(g * d).reshape(r, -1).sum(1)
                          for g, d, r in zip(grads, theta_d, units.rows, strict=True)])  # fmt: skip
    assert inner.shape == (33,)
    assert torch.allclose(inner, expected, atol=1e-6)
    assert all(p.grad is None for p in params)


def test_a_channel_user_step_equals_a_direct_reference():
    """theta(m) = theta_ft + m theta_d with m per row; the user is Adam on theta_ft."""
    from torch.func import functional_call

    model, theta_d, x = _tiny_problem()
    params, names = list(model.parameters()), [n for n, _ in model.named_parameters()]
    units = _Units(params, by_row=True)
    mask = _row_mask(units, 1)
    factors = units.per_tensor(mask)
    theta_ft = [p.detach().clone().requires_grad_(True) for p in params]
    theta_pre = [(f + d).detach() for f, d in zip(theta_ft, theta_d, strict=True)]
    with torch.no_grad():  # the model holds theta(m)
        for p, d, m in zip(params, theta_d, factors, strict=True):
            p.addcmul_(d, m)
    steps = _InBackward(params, [d.clone() for d in theta_d], world=1, large=50, units=units)
    steps.restart_user(1e-2)
    reference = torch.optim.Adam(theta_ft, lr=1e-2)
    for _ in range(3):  # Adam's state in the later steps
        steps.user_step(model(x).pow(2).mean(), mask, mask)
        theta = {n: f + m * (pre - f) for n, f, m, pre in zip(names, theta_ft, factors, theta_pre,
                                                              strict=True)}  # fmt: skip
        reference.zero_grad()
        functional_call(model, theta, (x,)).pow(2).mean().backward()  # (1 - m) g on theta_ft
        reference.step()
    steps.remove()
    with torch.no_grad():
        for p, d, f, m, pre in zip(params, steps.theta_d, theta_ft, factors, theta_pre,
                                   strict=True):  # fmt: skip
            assert torch.allclose(d, pre - f, atol=1e-6, rtol=0)
            assert torch.allclose(p, f + m * (pre - f), atol=1e-6, rtol=0)


def test_equal_row_logits_reduce_to_tensor_mode():
    import copy

    model, theta_d, x = _tiny_problem()
    channel_model = copy.deepcopy(model)
    per_tensor = _Units(list(model.parameters()), by_row=False)
    per_row = _Units(list(channel_model.parameters()), by_row=True)
    rows = torch.tensor(per_row.rows)
    tensor_steps = _InBackward(list(model.parameters()), [d.clone() for d in theta_d], world=1,
                               large=50, units=per_tensor)  # fmt: skip
    row_steps = _InBackward(list(channel_model.parameters()), [d.clone() for d in theta_d],
                            world=1, large=50, units=per_row)  # fmt: skip
    applied, mask = _row_mask(per_tensor, 2), _row_mask(per_tensor, 3)
    for steps in (tensor_steps, row_steps):
        steps.restart_user(1e-2)
    for _ in range(2):
        tensor_steps.user_step(model(x).pow(2).mean(), mask, applied)
        row_steps.user_step(channel_model(x).pow(2).mean(), mask.repeat_interleave(rows),
                            applied.repeat_interleave(rows))  # fmt: skip
        applied = mask
    moved = _row_mask(per_tensor, 4)
    _follow(tensor_steps, mask, moved)
    _follow(row_steps, mask.repeat_interleave(rows), moved.repeat_interleave(rows))
    for got, want in zip([*channel_model.parameters(), *row_steps.theta_d],
                         [*model.parameters(), *tensor_steps.theta_d], strict=True):  # fmt: skip
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
    tensor_inner = tensor_steps.inner_products(model(x).sum())
    row_inner = row_steps.inner_products(channel_model(x).sum())
    per_tensor_sums = torch.stack([chunk.sum() for chunk in row_inner.split(per_row.rows)])
    assert torch.allclose(per_tensor_sums, tensor_inner, atol=1e-6)


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


def test_the_schedule_spreads_a_restarts_rounds_over_the_horizon():
    plain = LearnerConfig(user_steps=4, user_reset_every=3)
    assert [_schedule(plain, r) for r in range(4)] == [(0, 4), (4, 4), (8, 4), (12, 4)]
    spread = LearnerConfig(user_reset_every=3, horizon=10)  # 3, 6, 10 steps into each restart
    assert [_schedule(spread, r) for r in range(7)] == [
        (0, 3), (3, 3), (6, 4), (10, 3), (13, 3), (16, 4), (20, 3)
    ]  # fmt: skip
    assert _schedule(LearnerConfig(user_reset_every=50, horizon=400), 49) == (392, 8)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"granularity": "channel", "share_by": "tensors"}, "share_by='parameters'"),
        ({"granularity": "rows"}, "granularity must be"),
        ({"horizon": 1}, r"horizon \(1\) must be at least user_reset_every \(2\)"),
    ],
)
def test_settings_the_learner_cannot_honour_are_refused(tmp_path, settings, message):
    config = dataclasses.replace(TINY, **settings)
    with pytest.raises(DataError, match=message):  # before any model is touched
        learn_mask(None, None, None, None, config, workdir=tmp_path)


def _killed_and_resumed(task, tmp_path, config: LearnerConfig):
    """A whole run, and one killed in round 4 and resumed from its checkpoint of round 2."""
    unet, scheduler, illegal, legal = task
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    whole = learn_mask(unet, scheduler, illegal, legal, config, workdir=tmp_path / "whole")
    rounds = []

    def kill_in_round_four(advance: int = 1, **fields: float) -> None:
        if "share" in fields:
            rounds.append(fields)
            if len(rounds) == 4:
                raise _Killed

    unet.load_state_dict(base)
    with pytest.raises(_Killed):
        learn_mask(unet, scheduler, illegal, legal, config, kill_in_round_four, tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["round"] == 2
    unet.load_state_dict(base)
    resumed = learn_mask(unet, scheduler, illegal, legal, config, workdir=tmp_path / "cut",
                         resume=True)  # fmt: skip
    unet.load_state_dict(base)
    return whole, resumed


def test_a_killed_channel_run_resumes_to_the_same_mask(task, tmp_path):
    config = dataclasses.replace(TINY, granularity="channel")
    whole, resumed = _killed_and_resumed(task, tmp_path, config)
    assert resumed.row_logits == whole.row_logits and resumed.logits == whole.logits
    assert (resumed.frozen, resumed.rows) == (whole.frozen, whole.rows)
    # The binarised mask holds the share, in rows: whole tensors and the rows of others.
    unet = task[0]
    shapes = {n: p.shape for n, p in unet.named_parameters()}
    assert set(whole.row_logits) == set(shapes) == set(whole.logits)
    assert all(len(whole.row_logits[n]) == (s[0] if len(s) else 1) for n, s in shapes.items())
    assert whole.rows and not set(whole.rows) & set(whole.frozen)
    total = sum(p.numel() for p in unet.parameters())
    frozen = sum(shapes[n].numel() for n in whole.frozen) + sum(
        count(r) * shapes[n].numel() // shapes[n][0] for n, r in whole.rows.items()
    )
    assert config.ratio <= frozen / total < config.ratio + 0.01


def _counting_losses(monkeypatch) -> list[tuple[int, bool]]:
    """Record every loss the learner asks for: its seed, and whether the halves share noise."""
    calls: list[tuple[int, bool]] = []
    paired = freezeasguard._paired_losses

    def counted(unet, scheduler, illegal, legal, size, seed, shared):
        calls.append((seed, shared))
        return paired(unet, scheduler, illegal, legal, size, seed, shared)

    monkeypatch.setattr(freezeasguard, "_paired_losses", counted)
    return calls


def test_a_horizon_spreads_the_users_steps_over_each_restart(task, tmp_path, monkeypatch):
    unet, scheduler, illegal, legal = task
    config = dataclasses.replace(TINY, horizon=5)  # restarts of 2 rounds: 2 + 3 user steps
    calls = _counting_losses(monkeypatch)
    learn_mask(unet, scheduler, illegal, legal, config, workdir=tmp_path)
    learner = [(seed, shared) for seed, shared in calls if seed >= 1_000_000]  # not relearning
    per_round, steps = [], 0
    for _, shared in learner:
        if shared:  # a mask step ends its round
            per_round.append(steps)
            steps = 0
        else:
            steps += 1
    assert per_round == [2, 3, 2, 3, 2]  # rounds 0-1, 2-3: H = 5 user steps each; round 4: 2
    user_seeds = [seed for seed, shared in learner if not shared]
    assert user_seeds == [1_000_000 + 2 * i for i in range(12)]  # one index per user step


def test_a_killed_run_with_a_horizon_resumes_to_the_same_mask(task, tmp_path):
    whole, resumed = _killed_and_resumed(task, tmp_path, dataclasses.replace(TINY, horizon=5))
    assert resumed.logits == whole.logits and resumed.frozen == whole.frozen
    assert resumed.history == whole.history
