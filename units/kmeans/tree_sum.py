"""Sums over numbered blocks in one fixed order, whoever holds which blocks.

Floating-point addition is not associative, so a sum over data spread across workers
depends on how the data was spread, unless the order of additions is fixed by the data
alone. Here it is: blocks ``0 .. n-1`` are the leaves of a binary tree of fixed shape, a
node's value is ``left + right`` (just ``left`` where the right subtree holds no block), and
the result is the root. A worker holding a contiguous range of blocks sends the values of
the largest tree nodes inside its range (at most ``2 log2 n`` of them), and the driver
rebuilds the root from whatever nodes it receives. Every worker count gives the same
expression tree, so the same bits: k-means centroids are identical on 1 or 100 workers.

Values are anything with ``+``: numpy arrays, Python floats, or tuples/dicts of them through
:func:`add`.

Example:
    >>> xs = [0.1, 0.2, 0.3, 0.4, 0.5]
    >>> one = root(nodes(dict(enumerate(xs)), 0, 5), 5)
    >>> two = root(nodes({0: .1, 1: .2}, 0, 2) + nodes({2: .3, 3: .4, 4: .5}, 2, 5), 5)
    >>> one == two
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: A tree node: (level, index). It covers blocks [index << level, (index + 1) << level).
Node = tuple[int, int]


def add(a: Any, b: Any) -> Any:
    """Adds two values of the same structure (dicts and tuples element by element)."""
    if isinstance(a, dict):
        return {k: add(a[k], b[k]) for k in a}
    if isinstance(a, tuple):
        return tuple(add(x, y) for x, y in zip(a, b, strict=True))
    return a + b


def _span(node: Node, n_blocks: int) -> tuple[int, int]:
    level, index = node
    return index << level, min((index + 1) << level, n_blocks)


def cover(lo: int, hi: int, n_blocks: int) -> list[Node]:
    """The largest tree nodes that together cover blocks ``[lo, hi)``, left to right."""
    out, pos = [], lo
    while pos < hi:
        level = 0
        # Grow while the node stays aligned and its (clipped) span stays inside [lo, hi).
        while pos % (1 << (level + 1)) == 0 and min(pos + (1 << (level + 1)), n_blocks) <= hi:
            if (1 << level) >= n_blocks:
                break
            level += 1
        out.append((level, pos >> level))
        pos = _span((level, pos >> level), n_blocks)[1]
    return out


def _value(node: Node, known: Mapping[Node, Any], n_blocks: int, combine: Callable) -> Any:
    if node in known:
        return known[node]
    level, index = node
    if level == 0:
        raise KeyError(f"block {index} is missing from the partial sums")
    left = _value((level - 1, 2 * index), known, n_blocks, combine)
    right_node = (level - 1, 2 * index + 1)
    if _span(right_node, n_blocks)[0] >= n_blocks:
        return left
    return combine(left, _value(right_node, known, n_blocks, combine))


def nodes(
    blocks: Mapping[int, Any], lo: int, hi: int, n_blocks: int | None = None, combine=add
) -> list[tuple[Node, Any]]:
    """The values of the nodes covering ``[lo, hi)``, from the per-block values ``blocks``.

    Args:
        blocks: Block index to value, for every block in ``[lo, hi)``.
        lo: First block of the range.
        hi: End of the range.
        n_blocks: Blocks in the whole tree (default ``hi``: the range ends the data).
        combine: How two values add.
    """
    n_blocks = hi if n_blocks is None else n_blocks
    known = {(0, i): v for i, v in blocks.items()}
    return [(node, _value(node, known, n_blocks, combine)) for node in cover(lo, hi, n_blocks)]


def root(parts: list[tuple[Node, Any]], n_blocks: int, combine=add) -> Any:
    """The sum over all ``n_blocks`` blocks from node values that partition them."""
    if n_blocks <= 0:
        raise ValueError("nothing to sum: no blocks")
    known = dict(parts)
    top = max(0, (n_blocks - 1).bit_length())
    return _value((top, 0), known, n_blocks, combine)
