"""Decoding on device: the whole caption in one jitted `lax.while_loop`, no host round trips."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxcap.data import text
from jaxcap.models.captioner import Captioner


class Decoded(NamedTuple):
    tokens_BxL: jax.Array      # generated ids, <end> included, <pad> after it
    alpha_BxLxR: jax.Array     # attention weights of each generated token
    log_prob_B: jax.Array      # sum of log-probabilities of the generated tokens


def greedy_decode(model: Captioner, variables, images, max_len: int) -> Decoded:
    """Greedy decoding from <start>; stops early once every caption has produced <end>."""
    features = model.apply(variables, images, method=Captioner.encode)
    state, keys = model.apply(variables, features, method=Captioner.start)
    batch, regions = features.shape[0], features.shape[1]

    def cond(carry):
        t, _, _, done, *_ = carry
        return (t < max_len) & ~jnp.all(done)

    def body(carry):
        t, token, state, done, tokens, alphas, log_prob = carry
        state, logits, alpha = model.apply(variables, state, token, features, keys, method=Captioner.step)
        log_p = jax.nn.log_softmax(logits)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        log_prob = log_prob + jnp.where(done, 0.0, jnp.take_along_axis(log_p, nxt[:, None], 1)[:, 0])
        nxt = jnp.where(done, text.PAD, nxt)
        tokens = tokens.at[:, t].set(nxt)
        alphas = alphas.at[:, t].set(jnp.where(done[:, None], 0.0, alpha))
        return t + 1, nxt, state, done | (nxt == text.END), tokens, alphas, log_prob

    init = (jnp.int32(0), jnp.full((batch,), text.START, jnp.int32), state,
            jnp.zeros((batch,), bool), jnp.zeros((batch, max_len), jnp.int32),
            jnp.zeros((batch, max_len, regions), jnp.float32), jnp.zeros((batch,), jnp.float32))
    _, _, _, _, tokens, alphas, log_prob = jax.lax.while_loop(cond, body, init)
    return Decoded(tokens, alphas, log_prob)


def make_decoder(model: nn.Module, max_len: int, beam_size: int):
    """A jitted `(variables, images) -> Decoded` for the configured decoding method."""
    if beam_size != 1:
        raise NotImplementedError(
            f'model.beam_size={beam_size}: beam search is not implemented yet; use '
            '--config.model.beam_size=1 (greedy).')
    return jax.jit(lambda variables, images: greedy_decode(model, variables, images, max_len))
