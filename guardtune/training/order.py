"""The order a fine-tune draws its examples in: epochs, and aspect-ratio buckets.

Every example is seen once per epoch, as with a shuffled DataLoader, but the order is a pure
function of (seed, batch number): batch k of the run (counted over steps, micro-batches and
processes, see `batch_number`) comes from a generator seeded with (seed, epoch). So a resumed
run, or one on more processes, takes exactly the examples an unbroken run would, with nothing
to checkpoint.

- `EpochOrder`: one permutation of all examples per epoch, cut into batches in turn.
- `BucketOrder` (`finetune --enable-bucket`): batches never mix latent shapes, so each
  bucket's examples are permuted and cut into batches of their own (the last one of a bucket
  may be smaller), and the epoch's batches are then shuffled together, as kohya's scripts do.
  `bucket_sizes` and `assign_buckets` make kohya's buckets: sizes that are multiples of a step,
  of about the training area, each image in the bucket nearest its aspect ratio.

Used by the fine-tune recipe.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def batch_number(step: int, micro: int, rank: int, grad_accum: int, processes: int) -> int:
    """The run's batch count before micro-batch `micro` of `step` on process `rank`."""
    return (step * grad_accum + micro) * processes + rank


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class EpochOrder:
    def __init__(self, examples: int, seed: int, batch_size: int = 1) -> None:
        self.examples, self.seed, self.batch_size = examples, seed, batch_size
        self._epoch, self._permutation = -1, torch.empty(0, dtype=torch.long)

    @property
    def batches_per_epoch(self) -> Fraction:
        return Fraction(self.examples, self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = _generator(self.seed, epoch)
            self._permutation = torch.randperm(self.examples, generator=generator)
            self._epoch = epoch
        return self._permutation

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Examples of draws start .. start + count - 1 of the run."""
        picked = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.examples)
            picked.append(int(self.permutation(epoch)[offset]))
        return torch.tensor(picked, dtype=torch.long)

    def batch(self, number: int) -> torch.Tensor:
        return self.indices(number * self.batch_size, self.batch_size)


class BucketOrder:
    def __init__(self, bucket_of_example: torch.Tensor, seed: int, batch_size: int) -> None:
        self.seed, self.batch_size = seed, batch_size
        self.members = [
            torch.nonzero(bucket_of_example == b).flatten()
            for b in sorted(set(bucket_of_example.tolist()))
        ]
        self._epoch, self._batches = -1, [torch.empty(0, dtype=torch.long)]

    @property
    def batches_per_epoch(self) -> Fraction:
        return Fraction(sum(math.ceil(len(m) / self.batch_size) for m in self.members))

    def batches(self, epoch: int) -> list[torch.Tensor]:
        if epoch != self._epoch:
            generator = _generator(self.seed, epoch)
            batches = []
            for members in self.members:
                shuffled = members[torch.randperm(len(members), generator=generator)]
                batches += list(torch.split(shuffled, self.batch_size))
            order = torch.randperm(len(batches), generator=generator).tolist()
            self._epoch, self._batches = epoch, [batches[i] for i in order]
        return self._batches

    def batch(self, number: int) -> torch.Tensor:
        epoch, offset = divmod(number, int(self.batches_per_epoch))
        return self.batches(epoch)[offset]


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """(width, height) buckets: multiples of `step`, sides within [min_side, max_side], area at
    most resolution², both orientations, and the square."""
    area = resolution * resolution
    side = max(step, resolution // step * step)
    sizes = {(side, side)}
    for width in range(max(step, min_side // step * step), max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def assign_buckets(
    image_sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]
) -> torch.Tensor:
    """For each (width, height), the bucket of nearest aspect ratio (the larger on a tie)."""
    ratios = torch.tensor([math.log(w / h) for w, h in buckets])
    areas = torch.tensor([w * h for w, h in buckets], dtype=torch.float64)
    chosen = []
    for width, height in image_sizes:
        distance = (ratios - math.log(width / height)).abs()
        nearest = torch.nonzero(distance <= distance.min() + 1e-9).flatten()
        chosen.append(int(nearest[areas[nearest].argmax()]))
    return torch.tensor(chosen, dtype=torch.long)
