"""Turning mask scores into exactly the requested frozen share, by parameters or by tensors.

Shared by the FreezeAsGuard learner (scores = mask logits) and the random baseline (scores =
a seeded permutation): tensors are frozen down the ranking until the share reaches p.
"""

from __future__ import annotations

SHARE_BY = ("parameters", "tensors")


def freeze_top(
    scores: dict[str, float], numel: dict[str, int], ratio: float, share_by: str
) -> list[str]:
    """Names of the highest-scoring tensors whose share (of parameters or tensors) reaches ratio."""
    if share_by not in SHARE_BY:
        raise ValueError(f"share_by must be one of {SHARE_BY}")
    if not 0.0 < ratio < 1.0:
        raise ValueError("the frozen ratio must be between 0 and 1")
    weight = numel if share_by == "parameters" else {name: 1 for name in numel}
    total = sum(weight.values())
    frozen, covered = [], 0
    for name in sorted(scores, key=lambda n: (-scores[n], n)):
        if covered >= ratio * total:
            break
        frozen.append(name)
        covered += weight[name]
    return sorted(frozen)


def random_scores(names: list[str], seed: int) -> dict[str, float]:
    """The paper's random-p baseline: a seeded random ranking of the tensors."""
    import torch

    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    return {names[index]: float(-rank) for rank, index in enumerate(order)}
