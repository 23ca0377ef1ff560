"""The decoder: one step function (attend, LSTM, LSTM), run over time by `jax.lax.scan`.

Training (teacher forcing), beam search and `Decoder.step` run the same step
function (`_step_forward`) on the same parameters, so a trained model decodes with
exactly the function it was trained with. Greedy decoding runs the same step
written batch-last (`column_step`), which is faster on CPU: the same numbers up
to the order of float32 sums, which tests/test_decode.py checks.

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
rather than stored. Training tells it how many steps each caption needs: rows
are sorted by that, and the loops run in phases of fewer and fewer rows, so a
batch's padding (about 40% of the reference's) is mostly never computed.
tests/test_models.py checks the gradients against autodiff through the step
that decoding runs, and the phased recurrence against the full one.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap import packing
from jaxcap.models.attention import (BahdanauAttention, DenseParams, attend_columns,
                                     attend_projected, scores_backward, softmax_backward)


def _dot(x, kernel):
    """x @ kernel in the kernel's (compute) dtype, accumulated and returned in float32."""
    return jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)


def _dot_left(kernel_IxJ, x_JxB):
    """kernel @ x in the kernel's (compute) dtype, accumulated and returned in float32."""
    return jnp.dot(kernel_IxJ, x_JxB.astype(kernel_IxJ.dtype), preferred_element_type=jnp.float32)


def _dot_transposed(x_BxJ, kernel_IxJ):
    """x @ kernel.T in the kernel's (compute) dtype, float32 out, computed as (kernel @ x.T).T.

    For the training loop's matmuls (8-64 rows against a 512-2,560-deep kernel):
    with the product laid out (I, B), the kernel's rows first, XLA:CPU's matmul
    runs faster than with (B, I): in the backward loop, the train step ran
    1.04-1.10x as fast (BENCHMARKS.md, round 4), with bitwise-equal results;
    the forward loop, see `_transposed_kernels`. The barrier keeps XLA
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


class TransposedKernels(NamedTuple):
    """The decoding step's kernels transposed, outputs first, for `column_step` and `logits_VxB`."""
    h2: jax.Array              # (A + 4U, U) StepWeights.h2_kernel.T
    lstm1: jax.Array           # (4U, D + U) StepWeights.lstm1_kernel.T
    lstm2: jax.Array           # (4U, U) StepWeights.lstm2_kernel.T
    words: jax.Array           # (4U, E) InputWeights.kernel.T
    out: jax.Array             # (V, U) the vocabulary projection's kernel.T


class DecodingWeights(NamedTuple):
    """Every parameter a decoding step reads, prepared once per decoding call (`decode_step`)."""
    step: StepWeights
    words: InputWeights
    embedding: jax.Array       # (V, E) word embeddings
    out_kernel: jax.Array      # (U, V) vocabulary projection, in the compute dtype
    out_bias: jax.Array        # (V,), in the compute dtype (as `project_logits` casts it)
    kernels_T: TransposedKernels   # the same kernels transposed, for `column_step`
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
        kernel = kernel.astype(self.dtype)
        embedding = self.embed.embedding
        kernels_T = TransposedKernels(*_transposed_kernels(step_weights), words=input_weights.kernel.T,
                                      out=kernel.T)
        return DecodingWeights(
            step_weights, input_weights, embedding, out_kernel=kernel, out_bias=bias.astype(self.dtype),
            kernels_T=kernels_T,
            word_gates=_word_gates(embedding, input_weights) if word_gate_table else None)

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

    def hidden_states(self, features_BxRxD, tokens_BxT, steps_B=None):
        """Teacher forcing up to the top LSTM: hidden_BxTxU (the logits' input), alpha_BxTxR.

        `steps_B`: how many steps each caption needs (its real targets); the
        steps after them are not computed, and come out zero. The rows are
        sorted by it for `recurrence`, and back.
        """
        if steps_B is not None:
            steps_B = jnp.clip(jnp.asarray(steps_B, jnp.int32), 0, tokens_BxT.shape[1])
            order_B = jnp.argsort(-steps_B, stable=True)
            features_BxRxD, tokens_BxT, steps_B = (jnp.take(x, order_B, axis=0) for x in
                                                   (features_BxRxD, tokens_BxT, steps_B))
        keys_BxRxA = self.attention_keys(features_BxRxD)
        step_weights, input_weights = self.weights(features_BxRxD.shape[-1])
        # Time-major, so the loop slices its input without a transpose of the big tensor.
        gates_TxBx4U = self.input_gates(tokens_BxT.T, input_weights)

        hidden_TxBxU, alpha_TxBxR = recurrence(step_weights, gates_TxBx4U, features_BxRxD,
                                               keys_BxRxA, steps_B)
        if steps_B is not None:
            unsort_B = jnp.argsort(order_B)
            hidden_TxBxU, alpha_TxBxR = hidden_TxBxU[:, unsort_B], alpha_TxBxR[:, unsort_B]
        # The vocabulary projection does not feed back into the recurrence, so it
        # runs after the loop, over all steps at once (`logits`), or only over the
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
    parameters inside a while loop, to be redone every step. The state and
    tokens may have K rows per image (beam search: rows b*K to b*K + K - 1 on
    image b), which attend over one copy of each image's regions.
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


def column_step(weights: DecodingWeights, state_UxB: DecoderState, token_B, features_RxDxB,
                keys_AxRxB):
    """`decode_step` up to the top LSTM, every array laid out (features, batch): (new state, alpha_RxB).

    The state's h and c are (U, B), the regions (R, D, B), the keys (A, R, B);
    the top hidden state, `new_state.h2`, is what `logits_VxB` projects. With
    the kernels as the left operand (`TransposedKernels`) XLA:CPU's matmul does
    not repack megabytes of weights for every product of a few rows: a loop of
    one such product ran 1.7x as fast at 64 rows, and in this layout nothing is
    transposed inside the loop (transposed products in the batch-first layout
    gained nothing: XLA then reads the products transposed in every fusion).
    The same numbers as `decode_step`, up to the order of float32 sums.
    """
    kernels_T, step = weights.kernels_T, weights.step
    attention_units = step.query_bias.shape[0]
    if weights.word_gates is None:
        words_ExB = jnp.take(weights.embedding, token_B, axis=0).T
        gates1_4UxB = _dot_left(kernels_T.words, words_ExB) + weights.words.bias[:, None]
    else:
        gates1_4UxB = jnp.take(weights.word_gates, token_B, axis=0).T
    from_h2 = _dot_left(kernels_T.h2, state_UxB.h2)
    query_AxB = from_h2[:attention_units] + step.query_bias[:, None]
    context_DxB, alpha_RxB = attend_columns(keys_AxRxB, features_RxDxB, query_AxB,
                                            step.score_kernel, step.score_bias)
    context_h1 = jnp.concatenate([context_DxB, state_UxB.h1], axis=0)
    h1, c1, _ = _lstm_forward(_dot_left(kernels_T.lstm1, context_h1) + gates1_4UxB, state_UxB.c1,
                              axis=0)
    h2, c2, _ = _lstm_forward(_dot_left(kernels_T.lstm2, h1) + from_h2[attention_units:]
                              + step.lstm2_bias[:, None], state_UxB.c2, axis=0)
    return DecoderState(h1, c1, h2, c2), alpha_RxB


def logits_VxB(weights: DecodingWeights, hidden_UxB):
    """`project_logits` laid out (V, B), the vocabulary first: out_kernel.T @ hidden.

    For `column_step`'s hidden state and a consumer that reduces over the
    vocabulary (greedy decoding's argmax and logsumexp), which then runs across
    the batch's contiguous columns.
    """
    return _dot_left(weights.kernels_T.out, hidden_UxB) + weights.out_bias[:, None]


class _Saved(NamedTuple):
    """What the backward pass needs of one step, besides the states (stacked over time)."""
    query_BxA: jax.Array
    alpha_BxR: jax.Array
    context_BxD: jax.Array
    gates1: tuple[jax.Array, ...]   # lstm1's i, f, g, o after their nonlinearities
    gates2: tuple[jax.Array, ...]   # lstm2's


def _step_forward(weights: StepWeights, state: DecoderState, gates1_Bx4U, features_BxRxD,
                  keys_BxRxA, kernels_T: tuple[jax.Array, ...] | None = None):
    """attend with h2(t-1) -> lstm1([context, word]) -> lstm2; the words' gates come precomputed.

    `kernels_T`: the step's three kernels transposed (`_transposed_kernels`),
    for the same products computed as (kernel.T @ x.T).T (`_dot_transposed`).
    Returns (new state, (h2, alpha_BxR), what the backward pass needs).
    """
    attention_units = weights.query_bias.shape[0]
    if kernels_T is None:
        dot_h2, dot1, dot2 = (functools.partial(_dot, kernel=kernel) for kernel in
                              (weights.h2_kernel, weights.lstm1_kernel, weights.lstm2_kernel))
    else:
        dot_h2, dot1, dot2 = (functools.partial(_dot_transposed, kernel_IxJ=kernel_T)
                              for kernel_T in kernels_T)
    from_h2_BxAp4U = dot_h2(state.h2)
    query_BxA = from_h2_BxAp4U[:, :attention_units] + weights.query_bias
    recurrent2_Bx4U = from_h2_BxAp4U[:, attention_units:]
    context_BxD, alpha_BxR = attend_projected(keys_BxRxA, features_BxRxD, query_BxA,
                                              weights.score_kernel, weights.score_bias)
    context_h1 = jnp.concatenate([context_BxD, state.h1], axis=-1)
    h1, c1, gates1 = _lstm_forward(dot1(context_h1) + gates1_Bx4U, state.c1)
    h2, c2, gates2 = _lstm_forward(
        dot2(h1) + recurrent2_Bx4U + weights.lstm2_bias, state.c2)
    saved = _Saved(query_BxA, alpha_BxR, context_BxD, gates1, gates2)
    return DecoderState(h1, c1, h2, c2), (h2, alpha_BxR), saved


def _transposed_kernels(weights: StepWeights) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The step's kernels transposed once per call, for `_step_forward` in the training loop.

    There the products come out faster as (kernel.T @ x.T).T: with the kernel
    as the left operand, XLA:CPU's matmul does not repack 4-6 MB of weights for
    every product of a few rows. A loop of the step's three products ran 1.3x as
    fast at 64 rows and 3.8x at 8 (the last phases of `_run`); the transposes
    cost ~10 ms a train step. Decoding stores them in its `TransposedKernels`.
    """
    return weights.h2_kernel.T, weights.lstm1_kernel.T, weights.lstm2_kernel.T


def _lstm_forward(z_Bx4U, c_BxU, axis: int = -1):
    """`lstm_update`, also returning the gate activations (i, f, g, o) for the backward pass.

    `axis`: the gates' axis (0 for `column_step`'s (4U, B) layout).
    """
    i, f, g, o = jnp.split(z_Bx4U, 4, axis=axis)
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


# Rows per phase of a recurrence with `steps_B` (below): a multiple of 8, so the
# matmuls of every phase keep whole register tiles.
PHASE_ROWS = 8
# Phases at most. Each phase is a loop of its own in the compiled step, forward and
# backward, so compile time grows with their number: with one phase per 8 rows, the
# train step at the reference's shapes took 26 s to compile on the development CPU at
# batch 64 (8 phases), 68 s at 256 (32), ~90 s at 512 (64), and more than 150 s on
# an H200 at 512.
MAX_PHASES = 8


def phase_rows(batch: int, granularity: int = PHASE_ROWS, max_phases: int | None = None
               ) -> tuple[int, ...]:
    """The row counts of a recurrence's phases, most first: batch, batch - g, ..., down to <= g.

    g is `granularity`, or its smallest multiple that makes at most `max_phases`
    (default `MAX_PHASES`) phases: 8 rows apart up to batch 64, 64 apart at 512.
    """
    max_phases = MAX_PHASES if max_phases is None else max_phases
    spacing = granularity * -(-batch // (granularity * max_phases))  # ceil
    return tuple(range(batch, 0, -spacing))


def _phase_edges(steps_B, rows: tuple[int, ...]):
    """[edges[p], edges[p + 1]) are the time steps of phase p, for steps_B sorted most first.

    Step t belongs to the phase of the fewest rows that holds every row with
    steps left (steps_B > t): phase p's rows[p] rows run while row rows[p + 1],
    the longest of the rows it leaves to the next phases, still has steps.
    """
    inner = [steps_B[r] for r in rows[1:]]
    return [jnp.int32(0)] + inner + [steps_B[0]]


def _schedule(steps_B, steps: int, batch: int, granularity: int):
    """(row counts, time edges) of the phases: one phase of every row and step without steps_B."""
    if steps_B is None:
        return (batch,), [0, steps]
    rows = phase_rows(batch, granularity)
    return rows, _phase_edges(steps_B, rows)


def _at(x_TxBx, t, rows: int):
    """x[t, :rows] for a traced t."""
    return jax.lax.dynamic_index_in_dim(x_TxBx, t, 0, keepdims=False)[:rows]


def _put(buffer_TxBx, t, x_Bx):
    """buffer with x written at [t, :len(x)]."""
    return jax.lax.dynamic_update_slice(buffer_TxBx, x_Bx[None].astype(buffer_TxBx.dtype),
                                        (t,) + (0,) * x_Bx.ndim)


def _run(weights: StepWeights, gates1_TxBx4U, features_BxRxD, keys_BxRxA, steps_B, granularity):
    """The loop over time from zero states: ((h2_TxBxU, alpha_TxBxR), (saved, states)).

    Without `steps_B`, every row runs all T steps. With it (rows sorted by
    steps, most first), the loop runs in phases of fewer and fewer rows
    (`phase_rows`): a phase computes only the rows that some of its steps
    need, so the padding of short captions costs fewer rows a step than the
    phases' spacing (8 up to batch 64). Whatever a step does not compute stays
    zero in the stacks.
    """
    steps, batch = gates1_TxBx4U.shape[:2]
    units = gates1_TxBx4U.shape[2] // 4
    zeros = jnp.zeros((batch, units), jnp.float32)
    state = DecoderState(zeros, zeros, zeros, zeros)
    rows, edges = _schedule(steps_B, steps, batch, granularity)
    kernels_T = _transposed_kernels(weights)

    def step(state, gates1_Bx4U, features, keys):
        state, _, saved = _step_forward(weights, state, gates1_Bx4U, features, keys, kernels_T)
        return state, saved

    state_shapes, saved_shapes = jax.eval_shape(step, state, gates1_TxBx4U[0], features_BxRxD,
                                                keys_BxRxA)
    stacks = jax.tree.map(lambda x: jnp.zeros((steps,) + x.shape, x.dtype),
                          (saved_shapes, state_shapes))
    for p, count in enumerate(rows):
        features, keys = features_BxRxD[:count], keys_BxRxA[:count]

        def body(t, carry, count=count, features=features, keys=keys):
            state, stacks = carry
            state, saved = step(state, _at(gates1_TxBx4U, t, count), features, keys)
            return state, jax.tree.map(lambda s, x: _put(s, t, x), stacks, (saved, state))

        state = jax.tree.map(lambda x, count=count: x[:count], state)
        state, stacks = jax.lax.fori_loop(edges[p], edges[p + 1], body, (state, stacks))
    saved, states = stacks
    return (states.h2, saved.alpha_BxR), (saved, states)


def _live(steps_B, steps: int):
    """(T, B) True where step t is one of row b's first steps_B[b]."""
    return jnp.arange(steps)[:, None] < steps_B[None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def recurrence(weights: StepWeights, gates1_TxBx4U, features_BxRxD, keys_BxRxA, steps_B=None,
               granularity: int = PHASE_ROWS):
    """Teacher-forced steps from zero states: (h2_TxBxU, alpha_TxBxR).

    The same forward pass as autodiff through a scan of `_step_forward`, with a
    hand-written backward pass that is cheaper on the machine: the reverse loop
    computes only what depends on the time step (the gate, state and attention
    gradients) and emits the per-step gate gradients; each weight's gradient is
    then one matmul over all T*B rows (sum_t x_t^T dz_t), not T small matmuls each
    added into a running sum. Same for the features' gradient through the context.

    `steps_B` (int, rows sorted most first): row b needs only its first
    steps_B[b] steps, and later ones are zero in the outputs (their cotangents
    are ignored). A batch of captions padded to a common length then skips most
    of its padding's work (`_run`); the steps that are computed are those of
    the full recurrence.
    """
    return _recurrence_fwd(weights, gates1_TxBx4U, features_BxRxD, keys_BxRxA, steps_B,
                           granularity)[0]


def _recurrence_fwd(weights, gates1_TxBx4U, features_BxRxD, keys_BxRxA, steps_B, granularity):
    outputs, (saved, states) = _run(weights, gates1_TxBx4U, features_BxRxD, keys_BxRxA, steps_B,
                                    granularity)
    if steps_B is not None:
        live_TxB = _live(steps_B, gates1_TxBx4U.shape[0])
        outputs = jax.tree.map(lambda x: jnp.where(live_TxB[..., None], x, 0.0), outputs)
    return outputs, (weights, features_BxRxD, keys_BxRxA, steps_B, saved, states)


def _shift(x_TxBxU):
    """x[t-1] at t, zeros at t = 0: the previous step's state (all start at zero)."""
    return jnp.concatenate([jnp.zeros_like(x_TxBxU[:1]), x_TxBxU[:-1]], axis=0)


def _sum_tb(x_xI, dz_xJ, dtype):
    """sum over the leading axes of x (x) dz, one matmul in the compute dtype, float32 accumulated."""
    return jnp.einsum('...i,...j->ij', x_xI.astype(dtype), dz_xJ.astype(dtype),
                      preferred_element_type=jnp.float32)


def _reverse_step(weights: StepWeights, features_BxRxD, keys_BxRxA, carry, xs):
    """One step of the backward pass: (carry, (d_z1, d_from_h2, d_context)) for step t's rows."""
    d_h1, d_c1, d_h2, d_c2, d_keys, d_score_kernel, d_score_bias = carry
    d_h2_ext, d_alpha_ext, s, c1, c1_prev, c2, c2_prev = xs
    feature_dim = features_BxRxD.shape[-1]
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
    carry = (d_context_h1[:, feature_dim:], d_c1, d_h2_prev, d_c2, d_keys, d_score_kernel + d_v,
             d_score_bias + d_scores.sum())
    return carry, (d_z1, d_from_h2, d_context)


def _recurrence_bwd(granularity, residuals, d_outputs):
    weights, features_BxRxD, keys_BxRxA, steps_B, saved, states = residuals
    d_h2_TxBxU, d_alpha_TxBxR = d_outputs
    steps, batch, units = states.h1.shape
    rows, edges = _schedule(steps_B, steps, batch, granularity)
    live_TxB = None
    if steps_B is not None:   # the outputs there are constant zeros
        live_TxB = _live(steps_B, steps)
        d_h2_TxBxU, d_alpha_TxBxR = (jnp.where(live_TxB[..., None], d, 0.0)
                                     for d in (d_h2_TxBxU, d_alpha_TxBxR))
    xs = (d_h2_TxBxU, d_alpha_TxBxR, saved, states.c1, _shift(states.c1), states.c2,
          _shift(states.c2))
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    # Per row: d_h1, d_c1, d_h2, d_c2 and the keys' gradient, going backwards in
    # time; the rows a phase adds (it has more than the one after it) start at zero.
    rows_carry = (zeros(0, units),) * 4 + (zeros(0, *keys_BxRxA.shape[1:]),)
    shared_carry = (zeros(*weights.score_kernel.shape), zeros())   # V's kernel, V's bias
    stacks = (zeros(steps, batch, weights.lstm1_kernel.shape[1]),   # d_z1
              zeros(steps, batch, weights.h2_kernel.shape[1]),      # d_from_h2
              zeros(steps, batch, features_BxRxD.shape[-1]))        # d_context
    for p in reversed(range(len(rows))):
        count = rows[p]
        features, keys = features_BxRxD[:count], keys_BxRxA[:count]
        rows_carry = tuple(jnp.pad(c, [(0, count - c.shape[0])] + [(0, 0)] * (c.ndim - 1))
                           for c in rows_carry)

        def body(i, loop, p=p, count=count, features=features, keys=keys):
            carry, stacks = loop
            t = edges[p + 1] - 1 - i
            carry, out = _reverse_step(weights, features, keys, carry,
                                       jax.tree.map(lambda x: _at(x, t, count), xs))
            return carry, jax.tree.map(lambda s, x: _put(s, t, x), stacks, out)

        carry, stacks = jax.lax.fori_loop(0, edges[p + 1] - edges[p], body,
                                          (rows_carry + shared_carry, stacks))
        rows_carry, shared_carry = carry[:5], carry[5:]
    d_keys, (d_score_kernel, d_score_bias) = rows_carry[4], shared_carry
    d_z1, d_from_h2, d_context = stacks
    d_weights = _weight_grads(weights, saved, states, d_z1, d_from_h2, d_score_kernel, d_score_bias,
                              live_TxB)
    d_features = _features_grad(saved.alpha_BxR, d_context, features_BxRxD.dtype)
    # d_z1 is also the gradient of the words' gates: autodiff takes it on to the embeddings.
    return d_weights, d_z1, d_features, d_keys.astype(keys_BxRxA.dtype), None


def _weight_grads(weights: StepWeights, saved: _Saved, states: DecoderState, d_z1, d_from_h2,
                  d_score_kernel, d_score_bias, live_TxB=None) -> StepWeights:
    """Each weight's gradient as one matmul over all steps and rows (the live ones, if given)."""
    dtype, attention_units = weights.lstm1_kernel.dtype, weights.query_bias.shape[0]
    context_h1 = jnp.concatenate([saved.context_BxD, _shift(states.h1)], axis=-1)
    d_z2 = d_from_h2[..., attention_units:]
    h2_kernel, lstm1_kernel, lstm2_kernel = _sums_over_steps(
        [(_shift(states.h2), d_from_h2), (context_h1, d_z1), (states.h1, d_z2)], live_TxB, dtype)
    return StepWeights(
        h2_kernel=h2_kernel.astype(dtype),
        query_bias=d_from_h2[..., :attention_units].sum(axis=(0, 1)),
        score_kernel=d_score_kernel.astype(weights.score_kernel.dtype),
        score_bias=d_score_bias,
        lstm1_kernel=lstm1_kernel.astype(dtype),
        lstm2_kernel=lstm2_kernel.astype(dtype),
        lstm2_bias=d_z2.sum(axis=(0, 1)))


def _sums_over_steps(pairs, live_TxB, dtype) -> list[jax.Array]:
    """[sum over (t, b) of x[t, b] (x) dz[t, b] for (x, dz) in pairs], each one matmul.

    With `live_TxB`, only live pairs count (dz is zero elsewhere): the matmuls
    run on them, packed to the front at one of a few static sizes
    (`jaxcap.packing`, as the loss does for the logits). The padding of a
    reference batch is about 40% of its pairs, and these three matmuls over all
    of them took 176 ms of a ~1 s train step (a profile).
    """
    if live_TxB is None:
        return [_sum_tb(x, dz, dtype) for x, dz in pairs]
    flat = [(x.reshape(-1, x.shape[-1]), dz.reshape(-1, dz.shape[-1])) for x, dz in pairs]
    return packing.over_packed_rows(
        lambda picked: [_sum_tb(x[picked], dz[picked], dtype) for x, dz in flat],
        live_TxB.reshape(-1))


def _features_grad(alpha_TxBxR, d_context_TxBxD, dtype):
    """sum_t alpha_t (x) d_context_t, per image: one batched matmul over the steps."""
    return jnp.einsum('tbr,tbd->brd', alpha_TxBxR, d_context_TxBxD,
                      preferred_element_type=jnp.float32).astype(dtype)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
