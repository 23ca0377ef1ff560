"""Beam search against independent host-side oracles that drive `Captioner.step` directly.

The oracles (exhaustive enumeration, a plain-Python beam search without early
stopping, host greedy, teacher forcing) use the model alone, no `jaxcap.decode` code.
Every jitted decoder is built once per configuration and reused across seeds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import decode
from jaxcap.data import text
from jaxcap.models import captioner
from jaxcap.models.captioner import Captioner

PENALTIES = ('none', 'gnmt', 'average')
VOCAB = 6  # <pad> <unk> <start> <end> and two words: 4 tokens may be emitted
ALPHA = 0.6


# --- Host-side oracles --------------------------------------------------------

def _norm(length: int, penalty: str) -> float:
    if penalty == 'gnmt':
        return ((5.0 + length) / 6.0) ** ALPHA
    return float(length) if penalty == 'average' else 1.0


def _emittable(vocab_size: int = VOCAB) -> list[int]:
    """Beam search may emit anything but <pad> and <start>."""
    return [w for w in range(vocab_size) if w not in (text.PAD, text.START)]


def _repeats_trigram(seq) -> bool:
    trigrams = [tuple(seq[i:i + 3]) for i in range(len(seq) - 2)]
    return len(set(trigrams)) < len(trigrams)


def _encode(model, variables, images):
    """Host copies of (features, keys, initial state): the oracles slice them with numpy."""
    features = model.apply(variables, images, method=Captioner.encode)
    state, keys = model.apply(variables, features, method=Captioner.start)
    return np.asarray(features), np.asarray(keys), jax.tree.map(np.asarray, state)


@functools.cache
def _jitted_step(model):
    return jax.jit(functools.partial(model.apply, method=Captioner.step))


STEP_ROWS = 128  # the oracles run the decoder on chunks of this many rows: one compile


def _step(model, variables, state, tokens, features, keys):
    """One decoder step on N rows: (host state, float64 log-probabilities NxV).

    Padding, slicing and the softmax stay in numpy: jax would compile each new shape.
    """
    rows = len(tokens)
    inputs = (state, np.asarray(tokens, np.int32), features, keys)
    pad = lambda x: np.concatenate([x, np.zeros((-rows % STEP_ROWS,) + x.shape[1:], x.dtype)])  # noqa: E731
    inputs = jax.tree.map(pad, inputs)
    states, logits = [], []
    for i in range(0, len(inputs[1]), STEP_ROWS):
        chunk = jax.tree.map(lambda x: x[i:i + STEP_ROWS], inputs)
        new_state, chunk_logits, _ = _jitted_step(model)(variables, *chunk)
        states.append(jax.tree.map(np.asarray, new_state))
        logits.append(np.asarray(chunk_logits, np.float64))
    state = jax.tree.map(lambda *x: np.concatenate(x)[:rows], *states)
    logits = np.concatenate(logits)[:rows]
    peak = logits.max(axis=1, keepdims=True)
    return state, logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))


def _rows(state, index):
    return jax.tree.map(lambda s: s[np.asarray(index, int)], state)


def _enumerate(model, variables, images, max_len, block=False):
    """Per image, {caption: raw log-prob} of EVERY caption that ends in <end> or at max_len."""
    features, keys, state = _encode(model, variables, images)
    complete = [{} for _ in range(features.shape[0])]
    image_n, prefix_n = list(range(features.shape[0])), [()] * features.shape[0]
    log_prob_n = [0.0] * features.shape[0]
    for _ in range(max_len):
        last = [p[-1] if p else text.START for p in prefix_n]
        state, log_p = _step(model, variables, state, last, features[np.asarray(image_n)],
                             keys[np.asarray(image_n)])
        nxt = ([], [], [], [])  # image, prefix, log-prob, state row
        for n, prefix in enumerate(prefix_n):
            for w in _emittable():
                seq, lp = prefix + (w,), log_prob_n[n] + log_p[n, w]
                if block and _repeats_trigram(seq):
                    continue
                if w == text.END or len(seq) == max_len:
                    complete[image_n[n]][seq] = lp
                else:
                    for column, value in zip(nxt, (image_n[n], seq, lp, n)):
                        column.append(value)
        if not nxt[0]:
            break
        image_n, prefix_n, log_prob_n = nxt[0], nxt[1], nxt[2]
        state = _rows(state, nxt[3])
    return complete


def _ranked(complete: dict, penalty: str):
    """[(score, caption)], best first."""
    return sorted(((lp / _norm(len(seq), penalty), seq) for seq, lp in complete.items()), reverse=True)


def _reference_beam(model, variables, images, max_len, beams, penalty):
    """Plain beam search on the host, with the same rules and NO early stopping.

    Per step: the 2K best extensions; those in the K best that emit <end> (or
    any, at the last step) finish; the K best others stay alive. Returns the
    best finished (score, caption, raw log-prob) of each image.
    """
    features, keys, state = _encode(model, variables, images)
    alive = [[((), 0.0, b)] for b in range(features.shape[0])]  # (caption, log-prob, state row)
    finished = [[] for _ in alive]
    for t in range(max_len):
        flat = [beam for image in alive for beam in image]
        image_n = np.asarray([b for b, image in enumerate(alive) for _ in image])
        last = [seq[-1] if seq else text.START for seq, _, _ in flat]
        state, log_p = _step(model, variables, _rows(state, [row for _, _, row in flat]), last,
                             features[image_n], keys[image_n])
        n, next_alive = 0, []
        for b, image in enumerate(alive):
            cands = []
            for seq, lp, _ in image:
                cands += [(lp + log_p[n, w], seq + (w,), n) for w in _emittable(log_p.shape[1])]
                n += 1
            top = sorted(cands, key=lambda c: -c[0])[:2 * beams]
            for rank, (lp, seq, _) in enumerate(top):
                if rank < beams and (seq[-1] == text.END or t == max_len - 1):
                    finished[b].append((lp / _norm(len(seq), penalty), seq, lp))
            next_alive.append([(seq, lp, row) for lp, seq, row in top if seq[-1] != text.END][:beams])
        alive = next_alive
    return [max(f) for f in finished]


def _host_greedy(model, variables, images, max_len):
    """The argmax caption of each image, stepping the decoder on the host."""
    features, keys, state = _encode(model, variables, images)
    captions = [()] * features.shape[0]
    for _ in range(max_len):
        last = [c[-1] if c else text.START for c in captions]
        state, log_p = _step(model, variables, state, last, features, keys)
        captions = [c if c and c[-1] == text.END else c + (int(np.argmax(lp)),)
                    for c, lp in zip(captions, log_p)]
    return captions


def _caption(tokens_row) -> tuple:
    """The generated tokens up to and including <end> (or all of them)."""
    tokens_row = [int(w) for w in tokens_row]
    return tuple(tokens_row[:tokens_row.index(text.END) + 1] if text.END in tokens_row else tokens_row)


def _assert_padded(tokens_row, alpha_row):
    length = len(_caption(tokens_row))
    np.testing.assert_array_equal(tokens_row[length:], text.PAD)
    np.testing.assert_array_equal(alpha_row[length:], 0.0)
    assert text.PAD not in tokens_row[:length] and text.START not in tokens_row[:length]


# --- Models ---------------------------------------------------------------------

@functools.cache
def _base():
    """The tiny model and its variables, initialised once (each init compiles for seconds)."""
    model = captioner.Captioner(vocab_size=VOCAB, stage_sizes=(), embed_dim=8, units=16,
                                attention_units=8, position_embedding=True)
    grids = jnp.zeros((2, 2, 2, 6))
    return model, captioner.init_variables(model, 0, grids, jnp.zeros((2, 3), jnp.int32))


def _tiny_model(seed, batch, logit_scale=60.0):
    """(model, variables, cached-feature images (batch, 2, 2, 6)) of a random model drawn by `seed`.

    Each seed flips the signs of the initial weights at random: a different model
    with the same scales, without paying for another init.
    """
    model, variables = _base()
    rng = np.random.default_rng(seed)
    # Numpy throughout: eager jax ops would compile once per parameter shape.
    variables = jax.tree.map(
        lambda x: np.asarray(x) * rng.choice([-1.0, 1.0], size=x.shape).astype(np.float32), variables)
    # Peaked enough that captions differ in quality, not so much that one wins everywhere.
    variables['params']['decoder']['logits']['kernel'] *= logit_scale
    images = rng.normal(size=(batch, 2, 2, 6)).astype(np.float32)
    return model, variables, images


def _bias(variables, token_bias: dict[int, float]):
    """A copy of the variables with `token_bias[token]` added to the token's logit."""
    variables = jax.tree.map(np.array, variables)
    for token, value in token_bias.items():
        variables['params']['decoder']['logits']['bias'][token] += value
    return variables


@functools.cache
def _decoder(model, max_len, beams, penalty, block=False):
    return decode.make_decoder(model, max_len, beams, penalty, ALPHA, block)


@functools.cache
def _jitted_apply(model):
    return jax.jit(model.apply)


def _teacher_forced(model, variables, images, tokens):
    """(float64 log-probabilities BxLxV, alpha BxLxR) when the decoder is fed <start> + tokens[:-1]."""
    inputs = np.concatenate([np.full((len(tokens), 1), text.START), tokens[:, :-1]], axis=1)
    logits, alpha = _jitted_apply(model)(variables, images, jnp.asarray(inputs, jnp.int32))
    return np.asarray(jax.nn.log_softmax(logits), np.float64), np.asarray(alpha)


@functools.cache
def _scorer(model):
    return jax.jit(functools.partial(decode.sequence_log_prob, model))


# --- Exhaustive: beam search with K >= every candidate finds the true optimum -------

EX_LEN, EX_BATCH = 4, 4
# V^(L-1) >= the candidates of every step before the last (4 * 3^(L-2)), so no
# hypothesis is pruned and every <end> finishes; at the last step all candidates
# have the same length, so the K best include the best.
EX_BEAMS = VOCAB ** (EX_LEN - 1)
# (seed, <end> bias): <end> made rarer, as at the start of a real caption, so that
# the best caption is sometimes long and the penalties disagree on some images.
EX_MODELS = ((0, -2.0), (1, -3.0), (2, -4.0))


@pytest.fixture(scope='module')
def exhaustive_cases():
    cases = []
    for seed, end_bias in EX_MODELS:
        model, variables, images = _tiny_model(seed, EX_BATCH)
        variables = _bias(variables, {text.END: end_bias})
        cases.append((model, variables, images, _enumerate(model, variables, images, EX_LEN)))
    return cases


def test_the_exhaustive_optimum_depends_on_the_penalty(exhaustive_cases):
    # Otherwise the next test could not tell a search that ignores the penalty.
    winners = {p: [_ranked(c, p)[0][1] for *_, complete in exhaustive_cases for c in complete]
               for p in PENALTIES}
    for p in PENALTIES:
        for q in PENALTIES:
            if p != q:
                assert winners[p] != winners[q], (p, q)
    assert len({len(w) for w in winners['none']}) >= 2
    assert len({len(w) for w in winners['gnmt']}) >= 2


@pytest.mark.parametrize('penalty', PENALTIES)
def test_beam_search_finds_the_exhaustive_optimum(exhaustive_cases, penalty):
    for model, variables, images, complete in exhaustive_cases:
        out = _decoder(model, EX_LEN, EX_BEAMS, penalty)(variables, images)
        tokens, alpha, log_prob = (np.asarray(x) for x in out)
        for b in range(EX_BATCH):
            ranked = _ranked(complete[b], penalty)
            caption = _caption(tokens[b])
            assert ranked[0][0] - ranked[1][0] > 1e-4  # no near-tie: the optimum is unique
            assert caption == ranked[0][1], (penalty, b, caption, ranked[:3])
            np.testing.assert_allclose(log_prob[b], complete[b][caption], atol=1e-5)
            _assert_padded(tokens[b], alpha[b])


# --- Small beams: the result of a plain beam search that never stops early --------

REF_LEN, REF_BATCH, REF_BEAMS = 8, 6, 3
# (seed, <end> bias, <unk> bias): captions that end at once, midway and never, so
# the finished set fills while better beams are still alive. A cheap <unk> makes
# long captions win under 'gnmt' after K short ones have finished. -1e4 forbids <end>.
REF_CASES = ((12, 0.0, 0.0), (13, 0.0, 0.0), (13, 1.0, 0.0), (15, 3.0, 6.0), (12, -1e4, 0.0))


@functools.cache
def _reference_case(seed, end_bias, unk_bias=0.0):
    model, variables, images = _tiny_model(seed, REF_BATCH)
    return model, _bias(variables, {text.END: end_bias, text.UNK: unk_bias}), images


@pytest.mark.parametrize('penalty', PENALTIES)
@pytest.mark.parametrize('case', REF_CASES)
def test_small_beams_match_a_search_without_early_stopping(penalty, case):
    model, variables, images = _reference_case(*case)
    out = _decoder(model, REF_LEN, REF_BEAMS, penalty)(variables, images)
    expected = _reference_beam(model, variables, images, REF_LEN, REF_BEAMS, penalty)
    for b, (_, caption, log_prob) in enumerate(expected):
        assert _caption(out.tokens_BxL[b]) == caption, (penalty, b)
        np.testing.assert_allclose(out.log_prob_B[b], log_prob, atol=1e-5)
        _assert_padded(np.asarray(out.tokens_BxL[b]), np.asarray(out.alpha_BxLxR[b]))


@functools.cache
def _large_vocabulary_case(seed):
    """A random model with 1,000 words and 64 attention units.

    The tiny model's 6 words and 8 units are below what beam search's two-stage
    top-k (`decode.top_k`: 3 x 1,000 candidates in chunks of 125) and its
    blocked sum over the attention units (2 blocks of 32) need to run at all.
    """
    model = captioner.Captioner(vocab_size=1000, stage_sizes=(), embed_dim=8, units=16,
                                attention_units=64, position_embedding=True)
    variables = jax.tree.map(np.array, captioner.init_variables(
        model, seed, jnp.zeros((2, 2, 2, 6)), jnp.zeros((2, 3), jnp.int32)))
    variables['params']['decoder']['logits']['kernel'] *= 20.0
    images = np.random.default_rng(seed).normal(size=(REF_BATCH, 2, 2, 6)).astype(np.float32)
    return model, variables, images


@pytest.mark.parametrize('seed', [0, 1])
def test_a_large_vocabulary_matches_a_search_without_early_stopping(seed):
    model, variables, images = _large_vocabulary_case(seed)
    out = _decoder(model, REF_LEN, REF_BEAMS, 'gnmt')(variables, images)
    expected = _reference_beam(model, variables, images, REF_LEN, REF_BEAMS, 'gnmt')
    for b, (_, caption, log_prob) in enumerate(expected):
        assert _caption(out.tokens_BxL[b]) == caption, b
        np.testing.assert_allclose(out.log_prob_B[b], log_prob, atol=1e-5)


@pytest.mark.parametrize('seed', range(6))
def test_two_stage_top_k_equals_xla_top_k_with_ties_and_infinities(seed):
    """Values and indices, ties to the lower index included, over shapes that chunk and that do not."""
    rng = np.random.default_rng(seed)
    for n, k, chunk in [(3000, 6, 128), (1000, 4, 7), (999, 3, 16), (50, 6, 4), (40, 3, 8), (10, 10, 2)]:
        x = [rng.normal(size=(4, n)),                      # distinct values
             rng.integers(0, 3, size=(4, n)),              # many ties, across chunks
             np.where(rng.random((4, n)) < 0.9, -np.inf, rng.integers(0, 2, size=(4, n)))]
        for values in x:
            values = values.astype(np.float32)
            expected_values, expected_index = jax.lax.top_k(values, k)
            got_values, got_index = decode.top_k(jnp.asarray(values), k, chunk)
            np.testing.assert_array_equal(got_values, expected_values)
            np.testing.assert_array_equal(got_index, expected_index)


@pytest.mark.parametrize('size', [5000, 125, 64, 97, 20])   # rows of 200, 25, 32; no divisor; <= 32
def test_blocked_maximum_is_numpys_maximum(size):
    rng = np.random.default_rng(size)
    x = (rng.normal(size=(3, 4, size)) * 10.0 ** rng.integers(-3, 4, size=(3, 4, 1))).astype(np.float32)
    x[0, 0] = -np.inf                                  # a row of -inf
    x[0, 1, rng.integers(size)] = np.inf               # an inf
    x[1, 0, :] = x[1, 0, 0]                            # all tied
    np.testing.assert_array_equal(decode._max_in_blocks(jnp.asarray(x)), np.max(x, axis=-1))


def test_beam_log_probabilities_are_jax_log_softmax_bitwise():
    # The maximum is taken in blocks (`_max_in_blocks`); every digit stays jax's.
    logits = jax.random.normal(jax.random.key(0), (6, 5000)) * 4.0
    never_emitted = decode._never_emitted_mask(5000)
    jax_log_probs = jax.jit(lambda x: jnp.where(never_emitted, -jnp.inf, jax.nn.log_softmax(x)))
    np.testing.assert_array_equal(jax.jit(decode._log_probs)(logits), jax_log_probs(logits))


def test_attention_history_follows_the_back_pointers():
    # Two images, two beams, four steps; every step's attention names (step, image, beam).
    steps, batch, beams = 4, 2, 2
    alpha = np.array([[[[100 * t + 10 * b + k, -1.0] for k in range(beams)] for b in range(batch)]
                      for t in range(steps)], np.float32)
    parent = np.zeros((steps, batch, beams), np.int32)   # [t, b, k]: the beam at step t that
    parent[1, 0] = [1, 0]                                # beam k alive after step t extends
    parent[2, 0] = [1, 0]
    parent[1, 1] = [1, 1]
    parent[2, 1] = [1, 0]
    tokens = np.array([[5, 4, text.END, text.PAD],       # image 0 ends at step 2, on beam 1
                       [5, 4, 5, 4]])                    # image 1 runs all 4 steps, ends on beam 0
    trail = decode._Trail(jnp.asarray(alpha), jnp.asarray(parent))
    history = np.asarray(decode._attention_history(trail, jnp.asarray(tokens), jnp.array([1, 0])))
    # Image 0: step 2 on beam 1, whose parent at step 1 is parent[1, 0, 1] = 0, then parent[0, 0, 0] = 0.
    np.testing.assert_array_equal(history[0, :, 0], [0, 100, 201, 0])
    # Image 1: step 3 on beam 0; parent[2, 1, 0] = 1; parent[1, 1, 1] = 1; parent[0, 1, 1] = 0.
    np.testing.assert_array_equal(history[1, :, 0], [10, 111, 211, 310])
    np.testing.assert_array_equal(history[:, :, 1], [[-1, -1, -1, 0], [-1, -1, -1, -1]])


def test_without_end_the_best_cut_caption_is_returned():
    model, variables, images = _reference_case(12, -1e4)
    out = _decoder(model, REF_LEN, REF_BEAMS, 'gnmt')(variables, images)
    tokens = np.asarray(out.tokens_BxL)
    assert np.all(tokens != text.END) and np.all(tokens != text.PAD)  # all max_len long
    assert np.all(np.isfinite(out.log_prob_B)) and np.all(np.asarray(out.log_prob_B) > -100)


@pytest.mark.parametrize('prepared', [False, True])
@pytest.mark.parametrize('case', REF_CASES)
def test_log_prob_and_attention_are_those_of_teacher_forcing(case, prepared):
    model, variables, images = _reference_case(*case)
    decoding_variables = decode.prepare(model, variables) if prepared else variables
    out = _decoder(model, REF_LEN, REF_BEAMS, 'gnmt')(decoding_variables, images)
    tokens = np.asarray(out.tokens_BxL)
    np.testing.assert_allclose(_scorer(model)(variables, images, out.tokens_BxL), out.log_prob_B,
                               atol=1e-5)
    log_p, alpha = _teacher_forced(model, variables, images, tokens)
    for b in range(REF_BATCH):
        length = len(_caption(tokens[b]))
        np.testing.assert_allclose(out.alpha_BxLxR[b, :length], alpha[b, :length], atol=1e-6)
        expected = log_p[b, np.arange(length), tokens[b, :length]].sum()
        np.testing.assert_allclose(out.log_prob_B[b], expected, atol=1e-5)


def test_sequence_log_prob_counts_up_to_the_first_end():
    model, variables, images = _reference_case(12, 0.0)
    tokens = np.array([[4, 5, text.END, 0, 0, 0, 0, 0],
                       [4, 5, text.END, 1, 5, 4, 4, 5],    # tokens after <end> do not count
                       [4, 5, 1, 5, 4, 4, 5, 1]] * 2)      # no <end>: all of them count
    log_p, _ = _teacher_forced(model, variables, images, tokens)
    got = _scorer(model)(variables, images, tokens)
    for b, length in enumerate([3, 3, 8] * 2):
        np.testing.assert_allclose(got[b], log_p[b, np.arange(length), tokens[b, :length]].sum(),
                                   atol=1e-5)


def test_one_beam_is_greedy():
    model, variables, images = _reference_case(13, 1.0)
    # Make <pad> and <start> the model's favourites: neither search may emit them.
    variables = _bias(variables, {text.PAD: 2.0, text.START: 2.0})
    greedy = _decoder(model, REF_LEN, 1, 'none')(variables, images)
    for row in np.asarray(greedy.tokens_BxL):
        assert not set(_caption(row)) & {text.PAD, text.START}
    beam = jax.jit(lambda v, x: decode.beam_search(model, v, x, REF_LEN, 1, 'none'))(variables, images)
    lengths = {len(_caption(row)) for row in np.asarray(greedy.tokens_BxL)}
    assert len(lengths) >= 2, lengths  # captions that end early and some that do not
    np.testing.assert_array_equal(beam.tokens_BxL, greedy.tokens_BxL)
    np.testing.assert_allclose(beam.log_prob_B, greedy.log_prob_B, atol=1e-5)


# --- Trigram blocking ---------------------------------------------------------------

BLOCK_LEN = 6
# 4 * 3^(L-2) >= the candidates of every step before the last (3 tokens continue a
# prefix, 4 extend it), so nothing is pruned and every <end> finishes.
BLOCK_BEAMS = 4 * 3 ** (BLOCK_LEN - 2)


def test_trigram_blocking_finds_the_best_caption_without_repeats():
    model, variables, images = _tiny_model(3, 3)
    variables = _bias(variables, {4: 3.0, text.END: -2.0})  # token 4, again and again
    greedy = _host_greedy(model, variables, images, BLOCK_LEN)
    assert all(_repeats_trigram(caption) for caption in greedy)
    unblocked = _enumerate(model, variables, images, BLOCK_LEN)
    assert all(_repeats_trigram(_ranked(c, 'none')[0][1]) for c in unblocked)  # blocking matters
    complete = _enumerate(model, variables, images, BLOCK_LEN, block=True)
    out = _decoder(model, BLOCK_LEN, BLOCK_BEAMS, 'none', block=True)(variables, images)
    for b in range(3):
        caption = _caption(out.tokens_BxL[b])
        ranked = _ranked(complete[b], 'none')
        assert not _repeats_trigram(caption)
        assert ranked[0][0] - ranked[1][0] > 1e-4
        assert caption == ranked[0][1], (b, caption, ranked[:3])
        np.testing.assert_allclose(out.log_prob_B[b], complete[b][caption], atol=1e-5)


# --- Settings -------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, key', [
    (dict(beam_size=0), 'model.beam_size'),
    (dict(beam_size=-2), 'model.beam_size'),
    (dict(beam_size=2.5), 'model.beam_size'),
    (dict(beam_size=3, length_penalty='gnmt2'), 'model.length_penalty'),
    (dict(beam_size=1, length_penalty='mean'), 'model.length_penalty'),
    (dict(beam_size=3, alpha=-0.5), 'model.length_penalty_alpha'),
])
def test_bad_settings_name_the_config_key(kwargs, key):
    model = captioner.Captioner(vocab_size=VOCAB, stage_sizes=())
    with pytest.raises(ValueError, match=key.replace('.', r'\.') + ' '):
        decode.make_decoder(model, 5, **kwargs)
