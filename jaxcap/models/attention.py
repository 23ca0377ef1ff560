"""Bahdanau (additive) attention over image regions."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class BahdanauAttention(nn.Module):
    """score_r = V tanh(W1 f_r + W2 h); alpha = softmax over regions; context = sum alpha_r f_r.

    The keys `W1 f` do not depend on the time step, so callers that attend many
    times over the same image compute them once with `project_keys` and pass them
    to `attend`; `__call__` does both, for one-off use.
    """
    units: int

    def setup(self):
        self.W1 = nn.Dense(self.units, name='W1')   # image regions -> keys
        self.W2 = nn.Dense(self.units, name='W2')   # decoder state -> query
        self.V = nn.Dense(1, name='V')              # energy -> score

    def project_keys(self, features_BxRxD: jax.Array) -> jax.Array:
        return self.W1(features_BxRxD)

    def attend(self, keys_BxRxA, values_BxRxD, query_BxH):
        """Returns (context_BxD, alpha_BxR) for one query per image."""
        energy_BxRxA = jnp.tanh(keys_BxRxA + self.W2(query_BxH)[:, None, :])
        scores_BxR = self.V(energy_BxRxA)[..., 0]
        alpha_BxR = jax.nn.softmax(scores_BxR, axis=-1)
        context_BxD = jnp.einsum('br,brd->bd', alpha_BxR, values_BxRxD)
        return context_BxD, alpha_BxR

    def __call__(self, features_BxRxD, query_BxH):
        return self.attend(self.project_keys(features_BxRxD), features_BxRxD, query_BxH)
