"""The decoder: one step cell (attend, embed, LSTM, LSTM), run over time by `nn.scan`.

Training (teacher forcing) and inference call the same `step`, so a trained model
decodes with exactly the function it was trained with.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models.attention import BahdanauAttention


class LSTMCell(nn.Module):
    """Keras-layout LSTM cell: fused gates in Keras order (i, f, c, o), forget bias 1.

    One `kernel` (input) and one `recurrent_kernel` matmul produce all four gates,
    which is both faster than four small matmuls and the layout Keras weights use.
    """
    units: int

    @nn.compact
    def __call__(self, carry, x):
        h, c = carry
        kernel = self.param('kernel', nn.initializers.glorot_uniform(), (x.shape[-1], 4 * self.units))
        recurrent = self.param('recurrent_kernel', nn.initializers.orthogonal(), (self.units, 4 * self.units))
        bias = self.param('bias', _unit_forget_bias, (4 * self.units,))
        z = x @ kernel + h @ recurrent + bias
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return h, c


def _unit_forget_bias(key, shape, dtype=jnp.float32):
    """Zeros, except ones for the forget gate (Keras' unit_forget_bias)."""
    del key
    units = shape[0] // 4
    return jnp.zeros(shape, dtype).at[units:2 * units].set(1.0)


class DecoderState(NamedTuple):
    """Both LSTM layers' (h, c); all zeros at the start, as in the reference."""
    h1: jax.Array
    c1: jax.Array
    h2: jax.Array
    c2: jax.Array


class Decoder(nn.Module):
    """Attention LSTM decoder: attends with the top layer's previous h (Show, Attend and Tell)."""
    vocab_size: int
    embed_dim: int
    units: int
    attention_units: int

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.embed_dim, name='embedding')
        self.attention = BahdanauAttention(self.attention_units, name='attention')
        self.lstm1 = LSTMCell(self.units, name='lstm1')
        self.lstm2 = LSTMCell(self.units, name='lstm2')
        self.out = nn.Dense(self.vocab_size, name='logits')

    def initial_state(self, batch_size: int) -> DecoderState:
        zeros = jnp.zeros((batch_size, self.units), jnp.float32)
        return DecoderState(zeros, zeros, zeros, zeros)

    def attention_keys(self, features_BxRxD):
        return self.attention.project_keys(features_BxRxD)

    def step(self, state: DecoderState, token_B, features_BxRxD, keys_BxRxA):
        """One time step. Returns (new state, (top hidden h2_BxU, alpha_BxR))."""
        context_BxD, alpha_BxR = self.attention.attend(keys_BxRxA, features_BxRxD, state.h2)
        x = jnp.concatenate([context_BxD, self.embed(token_B)], axis=-1)
        h1, c1 = self.lstm1((state.h1, state.c1), x)
        h2, c2 = self.lstm2((state.h2, state.c2), h1)
        return DecoderState(h1, c1, h2, c2), (h2, alpha_BxR)

    def logits(self, hidden_BxU):
        return self.out(hidden_BxU)

    def __call__(self, features_BxRxD, tokens_BxT):
        """Teacher forcing: feeds tokens[:, t] at step t. Returns logits_BxTxV, alpha_BxTxR."""
        keys_BxRxA = self.attention_keys(features_BxRxD)
        scan = nn.scan(
            _scan_body,
            variable_broadcast='params',
            split_rngs={'params': False},
            in_axes=(1, nn.broadcast, nn.broadcast),
            out_axes=1)
        state = self.initial_state(tokens_BxT.shape[0])
        _, (hidden_BxTxU, alpha_BxTxR) = scan(self, state, tokens_BxT, features_BxRxD, keys_BxRxA)
        # The vocabulary projection does not feed back into the recurrence, so it
        # runs once over all steps after the scan: one big matmul, not T small ones.
        return self.logits(hidden_BxTxU), alpha_BxTxR


def _scan_body(decoder: Decoder, state, token_B, features_BxRxD, keys_BxRxA):
    return decoder.step(state, token_B, features_BxRxD, keys_BxRxA)
