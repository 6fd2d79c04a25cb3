"""Turning mask scores into exactly the requested frozen share, by parameters or by tensors.

The FreezeAsGuard learner freezes down its ranking (the mask logits) until the share reaches p,
as the paper binarises: of tensors (`freeze_top`), or with a mask per channel of rows
(`freeze_top_rows`, whose answer is whole tensors and the rows of the rest, as
guardtune.rowranges spells them). Baselines that only need to sit at a given share (random-p in
`publish` and `evaluate`, the structural rule in `evaluate`) fill it instead: tensors in their
order while they fit, then the one landing closest, so one large tensor cannot overshoot it by
several points.
"""

from __future__ import annotations

from guardtune.rowranges import Ranges, ranges_of

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


def freeze_top_rows(
    scores: dict[str, list[float]], row_sizes: dict[str, int], ratio: float
) -> tuple[list[str], dict[str, Ranges]]:
    """The highest-scoring rows whose share of parameters reaches ratio.

    `scores` holds each tensor's row scores in row order, `row_sizes` the parameters in each of
    its rows. Rows tied on score go by tensor name, then row, so one ranking has one answer.
    Returns the tensors all of whose rows are chosen (sorted names: freezing them whole is the
    same freezing, in the form every reader knows) and, for the others with rows chosen, those
    rows as canonical ranges.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError("the frozen ratio must be between 0 and 1")
    total = sum(len(rows) * row_sizes[name] for name, rows in scores.items())
    ranking = sorted(
        (-score, name, row) for name, rows in scores.items() for row, score in enumerate(rows)
    )
    chosen: dict[str, list[int]] = {}
    covered = 0
    for _, name, row in ranking:
        if covered >= ratio * total:
            break
        chosen.setdefault(name, []).append(row)
        covered += row_sizes[name]
    whole = sorted(name for name, rows in chosen.items() if len(rows) == len(scores[name]))
    part = {name: ranges_of(rows) for name, rows in sorted(chosen.items())
            if len(rows) < len(scores[name])}  # fmt: skip
    return whole, part


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
