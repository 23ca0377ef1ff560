"""Losses: masked token cross-entropy (dense, and packed to skip padding) and the attention penalty."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxcap.packing import PACK_BUCKETS, over_packed_rows


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
    # jax arrays, which `loss_over` can index with a traced `picked`.
    hidden_NxU = jnp.asarray(hidden_BxTxU).reshape(-1, hidden_BxTxU.shape[-1])
    targets_N, valid_N = jnp.asarray(targets_BxT).reshape(-1), jnp.asarray(mask_BxT).reshape(-1) > 0

    def loss_over(picked):
        return masked_cross_entropy(logits_fn(hidden_NxU[picked]), targets_N[picked],
                                    valid_N[picked])[0]

    return over_packed_rows(loss_over, valid_N, buckets), mask_BxT.sum()


def attention_penalty(alpha_BxTxR, mask_BxT):
    """Doubly stochastic attention (Show, Attend and Tell): every region attended ~once in total."""
    return attention_penalty_sum(alpha_BxTxR, mask_BxT) / alpha_BxTxR.shape[0]


def attention_penalty_sum(alpha_BxTxR, mask_BxT):
    total_BxR = jnp.where(mask_BxT[..., None] > 0, alpha_BxTxR, 0.0).sum(axis=1)
    return ((1.0 - total_BxR) ** 2).sum()
