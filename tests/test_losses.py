"""Packed cross-entropy: the dense masked loss, computed on fewer rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import losses
from jaxcap.models import decoder

B, T, U, V = 6, 10, 8, 23


def _problem(seed, mask):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, U)).astype(np.float32)
    kernel = rng.normal(size=(U, V)).astype(np.float32)
    bias = rng.normal(size=(V,)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    return hidden, kernel, bias, targets, mask.astype(np.float32)


def _nll_float64(hidden, kernel, bias, targets, mask):
    logits = hidden.astype(np.float64) @ kernel + bias
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    return (nll * mask).sum()


def _packed(hidden, kernel, bias, targets, mask, buckets=4):
    logits_fn = functools.partial(decoder.project_logits, kernel_UxV=kernel, bias_V=bias)
    return losses.packed_cross_entropy(hidden, targets, mask, logits_fn, buckets)[0]


def _dense(hidden, kernel, bias, targets, mask):
    return losses.masked_cross_entropy(decoder.project_logits(hidden, kernel, bias), targets, mask)[0]


MASKS = {
    'captions of different lengths': np.arange(T)[None, :] < np.array([[1], [3], [4], [7], [9], [10]]),
    'scattered': np.random.default_rng(7).random((B, T)) < 0.3,
    'one token': np.eye(B, T, 3, dtype=bool),
    'every token': np.ones((B, T), bool),
    'no token': np.zeros((B, T), bool),
}


@pytest.mark.parametrize('name', list(MASKS))
def test_packed_loss_and_gradients_equal_the_dense_masked_loss(name):
    hidden, kernel, bias, targets, mask = _problem(0, MASKS[name])
    value, grads = jax.jit(jax.value_and_grad(_packed, argnums=(0, 1, 2)))(
        hidden, kernel, bias, targets, mask)
    np.testing.assert_allclose(value, _nll_float64(hidden, kernel, bias, targets, mask),
                               rtol=1e-5, atol=1e-5)
    dense_grads = jax.grad(_dense, argnums=(0, 1, 2))(hidden, kernel, bias, targets, mask)
    for got, want in zip(grads, dense_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Rows that carry no target get exactly no gradient.
    np.testing.assert_array_equal(np.asarray(grads[0])[mask == 0], 0.0)


def test_padding_values_cannot_leak_into_the_packed_loss():
    hidden, kernel, bias, targets, mask = _problem(1, MASKS['captions of different lengths'])
    # Huge states and out-of-range targets wherever the mask says "padding".
    wild = 1e3 * np.random.default_rng(3).normal(size=hidden.shape)
    garbage = np.where(mask[..., None] > 0, hidden, wild).astype(np.float32)
    wild_targets = np.where(mask > 0, targets, 10 ** 6).astype(np.int32)
    grad_fn = jax.jit(jax.value_and_grad(_packed, argnums=(0, 1, 2)))
    value, grads = grad_fn(hidden, kernel, bias, targets, mask)
    value2, grads2 = grad_fn(garbage, kernel, bias, wild_targets, mask)
    assert float(value) == float(value2)
    jax.tree.map(np.testing.assert_array_equal, grads, grads2)


@pytest.mark.parametrize('real_tokens, rows_projected', [(0, 15), (1, 15), (15, 15), (16, 30),
                                                         (31, 45), (45, 45), (46, 60), (60, 60)])
def test_only_the_smallest_bucket_holding_the_real_tokens_is_projected(real_tokens, rows_projected):
    # 60 rows in 4 buckets of 15: the projection sees the first bucket that fits.
    seen = []

    def logits_fn(hidden_NxU):
        jax.debug.callback(lambda n: seen.append(int(n)), hidden_NxU.shape[0])
        return hidden_NxU @ jnp.ones((U, V))

    mask = (np.arange(B * T) < real_tokens).reshape(B, T)[:, ::-1]  # real tokens at the ends
    hidden, _, _, targets, mask = _problem(2, mask)
    ce, count = jax.jit(functools.partial(losses.packed_cross_entropy, logits_fn=logits_fn,
                                          buckets=4))(hidden, targets, mask)
    jax.effects_barrier()
    assert seen == [rows_projected]
    assert int(count) == real_tokens
