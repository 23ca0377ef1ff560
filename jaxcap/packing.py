"""Running a computation on the real rows of a padded array, at one of a few static sizes.

XLA needs static shapes, so "only the rows that count" becomes: move them to the
front (in order), and run on the smallest of `buckets` row counts (n/buckets,
2n/buckets, ..., n) that holds them all, picked at run time by `lax.switch`,
one compiled branch per count. The rows past the last real one within the
bucket are whatever sorted after them; callers make them count for nothing.
The loss uses it for the vocabulary projection (`jaxcap.losses`), the
recurrence's backward pass for its weight gradients (`jaxcap.models.decoder`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PACK_BUCKETS = 8


def bucket_sizes(rows: int, buckets: int = PACK_BUCKETS) -> list[int]:
    """The row counts `over_packed_rows` compiles a branch for: ceil(rows * k / buckets)."""
    return sorted({-(-rows * k // buckets) for k in range(1, buckets + 1)})


def packed_rows(real: int, rows: int, buckets: int = PACK_BUCKETS) -> int:
    """How many of `rows` rows `over_packed_rows` runs on when `real` of them are real."""
    return next(size for size in bucket_sizes(rows, buckets) if size >= real)


def over_packed_rows(fn: Callable[[jax.Array], Any], real_N, buckets: int = PACK_BUCKETS):
    """fn(picked): `picked` indexes the real rows (`real_N`) first, at a bucket's size.

    `fn` indexes its own (jax) arrays with `picked`, a traced index array.
    """
    order_N = jnp.argsort(jnp.logical_not(real_N), stable=True)   # real rows first, in order
    sizes = bucket_sizes(real_N.shape[0], buckets)
    index = jnp.searchsorted(jnp.asarray(sizes), real_N.sum())    # first size >= real rows
    return jax.lax.switch(index, [lambda order_N, size=size: fn(order_N[:size]) for size in sizes],
                          order_N)
