"""The loss and the train step: masking, a golden value, learning, and failure modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from jaxcap import losses, parallel, train
from jaxcap.data import text
from jaxcap.models import captioner

VOCAB = 13


@pytest.fixture(scope='module')
def setup():
    config = tiny.get_config()
    model = captioner.from_config(config.model, VOCAB)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train.initial_state(config, model, mesh)
    rng = np.random.default_rng(0)
    size, max_len = config.data.image_size, config.data.max_len
    # Captions of different lengths: <start> w... <end> then padding.
    tokens = np.zeros((4, max_len), np.int32)
    for i, n in enumerate([3, 7, 10, 14]):
        tokens[i, :n + 2] = [text.START, *rng.integers(4, VOCAB, n), text.END]
    batch = {'images': rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
             'tokens': tokens, 'mask': (tokens != text.PAD).astype(np.float32)}
    return config, model, state, batch


def _loss_and_grads(model, state, batch):
    fn = jax.jit(jax.value_and_grad(
        lambda p: train.compute_loss(p, state.batch_stats, batch, model, 0.0, False)[0]))
    return fn(state.params)


def test_padding_has_exactly_zero_effect_on_loss_and_gradients(setup):
    _, model, state, batch = setup
    loss, grads = _loss_and_grads(model, state, batch)
    garbage = dict(batch)
    pad = batch['mask'] == 0
    # Random real words where the padding was: the mask still says "ignore".
    garbage['tokens'] = np.where(pad, np.random.default_rng(1).integers(4, VOCAB, pad.shape),
                                 batch['tokens']).astype(np.int32)
    loss2, grads2 = _loss_and_grads(model, state, garbage)
    assert float(loss) == float(loss2)
    jax.tree.map(np.testing.assert_array_equal, grads, grads2)


def test_the_model_reads_pad_wherever_the_mask_says_padding(setup, monkeypatch):
    # Bitwise equality above holds on a CPU even if the tokens under the mask reach the
    # embedding; on a GPU it needs them not to (its scatter-add order depends on them).
    _, model, state, batch = setup
    seen = []
    teacher_forcing = captioner.Captioner.teacher_forcing

    def spy(self, inputs, tokens, *args, **kwargs):
        seen.append(tokens)
        return teacher_forcing(self, inputs, tokens, *args, **kwargs)

    monkeypatch.setattr(captioner.Captioner, 'teacher_forcing', spy)
    garbage = dict(batch, tokens=np.where(batch['mask'] == 0, 7, batch['tokens']).astype(np.int32))
    train.compute_loss(state.params, state.batch_stats, garbage, model, 0.0, False)
    np.testing.assert_array_equal(seen[0], batch['tokens'][:, :-1])


def test_loss_is_the_masked_mean_of_token_cross_entropy(setup):
    _, model, state, batch = setup
    loss = train.compute_loss(state.params, state.batch_stats, batch, model, 0.0, False)[0]
    logits, _ = model.apply(state.variables(), batch['images'], batch['tokens'][:, :-1])
    logits = np.asarray(logits, np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets, mask = batch['tokens'][:, 1:], batch['mask'][:, 1:]
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    # 3 + 7 + 10 + 14 words, each followed by <end>: 38 predicted tokens.
    assert mask.sum() == 38
    np.testing.assert_allclose(loss, (nll * mask).sum() / 38, rtol=1e-5)


def test_golden_first_step_loss(setup):
    # If the model, its initialisation or the tiny config changes on purpose,
    # update this value (print it from this test) and say so in the commit.
    _, model, state, batch = setup
    loss = float(train.compute_loss(state.params, state.batch_stats, batch, model, 0.0, True)[0])
    # Freshly initialised, the logits are near zero: the loss is near ln(vocab).
    assert abs(loss - np.log(VOCAB)) < 0.15
    np.testing.assert_allclose(loss, GOLDEN_FIRST_LOSS, rtol=1e-5)


GOLDEN_FIRST_LOSS = 2.5488014221191406


def test_steps_on_one_batch_drive_the_loss_down(setup):
    config, model, _, batch = setup
    config = config.copy_and_resolve_references()
    config.optim.decay = 'constant'   # tiny's cosine schedule ends after 6 steps
    config.optim.learning_rate = 1e-2
    mesh = parallel.make_mesh(jax.devices()[:1])
    step = jax.jit(functools.partial(train.train_step, model=model, attention_reg=0.0))
    state = train.initial_state(config, model, mesh)
    history = []
    for _ in range(40):
        state, metrics = step(state, batch)
        history.append(float(metrics['loss']))
    assert int(state.step) == 40
    assert history[-1] < 0.5 * history[0], history


def test_batch_stats_update_in_training_and_not_in_eval(setup):
    _, model, state, batch = setup
    _, (_, new_stats) = train.compute_loss(state.params, state.batch_stats, batch, model, 0.0, True)
    _, (_, eval_stats) = train.compute_loss(state.params, state.batch_stats, batch, model, 0.0, False)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.batch_stats, new_stats)
    assert any(jax.tree.leaves(changed))
    jax.tree.map(np.testing.assert_array_equal, state.batch_stats, eval_stats)


def test_attention_penalty_is_zero_when_each_region_gets_total_weight_one():
    # 2 steps over 2 regions: step 0 looks at region 0, step 1 at region 1.
    alpha = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert float(losses.attention_penalty(alpha, jnp.ones((1, 2)))) == 0.0
    # Masking step 1 leaves region 1 unattended: (1 - 0)^2 = 1.
    assert float(losses.attention_penalty(alpha, jnp.array([[1.0, 0.0]]))) == 1.0


def test_nan_loss_fails_fast_with_advice():
    with pytest.raises(train.NanLossError, match='step 7.*learning_rate'):
        train.check_finite(7, {'loss': float('nan')})
    train.check_finite(7, {'loss': 1.0})


def test_unknown_schedule_is_rejected():
    config = tiny.get_config()
    config.optim.decay = 'linear'
    with pytest.raises(ValueError, match="optim.decay"):
        train.make_optimizer(config.optim, 10)
