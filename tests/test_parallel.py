"""Data parallelism: the per-device step, mapped both ways over 8 devices, equals one device."""

import functools

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from jaxcap import parallel, train
from jaxcap.data import text
from jaxcap.models import captioner

VOCAB = 13
ROWS = 16  # two per fake device


@pytest.fixture(scope='module')
def setup():
    config = tiny.get_config()
    config.optim.warmup_steps = 0
    config.optim.decay = 'constant'   # a non-zero learning rate at step 0
    model = captioner.from_config(config.model, VOCAB)
    rng = np.random.default_rng(0)
    size, max_len = config.data.image_size, config.data.max_len
    tokens = np.zeros((ROWS, max_len), np.int32)
    for i in range(ROWS):
        n = int(rng.integers(1, max_len - 2))
        tokens[i, :n + 2] = [text.START, *rng.integers(4, VOCAB, n), text.END]
    batch = {'images': rng.integers(0, 256, (ROWS, size, size, 3), dtype=np.uint8),
             'tokens': tokens, 'mask': (tokens != text.PAD).astype(np.float32)}
    return config, model, batch


def _with_sgd(state):
    """Plain SGD, so that equal parameters mean equal gradients (Adam would hide a
    scale error, and turn the rounding noise of zero gradients into full steps)."""
    tx = optax.sgd(0.5)
    return state.replace(tx=tx, opt_state=tx.init(state.params))


def _single_device_steps(config, model, batch, steps, attention_reg):
    """The reference: the whole batch on one device, no collectives."""
    state = _with_sgd(train.initial_state(config, model, parallel.make_mesh(jax.devices()[:1])))
    step = jax.jit(functools.partial(train.train_step, model=model, attention_reg=attention_reg))
    for _ in range(steps):
        state, metrics = step(state, batch)
    return state, metrics


def _data_parallel_steps(config, model, batch, steps, attention_reg, mode):
    mesh = parallel.make_mesh()
    trainer = train.data_parallel_step(model, attention_reg, mesh, mode)
    state = trainer.put_state(_with_sgd(train.initial_state(config, model, mesh)))
    for _ in range(steps):
        state, metrics = trainer.step(state, trainer.put_batch(batch))
    return trainer.get_state(state), metrics


def _assert_trees_close(actual, expected, tol=1e-5):
    """Every leaf within `tol` of its own scale: summation order differs across devices."""
    def check(path, a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.abs(b).max(), 1e-6)
        assert np.abs(a - b).max() <= tol * scale + 1e-7, (jax.tree_util.keystr(path), np.abs(a - b).max(), scale)
    jax.tree_util.tree_map_with_path(check, actual, expected)


@pytest.mark.parametrize('mode, attention_reg', [('shard_map', 0.5), ('pmap', 0.0)])
def test_eight_devices_equal_one_device(setup, mode, attention_reg):
    config, model, batch = setup
    assert jax.device_count() == 8
    s1, m1 = _single_device_steps(config, model, batch, 2, attention_reg)
    s8, m8 = _data_parallel_steps(config, model, batch, 2, attention_reg, mode)
    # Not N times the gradient (the shard_map trap), nor 1/N of it: the same update.
    np.testing.assert_allclose(float(m8['loss']), float(m1['loss']), rtol=1e-5)
    np.testing.assert_allclose(float(m8['grad_norm']), float(m1['grad_norm']), rtol=1e-4)
    _assert_trees_close(s8.params, s1.params)
    # BatchNorm statistics of the global batch, not of one device's two rows.
    _assert_trees_close(s8.batch_stats, s1.batch_stats)
    assert int(s8.step) == 2
    assert s8.params['decoder']['embedding']['embedding'].sharding.is_fully_replicated


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="parallel.mode must be one of"):
        parallel.DataParallel(lambda s, b: (s, {}), parallel.make_mesh(), 'pjit')


def test_batch_size_that_does_not_divide_the_devices_fails_clearly():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match=r'batch_size=12 .* 8 devices.*=16 or 8'):
        parallel.check_batch_size(12, mesh)
    parallel.check_batch_size(16, mesh)
