"""Bahdanau (additive) attention over image regions."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class DenseParams(nn.Module):
    """The parameters of `nn.Dense(features)`, returned instead of applied.

    Same names, shapes, initialisers and creation order as `nn.Dense`, so the
    parameter tree (and its initial values) is exactly a Dense layer's; callers
    get the raw kernel so they can fuse it with other matmuls that share an input.
    """
    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param('kernel', nn.initializers.lecun_normal(), (in_features, self.features))
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
        return kernel, bias


class BahdanauAttention(nn.Module):
    """score_r = V tanh(W1 f_r + W2 h); alpha = softmax over regions; context = sum alpha_r f_r.

    The keys `W1 f` do not depend on the time step, so callers that attend many
    times over the same image compute them once with `project_keys` and pass them
    to `attend`; `__call__` does both, for one-off use. `query_weights` and
    `score_weights` hand out W2 and V so that a decoder can fuse W2 with other
    matmuls on the same hidden state and call `attend_projected` itself.

    Attributes:
      units: size of the keys and queries (W1/W2 outputs).
      dtype: compute dtype of the key projection (parameters stay float32).
    """
    units: int
    dtype: Any = jnp.float32

    def setup(self):
        self.W1 = nn.Dense(self.units, dtype=self.dtype, name='W1')   # image regions -> keys
        self.W2 = DenseParams(self.units, name='W2')                   # decoder state -> query
        self.V = DenseParams(1, name='V')                              # energy -> score

    def project_keys(self, features_BxRxD: jax.Array) -> jax.Array:
        return self.W1(features_BxRxD)

    def query_weights(self, query_dim: int) -> tuple[jax.Array, jax.Array]:
        """W2's (kernel_HxA, bias_A)."""
        return self.W2(query_dim)

    def score_weights(self) -> tuple[jax.Array, jax.Array]:
        """V as (kernel_A, scalar bias): one score per region."""
        kernel, bias = self.V(self.units)
        return kernel[:, 0], bias[0]

    def attend(self, keys_BxRxA, values_BxRxD, query_BxH):
        """Returns (context_BxD, alpha_BxR) for one query per image."""
        kernel, bias = self.query_weights(query_BxH.shape[-1])
        query_BxA = jnp.dot(query_BxH.astype(self.dtype), kernel.astype(self.dtype),
                            preferred_element_type=jnp.float32) + bias
        return attend_projected(keys_BxRxA, values_BxRxD, query_BxA, *self.score_weights())

    def __call__(self, features_BxRxD, query_BxH):
        return self.attend(self.project_keys(features_BxRxD), features_BxRxD, query_BxH)


def attend_projected(keys_BxRxA, values_BxRxD, query_NxA, score_kernel_A, score_bias):
    """Context and weights from projected keys and query (pure: scan bodies call it).

    N may be a multiple K of the B images (beam search's K hypotheses per
    image, rows b*K to b*K + K - 1 on image b): each image's keys and values are
    then read once for its K queries, not from K copies. Softmax runs in float32
    whatever the compute dtype. Returns (context_NxD, alpha_NxR).
    """
    batch, rows = keys_BxRxA.shape[0], query_NxA.shape[0]
    if rows == batch:
        scores_BxR = additive_scores(keys_BxRxA, query_NxA, score_kernel_A, score_bias)
        alpha_BxR = jax.nn.softmax(scores_BxR, axis=-1)
        context_BxD = jnp.einsum('br,brd->bd', alpha_BxR.astype(values_BxRxD.dtype), values_BxRxD,
                                 preferred_element_type=jnp.float32)
        return context_BxD, alpha_BxR
    query_BxKxA = query_NxA.reshape(batch, rows // batch, -1)
    energy_BxKxRxA = _energy(keys_BxRxA[:, None], query_BxKxA)
    scores_BxKxR = _sum_in_blocks(energy_BxKxRxA * score_kernel_A.astype(jnp.float32)) + score_bias
    alpha_BxKxR = jax.nn.softmax(scores_BxKxR, axis=-1)
    context_BxKxD = jnp.einsum('bkr,brd->bkd', alpha_BxKxR.astype(values_BxRxD.dtype), values_BxRxD,
                               preferred_element_type=jnp.float32)
    return context_BxKxD.reshape(rows, -1), alpha_BxKxR.reshape(rows, -1)


def attend_columns(keys_AxRxB, values_RxDxB, query_AxB, score_kernel_A, score_bias):
    """`attend_projected` with the batch as the last axis of every array, for decoding loops.

    Decoding keeps its state laid out (features, batch) (`jaxcap.models.decoder.column_step`),
    so the query arrives as (A, B) and the context leaves as (D, B). The keys
    come as (A, R, B), so that the energy's sum over A adds whole (R, B) slabs:
    greedy decoding ran 1.04x as fast as with the keys (R, A, B), bitwise equal
    (BENCHMARKS.md, round 10). Returns (context_DxB, alpha_RxB).
    """
    energy_AxRxB = jnp.tanh(keys_AxRxB.astype(jnp.float32) + query_AxB[:, None, :])
    scores_RxB = (jnp.sum(energy_AxRxB * score_kernel_A.astype(jnp.float32)[:, None, None], axis=0)
                  + score_bias)
    alpha_RxB = jax.nn.softmax(scores_RxB, axis=0)
    # A multiply-and-sum, not a dot: a dot would batch over the minor axis.
    context_DxB = jnp.sum(alpha_RxB[:, None, :] * values_RxDxB.astype(jnp.float32), axis=0)
    return context_DxB, alpha_RxB


def _sum_in_blocks(x, block: int = 32):
    """jnp.sum(x, axis=-1) as sums of `block` consecutive elements, then those added in order.

    XLA:CPU rewrites a sum over more than 32 elements into a windowed sum (a
    reduce-window of 32, then a reduce) that does not fuse with the ops that
    compute its input: beam search's energy, 19 MB a step at batch 64, was
    written out and read back. A sum over at most 32 fuses with them, and so do
    the adds of its partial sums; the barrier keeps XLA from merging the two
    sums back into one. Batch-64 beam-3 decoding ran 1.06-1.09x as fast
    (BENCHMARKS.md, round 10). A float32 sum in another order. CPU only: on an
    H200 the plain sum ran beam search 1.05x as fast (round 11).
    """
    size = x.shape[-1]
    if size <= block or size % block or jax.default_backend() != 'cpu':
        return jnp.sum(x, axis=-1)
    partial = jax.lax.optimization_barrier(
        jnp.sum(x.reshape(x.shape[:-1] + (size // block, block)), axis=-1))
    total = partial[..., 0]
    for i in range(1, size // block):
        total = total + partial[..., i]
    return total


@jax.checkpoint
def additive_scores(keys_BxRxA, query_BxA, score_kernel_A, score_bias):
    """V tanh(keys + query) per region, recomputed (not stored) for the backward pass.

    The (B, R, A) energy is the largest tensor of a decoder step: stored for the
    backward pass it would be T of them (218 MB per reference batch, written and
    read back), while recomputing it costs one fused add+tanh per step. A
    multiply-and-sum, not a (.., A) x (A, 1) matmul, so that XLA can fuse add,
    tanh, multiply and the sum over A into one pass. (XLA:CPU splits a sum over
    more than 32 units into a reduce-window that does not fuse, and writes the
    energy out; summed in blocks, as beam search does (`_sum_in_blocks`), the
    train step ran 1.01x as fast, not worth other float32 digits in training.)
    """
    energy_BxRxA = _energy(keys_BxRxA, query_BxA)
    return jnp.sum(energy_BxRxA * score_kernel_A.astype(jnp.float32), axis=-1) + score_bias


def _energy(keys_BxRxA, query_BxA):
    return jnp.tanh(keys_BxRxA.astype(jnp.float32) + query_BxA[..., None, :])


def scores_backward(keys_BxRxA, query_BxA, score_kernel_A, d_scores_BxR, d_keys_acc_BxRxA):
    """The gradients of `additive_scores` for a hand-written backward pass.

    Recomputes the energy instead of reading a stored one. Returns (d_query_BxA,
    d_keys_acc + d_keys, d_score_kernel_A); the keys' gradient is added to a
    running sum because the same keys serve every time step.
    """
    energy_BxRxA = _energy(keys_BxRxA, query_BxA)
    d_energy_BxRxA = (d_scores_BxR[..., None] * score_kernel_A.astype(jnp.float32)
                      * (1.0 - energy_BxRxA * energy_BxRxA))
    d_kernel_A = jnp.einsum('br,bra->a', d_scores_BxR, energy_BxRxA)
    return d_energy_BxRxA.sum(axis=1), d_keys_acc_BxRxA + d_energy_BxRxA, d_kernel_A


def softmax_backward(alpha_BxR, d_alpha_BxR):
    """d scores from d alpha, for alpha = softmax(scores) over the last axis."""
    return alpha_BxR * (d_alpha_BxR - jnp.sum(alpha_BxR * d_alpha_BxR, axis=-1, keepdims=True))
