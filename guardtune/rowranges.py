"""Row ranges: the part of a tensor a channel-granular policy freezes.

A weight's rows are its output channels (dim 0: a linear layer's output features, a
convolution's output channels); a bias or norm vector's rows are its entries. A policy that
freezes part of a tensor lists the frozen rows as half-open ranges `[start, stop)`, sorted,
disjoint and not touching (so one set of rows has exactly one spelling, and signs to the same
bytes). The learner (`guardtune.learn`), the policy (`guardtune.trust.policy`), enforcement
(`guardtune.enforce`) and `audit` all speak this form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Ranges = tuple[tuple[int, int], ...]


def ranges_of(rows: Iterable[int]) -> Ranges:
    """The canonical ranges covering exactly `rows` (any order, repeats allowed)."""
    ranges: list[list[int]] = []
    for row in sorted(set(rows)):
        if row < 0:
            raise ValueError(f"row {row} is negative")
        if ranges and ranges[-1][1] == row:
            ranges[-1][1] = row + 1
        else:
            ranges.append([row, row + 1])
    return tuple((start, stop) for start, stop in ranges)


def count(ranges: Ranges) -> int:
    """How many rows the ranges cover."""
    return sum(stop - start for start, stop in ranges)


def height(shape: Sequence[int]) -> int:
    """How many rows a tensor of `shape` has: its size along dim 0 (a 0-d tensor is one row)."""
    return shape[0] if len(shape) else 1


def problem(ranges: Sequence[Sequence[int]], height: int | None = None) -> str | None:
    """Why `ranges` is not canonical (within `height` rows, if given), or None if it is."""
    previous = -1
    for pair in ranges:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return "each range must be two integers [start, stop)"
        if not all(type(x) is int for x in pair):  # bool is an int, but no row number
            return "each range must be two integers [start, stop)"
        start, stop = pair
        if start < 0 or stop <= start:
            return f"range [{start}, {stop}) is empty or negative"
        if start <= previous:
            return "ranges must be sorted, disjoint and not touching"
        if height is not None and stop > height:
            return f"range [{start}, {stop}) passes the tensor's {height} rows"
        previous = stop
    if not ranges:
        return "no rows are listed"
    return None
