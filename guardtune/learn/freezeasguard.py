"""FreezeAsGuard's bilevel mask learner (paper Sec. 3, Algorithm 1, Appendix A).

One mask entry (a unit) per UNet parameter tensor, or with `granularity="channel"` one per row of
each tensor (its entries along dim 0: a convolution's or linear layer's output channels, a bias
or norm vector's entries; see guardtune.rowranges), m = sigmoid(w / T). The model the simulated
user trains is theta(m) = m * theta_pre + (1 - m) * theta_ft = theta_ft + m * theta_d, with m
broadcast over each unit's parameters, kept as the UNet's own parameters, and theta_d = theta_pre
- theta_ft is the only other copy of the weights in memory (Sec. 3.3: two copies instead of
three). What the learner does per unit it does alike per tensor or per row (`_Units`): per
tensor with a number for each tensor (scalar arithmetic, as before there were rows), per row with
a (rows, 1, ...) factor that broadcasts over the row's parameters.

`learn_mask` runs these steps, each a function of its own:
- Relearn (`_relearn`): theta_ft is theta_pre fine-tuned on illegal + legal data (what the
  authors' code does before learning the mask). theta_ft and theta_d are written to the work
  folder once (`_Store`).
- Lower level (Eq. 7, 9, 10; `_user_steps`): the simulated user's steps on L_illegal + L_legal,
  from theta_ft again at every restart (`_restart_user`). The user trains theta_ft; since
  theta_ft = theta_pre - theta_d, we hand theta_d to a fused Adam with gradient -(1 - m) * g,
  and move theta(m) by (1 - m) times the change of theta_d, in place.
- Upper level (Eq. 5, 6, 8; `_mask_update`): L_upper = -lambda1 * L_illegal + lambda2 *
  L_legal. Its gradient for w_i is <dL/dtheta(m)_i, theta_d,i> * m_i (1 - m_i) / T (the inner
  product over unit i's parameters), plus the sparsity term.
- Cost: both levels do their per-tensor work inside the backward, as each large tensor's
  gradient lands (`_InBackward`); small tensors go together afterwards with foreach ops (one
  multiply, one concatenation, one segment sum for all their inner products, per tensor or per
  row). One mask-update cycle costs 1.10x as many plain fine-tune steps on an SD v1.5-size UNet,
  at 0.94x the memory (benchmarks/learner.py, per tensor); on the embedded model, on CPU, about
  1.1x per tensor and per channel alike, per channel at 1.06x the memory.

Deviations from the paper, each kept because probing the learner on the embedded scenario showed
it mattered: the illegal and legal halves of a mask step share timesteps and noise (so their
loss difference is not drowned by sampling noise); each unit's inner product is divided by its
size and by a running RMS over rounds (so the step size means the same for every unit and
every model); the sparsity pull is c * (share(m) - p), the gradient of c/2 * (share - p)^2, with
share by parameters or tensors (per row, only by parameters: a share of tensors does not say what
part of a tensor counts); the simulated user is Adam at the attacker's learning rate, and
it restarts from theta_ft every `user_reset_every` rounds, so the mask keeps being judged
against a user at the start of an attack rather than one that has trained for thousands of steps
(the authors' code keeps one user trajectory); all mask logits start equal rather than random (a
random start hid the signal). lambda1 = lambda2 = 1 because both halves of every batch have the
same size, which is the balance Sec. 3.1 asks for.

The attacker's horizon (`horizon`, `_schedule`): with restarts alone, a user is at most
`user_reset_every * user_steps` steps into its attack when a mask step judges it (200 by
default), and the protection of such a mask was found to fade by 400 user steps: nothing had
asked it to hold there. With a horizon H, each restart's user runs H steps, and its R =
`user_reset_every` rounds are spread over them: round k of a restart takes the user to
floor(H (k + 1) / R) steps, so mask steps see users early, in the middle and late in the
attack, each mask step still one backward. The user's steps per round become H / R on average
(`user_steps` is then unused), so a round costs what H / R user steps cost. Without a horizon,
every round takes `user_steps` steps, as before.

Resumable (`_resume`): every user restart is a checkpoint (`_Checkpoint`: mask logits, RMS
state and history in `state.json`; theta_ft and theta_d in `relearned.safetensors`), and
everything random in round r is seeded by r and the index of the user's step, so a resumed run
computes the same rounds as an uninterrupted one. Under torch.distributed (e.g. `accelerate
launch`) each rank draws its own batches and the user's gradients and the mask gradients are
averaged across ranks, so every rank holds the same mask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from guardtune import atomic
from guardtune.errors import DataError
from guardtune.learn.binarize import freeze_top, freeze_top_rows
from guardtune.rowranges import Ranges, height
from guardtune.tensorfile import read_header
from guardtune.training.loss import draw_noise, pose, predict

GRANULARITIES = ("tensor", "channel")  # a mask entry per tensor, or per row (output channel)


@dataclass(frozen=True)
class LearnerConfig:
    ratio: float = 0.3  # p, the share to freeze
    share_by: str = "parameters"  # or "tensors"
    granularity: str = "tensor"  # a mask entry per tensor, or per "channel" (row along dim 0)
    relearn_steps: int = 200
    relearn_lr: float = 1e-4
    rounds: int = 150  # mask updates (K in Algorithm 1)
    user_steps: int = 4  # simulated-user steps per mask update (L in Algorithm 1)
    user_lr: float = 1e-4
    user_reset_every: int = 50  # rounds between restarts of the simulated user (and checkpoints)
    horizon: int | None = None  # user steps per restart, spread over its rounds (see above)
    mask_lr: float = 0.05
    init_spread: float = 0.0  # initial logits are -1 - init_spread * U(0, 1)
    temperature: float = 0.2  # T
    sparsity_weight: float = 10.0  # c
    batch_size: int = 8  # per half (illegal, legal), per process
    seed: int = 0


@dataclass(frozen=True)
class RoundLog:
    round: int
    illegal_loss: float
    legal_loss: float
    mask_share: float  # share(m) of the continuous mask


@dataclass(frozen=True)
class LearnedMask:
    frozen: list[str]  # bare UNet parameter names of whole frozen tensors, sorted
    logits: dict[str, float]  # per tensor; per channel, each tensor's mean row logit
    history: list[RoundLog] = field(default_factory=list)
    rows: dict[str, Ranges] = field(default_factory=dict)  # tensors frozen in part: their rows
    row_logits: dict[str, list[float]] = field(default_factory=dict)  # per channel: every row's


def _buckets(tensors: list[torch.Tensor], bucket: int) -> list[tuple[int, int]]:
    """Consecutive index ranges holding at most `bucket` values each (or one larger tensor)."""
    ranges, start = [], 0
    while start < len(tensors):
        stop, size = start, 0
        while stop < len(tensors) and (stop == start or size + tensors[stop].numel() <= bucket):
            size += tensors[stop].numel()
            stop += 1
        ranges.append((start, stop))
        start = stop
    return ranges


_Factor = float | torch.Tensor  # a whole tensor's mask value, or its rows' as (rows, 1, ...)


class _Units:
    """Which mask entry each parameter answers to: one per tensor, or one per row of each tensor.

    Units are numbered tensor by tensor in named_parameters order, and within a tensor by row,
    which is also the order of the logits vector and of a checkpoint's logits.
    """

    def __init__(self, params: list[torch.Tensor], by_row: bool) -> None:
        self.by_row = by_row
        self.rows = [height(p.shape) if by_row else 1 for p in params]
        # Tensor i's units are [start[i], start[i + 1]).
        self.start = list(itertools.accumulate(self.rows, initial=0))
        self.count = self.start[-1]
        self.size = torch.tensor(  # parameters per unit, float64 as the mask arithmetic
            [p.numel() // r for p, r in zip(params, self.rows, strict=True) for _ in range(r)],
            dtype=torch.float64,
        )
        self.shapes = [(r, *[1] * (p.dim() - 1)) if p.dim() else ()
                       for p, r in zip(params, self.rows, strict=True)]  # fmt: skip
        self.device = params[0].device if params else torch.device("cpu")
        # Row factors in at least float32: in half precision a mask value would lose the digits
        # that a number per tensor keeps (a scalar multiplies in float32 there too).
        dtype = params[0].dtype if params else torch.float32
        self.dtype = torch.promote_types(dtype, torch.float32)

    def per_tensor(self, values: torch.Tensor) -> list[_Factor]:
        """One value per unit as each tensor's factor: a number, or a (rows, 1, ...) tensor."""
        if not self.by_row:
            return values.tolist()
        moved = values.to(device=self.device, dtype=self.dtype)
        return [v.view(shape) for v, shape in zip(moved.split(self.rows), self.shapes, strict=True)]

    def names(self, names: list[str], values: torch.Tensor) -> dict[str, list[float]]:
        """One value per unit, as each tensor's list of row values."""
        listed = values.tolist()
        return {n: listed[self.start[i] : self.start[i + 1]] for i, n in enumerate(names)}


def _add_scaled(target: torch.Tensor, other: torch.Tensor, factor: _Factor) -> None:
    """target += factor * other: a number for a whole tensor, a (rows, 1, ...) tensor per row."""
    if isinstance(factor, float):
        target.add_(other, alpha=factor)
    else:
        target.addcmul_(other, factor)


class _FlatDot:
    """Inner products <a_i, b_i> for many small tensors, a few kernel launches in all.

    Per tensor, or with `rows` per row of each tensor (row sums of a_i * b_i): either way a
    segment sum, with one segment per tensor or per row. Tensors are multiplied with one foreach
    op, then concatenated and segment-summed in buckets of at most `bucket` values, so the flat
    copy never approaches the size of the model.
    """

    def __init__(
        self, tensors: list[torch.Tensor], bucket: int = 1 << 24, rows: list[int] | None = None
    ) -> None:
        device = tensors[0].device if tensors else torch.device("cpu")
        rows = rows if rows is not None else [1] * len(tensors)
        self.groups = [
            (start, stop, torch.tensor(
                [t.numel() // r for t, r in zip(tensors[start:stop], rows[start:stop], strict=True)
                 for _ in range(r)], dtype=torch.long, device=device))
            for start, stop in _buckets(tensors, bucket)
        ]  # fmt: skip

    def __call__(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        if not a:
            return torch.zeros(0)
        torch._foreach_mul_(a, b)  # a is consumed: it is a gradient we no longer need
        sums = []
        for start, stop, lengths in self.groups:
            flat = torch.cat([t.reshape(-1) for t in a[start:stop]])
            sums.append(torch.segment_reduce(flat, "sum", lengths=lengths))
        return torch.cat(sums)


class _InBackward:
    """A user step's or a mask step's per-unit work, done as each large gradient lands.

    As torchtune's optimizer-in-backward: autograd calls a hook the moment a large tensor's
    gradient is complete, the hook uses it (the user's masked Adam step, or the inner products
    <g, theta_d> of a mask step) and drops it. So a backward never holds a whole model's
    gradients (on an SD v1.5-size UNet, 3.4 GB fewer at peak), each freed buffer is reused by
    the next instead of faulting in fresh pages, and a large tensor's inner product is one dot
    that writes nothing (per row: the spent gradient times theta_d in place, then row sums).
    Small tensors (biases, norms: half of an SD UNet's tensors, a tiny share of its values) keep
    their gradients and are done together after the backward with foreach ops, where a kernel
    launch each would cost more than the arithmetic; per row, their factors are expanded to
    their full shapes, so the foreach ops keep their multi-tensor kernels.

    The arithmetic is the same elementwise arithmetic as one multi-tensor step, in another order.
    """

    def __init__(
        self, params, theta_d, world: int, large: int = 1 << 16, units: _Units | None = None
    ) -> None:
        self.params, self.theta_d, self.world = params, theta_d, world
        self.units = units if units is not None else _Units(params, by_row=False)
        self.large = [i for i, p in enumerate(params) if p.numel() >= large]
        self.small = [i for i, p in enumerate(params) if p.numel() < large]
        rows = self.units.rows
        self.dot = _FlatDot([params[i] for i in self.small], rows=[rows[i] for i in self.small])
        starts = self.units.start
        small_units = [u for i in self.small for u in range(starts[i], starts[i + 1])]
        self.small_units = torch.tensor(small_units, dtype=torch.long)
        # Per row, each factor of a step (scale, lift, lower) lives in buffers made once, with a
        # view for each tensor; a step refills them with one copy and one gather rather than
        # making a tensor for each of hundreds of tensors (that took 10% of a user step on the
        # embedded model). The gather expands the small tensors' factors to their full shapes.
        self.slots: dict[str, tuple[torch.Tensor, torch.Tensor, list[_Factor]]] = {}
        if self.units.by_row:
            sizes = self.units.size[self.small_units].long()
            self.expand = torch.repeat_interleave(self.small_units, sizes).to(self.units.device)
            self.slots = {kind: self._slot() for kind in ("scale", "lift", "lower")}
        self.mode: str | None = None  # None: outside a step, hooks leave gradients alone
        self.users: dict[int, torch.optim.Optimizer] = {}
        self.small_user: torch.optim.Optimizer | None = None
        self.inner = torch.zeros(self.units.count)
        self.scale: list[_Factor] = []
        self.lift: list[_Factor] = []
        self.lower: list[_Factor] = []
        self.handles = [
            params[i].register_post_accumulate_grad_hook(self._hook(i)) for i in self.large
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def restart_user(self, lr: float) -> None:
        """A fresh simulated user: Adam on theta_d, one optimizer per large tensor."""
        self.users, self.small_user = {}, None  # free the old state before the new one fills
        self.users = {i: torch.optim.Adam([self.theta_d[i]], lr=lr, fused=True)
                      for i in self.large}  # fmt: skip
        if self.small:
            small = [self.theta_d[i] for i in self.small]
            self.small_user = torch.optim.Adam(small, lr=lr, fused=True)

    def user_step(self, loss: torch.Tensor, mask: torch.Tensor, applied: torch.Tensor) -> None:
        """Backward, then the user's step on theta_d; theta(m) moves from `applied` to `mask`."""
        self.scale = self._factors("scale", mask - 1.0)  # d/dtheta_d = -(1 - m) g
        self.lower = self._factors("lower", 1.0 - mask)
        self.lift = self.lower if applied is mask else self._factors("lift", 1.0 - applied)
        self._backward(loss, "user")
        if self.small_user is not None:
            self._user_update(self.small, self._take(self.small), self.small_user)

    def inner_products(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward, then <dloss/dtheta(m)_u, theta_d,u> for every unit u."""
        self._backward(loss, "mask")
        small = self.dot(self._take(self.small), [self.theta_d[i] for i in self.small])
        inner = self.inner.clone()
        inner[self.small_units] = small.to(inner.device)
        return inner

    def _slot(self) -> tuple[torch.Tensor, torch.Tensor, list[_Factor]]:
        """Buffers for one factor: a value per unit, the small tensors' values expanded, and each
        tensor's view (a large tensor's (rows, 1, ...), a small tensor's at its own shape)."""
        units, device, dtype = self.units, self.units.device, self.units.dtype
        per_unit = torch.zeros(units.count, device=device, dtype=dtype)
        expanded = torch.zeros(len(self.expand), device=device, dtype=dtype)
        views: list[_Factor] = [
            per_unit[units.start[i] : units.start[i + 1]].view(shape)
            for i, shape in enumerate(units.shapes)
        ]
        pieces = expanded.split([self.params[i].numel() for i in self.small])
        for i, piece in zip(self.small, pieces, strict=True):
            views[i] = piece.view(self.params[i].shape)
        return per_unit, expanded, views

    def _factors(self, kind: str, values: torch.Tensor) -> list[_Factor]:
        """Each tensor's factor from one value per unit: a number per tensor, or per row."""
        if not self.units.by_row:
            return values.tolist()
        per_unit, expanded, views = self.slots[kind]
        per_unit.copy_(values)
        torch.index_select(per_unit, 0, self.expand, out=expanded)
        return views

    def _backward(self, loss: torch.Tensor, mode: str) -> None:
        self.mode = mode
        try:
            loss.backward()
        finally:
            self.mode = None

    def _take(self, indices: list[int]) -> list[torch.Tensor]:
        grads = [self.params[i].grad for i in indices]
        for i in indices:
            self.params[i].grad = None
        return grads

    @torch.no_grad()
    def _user_update(self, indices, grads, optimizer) -> None:
        _average(grads, self.world)
        torch._foreach_mul_(grads, [self.scale[i] for i in indices])
        for i, g in zip(indices, grads, strict=True):
            self.theta_d[i].grad = g
        # theta(m) = theta_pre - (1 - m) * theta_d: lift to theta_pre, step, lower again.
        if self.units.by_row:
            params, theta_d = [self.params[i] for i in indices], [self.theta_d[i] for i in indices]
            torch._foreach_addcmul_(params, theta_d, [self.lift[i] for i in indices])
            optimizer.step()
            torch._foreach_addcmul_(params, theta_d, [self.lower[i] for i in indices], value=-1)
            for d in theta_d:
                d.grad = None
            return
        for i in indices:  # per tensor: a number each
            self.params[i].add_(self.theta_d[i], alpha=self.lift[i])
        optimizer.step()
        for i in indices:
            self.params[i].sub_(self.theta_d[i], alpha=self.lower[i])
            self.theta_d[i].grad = None

    def _hook(self, i: int):
        def landed(param: torch.Tensor) -> None:
            if self.mode is None:
                return
            (grad,) = self._take([i])
            if self.mode == "user":
                self._user_update([i], [grad], self.users[i])
            # Ranks average the inner products afterwards: theta_d is the same on all.
            elif self.units.by_row:  # the gradient is spent: it takes the products in place
                rows = grad.mul_(self.theta_d[i]).reshape(self.units.rows[i], -1).sum(1)
                self.inner[self.units.start[i] : self.units.start[i + 1]] = rows
            else:
                self.inner[i] = torch.dot(grad.reshape(-1), self.theta_d[i].reshape(-1))

        return landed


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _average(tensors: list[torch.Tensor], world: int, bucket: int = 1 << 24) -> None:
    """All-reduce (mean) a list of tensors in place, in flat buckets of at most `bucket` values."""
    if world == 1:
        return
    for start, stop in _buckets(tensors, bucket):
        group = tensors[start:stop]
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _paired_losses(unet, scheduler, illegal, legal, size: int, seed: int, shared: bool):
    """Mean diffusion losses of an illegal and a legal batch, in one forward pass.

    With `shared`, both halves get the same timesteps and noise, so their difference measures
    the data rather than the sampling.
    """
    generator = torch.Generator().manual_seed(seed)
    illegal_latents, illegal_states = illegal.batch(size, generator)
    legal_latents, legal_states = legal.batch(size, generator)
    draws = size if shared else 2 * size
    noise, timesteps = draw_noise(scheduler, (draws, *illegal_latents.shape[1:]), generator)
    if shared:
        noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    latents = torch.cat([illegal_latents, legal_latents])
    problem = pose(scheduler, latents, noise, timesteps)
    prediction = predict(unet, problem, torch.cat([illegal_states, legal_states]))
    target = problem.target.to(prediction.device)
    per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    return per_example[:size].mean(), per_example[size:].mean()


def _fingerprint(config: LearnerConfig, names: list[str], data_key: str) -> str:
    """What a checkpoint must match to be resumed: the config, the tensors and the data."""
    record = {"config": dataclasses.asdict(config), "names": names, "data": data_key}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _write_tensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file written tensor by tensor, so no second copy of the model is built."""
    header, offset = {}, 0
    for name, t in tensors:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic.replacing(path) as temporary, temporary.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for _, t in tensors:
            cpu = t.detach().contiguous().cpu()
            handle.write(cpu.view(torch.uint8).numpy().data if cpu.numel() else b"")
        handle.flush()
        os.fsync(handle.fileno())
        _drop_cache(handle)


def _drop_cache(handle) -> None:
    """Tell the kernel this file's pages will not be read again soon.

    The store is read once per simulated-user restart; left in the page cache, two model-size
    copies crowd the training process, whose fresh gradient buffers then page-fault into reclaim
    (measured on an SD v1.5-size UNet on a 24 GiB machine: see benchmarks/learner.py).
    """
    if hasattr(os, "posix_fadvise"):  # Linux; elsewhere the cache is left to the kernel
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _read_into(path: Path, targets: list[tuple[str, torch.Tensor]]) -> None:
    """Read tensors of a file written by _write_tensors into existing tensors, in place.

    Plain reads rather than a memory map, so the file's pages do not join this process's
    resident memory (they stay reclaimable page cache).
    """
    records = {r.name: r for r in read_header(path)}
    with path.open("rb") as handle, torch.no_grad():
        for name, t in targets:
            record = records[name]
            buffer = t if t.device.type == "cpu" and t.is_contiguous() else torch.empty_like(
                t, device="cpu", memory_format=torch.contiguous_format)  # fmt: skip
            handle.seek(record.start)
            view = buffer.detach().reshape(-1).view(torch.uint8).numpy().data  # bytes, in place
            if handle.readinto(view) != record.end - record.start:
                raise DataError(f"{path} is truncated", hint="drop --resume")
            if buffer is not t:
                t.copy_(buffer)
        _drop_cache(handle)


def _named(prefix: str, names: list[str], tensors: list[torch.Tensor]):
    return [(prefix + n, t) for n, t in zip(names, tensors, strict=True)]


class _Store:
    """theta_ft and theta_d of the relearned model on disk, read back at every user restart."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "relearned.safetensors"

    def save(self, names, theta_ft, theta_d) -> None:
        _write_tensors(self.path, _named("ft.", names, theta_ft) + _named("d.", names, theta_d))

    def restart(self, names, params, theta_d, mask: list[_Factor]) -> None:
        """theta_d <- theta_pre - theta_ft; theta(m) <- theta_ft + m * theta_d (m per tensor)."""
        _read_into(self.path, _named("d.", names, theta_d) + _named("ft.", names, params))
        with torch.no_grad():
            for p, d, m in zip(params, theta_d, mask, strict=True):
                _add_scaled(p, d, m)


@dataclass(frozen=True)
class _Bilevel:
    """What both levels' steps are computed on, and how this process shares them with others."""

    unet: Any
    scheduler: Any
    illegal: Any  # EncodedData
    legal: Any
    config: LearnerConfig
    size: torch.Tensor  # float64: each unit's number of parameters
    weight: torch.Tensor  # float64: each unit's weight in share(m), by `config.share_by`
    world: int
    seed_base: int  # ranks draw different batches

    def losses(self, seed: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The illegal and the legal half's loss on batches drawn with `seed`."""
        return _paired_losses(self.unet, self.scheduler, self.illegal, self.legal,
                              self.config.batch_size, seed, shared)  # fmt: skip


@dataclass(frozen=True)
class _Checkpoint:
    """`state.json`: the upper level's state at a user restart, and what it was learned under."""

    fingerprint: str  # of the config, the tensors and the data (_fingerprint)
    round: int  # the first round still to compute
    logits: torch.Tensor  # w, float64
    mean_square: float  # the running mean of squared inner products, whose RMS divides them
    history: tuple[RoundLog, ...]

    def save(self, path: Path) -> None:
        atomic.write_json(path, {
            "fingerprint": self.fingerprint, "round": self.round, "logits": self.logits.tolist(),
            "mean_square": self.mean_square,
            "history": [dataclasses.asdict(h) for h in self.history],
        })  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> _Checkpoint:
        state = json.loads(path.read_text())
        return cls(
            fingerprint=state["fingerprint"],
            round=state["round"],
            logits=torch.tensor(state["logits"], dtype=torch.float64),
            mean_square=state["mean_square"],
            history=tuple(RoundLog(**h) for h in state["history"]),
        )


def learn_mask(
    unet,
    scheduler,
    illegal,
    legal,
    config: LearnerConfig,
    report: Callable[..., None] | None = None,
    workdir: Path | None = None,
    resume: bool = False,
    data_key: str = "",
) -> LearnedMask:
    """Algorithm 1 on a UNet whose parameters hold theta_pre; returns the binarised mask.

    `illegal` and `legal` are EncodedData (cached latents and text embeddings); `report` is a
    progress callback; `workdir` holds checkpoints (a temporary folder if None); with `resume`,
    a matching checkpoint there is continued. The UNet's parameters are left holding theta(m)
    of the final round. Settings it cannot honour raise DataError before anything is computed.

    relearn (or resume) -> for each round: restart the user every `user_reset_every` rounds ->
    the user's steps (lower level) -> the mask update (upper level) -> the binarised mask: per
    tensor, `frozen` and `logits`; per channel also `rows` (tensors frozen in part) and
    `row_logits`, with `logits` each tensor's mean row logit.
    """
    import tempfile

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="guardtune-learn-") as temporary:
            return learn_mask(unet, scheduler, illegal, legal, config, report, Path(temporary))
    _check(config)
    rank, world = _world()
    names = [n for n, _ in unet.named_parameters()]
    params = [p for _, p in unet.named_parameters()]
    for p in params:
        p.requires_grad_(True)
    units = _Units(params, by_row=config.granularity == "channel")
    weight = (
        units.size / units.size.sum()
        if config.share_by == "parameters"
        else torch.full_like(units.size, 1 / len(params))
    )
    problem = _Bilevel(unet, scheduler, illegal, legal, config, units.size, weight, world,
                       seed_base=config.seed * 7919 + rank * 104_729)  # fmt: skip
    store = _Store(workdir)
    state_path = workdir / "state.json"
    key = _fingerprint(config, names, data_key)

    theta_d: list[torch.Tensor] | None = None
    checkpoint = _resume(state_path, key, store, config) if resume else None
    if checkpoint is not None:
        if report:
            report(advance=config.relearn_steps + checkpoint.round)
    else:
        theta_d = _relearn(problem, names, params, store, rank, report)
        checkpoint = _Checkpoint(key, 0, _initial_logits(config, units.count), 0.0, ())
        if rank == 0:  # after the store: a checkpoint always has the weights it refers to
            checkpoint.save(state_path)
    _barrier(world)
    start, logits, mean_square = checkpoint.round, checkpoint.logits, checkpoint.mean_square
    history = list(checkpoint.history)

    if theta_d is None:  # filled from the store at the first restart
        theta_d = [torch.empty_like(p) for p in params]
    steps = _InBackward(params, theta_d, world, units=units)
    try:
        mask = torch.sigmoid(logits / config.temperature)
        # The UNet holds theta(m) for the mask `applied`. A mask step does not move the weights to
        # the new mask; the next user step's lift-and-lower does it on the way (it passes over every
        # weight anyway), so a round costs one pass over the model fewer.
        applied = mask
        for round_index in range(start, config.rounds):
            if round_index % config.user_reset_every == 0 or round_index == start:
                if round_index > start and rank == 0:
                    checkpoint = _Checkpoint(key, round_index, logits, mean_square, tuple(history))
                    checkpoint.save(state_path)
                _restart_user(store, names, steps, mask, config.user_lr)
                applied = mask
            _user_steps(problem, steps, round_index, mask, applied)
            applied = mask  # the user's steps moved theta(m) on to `mask`
            logits, mean_square, log = _mask_update(problem, steps, round_index, logits, mask,
                                                    mean_square)  # fmt: skip
            mask = torch.sigmoid(logits / config.temperature)
            history.append(log)
            if report:
                report(illegal=log.illegal_loss, legal=log.legal_loss, share=log.mask_share)
        _follow(steps, applied, mask)  # the UNet ends holding theta(m) of the last mask
    finally:
        steps.remove()  # the UNet leaves without guardtune's hooks
    if world > 1:  # every rank must have taken the same mask steps
        reference = logits.to(params[0].device)  # NCCL only moves device tensors
        torch.distributed.broadcast(reference, 0)
        if not torch.equal(reference.cpu(), logits):
            raise RuntimeError(f"rank {rank}'s mask differs from rank 0's")
    if rank == 0:
        _Checkpoint(key, config.rounds, logits, mean_square, tuple(history)).save(state_path)
    if not units.by_row:
        scores = dict(zip(names, logits.tolist(), strict=True))
        sizes = {n: p.numel() for n, p in zip(names, params, strict=True)}
        frozen = freeze_top(scores, sizes, config.ratio, config.share_by)
        return LearnedMask(frozen, scores, history)
    row_logits = units.names(names, logits)
    row_sizes = {n: p.numel() // max(r, 1) for n, p, r in zip(names, params, units.rows,
                                                             strict=True)}  # fmt: skip
    frozen, rows = freeze_top_rows(row_logits, row_sizes, config.ratio)
    # The log keeps one number per tensor: its rows' mean.
    means = {n: sum(v) / max(len(v), 1) for n, v in row_logits.items()}
    return LearnedMask(frozen, means, history, rows, row_logits)


def _check(config: LearnerConfig) -> None:
    """Refuse settings the learner cannot honour, each in one line."""
    if config.user_reset_every < 1:
        raise DataError("user_reset_every must be at least 1 (the number of rounds: no restarts)")
    if config.granularity not in GRANULARITIES:
        raise DataError(f"granularity must be one of {GRANULARITIES}, not {config.granularity!r}")
    if config.granularity == "channel" and config.share_by != "parameters":
        raise DataError("a mask per channel needs share_by='parameters': a share of tensors does "
                        "not say how much of a tensor its rows count for")  # fmt: skip
    if config.horizon is not None and config.horizon < config.user_reset_every:
        raise DataError(f"horizon ({config.horizon}) must be at least user_reset_every "
                        f"({config.user_reset_every}): a user step or more per round")  # fmt: skip


def _schedule(config: LearnerConfig, round_index: int) -> tuple[int, int]:
    """The user steps of a round: the index of its first (counted over the run) and how many.

    Without a horizon, `user_steps` each. With one, round k of a restart of R rounds takes the
    user from floor(H k / R) to floor(H (k + 1) / R) steps since the restart, so a restart's
    mask steps are spread over its user's whole H steps (module docstring). Both are functions of
    the round alone, so a resumed run draws the same batches.
    """
    if config.horizon is None:
        return round_index * config.user_steps, config.user_steps
    restart, k = divmod(round_index, config.user_reset_every)
    reached = [config.horizon * j // config.user_reset_every for j in (k, k + 1)]
    return restart * config.horizon + reached[0], reached[1] - reached[0]


def _initial_logits(config: LearnerConfig, count: int) -> torch.Tensor:
    """w at round 0, near m = 0 so that theta(m) ~ theta_ft.

    Sec. 3.3 draws random negative w; we start them equal by default, because a random start is
    a ranking that 150 mask steps do not undo: with a spread of 0.2 the learned 30% mask
    protected no better than random freezing, with none it did (embedded scenario, p = 0.3).
    """
    generator = torch.Generator().manual_seed(config.seed)
    spread = torch.rand(count, generator=generator, dtype=torch.float64)
    return -1.0 - config.init_spread * spread


def _resume(state_path: Path, key: str, store: _Store, config: LearnerConfig) -> _Checkpoint | None:
    """The checkpoint in the work folder, if there is one; refused if made under other settings."""
    if not state_path.is_file():
        return None
    checkpoint = _Checkpoint.load(state_path)
    if checkpoint.fingerprint != key:
        raise DataError(
            f"the checkpoint in {state_path.parent} was made with other settings, data or model",
            hint="drop --resume or use another --work-dir",
        )
    if not store.path.is_file() and checkpoint.round < config.rounds:
        raise DataError(f"{store.path} is missing; cannot resume", hint="drop --resume")
    return checkpoint


def _relearn(
    problem: _Bilevel,
    names: list[str],
    params,
    store: _Store,
    rank: int,
    report: Callable[..., None] | None,
) -> list[torch.Tensor] | None:
    """theta_ft: the UNet's theta_pre fine-tuned on illegal + legal data, left in the UNet.

    Rank 0 writes theta_ft and theta_d = theta_pre - theta_ft to the store and returns theta_d;
    the other ranks return None and read theta_d from the store at the first user restart.
    theta_pre waits on disk meanwhile, so relearning holds no more memory than a plain
    fine-tune.
    """
    config = problem.config
    pretrained = store.path.with_name("pretrained.safetensors")
    if rank == 0:
        _write_tensors(pretrained, _named("", names, params))
    relearn = torch.optim.AdamW(params, lr=config.relearn_lr, weight_decay=0.0, fused=True)
    for step in range(config.relearn_steps):
        illegal_loss, legal_loss = problem.losses(problem.seed_base + step, shared=False)
        relearn.zero_grad(set_to_none=True)
        (illegal_loss + legal_loss).backward()
        _average([p.grad for p in params], problem.world)
        relearn.step()
        if report:
            report(relearn_loss=(illegal_loss + legal_loss).item())
    del relearn  # Adam's state goes before theta_d takes its place
    for p in params:
        p.grad = None
    if rank != 0:
        return None
    theta_d = [torch.empty_like(p) for p in params]
    _read_into(pretrained, _named("", names, theta_d))
    with torch.no_grad():
        torch._foreach_sub_(theta_d, [p.detach() for p in params])  # theta_pre - theta_ft
    store.save(names, params, theta_d)
    pretrained.unlink()
    return theta_d


def _restart_user(store: _Store, names: list[str], steps: _InBackward, mask, lr: float) -> None:
    """A fresh simulated user at theta_ft: theta(m) and theta_d from the store, a new Adam."""
    store.restart(names, steps.params, steps.theta_d, steps.units.per_tensor(mask))
    steps.restart_user(lr)


def _user_steps(problem: _Bilevel, steps: _InBackward, round_index: int, mask, applied) -> None:
    """Lower level (Eq. 7, 9, 10): the simulated user fine-tunes theta_ft through the mask.

    The UNet arrives holding theta(m) for the mask `applied` and leaves holding it for `mask`.
    """
    first, count = _schedule(problem.config, round_index)
    for user_step in range(first, first + count):
        seed = 1_000_000 + problem.seed_base + 2 * user_step
        illegal_loss, legal_loss = problem.losses(seed, shared=False)
        steps.user_step(illegal_loss + legal_loss, mask, applied)
        applied = mask
    _follow(steps, applied, mask)  # only if there were no user steps


def _mask_update(
    problem: _Bilevel,
    steps: _InBackward,
    round_index: int,
    logits: torch.Tensor,
    mask: torch.Tensor,
    mean_square: float,
) -> tuple[torch.Tensor, float, RoundLog]:
    """Upper level (Eq. 5, 6, 8): one gradient step on the logits; new logits and RMS state.

    The gradient for w_i is <dL_upper/dtheta(m)_i, theta_d,i>, divided by the unit's size and
    by the running RMS of those over rounds and units, plus the sparsity pull c * (share(m) - p),
    both times dm_i/dw_i = m_i (1 - m_i) / T.
    """
    config = problem.config
    # The same timesteps and noise for both halves; odd, where the user's seeds are even.
    seed = 1_000_001 + problem.seed_base + 2 * _schedule(config, round_index)[0]
    illegal_loss, legal_loss = problem.losses(seed, shared=True)
    inner = steps.inner_products(-illegal_loss + legal_loss).double()
    with torch.no_grad():
        losses = torch.stack([illegal_loss.detach(), legal_loss.detach()]).double()
        _average([inner, losses], problem.world)
        inner /= problem.size  # <dL/dtheta(m)_i, theta_d,i> / size
        mean_square = 0.9 * mean_square + 0.1 * float(inner.pow(2).mean())
        rms = math.sqrt(mean_square / (1 - 0.9 ** (round_index + 1))) + 1e-30
        share = float((mask * problem.weight).sum())
        gradient = (
            (inner / rms + config.sparsity_weight * (share - config.ratio))
            * mask
            * (1 - mask)
            / config.temperature
        )
        logits = logits - config.mask_lr * gradient
    return logits, mean_square, RoundLog(round_index, float(losses[0]), float(losses[1]), share)


def _follow(steps: _InBackward, applied: torch.Tensor, mask: torch.Tensor) -> None:
    """Move theta(m) from the mask `applied` to `mask` in place: + (m - m_applied) * theta_d."""
    if applied is mask:
        return
    changes = steps.units.per_tensor(mask - applied)
    with torch.no_grad():
        for p, d, change in zip(steps.params, steps.theta_d, changes, strict=True):
            _add_scaled(p, d, change)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
