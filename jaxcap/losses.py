"""Losses: masked token cross-entropy (dense, and packed to skip padding) and the attention penalty."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# Packed cross-entropy computes logits for the first k/PACK_BUCKETS of the rows,
# the smallest k that holds every real token: one compiled branch per k.
PACK_BUCKETS = 8


def masked_cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
    """Sum of per-token cross-entropy over unmasked tokens, and their count.

    `jnp.where`, not a multiplication, so that whatever a padded position
    computes (even inf or NaN) cannot leak into the loss or its gradient.
    """
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    return jnp.where(mask_BxT > 0, ce_BxT, 0.0).sum(), mask_BxT.sum()


def packed_cross_entropy(hidden_BxTxU, targets_BxT, mask_BxT,
                         logits_fn: Callable[[jax.Array], jax.Array], buckets: int = PACK_BUCKETS):
    """`masked_cross_entropy(logits_fn(hidden), ...)`, projecting only the rows that count.

    The vocabulary projection and its softmax are a third of a training step at
    the reference's shapes, and padding is a large share of the rows (about 40%
    of the reference's batches; most of a COCO batch padded to 35 tokens). Real
    tokens are moved to the front, and `logits_fn` runs on the smallest of
    `buckets` static row counts (n/buckets, 2n/buckets, ..., n) that holds them
    all, picked at run time by `lax.switch`. Rows past the last real token
    within the bucket are masked with `jnp.where`, as in the dense loss, so the
    value and gradients are the dense loss' up to the order of the sum.
    Returns (sum of cross-entropy, number of real tokens).
    """
    hidden_NxU = hidden_BxTxU.reshape(-1, hidden_BxTxU.shape[-1])
    targets_N, valid_N = targets_BxT.reshape(-1), mask_BxT.reshape(-1) > 0
    count = valid_N.sum()
    # Real rows first, each group in its original order.
    order_N = jnp.argsort(jnp.logical_not(valid_N), stable=True)
    sizes = bucket_sizes(targets_N.shape[0], buckets)

    def loss_over_first(size: int):
        def branch(hidden_NxU, targets_N, valid_N, order_N):
            picked = order_N[:size]
            return masked_cross_entropy(logits_fn(hidden_NxU[picked]), targets_N[picked],
                                        valid_N[picked])[0]
        return branch

    index = jnp.searchsorted(jnp.asarray(sizes), count)  # first size >= count
    ce_sum = jax.lax.switch(index, [loss_over_first(size) for size in sizes],
                            hidden_NxU, targets_N, valid_N, order_N)
    return ce_sum, mask_BxT.sum()


def bucket_sizes(rows: int, buckets: int = PACK_BUCKETS) -> list[int]:
    """The row counts `packed_cross_entropy` compiles a branch for: ceil(rows * k / buckets)."""
    return sorted({-(-rows * k // buckets) for k in range(1, buckets + 1)})


def packed_rows(real_tokens: int, rows: int, buckets: int = PACK_BUCKETS) -> int:
    """How many rows `packed_cross_entropy` projects for `real_tokens` of `rows`."""
    return next(size for size in bucket_sizes(rows, buckets) if size >= real_tokens)


def attention_penalty(alpha_BxTxR, mask_BxT):
    """Doubly stochastic attention (Show, Attend and Tell): every region attended ~once in total."""
    return attention_penalty_sum(alpha_BxTxR, mask_BxT) / alpha_BxTxR.shape[0]


def attention_penalty_sum(alpha_BxTxR, mask_BxT):
    total_BxR = jnp.where(mask_BxT[..., None] > 0, alpha_BxTxR, 0.0).sum(axis=1)
    return ((1.0 - total_BxR) ** 2).sum()
