"""Turning mask scores into exactly the requested frozen share, by parameters or by tensors.

The FreezeAsGuard learner freezes down its ranking (the mask logits) until the share reaches p,
as the paper binarises. Baselines that only need to sit at a given share (random-p in `publish`
and `evaluate`, the structural rule in `evaluate`) fill it instead: tensors in their order while
they fit, then the one landing closest, so one large tensor cannot overshoot it by several points.
"""

from __future__ import annotations

SHARE_BY = ("parameters", "tensors")


def share_weights(numel: dict[str, int], share_by: str) -> dict[str, int]:
    """What each tensor counts towards the share: its size, or 1 for a share of tensors."""
    if share_by not in SHARE_BY:
        raise ValueError(f"share_by must be one of {SHARE_BY}")
    return numel if share_by == "parameters" else dict.fromkeys(numel, 1)


def freeze_top(
    scores: dict[str, float], numel: dict[str, int], ratio: float, share_by: str
) -> list[str]:
    """Names of the highest-scoring tensors whose share (of parameters or tensors) reaches ratio."""
    if not 0.0 < ratio < 1.0:
        raise ValueError("the frozen ratio must be between 0 and 1")
    weight = share_weights(numel, share_by)
    total = sum(weight.values())
    frozen, covered = [], 0
    for name in sorted(scores, key=lambda n: (-scores[n], n)):
        if covered >= ratio * total:
            break
        frozen.append(name)
        covered += weight[name]
    return sorted(frozen)


def fill_to_share(
    order: list[str], numel: dict[str, int], share: float, frozen: frozenset[str] = frozenset()
) -> frozenset[str]:
    """Add tensors in `order` while they fit under the share, then the one landing closest.

    `numel` weighs each tensor (its size for a share of parameters, 1 for a share of tensors).
    A first random baseline froze down its order until the share was passed, and one draw of the
    embedded model landed at 35% for a 30% policy; filling keeps every freezing method within a
    bias vector's size of the same share.
    """
    target = share * sum(numel.values())
    chosen = set(frozen)
    covered = sum(numel[n] for n in chosen)
    for name in order:
        if name not in chosen and covered + numel[name] <= target:
            chosen.add(name)
            covered += numel[name]
    rest = [n for n in order if n not in chosen]
    if rest:
        closest = min(rest, key=lambda n: abs(covered + numel[n] - target))
        if abs(covered + numel[closest] - target) < target - covered:
            chosen.add(closest)
    return frozenset(chosen)


def random_scores(names: list[str], seed: int) -> dict[str, float]:
    """The paper's random-p baseline: a seeded random ranking of the tensors."""
    import torch

    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    return {names[index]: float(-rank) for rank, index in enumerate(order)}
