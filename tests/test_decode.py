"""Greedy decoding on device agrees with teacher forcing of the same model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import decode
from jaxcap.data import text
from jaxcap.models import captioner
from jaxcap.models import decoder as decoder_lib

VOCAB, MAX_LEN = 9, 6


@pytest.fixture(scope='module')
def model_and_variables():
    model = captioner.Captioner(vocab_size=VOCAB, stage_sizes=(), embed_dim=8, units=16,
                                attention_units=8, position_embedding=True)
    features = jax.random.normal(jax.random.key(1), (5, 2, 2, 6))
    variables = captioner.init_variables(model, 0, features, jnp.zeros((5, 3), jnp.int32))
    # Make the random model confident, so argmax ties cannot blur the comparison.
    variables['params']['decoder']['logits']['kernel'] *= 20.0
    return model, variables, features


@pytest.mark.parametrize('prepared', [False, True])
def test_greedy_tokens_are_the_argmax_of_teacher_forcing_on_themselves(model_and_variables, prepared):
    model, variables, features = model_and_variables
    decoding_variables = decode.prepare(model, variables) if prepared else variables
    out = decode.make_decoder(model, MAX_LEN, beam_size=1)(decoding_variables, features)
    tokens = np.asarray(out.tokens_BxL)
    inputs = np.concatenate([np.full((5, 1), text.START), tokens[:, :-1]], axis=1)
    logits, alpha = model.apply(variables, features, jnp.asarray(inputs, jnp.int32))
    log_p = np.asarray(jax.nn.log_softmax(logits))
    allowed = np.where(np.isin(np.arange(VOCAB), [text.PAD, text.START]), -np.inf, log_p)  # never emitted
    for row in range(5):
        ends = np.flatnonzero(tokens[row] == text.END)
        length = ends[0] + 1 if ends.size else MAX_LEN
        np.testing.assert_array_equal(tokens[row, :length], allowed[row, :length].argmax(-1))
        np.testing.assert_array_equal(tokens[row, length:], text.PAD)
        expected = log_p[row, np.arange(length), tokens[row, :length]].sum()
        np.testing.assert_allclose(out.log_prob_B[row], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.alpha_BxLxR[row, :length], alpha[row, :length], atol=1e-6)


def test_decoding_stops_at_the_end_token(model_and_variables):
    model, variables, features = model_and_variables
    forced = jax.tree.map(lambda x: x, variables)
    bias = forced['params']['decoder']['logits']['bias']
    forced['params']['decoder']['logits']['bias'] = bias.at[text.END].set(1e4)
    out = decode.greedy_decode(model, forced, features, MAX_LEN)
    np.testing.assert_array_equal(out.tokens_BxL[:, 0], text.END)
    np.testing.assert_array_equal(out.tokens_BxL[:, 1:], text.PAD)
    np.testing.assert_allclose(out.log_prob_B, 0.0, atol=1e-4)


def test_decoder_compiles_once_for_every_batch_of_the_same_shape(model_and_variables, monkeypatch):
    # Evaluation decodes a split batch after batch, and training validates every N
    # steps with new parameters: none of that may trace (and compile) again.
    model, variables, features = model_and_variables
    monkeypatch.setattr(decode, 'greedy_decode', chex.assert_max_traces(decode.greedy_decode, n=1))
    decoder = decode.make_decoder(model, MAX_LEN, beam_size=1)
    for seed in range(3):
        new_variables = jax.tree.map(lambda x: x + 0.01 * seed, variables)
        new_features = jax.random.normal(jax.random.key(seed), features.shape)
        jax.block_until_ready(decoder(new_variables, new_features))
    assert decoder._cache_size() == 1


def test_prepared_variables_decode_new_batches_without_compiling_again(model_and_variables):
    model, variables, features = model_and_variables
    decoder = decode.make_decoder(model, MAX_LEN, beam_size=1)
    prepared = decode.prepare(model, variables)
    expected = decoder(variables, features)
    for seed in range(3):
        new_features = features if seed == 0 else jax.random.normal(jax.random.key(seed), features.shape)
        jax.block_until_ready(decoder(prepared, new_features))
    # One compilation for raw variables, one for prepared ones, whatever the batch.
    assert decoder._cache_size() == 2
    out = decoder(prepared, features)
    np.testing.assert_array_equal(out.tokens_BxL, expected.tokens_BxL)
    np.testing.assert_allclose(out.log_prob_B, expected.log_prob_B, rtol=1e-6, atol=1e-6)


def test_the_word_gate_table_holds_each_words_share_of_the_first_lstms_gates(model_and_variables):
    model, variables, _ = model_and_variables
    params = jax.tree.map(np.asarray, variables['params']['decoder'])
    weights = decode.prepare(model, variables).weights
    # lstm1 reads [context, word]: the kernel's rows after the first embed_dim
    # (the regions' size) multiply the word's embedding.
    word_rows = params['lstm1']['kernel'][model.embed_dim:]
    expected = params['embedding']['embedding'] @ word_rows + params['lstm1']['bias']
    assert weights.word_gates.shape == (VOCAB, 4 * model.units)
    np.testing.assert_allclose(weights.word_gates, expected, rtol=1e-5, atol=1e-6)
    assert decode._unpack(model, variables)[1].word_gates is None   # raw variables: per step


def test_decoding_step_and_teacher_forcing_share_one_set_of_numbers(model_and_variables):
    # `Captioner.step` (decoding) and `Captioner.decode` (training's scan with the
    # hoisted input projection) must compute the same function of the same parameters.
    model, variables, features = model_and_variables
    tokens = jax.random.randint(jax.random.key(3), (5, MAX_LEN), 0, VOCAB)
    logits, alpha = model.apply(variables, features, tokens)
    regions = model.apply(variables, features, method=captioner.Captioner.encode)
    state, keys = model.apply(variables, regions, method=captioner.Captioner.start)
    for t in range(MAX_LEN):
        state, step_logits, step_alpha = model.apply(variables, state, tokens[:, t], regions, keys,
                                                     method=captioner.Captioner.step)
        np.testing.assert_allclose(step_logits, logits[:, t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(step_alpha, alpha[:, t], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('prepared', [False, True])
def test_the_column_step_is_the_decoding_step_laid_out_batch_last(model_and_variables, prepared):
    # Greedy decoding runs `column_step` and `logits_VxB`; beam search and
    # `Captioner.step` run `decode_step`. Same numbers, transposed.
    model, variables, features = model_and_variables
    decoding_variables = decode.prepare(model, variables) if prepared else variables
    _, weights = decode._unpack(model, decoding_variables)
    regions = model.apply(variables, features, method=captioner.Captioner.encode)
    state, keys = model.apply(variables, regions, method=captioner.Captioner.start)
    state = type(state)(*(jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(state)))
    tokens = jnp.asarray([text.START, 4, 5, 8, 3], jnp.int32)
    new_state, logits_BxV, alpha_BxR = decoder_lib.decode_step(weights, state, tokens, regions, keys)
    batch_last = lambda x: jnp.moveaxis(x, 0, -1)  # noqa: E731
    new_state_T, alpha_RxB = decoder_lib.column_step(
        weights, jax.tree.map(batch_last, state), tokens, batch_last(regions),
        jnp.transpose(keys, (2, 1, 0)))   # the keys (A, R, B)
    for row_major, column_major in zip(new_state, new_state_T):
        np.testing.assert_allclose(column_major.T, row_major, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha_RxB.T, alpha_BxR, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(decoder_lib.logits_VxB(weights, new_state_T.h2).T, logits_BxV,
                               rtol=1e-5, atol=1e-5)


def test_the_greedy_choice_is_the_first_allowed_argmax_and_its_log_probability():
    never_emitted = decode._never_emitted_mask(6)          # <pad> (0) and <start> (2)
    logits_BxV = np.array([
        [0.0, 1.0, 0.0, 4.0, 2.0, 4.0],                    # a tie: the first index wins
        [1000.0, 1.0, 900.0, 2.0, 3.0, -1.0],              # never-emitted favourites, far ahead
        [5.0, 1.0, 5.0, 1.0, 1.0, 1.0],                    # all allowed words equal
        [0.0, np.nan, 0.0, 1.0, 0.0, 0.0],                 # a broken model
    ], np.float32)
    token_B, log_p_B = decode._greedy_choice(jnp.asarray(logits_BxV.T), never_emitted)
    np.testing.assert_array_equal(token_B[:3], [3, 4, 1])
    assert 0 <= int(token_B[3]) < 6
    exact = logits_BxV[:3].astype(np.float64)
    log_softmax = exact - np.log(np.exp(exact - exact.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - exact.max(1, keepdims=True)
    np.testing.assert_allclose(log_p_B[:3], log_softmax[np.arange(3), [3, 4, 1]], rtol=1e-6)
