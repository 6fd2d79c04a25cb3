"""The methods `evaluate` compares, as what each hands the user: frozen tensors, or new weights.

Freezing methods (full, random, blocks, freezeasguard) leave the weights as published and name
tensors the user cannot train; immunising methods (IMMA, UCE, PersGuard) change the weights and
freeze nothing; the combined defence (freezeasguard+uce) does both: its weights are the edited
model a publisher ships and its policy freezes part of them. Freezing methods are compared at
the same frozen-parameter share, the policy's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from guardtune.blocks import block_of
from guardtune.learn.binarize import fill_to_share, random_scores
from guardtune.rowranges import Ranges, count

COMBINED = "freezeasguard+uce"
# What `evaluate` compares unless told otherwise; the combined defence needs its edited model.
DEFAULT_METHODS = ("full", "random", "blocks", "freezeasguard", "imma", "uce", "persguard")
METHODS = (*DEFAULT_METHODS, COMBINED)
# Methods whose outcome depends on the seed beyond the user's fine-tune (they draw a mask).
SEEDED = ("random", "blocks")


@dataclass(frozen=True)
class Defense:
    """What the user starts from: `weights` replace the base UNet's (None: as published)."""

    method: str
    frozen: frozenset[str] = frozenset()
    weights: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    rows: dict[str, Ranges] = field(default_factory=dict, compare=False)  # frozen in part

    def frozen_share(self, numel: dict[str, int], heights: dict[str, int]) -> float:
        """Frozen parameters over all; a tensor frozen in part counts its frozen rows."""
        whole = sum(numel[n] for n in self.frozen)
        part = sum(numel[n] * count(r) / heights[n] for n, r in self.rows.items())
        return (whole + part) / sum(numel.values())


def random_mask(numel: dict[str, int], share: float, seed: int) -> frozenset[str]:
    """The paper's random-p baseline: tensors in a seeded random order, at a parameter share."""
    draw = random_scores(list(numel), seed)
    return fill_to_share(sorted(numel, key=lambda n: -draw[n]), numel, share)


def low_resolution_order(names: list[str]) -> list[str]:
    """Blocks from the bottom of the U outwards: mid, deepest down, deepest up, next pair, ..."""
    downs = sorted(
        {block_of(f"unet.{n}")[0] for n in names if n.startswith("down_blocks.")},
        key=lambda b: -int(b.split(".")[1]),
    )
    ups = sorted(
        {block_of(f"unet.{n}")[0] for n in names if n.startswith("up_blocks.")},
        key=lambda b: int(b.split(".")[1]),
    )
    order = ["mid_block"]
    for pair in zip(downs, ups, strict=False):
        order.extend(pair)
    order.extend(downs[len(ups) :] + ups[len(downs) :])
    return order


def blocks_mask(numel: dict[str, int], share: float, seed: int) -> frozenset[str]:
    """The structural rule: whole blocks along the low-resolution path, the rest at random.

    Blocks are frozen whole while the next one still fits under the share; the remainder is
    filled with tensors drawn at random from outside the frozen blocks.
    """
    total = sum(numel.values())
    members: dict[str, list[str]] = {}
    for name in numel:
        members.setdefault(block_of(f"unet.{name}")[0], []).append(name)
    frozen: set[str] = set()
    covered = 0
    for block in low_resolution_order(list(numel)):
        size = sum(numel[n] for n in members.get(block, []))
        if covered + size > share * total:
            break
        frozen.update(members.get(block, []))
        covered += size
    rest = [n for n in numel if n not in frozen]
    draw = random_scores(rest, seed)
    return fill_to_share(sorted(rest, key=lambda n: -draw[n]), numel, share, frozenset(frozen))


ATTENTION_PROJECTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


def attention_projections(names: list[str]) -> list[str]:
    """The parameters IMMA's defence may move: every attention layer's q, k, v and out."""
    return [n for n in names if ATTENTION_PROJECTION.search(n)]
