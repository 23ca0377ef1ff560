"""The decoder: one step function (attend, LSTM, LSTM), run over time by `jax.lax.scan`.

Training (teacher forcing) and inference run the same step function (`_step_forward`) on
the same parameters, so a trained model decodes with exactly the function it was
trained with.

Speed: everything that does not depend on the time step runs outside the loop.
The attention keys `W1 f` are computed once per image; the word embeddings' half
of the first LSTM's input projection is one matmul over all steps (its kernel is
the embedding rows of `lstm1/kernel`, sliced, so the parameter layout stays
Keras'); the vocabulary projection runs once after the loop. Inside the loop,
matmuls that read the same input are fused: the previous top hidden state feeds
the attention query (W2) and the second LSTM's recurrent term in one matmul, and
[context, h1] meets the first LSTM's context rows and recurrent kernel in one.
The loop body is a pure function of arrays (no Flax module inside the scan).

Teacher forcing differentiates through `recurrence`, whose backward pass is
written by hand (`_recurrence_bwd`): the reverse loop does only the per-step
work, and every weight gradient is then one matmul over all steps. The attention
energy tanh(keys + query), the largest per-step tensor, is recomputed there
rather than stored. tests/test_models.py checks the gradients against autodiff
through the step that decoding runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models.attention import (BahdanauAttention, DenseParams, attend_projected,
                                     scores_backward, softmax_backward)


def _dot(x, kernel):
    """x @ kernel in the kernel's (compute) dtype, accumulated and returned in float32."""
    return jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)


def _dot_transposed(x_BxJ, kernel_IxJ):
    """x @ kernel.T in the kernel's (compute) dtype, float32 out, computed as (kernel @ x.T).T.

    For the backward loop's matmuls (64 rows against a 2,048-2,560-deep kernel):
    with the product laid out (I, B), the kernel's rows first, XLA:CPU's matmul
    runs faster than with (B, I): the train step ran 1.04-1.10x as fast
    (BENCHMARKS.md, round 4), with bitwise-equal results. The barrier keeps XLA
    from folding the transpose back into the matmul, which would restore (B, I).
    """
    product_IxB = jnp.dot(kernel_IxJ, x_BxJ.astype(kernel_IxJ.dtype).T,
                          preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(product_IxB).T


def lstm_update(z_Bx4U, c_BxU):
    """(h, c) from the summed gate pre-activations, in Keras order (i, f, c, o)."""
    h, c, _ = _lstm_forward(z_Bx4U, c_BxU)
    return h, c


class LSTMCell(nn.Module):
    """Keras-layout LSTM cell: fused gates in Keras order (i, f, c, o), forget bias 1.

    One `kernel` (input) and one `recurrent_kernel` matmul produce all four gates,
    which is both faster than four small matmuls and the layout Keras weights use.
    `weights` hands the parameters out, so a decoder can fuse or hoist parts of
    the input projection; `__call__` is the plain cell.
    """
    units: int

    @nn.compact
    def weights(self, input_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(kernel_Ix4U, recurrent_kernel_Ux4U, bias_4U)."""
        kernel = self.param('kernel', nn.initializers.glorot_uniform(), (input_dim, 4 * self.units))
        recurrent = self.param('recurrent_kernel', nn.initializers.orthogonal(), (self.units, 4 * self.units))
        bias = self.param('bias', _unit_forget_bias, (4 * self.units,))
        return kernel, recurrent, bias

    def __call__(self, carry, x):
        h, c = carry
        kernel, recurrent, bias = self.weights(x.shape[-1])
        return lstm_update(x @ kernel + h @ recurrent + bias, c)


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


class StepWeights(NamedTuple):
    """The parameters one step uses, sliced and fused once per call (never per step).

    Kernels are in the compute dtype; biases stay float32.
    """
    h2_kernel: jax.Array       # (U, A + 4U): [attention W2 | lstm2 recurrent], both read h2(t-1)
    query_bias: jax.Array      # (A,) W2 bias
    score_kernel: jax.Array    # (A,) attention V
    score_bias: jax.Array      # () attention V bias
    lstm1_kernel: jax.Array    # (D + U, 4U): [lstm1 kernel's context rows ; lstm1 recurrent]
    lstm2_kernel: jax.Array    # (U, 4U) lstm2 input kernel
    lstm2_bias: jax.Array      # (4U,)


class InputWeights(NamedTuple):
    """The word half of the first LSTM's input projection (hoisted out of the loop)."""
    kernel: jax.Array          # (E, 4U): lstm1 kernel's embedding rows
    bias: jax.Array            # (4U,) lstm1 bias (added here, once, not per step)


class DecodingWeights(NamedTuple):
    """Every parameter a decoding step reads, prepared once per decoding call (`decode_step`)."""
    step: StepWeights
    words: InputWeights
    embedding: jax.Array       # (V, E) word embeddings
    out_kernel: jax.Array      # (U, V) vocabulary projection, in the compute dtype
    out_bias: jax.Array        # (V,), in the compute dtype (as `project_logits` casts it)
    # (V, 4U): `_word_gates` of every word, so that a step gathers its words'
    # rows instead of running a (B, E) x (E, 4U) matmul. None: computed per step.
    word_gates: jax.Array | None = None


class Decoder(nn.Module):
    """Attention LSTM decoder: attends with the top layer's previous h (Show, Attend and Tell).

    Attributes:
      vocab_size: output classes.
      embed_dim: word embedding size.
      units: LSTM units.
      attention_units: W1/W2 size.
      dtype: compute dtype of the matmuls ('bfloat16' for mixed precision);
        parameters, the recurrent state, gate arithmetic, softmaxes and the
        returned logits stay float32.
    """
    vocab_size: int
    embed_dim: int
    units: int
    attention_units: int
    dtype: Any = jnp.float32

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.embed_dim, name='embedding')
        self.attention = BahdanauAttention(self.attention_units, dtype=self.dtype, name='attention')
        self.lstm1 = LSTMCell(self.units, name='lstm1')
        self.lstm2 = LSTMCell(self.units, name='lstm2')
        # A Dense layer's parameters, applied by `project_logits`: the loss can
        # then project only some rows (`jaxcap.losses.packed_cross_entropy`).
        self.out = DenseParams(self.vocab_size, name='logits')

    def initial_state(self, batch_size: int) -> DecoderState:
        zeros = jnp.zeros((batch_size, self.units), jnp.float32)
        return DecoderState(zeros, zeros, zeros, zeros)

    def attention_keys(self, features_BxRxD):
        return self.attention.project_keys(features_BxRxD)

    def weights(self, feature_dim: int) -> tuple[StepWeights, InputWeights]:
        """Slices and fuses the parameters for `_step_forward` (the layout stays Keras')."""
        kernel1, recurrent1, bias1 = self.lstm1.weights(feature_dim + self.embed_dim)
        kernel2, recurrent2, bias2 = self.lstm2.weights(self.units)
        w2_kernel, w2_bias = self.attention.query_weights(self.units)
        v_kernel, v_bias = self.attention.score_weights()
        # The reference concatenates [context, embedding] into lstm1: the first
        # feature_dim rows of its kernel read the context, the rest the word.
        context_rows, word_rows = kernel1[:feature_dim], kernel1[feature_dim:]
        cast = lambda x: x.astype(self.dtype)  # noqa: E731
        step = StepWeights(
            h2_kernel=cast(jnp.concatenate([w2_kernel, recurrent2], axis=1)),
            query_bias=w2_bias, score_kernel=cast(v_kernel), score_bias=v_bias,
            lstm1_kernel=cast(jnp.concatenate([context_rows, recurrent1], axis=0)),
            lstm2_kernel=cast(kernel2), lstm2_bias=bias2)
        return step, InputWeights(cast(word_rows), bias1)

    def input_gates(self, tokens, weights: InputWeights):
        """The words' share of lstm1's gate pre-activations (any leading shape) -> (..., 4U)."""
        return _word_gates(self.embed(tokens), weights)

    def decoding_weights(self, feature_dim: int, word_gate_table: bool = False) -> DecodingWeights:
        """What `decode_step` reads: computed before a decoding loop, not in every step.

        `word_gate_table` adds `DecodingWeights.word_gates`: V x E x 4U multiply-adds
        and V x 4U floats (41 MB at the reference's sizes), which pay for themselves
        once some 140 captions are decoded with them (`jaxcap.decode.prepare`).
        """
        step_weights, input_weights = self.weights(feature_dim)
        kernel, bias = self.output_weights()
        embedding = self.embed.embedding
        return DecodingWeights(step_weights, input_weights, embedding,
                               kernel.astype(self.dtype), bias.astype(self.dtype),
                               _word_gates(embedding, input_weights) if word_gate_table else None)

    def step(self, state: DecoderState, token_B, features_BxRxD, keys_BxRxA):
        """One decoding step: (new state, logits_BxV, alpha_BxR)."""
        weights = self.decoding_weights(features_BxRxD.shape[-1])
        return decode_step(weights, state, token_B, features_BxRxD, keys_BxRxA)

    def output_weights(self) -> tuple[jax.Array, jax.Array]:
        """The vocabulary projection's (kernel_UxV, bias_V), for `project_logits`."""
        return self.out(self.units)

    def logits(self, hidden_BxU):
        """Vocabulary logits, float32 whatever the compute dtype (the loss needs the precision)."""
        return project_logits(hidden_BxU, *self.output_weights(), dtype=self.dtype)

    def __call__(self, features_BxRxD, tokens_BxT):
        """Teacher forcing: feeds tokens[:, t] at step t. Returns logits_BxTxV, alpha_BxTxR."""
        hidden_BxTxU, alpha_BxTxR = self.hidden_states(features_BxRxD, tokens_BxT)
        return self.logits(hidden_BxTxU), alpha_BxTxR

    def hidden_states(self, features_BxRxD, tokens_BxT):
        """Teacher forcing up to the top LSTM: hidden_BxTxU (the logits' input), alpha_BxTxR."""
        keys_BxRxA = self.attention_keys(features_BxRxD)
        step_weights, input_weights = self.weights(features_BxRxD.shape[-1])
        # Time-major, so the scan slices its input without a transpose of the big tensor.
        gates_TxBx4U = self.input_gates(tokens_BxT.T, input_weights)

        hidden_TxBxU, alpha_TxBxR = recurrence(step_weights, gates_TxBx4U, features_BxRxD,
                                               keys_BxRxA)
        # The vocabulary projection does not feed back into the recurrence, so it
        # runs after the scan, over all steps at once (`logits`), or only over the
        # rows the loss scores (`jaxcap.losses.packed_cross_entropy`).
        return hidden_TxBxU.swapaxes(0, 1), alpha_TxBxR.swapaxes(0, 1)


def project_logits(hidden_NxU, kernel_UxV, bias_V, dtype=jnp.float32):
    """hidden @ kernel + bias in the compute dtype (as `nn.Dense(dtype=...)`), returned in float32."""
    return _dot(hidden_NxU, kernel_UxV.astype(dtype)) + bias_V.astype(dtype)


def _word_gates(words_xE, weights: InputWeights):
    """Embedded words -> their share of lstm1's gate pre-activations, bias included."""
    return _dot(words_xE, weights.kernel) + weights.bias


def decode_step(weights: DecodingWeights, state: DecoderState, token_B, features_BxRxD, keys_BxRxA):
    """One decoding step, a pure function of prepared weights: (new state, logits_BxV, alpha_BxR).

    The step teacher forcing scans (`_step_forward`), fed the word's gates, then
    the vocabulary projection. Decoding loops call it with weights prepared once
    (`Decoder.decoding_weights`): XLA leaves some slices of loop-invariant
    parameters inside a while loop, to be redone every step.
    """
    if weights.word_gates is None:
        words_BxE = jnp.take(weights.embedding, token_B, axis=0)   # what nn.Embed computes
        gates_Bx4U = _word_gates(words_BxE, weights.words)
    else:
        gates_Bx4U = jnp.take(weights.word_gates, token_B, axis=0)
    state, (hidden_BxU, alpha_BxR), _ = _step_forward(weights.step, state, gates_Bx4U,
                                                      features_BxRxD, keys_BxRxA)
    logits_BxV = project_logits(hidden_BxU, weights.out_kernel, weights.out_bias,
                                weights.out_kernel.dtype)
    return state, logits_BxV, alpha_BxR


class _Saved(NamedTuple):
    """What the backward pass needs of one step, besides the states (stacked over time)."""
    query_BxA: jax.Array
    alpha_BxR: jax.Array
    context_BxD: jax.Array
    gates1: tuple[jax.Array, ...]   # lstm1's i, f, g, o after their nonlinearities
    gates2: tuple[jax.Array, ...]   # lstm2's


def _step_forward(weights: StepWeights, state: DecoderState, gates1_Bx4U, features_BxRxD,
                  keys_BxRxA):
    """attend with h2(t-1) -> lstm1([context, word]) -> lstm2; the words' gates come precomputed.

    Returns (new state, (h2, alpha_BxR), what the backward pass needs).
    """
    attention_units = weights.query_bias.shape[0]
    from_h2_BxAp4U = _dot(state.h2, weights.h2_kernel)
    query_BxA = from_h2_BxAp4U[:, :attention_units] + weights.query_bias
    recurrent2_Bx4U = from_h2_BxAp4U[:, attention_units:]
    context_BxD, alpha_BxR = attend_projected(keys_BxRxA, features_BxRxD, query_BxA,
                                              weights.score_kernel, weights.score_bias)
    context_h1 = jnp.concatenate([context_BxD, state.h1], axis=-1)
    h1, c1, gates1 = _lstm_forward(_dot(context_h1, weights.lstm1_kernel) + gates1_Bx4U, state.c1)
    h2, c2, gates2 = _lstm_forward(
        _dot(h1, weights.lstm2_kernel) + recurrent2_Bx4U + weights.lstm2_bias, state.c2)
    saved = _Saved(query_BxA, alpha_BxR, context_BxD, gates1, gates2)
    return DecoderState(h1, c1, h2, c2), (h2, alpha_BxR), saved


def _lstm_forward(z_Bx4U, c_BxU):
    """`lstm_update`, also returning the gate activations (i, f, g, o) for the backward pass."""
    i, f, g, o = jnp.split(z_Bx4U, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c_BxU + i * g
    return o * jnp.tanh(c), c, (i, f, g, o)


def _lstm_backward(gates, c_prev_BxU, c_BxU, d_h_BxU, d_c_BxU):
    """(d z_Bx4U, d c_prev) of `_lstm_forward`, from the gradients of its h and c."""
    i, f, g, o = gates
    tanh_c = jnp.tanh(c_BxU)
    d_c = d_c_BxU + d_h_BxU * o * (1.0 - tanh_c * tanh_c)
    d_z = jnp.concatenate([d_c * g * i * (1.0 - i), d_c * c_prev_BxU * f * (1.0 - f),
                           d_c * i * (1.0 - g * g), d_h_BxU * tanh_c * o * (1.0 - o)], axis=-1)
    return d_z, d_c * f


def _run(weights: StepWeights, gates1_TxBx4U, features_BxRxD, keys_BxRxA):
    """The scan over time from zero states: ((h2_TxBxU, alpha_TxBxR), (saved, states))."""
    batch, units = gates1_TxBx4U.shape[1], gates1_TxBx4U.shape[2] // 4
    zeros = jnp.zeros((batch, units), jnp.float32)

    def body(state, gates1_Bx4U):
        state, outputs, saved = _step_forward(weights, state, gates1_Bx4U, features_BxRxD, keys_BxRxA)
        return state, (outputs, saved, state)

    _, (outputs, saved, states) = jax.lax.scan(body, DecoderState(zeros, zeros, zeros, zeros),
                                                gates1_TxBx4U)
    return outputs, (saved, states)


@jax.custom_vjp
def recurrence(weights: StepWeights, gates1_TxBx4U, features_BxRxD, keys_BxRxA):
    """Teacher-forced steps from zero states: (h2_TxBxU, alpha_TxBxR).

    The same forward pass as autodiff through a scan of `_step_forward`, with a
    hand-written backward pass that is cheaper on the machine: the reverse scan
    computes only what depends on the time step (the gate, state and attention
    gradients) and emits the per-step gate gradients; each weight's gradient is
    then one matmul over all T*B rows (sum_t x_t^T dz_t), not T small matmuls each
    added into a running sum. Same for the features' gradient through the context.
    """
    return _run(weights, gates1_TxBx4U, features_BxRxD, keys_BxRxA)[0]


def _recurrence_fwd(weights, gates1_TxBx4U, features_BxRxD, keys_BxRxA):
    outputs, (saved, states) = _run(weights, gates1_TxBx4U, features_BxRxD, keys_BxRxA)
    return outputs, (weights, features_BxRxD, keys_BxRxA, saved, states)


def _shift(x_TxBxU):
    """x[t-1] at t, zeros at t = 0: the previous step's state (all start at zero)."""
    return jnp.concatenate([jnp.zeros_like(x_TxBxU[:1]), x_TxBxU[:-1]], axis=0)


def _sum_tb(x_TxBxI, dz_TxBxJ, dtype):
    """sum_t x_t^T dz_t in one matmul, in the compute dtype, accumulated in float32."""
    return jnp.einsum('tbi,tbj->ij', x_TxBxI.astype(dtype), dz_TxBxJ.astype(dtype),
                      preferred_element_type=jnp.float32)


def _recurrence_bwd(residuals, d_outputs):
    weights, features_BxRxD, keys_BxRxA, saved, states = residuals
    d_h2_TxBxU, d_alpha_TxBxR = d_outputs
    feature_dim = features_BxRxD.shape[-1]
    c1_prev, c2_prev = _shift(states.c1), _shift(states.c2)

    def body(carry, xs):
        d_h1, d_c1, d_h2, d_c2, d_keys, d_score_kernel = carry
        d_h2_ext, d_alpha_ext, s, c1, c1_prev, c2, c2_prev = xs
        d_z2, d_c2 = _lstm_backward(s.gates2, c2_prev, c2, d_h2 + d_h2_ext, d_c2)
        d_h1 = d_h1 + _dot_transposed(d_z2, weights.lstm2_kernel)
        d_z1, d_c1 = _lstm_backward(s.gates1, c1_prev, c1, d_h1, d_c1)
        d_context_h1 = _dot_transposed(d_z1, weights.lstm1_kernel)
        d_context = d_context_h1[:, :feature_dim]
        d_alpha = d_alpha_ext + jnp.einsum('bd,brd->br', d_context, features_BxRxD,
                                           preferred_element_type=jnp.float32)
        d_scores = softmax_backward(s.alpha_BxR, d_alpha)
        d_query, d_keys, d_v = scores_backward(keys_BxRxA, s.query_BxA, weights.score_kernel,
                                               d_scores, d_keys)
        d_from_h2 = jnp.concatenate([d_query, d_z2], axis=-1)
        d_h2_prev = _dot_transposed(d_from_h2, weights.h2_kernel)
        carry = (d_context_h1[:, feature_dim:], d_c1, d_h2_prev, d_c2, d_keys, d_score_kernel + d_v)
        return carry, (d_z1, d_from_h2, d_context, d_scores.sum())

    batch, units = states.h1.shape[1:]
    zeros = jnp.zeros((batch, units), jnp.float32)
    init = (zeros, zeros, zeros, zeros, jnp.zeros(keys_BxRxA.shape, jnp.float32),
            jnp.zeros(weights.score_kernel.shape, jnp.float32))
    xs = (d_h2_TxBxU, d_alpha_TxBxR, saved, states.c1, c1_prev, states.c2, c2_prev)
    carry, (d_z1, d_from_h2, d_context, d_score_bias) = jax.lax.scan(body, init, xs, reverse=True)
    _, _, _, _, d_keys, d_score_kernel = carry
    d_weights = _weight_grads(weights, saved, states, d_z1, d_from_h2, d_score_kernel,
                              d_score_bias.sum())
    d_features = _features_grad(saved.alpha_BxR, d_context, features_BxRxD.dtype)
    # d_z1 is also the gradient of the words' gates: autodiff takes it on to the embeddings.
    return d_weights, d_z1, d_features, d_keys.astype(keys_BxRxA.dtype)


def _weight_grads(weights: StepWeights, saved: _Saved, states: DecoderState, d_z1, d_from_h2,
                  d_score_kernel, d_score_bias) -> StepWeights:
    """Each weight's gradient as one matmul over all steps and rows."""
    dtype, attention_units = weights.lstm1_kernel.dtype, weights.query_bias.shape[0]
    context_h1 = jnp.concatenate([saved.context_BxD, _shift(states.h1)], axis=-1)
    d_z2 = d_from_h2[..., attention_units:]
    return StepWeights(
        h2_kernel=_sum_tb(_shift(states.h2), d_from_h2, dtype).astype(dtype),
        query_bias=d_from_h2[..., :attention_units].sum(axis=(0, 1)),
        score_kernel=d_score_kernel.astype(weights.score_kernel.dtype),
        score_bias=d_score_bias,
        lstm1_kernel=_sum_tb(context_h1, d_z1, dtype).astype(dtype),
        lstm2_kernel=_sum_tb(states.h1, d_z2, dtype).astype(dtype),
        lstm2_bias=d_z2.sum(axis=(0, 1)))


def _features_grad(alpha_TxBxR, d_context_TxBxD, dtype):
    """sum_t alpha_t (x) d_context_t, per image: one batched matmul over the steps."""
    return jnp.einsum('tbr,tbd->brd', alpha_TxBxR, d_context_TxBxD,
                      preferred_element_type=jnp.float32).astype(dtype)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
