"""FreezeAsGuard's bilevel mask learner (paper Sec. 3, Algorithm 1, Appendix A).

One mask entry per UNet parameter tensor, m = sigmoid(w / T). The model the simulated user
trains is theta(m) = m * theta_pre + (1 - m) * theta_ft = theta_ft + m * theta_d, kept as the
UNet's own parameters, and theta_d = theta_pre - theta_ft is the only other copy of the weights
(Sec. 3.3: two copies instead of three).

- Relearn: theta_ft is theta_pre fine-tuned on illegal + legal data (what the authors' code does
  before learning the mask).
- Lower level (Eq. 7, 9, 10): the simulated user's steps on L_illegal + L_legal. The gradient
  with respect to theta_ft is g * (1 - m); the user's optimizer turns it into an update u, and
  theta_ft -= u means theta_d += u and theta(m) -= (1 - m) * u. The paper writes plain SGD; we
  use Adam, like the attacker the policy must withstand (deviation, see below).
- Upper level (Eq. 5, 6, 8): L_upper = -lambda1 * L_illegal + lambda2 * L_legal. Its gradient for
  w_i is <dL/dtheta(m)_i, theta_d,i> * m_i (1 - m_i) / T, computed for all tensors at once
  (foreach multiply, one concatenation, one segment sum), plus the sparsity term.

Deviations from the paper, each measured useful in ../shared/reference/feasibility-notes.md:
the illegal and legal halves of a mask step share timesteps and noise (so their loss difference
is not drowned by sampling noise); each tensor's inner product is divided by its size and by a
running RMS over rounds (so the step size means the same for every tensor and every model);
the sparsity pull is c * (share(m) - p), the gradient of c/2 * (share - p)^2, with share by
parameters or tensors; the simulated user is Adam. lambda1 = lambda2 = 1 because both halves of
every batch have the same size, which is the balance Sec. 3.1 asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from guardtune.learn.binarize import freeze_top


@dataclass(frozen=True)
class LearnerConfig:
    ratio: float = 0.3  # p, the share to freeze
    share_by: str = "parameters"  # or "tensors"
    relearn_steps: int = 200
    relearn_lr: float = 1e-4
    rounds: int = 150  # mask updates (K in Algorithm 1)
    user_steps: int = 4  # simulated-user steps per mask update (L in Algorithm 1)
    user_lr: float = 1e-5
    mask_lr: float = 0.05
    temperature: float = 0.2  # T
    sparsity_weight: float = 10.0  # c
    batch_size: int = 8  # per half (illegal, legal)
    seed: int = 0


@dataclass(frozen=True)
class RoundLog:
    round: int
    illegal_loss: float
    legal_loss: float
    mask_share: float  # share(m) of the continuous mask


@dataclass(frozen=True)
class LearnedMask:
    frozen: list[str]  # bare UNet parameter names
    logits: dict[str, float]
    history: list[RoundLog] = field(default_factory=list)


class _FlatDot:
    """Per-tensor inner products <a_i, b_i> for all tensors with three kernel launches."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.lengths = torch.tensor([t.numel() for t in tensors], device=tensors[0].device)

    def __call__(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        torch._foreach_mul_(a, b)  # a is consumed: it is a gradient we no longer need
        flat = torch.cat([t.reshape(-1) for t in a])
        return torch.segment_reduce(flat, "sum", lengths=self.lengths)


class _ForeachAdam:
    """Adam's update direction for a list of tensors, vectorised with foreach ops."""

    def __init__(self, like: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps=1e-8) -> None:
        self.exp_avg = [torch.zeros_like(t) for t in like]
        self.exp_avg_sq = [torch.zeros_like(t) for t in like]
        self.lr, self.betas, self.eps, self.step = lr, betas, eps, 0

    def update(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        self.step += 1
        beta1, beta2 = self.betas
        torch._foreach_lerp_(self.exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(self.exp_avg_sq, beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - beta2)
        denom = list(torch._foreach_sqrt(self.exp_avg_sq))
        torch._foreach_div_(denom, math.sqrt(1 - beta2**self.step))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_div_(denom, self.exp_avg)  # reuse: denom becomes 1 / direction
        torch._foreach_reciprocal_(denom)
        torch._foreach_mul_(denom, self.lr / (1 - beta1**self.step))
        return denom


def learn_mask(unet, scheduler, illegal, legal, config: LearnerConfig, report=None) -> LearnedMask:
    """Algorithm 1 on a UNet whose parameters hold theta_pre; returns the binarised mask.

    `illegal` and `legal` are EncodedData (cached latents and text embeddings); `report` is a
    progress callback. The UNet's parameters are left holding theta(m) of the final round.
    """
    from guardtune.train import diffusion_loss

    torch.manual_seed(config.seed)
    names = [n for n, _ in unet.named_parameters()]
    params = [p for _, p in unet.named_parameters()]
    for p in params:
        p.requires_grad_(True)
    numel = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    weight = (
        numel / numel.sum()
        if config.share_by == "parameters"
        else torch.full_like(numel, 1 / len(params))
    )

    def batch_loss(data, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        latents, states = data.batch(config.batch_size, generator)
        return diffusion_loss(unet, scheduler, latents, states, generator, None)

    # Relearn: theta_ft, the model fully fine-tuned on illegal + legal data.
    theta_d = [p.detach().clone() for p in params]  # theta_pre for now
    relearn = torch.optim.AdamW(params, lr=config.relearn_lr, weight_decay=0.0, fused=True)
    for step in range(config.relearn_steps):
        loss = batch_loss(illegal, 2 * step) + batch_loss(legal, 2 * step + 1)
        relearn.zero_grad(set_to_none=True)
        loss.backward()
        relearn.step()
        if report:
            report(phase=0, loss=loss.item())
    del relearn
    with torch.no_grad():
        torch._foreach_sub_(theta_d, [p.detach() for p in params])  # theta_pre - theta_ft

    # Start near m = 0 (Sec. 3.3: random negative w), theta(m) ~ theta_ft.
    generator = torch.Generator().manual_seed(config.seed)
    logits = -1.0 - 0.2 * torch.rand(len(params), generator=generator, dtype=torch.float64)
    mask = torch.sigmoid(logits / config.temperature)
    with torch.no_grad():
        torch._foreach_add_(params, torch._foreach_mul(theta_d, mask.tolist()))
    user = _ForeachAdam(params, config.user_lr)
    dot = _FlatDot(params)
    mean_square = 0.0
    history: list[RoundLog] = []
    seed_base = 1_000_000 + config.seed * 7919
    for round_index in range(config.rounds):
        # Lower level: the simulated user fine-tunes theta_ft through the mask.
        for user_step in range(config.user_steps):
            seed = seed_base + 4 * (round_index * config.user_steps + user_step)
            loss = batch_loss(illegal, seed) + batch_loss(legal, seed + 1)
            user_grads = torch.autograd.grad(loss, params)
            keep = (1.0 - mask).tolist()
            with torch.no_grad():
                scaled = list(torch._foreach_mul(user_grads, keep))  # dL/dtheta_ft = g * (1 - m)
                update = user.update(scaled)
                torch._foreach_add_(theta_d, update)  # theta_ft -= u
                torch._foreach_mul_(update, keep)
                torch._foreach_sub_(params, update)  # theta(m) -= (1 - m) * u
        # Upper level: the same timesteps and noise for both halves (shared seed).
        seed = seed_base + 3 + 4 * round_index * config.user_steps
        illegal_loss = batch_loss(illegal, seed)
        legal_loss = batch_loss(legal, seed)
        mask_grads = list(torch.autograd.grad(-illegal_loss + legal_loss, params))
        with torch.no_grad():
            inner = dot(mask_grads, theta_d).double() / numel  # <dL/dtheta(m)_i, theta_d,i> / size
            mean_square = 0.9 * mean_square + 0.1 * float(inner.pow(2).mean())
            rms = math.sqrt(mean_square / (1 - 0.9 ** (round_index + 1))) + 1e-30
            share = float((mask * weight).sum())
            gradient = (
                (inner / rms + config.sparsity_weight * (share - config.ratio))
                * mask
                * (1 - mask)
                / config.temperature
            )
            logits = logits - config.mask_lr * gradient
            new_mask = torch.sigmoid(logits / config.temperature)
            change = (new_mask - mask).tolist()
            torch._foreach_add_(params, torch._foreach_mul(theta_d, change))  # theta(m) moves
            mask = new_mask
        losses = (illegal_loss.item(), legal_loss.item())
        history.append(RoundLog(round_index, losses[0], losses[1], share))
        if report:
            report(phase=1, illegal=losses[0], legal=losses[1], share=share)
    scores = dict(zip(names, logits.tolist(), strict=True))
    sizes = dict(zip(names, [int(n) for n in numel.tolist()], strict=True))
    frozen = freeze_top(scores, sizes, config.ratio, config.share_by)
    return LearnedMask(frozen, scores, history)
