"""Decoding on device (greedy or beam search): the whole caption in one jitted `lax.while_loop`."""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxcap import xla_options
from jaxcap.data import text
from jaxcap.models import decoder as decoder_lib
from jaxcap.models.captioner import Captioner


class Decoded(NamedTuple):
    tokens_BxL: jax.Array      # generated ids, <end> included, <pad> after it
    alpha_BxLxR: jax.Array     # attention weights of each generated token
    # Sum of log-probabilities of the generated tokens: raw, never length-penalised
    # (beam search ranks by `penalised_score`, which is computed from it).
    log_prob_B: jax.Array


# Never emitted by either search: a <pad> or <start> inside a caption means nothing.
_NEVER_EMITTED = (text.PAD, text.START)


def _never_emitted_mask(vocab_size: int) -> jax.Array:
    """(V,) True at `_NEVER_EMITTED`: a select XLA fuses into the next reduction, unlike a scatter."""
    return jnp.isin(jnp.arange(vocab_size), jnp.asarray(_NEVER_EMITTED))


class Prepared(NamedTuple):
    """A model's variables, and the decoding weights derived from them once (`prepare`)."""
    variables: Any
    weights: decoder_lib.DecodingWeights


def prepare(model: Captioner, variables) -> Prepared:
    """What every decoding call with these variables would redo, done once: pass it as `variables`.

    Besides slicing and fusing the step's kernels, it tabulates every word's share
    of the first LSTM's gates (`DecodingWeights.word_gates`), so each step
    gathers rows instead of multiplying the words' embeddings (batch-64 greedy
    decoding about 1.1x as fast on CPU; BENCHMARKS.md, round 5). The table costs
    about as much as decoding 140 captions, which an evaluation amortises over
    a split; a single decoding call is faster with raw variables.
    """
    return Prepared(variables, _prepared_weights(model, variables))


@functools.partial(jax.jit, static_argnums=0)
def _prepared_weights(model: Captioner, variables) -> decoder_lib.DecodingWeights:
    return model.apply(variables, word_gate_table=True, method=Captioner.decoding_weights)


def _unpack(model: Captioner, variables) -> tuple[Any, decoder_lib.DecodingWeights]:
    """(variables, decoding weights) from raw or `Prepared` variables."""
    if isinstance(variables, Prepared):
        return variables.variables, variables.weights
    return variables, model.apply(variables, method=Captioner.decoding_weights)


def greedy_decode(model: Captioner, variables, images, max_len: int) -> Decoded:
    """Greedy decoding from <start>; stops early once every caption has produced <end>.

    `variables`: the model's, or `prepare(model, variables)` for many calls.
    The loop runs `decoder.column_step`: its state, the regions and the keys
    laid out batch-last, transposed once here.
    """
    variables, weights = _unpack(model, variables)
    features = model.apply(variables, images, method=Captioner.encode)
    state, keys = model.apply(variables, features, method=Captioner.start)
    batch, regions = features.shape[0], features.shape[1]
    features_RxDxB, keys_AxRxB = jnp.transpose(features, (1, 2, 0)), jnp.transpose(keys, (2, 1, 0))
    state_UxB = jax.tree.map(jnp.transpose, state)
    never_emitted_V = _never_emitted_mask(model.vocab_size)

    def cond(carry):
        t, _, _, done, *_ = carry
        return (t < max_len) & ~jnp.all(done)

    def body(carry):
        t, token, state, done, tokens, alphas, log_prob = carry
        state, alpha_RxB = decoder_lib.column_step(weights, state, token, features_RxDxB, keys_AxRxB)
        nxt, log_p = _greedy_choice(decoder_lib.logits_VxB(weights, state.h2), never_emitted_V)
        log_prob = log_prob + jnp.where(done, 0.0, log_p)
        nxt = jnp.where(done, text.PAD, nxt)
        tokens = tokens.at[:, t].set(nxt)
        alphas = alphas.at[:, t].set(jnp.where(done[:, None], 0.0, alpha_RxB.T))
        return t + 1, nxt, state, done | (nxt == text.END), tokens, alphas, log_prob

    init = (jnp.int32(0), jnp.full((batch,), text.START, jnp.int32), state_UxB,
            jnp.zeros((batch,), bool), jnp.zeros((batch, max_len), jnp.int32),
            jnp.zeros((batch, max_len, regions), jnp.float32), jnp.zeros((batch,), jnp.float32))
    _, _, _, _, tokens, alphas, log_prob = jax.lax.while_loop(cond, body, init)
    return Decoded(tokens, alphas, log_prob)


def _greedy_choice(logits_VxB, never_emitted_V):
    """(the first highest-scoring token that may be emitted, its log-probability), per column.

    Written as reductions that vectorise across the batch: the max over the
    allowed words, the first index where it is reached (what `jnp.argmax`
    returns), and a logsumexp over all words (a never-emitted word still takes
    its share of the probability) shifted by the largest logit: the allowed
    max or one of the few never-emitted ones. In profiles at batch 64, these
    took ~13.5 ms a call against ~28 for `jnp.argmax`, whose (value, index)
    reduction alone took 15.7, the chosen logit and `jax.nn.logsumexp`.
    """
    vocab = logits_VxB.shape[0]
    allowed_VxB = jnp.where(never_emitted_V[:, None], -jnp.inf, logits_VxB)
    best_B = jnp.max(allowed_VxB, axis=0)
    index_VxB = jax.lax.broadcasted_iota(jnp.int32, logits_VxB.shape, 0)
    # min(..., vocab - 1): a valid id even for NaN logits, which equal nothing.
    token_B = jnp.minimum(jnp.min(jnp.where(allowed_VxB == best_B, index_VxB, vocab), axis=0),
                          vocab - 1)
    never_emitted_ids = jnp.asarray(_NEVER_EMITTED)
    shift_B = jnp.maximum(best_B, jnp.max(logits_VxB[never_emitted_ids], axis=0))
    log_normaliser_B = shift_B + jnp.log(jnp.sum(jnp.exp(logits_VxB - shift_B), axis=0))
    return token_B, best_B - log_normaliser_B


# ---------------------------------------------------------------------------
# Beam search.

LENGTH_PENALTIES = ('none', 'gnmt', 'average')


class _Hypotheses(NamedTuple):
    """K hypotheses per image (alive ones, or finished ones, best first)."""
    tokens_BxKxL: jax.Array    # <pad> after the last generated token
    log_prob_BxK: jax.Array    # raw sum of log-probabilities; -inf marks an empty slot
    score_BxK: jax.Array       # length-penalised log_prob (finished); = log_prob (alive)
    # The alive beam (0..K-1) whose step generated the last token: where its
    # attention history continues in the `_Trail`.
    parent_BxK: jax.Array


class _Trail(NamedTuple):
    """Every step's attention, and how the alive beams descend from each other (back-pointers).

    The attention history of a hypothesis is read back once, for the caption
    returned (`_attention_history`), instead of being reordered with the beams at
    every step: 1.3 MB gathered and copied a few times a step at batch 64.
    """
    alpha_LxBxKxR: jax.Array   # step t's attention, by the alive beam that ran it
    parent_LxBxK: jax.Array    # the alive beam at step t that each beam alive after it extends


def check_settings(max_len: int, beam_size: int, length_penalty: str, alpha: float) -> None:
    """Raises ValueError, naming the config key, for settings decoding cannot use."""
    if not isinstance(beam_size, numbers.Integral) or beam_size < 1:
        raise ValueError(f'model.beam_size must be an integer >= 1 (1 = greedy), got {beam_size!r}.')
    if length_penalty not in LENGTH_PENALTIES:
        raise ValueError(f'model.length_penalty must be one of {LENGTH_PENALTIES}, '
                         f'got {length_penalty!r}.')
    # A negative exponent would make the penalty shrink with length, which breaks
    # the early-stopping bound of `beam_search` (and rewards short captions).
    if not alpha >= 0:
        raise ValueError(f'model.length_penalty_alpha must be >= 0, got {alpha!r}.')
    if not isinstance(max_len, numbers.Integral) or max_len < 1:
        raise ValueError(f'model.max_decode_len must be an integer >= 1, got {max_len!r}.')


def length_normaliser(length, length_penalty: str, alpha: float) -> jax.Array:
    """The divisor of the summed log-probability: 1, ((5 + n) / 6) ** alpha or n.

    `length` counts generated tokens, <end> included. Every option is positive and
    non-decreasing in the length, which the early-stopping bound relies on.
    """
    length = jnp.asarray(length, jnp.float32)
    if length_penalty == 'gnmt':   # Wu et al. 2016, eq. 14
        return ((5.0 + length) / 6.0) ** alpha
    if length_penalty == 'average':
        return length
    return jnp.ones_like(length)


def caption_mask(tokens_BxL: jax.Array) -> jax.Array:
    """True for the tokens of each caption: up to and including the first <end>.

    A caption without <end> (cut at max_len, or a padded reference) runs to its
    first <pad>.
    """
    is_end_BxL = tokens_BxL == text.END
    ended_before_BxL = (jnp.cumsum(is_end_BxL, axis=1) - is_end_BxL) > 0
    padded_BxL = jnp.cumsum(tokens_BxL == text.PAD, axis=1) > 0
    return ~ended_before_BxL & ~padded_BxL


def penalised_score(log_prob_B: jax.Array, tokens_BxL: jax.Array, length_penalty: str = 'gnmt',
                    alpha: float = 0.6) -> jax.Array:
    """The score beam search ranks captions by: log_prob_B / length_normaliser(length)."""
    length_B = jnp.sum(caption_mask(tokens_BxL), axis=1)
    return log_prob_B / length_normaliser(length_B, length_penalty, alpha)


def sequence_log_prob(model: Captioner, variables, images, tokens_BxL: jax.Array) -> jax.Array:
    """Sum of the log-probabilities of given captions under teacher forcing.

    The decoder is fed <start> + tokens[:-1]; the tokens counted are those of
    `caption_mask` (up to and including the first <end>; <pad> after it ignored).
    """
    tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
    features_BxRxD = model.apply(variables, images, method=Captioner.encode)
    start_Bx1 = jnp.full((tokens_BxL.shape[0], 1), text.START, jnp.int32)
    inputs_BxL = jnp.concatenate([start_Bx1, tokens_BxL[:, :-1]], axis=1)
    logits_BxLxV, _ = model.apply(variables, features_BxRxD, inputs_BxL, method=Captioner.decode)
    log_p_BxLxV = jax.nn.log_softmax(logits_BxLxV)
    log_p_BxL = jnp.take_along_axis(log_p_BxLxV, tokens_BxL[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(caption_mask(tokens_BxL), log_p_BxL, 0.0), axis=1)


def top_k(x_BxN, k: int, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x_BxN, k)`, the same values and indices, from two small top-k's.

    XLA:CPU's TopK visits every element through a partial sort: over beam
    search's K x vocabulary candidates per image it took 7% of a batch-64
    beam-3 call (a profile, BENCHMARKS.md round 10). Here one vectorised pass
    takes the maximum of each chunk of consecutive elements, and the k best
    chunks by maximum hold the k best elements: each chunk ranked above an
    element's own holds a distinct element ranked above it (greater, or equal
    at a lower index), and at most k - 1 elements are. Those chunks, kept in
    index order so that ties still go to the lower index, are searched in full.

    `chunk`: the chunks' size, or the nearest divisor of N (a reshape, not a
    copy); where N has none within a factor 2, XLA's TopK runs.
    """
    n = x_BxN.shape[-1]
    size = _nearest_divisor(n, chunk)
    if size is None or n // size <= k:
        return jax.lax.top_k(x_BxN, k)
    x_BxCxS = x_BxN.reshape(x_BxN.shape[:-1] + (n // size, size))
    _, best_chunks_Bxk = jax.lax.top_k(_max_in_blocks(x_BxCxS), k)
    best_chunks_Bxk = jnp.sort(best_chunks_Bxk, axis=-1)
    searched_BxkxS = jnp.take_along_axis(x_BxCxS, best_chunks_Bxk[..., None], axis=-2)
    values_Bxk, within_Bxk = jax.lax.top_k(searched_BxkxS.reshape(x_BxN.shape[:-1] + (k * size,)), k)
    chunk_Bxk = jnp.take_along_axis(best_chunks_Bxk, within_Bxk // size, axis=-1)
    return values_Bxk, chunk_Bxk * size + within_Bxk % size


def _max_in_blocks(x, block: int = 32):
    """`jnp.max(x, axis=-1)`, bitwise the same, in two steps that XLA:CPU runs faster.

    XLA:CPU rewrites a reduction over more than 32 elements into a windowed one
    that does not fuse with the ops computing its input, and along the minor
    axis it runs slowly: in a beam-3 profile (batch 64), the log-softmax's
    maximum over the 5,000 words took 19 ms a call (its input written out, then
    reduced) and the top-k's chunk maxima 16 ms. Here the axis is split into at
    most `block` rows of contiguous elements: the maximum over the rows runs
    elementwise along them (vectorised, fused with the input), then the maximum
    along what is left: 5 and 4 ms. The barrier keeps XLA from merging the two
    back into one. A maximum is exact in any order. CPU only: on an H200 beam
    search ran 0.98x as fast with it (BENCHMARKS.md, round 11).
    """
    size = x.shape[-1]
    rows = max(d for d in range(1, block + 1) if size % d == 0)
    if size <= block or rows < block // 4 or jax.default_backend() != 'cpu':
        return jnp.max(x, axis=-1)
    if size // rows < 16:   # rows too short to vectorise along: 125 as 5 x 25, not 25 x 5
        rows = size // rows
    partial = jax.lax.optimization_barrier(
        jnp.max(x.reshape(x.shape[:-1] + (rows, size // rows)), axis=-2))
    return jnp.max(partial, axis=-1)


def _nearest_divisor(n: int, target: int) -> int | None:
    """The divisor of n closest to target, within [target / 2, 2 * target]; None if there is none."""
    divisors = [d for d in range(max(1, target // 2), 2 * target + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d)) if divisors else None


def _take(x_BxKx, index_BxJ):
    """x[b, index[b, j]] for every b, j: reorders the beams of each image."""
    return jax.vmap(lambda x, i: x[i])(x_BxKx, index_BxJ)


def _repeated_trigram_mask(tokens_NxL, t, vocab_size: int) -> jax.Array:
    """True for each token w such that (tokens[t-2], tokens[t-1], w) already occurs in tokens[:t]."""
    length = tokens_NxL.shape[1]
    if length < 3:
        return jnp.zeros((tokens_NxL.shape[0], vocab_size), bool)
    prev2_N = tokens_NxL[:, jnp.maximum(t - 2, 0)]
    prev1_N = tokens_NxL[:, jnp.maximum(t - 1, 0)]
    # Trigram j is tokens[j:j+3]; only those complete before position t count.
    complete_J = jnp.arange(length - 2) + 2 < t
    match_NxJ = ((tokens_NxL[:, :-2] == prev2_N[:, None]) & (tokens_NxL[:, 1:-1] == prev1_N[:, None])
                 & complete_J)
    third_NxJxV = tokens_NxL[:, 2:, None] == jnp.arange(vocab_size)
    return jnp.any(match_NxJ[..., None] & third_NxJxV, axis=1)


def _step_log_probs(weights, state, alive, t, features, keys, block_repeated_trigrams):
    """Runs the decoder on every alive beam at step t >= 1: (new state, log_p_BxKxV, alpha_BxKxR)."""
    batch, beams, max_len = alive.tokens_BxKxL.shape
    tokens_NxL = alive.tokens_BxKxL.reshape(batch * beams, max_len)
    state, logits_NxV, alpha_NxR = decoder_lib.decode_step(weights, state, tokens_NxL[:, t - 1],
                                                           features, keys)
    log_p_NxV = _log_probs(logits_NxV)
    if block_repeated_trigrams:
        log_p_NxV = jnp.where(_repeated_trigram_mask(tokens_NxL, t, log_p_NxV.shape[-1]), -jnp.inf,
                              log_p_NxV)
    return (state, log_p_NxV.reshape(batch, beams, -1),
            alpha_NxR.reshape(batch, beams, alpha_NxR.shape[-1]))


def _first_step_log_probs(weights, state_B, features, keys, beams: int):
    """`_step_log_probs` at step 0, computed on one row per image and repeated for its K beams.

    Every beam of an image starts from <start> and the same state, so the other
    K - 1 rows would only recompute the first (and are dead at first anyway).
    """
    start_B = jnp.full((features.shape[0],), text.START, jnp.int32)
    state_B, logits_BxV, alpha_BxR = decoder_lib.decode_step(weights, state_B, start_B, features, keys)
    per_beam = lambda x: jnp.repeat(x[:, None], beams, axis=1)  # noqa: E731
    state = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), state_B)
    return state, per_beam(_log_probs(logits_BxV)), per_beam(alpha_BxR)


def _log_probs(logits_NxV):
    """log_softmax, with -inf for the never-emitted tokens.

    Masked after the softmax, not renormalised: scores stay the model's own
    log-probabilities, which `sequence_log_prob` reproduces.
    """
    never_emitted_V = _never_emitted_mask(logits_NxV.shape[-1])
    # jax.nn.log_softmax's operations, with the maximum taken in blocks (`_max_in_blocks`).
    shifted_NxV = logits_NxV - _max_in_blocks(logits_NxV)[:, None]
    log_p_NxV = shifted_NxV - jnp.log(jnp.sum(jnp.exp(shifted_NxV), axis=-1, keepdims=True))
    return jnp.where(never_emitted_V, -jnp.inf, log_p_NxV)


class _Candidates(NamedTuple):
    """The 2K best one-token extensions of the alive beams of each image, best first."""
    tokens_Bx2KxL: jax.Array
    log_prob_Bx2K: jax.Array
    parent_Bx2K: jax.Array      # the alive beam each one extends


def _expand(alive: _Hypotheses, log_p_BxKxV, t, beams: int) -> _Candidates:
    """The 2K best extensions: at most K end in <end> (one per parent), so at least K continue."""
    batch, _, vocab = log_p_BxKxV.shape
    total_BxKV = (alive.log_prob_BxK[..., None] + log_p_BxKxV).reshape(batch, -1)
    # The barrier keeps XLA from fusing the result into its consumers, which inside
    # the while loop turns the top-k into a full sort of K x vocab per image (~5x
    # slower beam search on CPU, measured in bench/decode.py).
    log_prob_Bx2K, flat_Bx2K = jax.lax.optimization_barrier(top_k(total_BxKV, 2 * beams))
    parent_Bx2K, token_Bx2K = flat_Bx2K // vocab, (flat_Bx2K % vocab).astype(jnp.int32)
    tokens_Bx2KxL = _take(alive.tokens_BxKxL, parent_Bx2K).at[:, :, t].set(token_Bx2K)
    return _Candidates(tokens_Bx2KxL, log_prob_Bx2K, parent_Bx2K)


def _pick(cand: _Candidates, index_BxJ, log_prob_BxJ, score_BxJ) -> _Hypotheses:
    """The candidates at index_BxJ, with the given log-probabilities and scores."""
    return _Hypotheses(_take(cand.tokens_Bx2KxL, index_BxJ), log_prob_BxJ, score_BxJ,
                       _take(cand.parent_Bx2K, index_BxJ))


def _top(hyps: _Hypotheses, score_BxJ, beams: int) -> _Hypotheses:
    """The `beams` hypotheses with the best score_BxJ, best first."""
    _, index_BxK = jax.lax.top_k(score_BxJ, beams)
    return jax.tree.map(lambda x: _take(x, index_BxK), hyps)


def _next_alive(cand: _Candidates, state: decoder_lib.DecoderState, t, beams: int):
    """The K best candidates that do not end in <end>, and the decoder state they continue from."""
    is_end_Bx2K = cand.tokens_Bx2KxL[:, :, t] == text.END
    live_Bx2K = jnp.where(is_end_Bx2K, -jnp.inf, cand.log_prob_Bx2K)
    # -inf marks a dead beam (fewer than K live candidates): it can never win.
    live_BxK, index_BxK = jax.lax.top_k(live_Bx2K, beams)
    alive = _pick(cand, index_BxK, live_BxK, live_BxK)
    batch = live_BxK.shape[0]
    state = jax.tree.map(
        lambda s: _take(s.reshape(batch, beams, -1), alive.parent_BxK).reshape(batch * beams, -1),
        state)
    return alive, state


def _finish(finished: _Hypotheses, cand: _Candidates, t, max_len: int, beams: int,
            length_penalty: str, alpha: float) -> _Hypotheses:
    """Merges the candidates that end here into the K best finished hypotheses.

    A candidate ends here if it emits <end>, or if this is the last step (cut at
    max_len), and only if it ranks among the step's K best: then K=1 is exactly
    greedy, and unlikely early <end>s do not crowd the finished set (as fairseq).
    """
    index_BxK = jnp.broadcast_to(jnp.arange(beams), (finished.score_BxK.shape[0], beams))
    ends_BxK = (_take(cand.tokens_Bx2KxL[:, :, t], index_BxK) == text.END) | (t == max_len - 1)
    log_prob_BxK = jnp.where(ends_BxK, cand.log_prob_Bx2K[:, :beams], -jnp.inf)
    score_BxK = log_prob_BxK / length_normaliser(t + 1, length_penalty, alpha)
    ending = _pick(cand, index_BxK, log_prob_BxK, score_BxK)
    # Old hypotheses first: top_k keeps the lower index on ties, so a tie never
    # replaces a hypothesis already found.
    merged = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), finished, ending)
    return _top(merged, merged.score_BxK, beams)


def _cannot_improve(alive: _Hypotheses, finished: _Hypotheses, max_len: int, length_penalty: str,
                    alpha: float) -> jax.Array:
    """done_B: no extension of an alive beam can enter the finished set any more.

    Log-probabilities only decrease as a hypothesis grows, and every normaliser is
    positive and non-decreasing in the length n <= max_len, so an extension of a
    beam with log_p <= 0 scores at most log_p / norm(n) <= log_p / norm(max_len).
    For 'none' this is the usual rule; for 'gnmt' and 'average' it is the bound of
    the longest possible caption, so stopping on it never changes the result.
    While the finished set has an empty slot its worst score is -inf, so the
    search goes on (unless every alive beam is dead, when nothing can come).
    """
    bound_B = jnp.max(alive.log_prob_BxK, axis=1) / length_normaliser(max_len, length_penalty, alpha)
    return bound_B <= finished.score_BxK[:, -1]


def _empty_hypotheses(batch: int, beams: int, max_len: int) -> _Hypotheses:
    empty_BxK = jnp.full((batch, beams), -jnp.inf, jnp.float32)
    return _Hypotheses(jnp.full((batch, beams, max_len), text.PAD, jnp.int32), empty_BxK, empty_BxK,
                       jnp.zeros((batch, beams), jnp.int32))


def _attention_history(trail: _Trail, tokens_BxL, parent_B) -> jax.Array:
    """The attention history alpha_BxLxR of captions whose last token alive beam parent_B generated.

    Walks the back-pointers from each caption's last step to its first; zeros
    after the last step, as for `<pad>` in the tokens.
    """
    last_B = jnp.sum(caption_mask(tokens_BxL), axis=1) - 1
    steps = tokens_BxL.shape[1]

    def back(beam_B, t):
        beam_B = jnp.where(t == last_B, parent_B, beam_B)
        alpha_BxR = _take(trail.alpha_LxBxKxR[t], beam_B[:, None])[:, 0]
        alpha_BxR = jnp.where((t <= last_B)[:, None], alpha_BxR, 0.0)
        # The beam at step t - 1 (at t = 0 there is none, and the value is unused).
        return _take(trail.parent_LxBxK[jnp.maximum(t - 1, 0)], beam_B[:, None])[:, 0], alpha_BxR

    _, alpha_LxBxR = jax.lax.scan(back, parent_B, jnp.arange(steps - 1, -1, -1))
    return jnp.flip(alpha_LxBxR, axis=0).swapaxes(0, 1)


def beam_search(model: Captioner, variables, images, max_len: int, beam_size: int,
                length_penalty: str = 'gnmt', alpha: float = 0.6,
                block_repeated_trigrams: bool = False) -> Decoded:
    """Batched beam search in one `lax.while_loop`; jittable with all but variables/images static.

    Each step extends the K alive beams of every image by every token (never
    <pad> or <start>), keeps the 2K best, moves those that emit <end> and rank in
    the K best into a finished set of size K (ranked by the length-penalised
    score) and keeps the K best others alive. At max_len the K best cut
    hypotheses finish too, so a caption is always returned, with or without
    <end>. An image is done when no alive beam can beat its worst finished one
    (see `_cannot_improve`); the loop ends when every image is done or at max_len.

    Args:
      model: the captioner.
      variables: its variables, or `prepare(model, variables)`.
      images: images, or cached grids, as `Captioner.encode` takes them (batch B).
      max_len: tokens generated at most, <end> included.
      beam_size: K, the beams kept per image.
      length_penalty: 'none' (sum of log-probabilities), 'gnmt' (sum / ((5 + n) / 6)
        ** alpha, Wu et al. 2016) or 'average' (sum / n); n counts generated
        tokens, <end> included.
      alpha: the 'gnmt' exponent.
      block_repeated_trigrams: give -inf to any token that would repeat a trigram
        already in the hypothesis.

    Returns:
      The best finished hypothesis of each image: tokens (<end> included, <pad>
      after), the attention of every generated token, and `log_prob_B`, the RAW
      sum of log-probabilities of those tokens (what `sequence_log_prob` gives);
      the score it was ranked by is `penalised_score(log_prob_B, tokens_BxL, ...)`.
    """
    check_settings(max_len, beam_size, length_penalty, alpha)
    beams = beam_size
    variables, weights = _unpack(model, variables)
    features_BxRxD = model.apply(variables, images, method=Captioner.encode)
    state, keys_BxRxA = model.apply(variables, features_BxRxD, method=Captioner.start)
    batch, regions = features_BxRxD.shape[:2]
    # Encoded and projected (W1) once per image; its K beams attend over that one
    # copy (`attend_projected`), which beam-3 decoding reads 1.035x as fast as K copies.
    empty = _empty_hypotheses(batch, beams, max_len)
    # One live beam per image at first: the others would only duplicate it.
    start_BxK = empty.log_prob_BxK.at[:, 0].set(0.0)
    alive = empty._replace(log_prob_BxK=start_BxK, score_BxK=start_BxK)
    trail = _Trail(jnp.zeros((max_len, batch, beams, regions), jnp.float32),
                   jnp.zeros((max_len, batch, beams), jnp.int32))

    def cond(carry):
        t, *_, done_B = carry
        return (t < max_len) & ~jnp.all(done_B)

    def advance(t, alive, finished, trail, stepped):
        """The loop's carry after step t, from the decoder's (state, log_p_BxKxV, alpha_BxKxR)."""
        state, log_p_BxKxV, alpha_BxKxR = stepped
        cand = _expand(alive, log_p_BxKxV, t, beams)
        alive, state = _next_alive(cand, state, t, beams)
        finished = _finish(finished, cand, t, max_len, beams, length_penalty, alpha)
        trail = _Trail(trail.alpha_LxBxKxR.at[t].set(alpha_BxKxR),
                       trail.parent_LxBxK.at[t].set(alive.parent_BxK))
        done_B = _cannot_improve(alive, finished, max_len, length_penalty, alpha)
        return t + 1, alive, state, finished, trail, done_B

    def body(carry):
        t, alive, state, finished, trail, _ = carry
        return advance(t, alive, finished, trail, _step_log_probs(
            weights, state, alive, t, features_BxRxD, keys_BxRxA, block_repeated_trigrams))

    init = advance(jnp.int32(0), alive, empty, trail,
                   _first_step_log_probs(weights, state, features_BxRxD, keys_BxRxA, beams))
    _, _, _, finished, trail, _ = jax.lax.while_loop(cond, body, init)
    tokens_BxL = finished.tokens_BxKxL[:, 0]
    return Decoded(tokens_BxL, _attention_history(trail, tokens_BxL, finished.parent_BxK[:, 0]),
                   finished.log_prob_BxK[:, 0])


def make_decoder(model: nn.Module, max_len: int, beam_size: int, length_penalty: str = 'gnmt',
                 alpha: float = 0.6, block_repeated_trigrams: bool = False):
    """A jitted `(variables, images) -> Decoded`: greedy for beam_size 1, else beam search.

    `variables` may be `prepare(model, variables)`, which makes decoding many
    batches with the same variables faster.

    Raises:
      ValueError: naming the config key (`model.beam_size`, `model.length_penalty`,
        ...) of a setting decoding cannot use.
    """
    # Checked for greedy too: a typo in the config should fail before a long run.
    check_settings(max_len, beam_size, length_penalty, alpha)
    if beam_size == 1:
        return xla_options.jit(
            lambda variables, images: greedy_decode(model, variables, images, max_len))
    return xla_options.jit(lambda variables, images: beam_search(
        model, variables, images, max_len, beam_size, length_penalty, alpha, block_repeated_trigrams))
