"""Encoder modes: frozen, fine-tuned top stages, converted init weights, and the feature cache."""

import functools
import os

import jax
import numpy as np
import pytest

from configs import tiny
from jaxcap import inference, parallel, train, weights
from jaxcap.data import pipeline, text
from jaxcap.models import captioner, resnet

VOCAB = 13


def _config(**encoder):
    config = tiny.get_config()
    config.optim.warmup_steps = 0
    config.optim.decay = 'constant'
    for key, value in encoder.items():
        config.model.encoder[key] = value
    return config


def _batch(config, rows=8, seed=0):
    rng = np.random.default_rng(seed)
    size, max_len = config.data.image_size, config.data.max_len
    tokens = np.zeros((rows, max_len), np.int32)
    for i in range(rows):
        n = int(rng.integers(1, max_len - 2))
        tokens[i, :n + 2] = [text.START, *rng.integers(4, VOCAB, n), text.END]
    return {'images': rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8),
            'tokens': tokens, 'mask': (tokens != text.PAD).astype(np.float32)}


def _train(config, steps=3):
    """(state before, state after) `steps` Adam steps on one batch, on one device."""
    model = captioner.from_config(config.model, VOCAB)
    before = train.initial_state(config, model, parallel.make_mesh(jax.devices()[:1]))
    before = jax.device_get(before)
    step = jax.jit(functools.partial(train.train_step, model=model, attention_reg=0.0))
    state, batch = jax.tree.map(np.copy, before), _batch(config)
    for _ in range(steps):
        state, _ = step(state, batch)
    return before, jax.device_get(state)


def _changed(a, b) -> dict[str, bool]:
    """Top-level layer name -> whether any of its arrays changed."""
    return {name: any(np.any(x != y) for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])))
            for name in a}


def test_frozen_encoder_is_bit_identical_after_training():
    before, after = _train(_config(train_stages=0))
    assert not any(_changed(before.params['encoder'], after.params['encoder']).values())
    assert not any(_changed(before.batch_stats['encoder'], after.batch_stats['encoder']).values())
    assert all(_changed(before.params['decoder'], after.params['decoder']).values())
    # Frozen parameters carry no Adam moments: nothing in the optimizer state
    # has an encoder kernel's shape.
    encoder_shapes = {x.shape for x in jax.tree.leaves(before.params['encoder']) if x.ndim == 4}
    assert not encoder_shapes & {x.shape for x in jax.tree.leaves(after.opt_state)}


def test_fine_tuning_the_top_stage_changes_it_and_nothing_below():
    # tiny's ResNet has two stages: conv2_* (below) and conv3_* (top).
    before, after = _train(_config(train_stages=1))
    params = _changed(before.params['encoder'], after.params['encoder'])
    stats = _changed(before.batch_stats['encoder'], after.batch_stats['encoder'])
    assert params == {name: name.startswith('conv3') for name in params}
    assert stats == {name: name.startswith('conv3') for name in stats}


def test_fine_tuning_everything_changes_the_stem_too():
    before, after = _train(_config(train_stages=-1))
    assert all(_changed(before.params['encoder'], after.params['encoder']).values())
    assert all(_changed(before.batch_stats['encoder'], after.batch_stats['encoder']).values())


def test_encoder_learning_rate_scale_applies_to_the_encoder_only():
    config = _config(train_stages=-1)
    config.optim.encoder_lr_scale = 0.0
    before, after = _train(config)
    assert not any(_changed(before.params['encoder'], after.params['encoder']).values())
    assert all(_changed(before.params['decoder'], after.params['decoder']).values())


def test_frozen_layers_are_labelled_from_the_top():
    assert [resnet.frozen_stage_count(4, k) for k in (-1, 0, 1, 3, 4, 9)] == [0, 4, 3, 1, 0, 0]
    assert resnet.is_frozen_layer('conv1_conv', 4, 1)
    assert resnet.is_frozen_layer('conv4_block6', 4, 1)
    assert not resnet.is_frozen_layer('conv5_block1', 4, 1)
    assert not resnet.is_frozen_layer('conv1_bn', 4, -1)


def test_converted_encoder_weights_initialise_the_encoder(tmp_path):
    config = _config(train_stages=0)
    model = resnet.ResNet(config.model.encoder.stage_sizes, config.model.encoder.num_filters)
    size = config.data.image_size
    variables = jax.device_get(captioner.init_variables(
        model, 123, np.zeros((1, size, size, 3), np.float32)))
    path = str(tmp_path / 'encoder.msgpack')
    weights.save_variables(variables, path)
    config.model.encoder.weights = path
    state = train.initial_state(config, captioner.from_config(config.model, VOCAB),
                                parallel.make_mesh(jax.devices()[:1]))
    jax.tree.map(np.testing.assert_array_equal, variables['params'], state.params['encoder'])
    jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'],
                 state.batch_stats['encoder'])


def test_encoder_weights_of_another_architecture_are_refused(tmp_path):
    config = _config(train_stages=0)
    other = resnet.ResNet((1, 1), 8)  # twice tiny's width
    size = config.data.image_size
    path = str(tmp_path / 'wide.msgpack')
    weights.save_variables(captioner.init_variables(other, 0, np.zeros((1, size, size, 3))), path)
    config.model.encoder.weights = path
    with pytest.raises(ValueError, match='does not fit model.encoder'):
        train.initial_state(config, captioner.from_config(config.model, VOCAB),
                            parallel.make_mesh(jax.devices()[:1]))


def test_a_feature_cache_needs_a_frozen_encoder():
    config = _config(train_stages=1)
    config.data.features_dir = '/tmp/somewhere'
    with pytest.raises(ValueError, match='train_stages=0'):
        train.check_encoder_mode(config)


def _losses(config, steps):
    """Losses of `steps` training steps on the configured source, from a fresh state."""
    source = pipeline.training_source(config)
    vocab = pipeline.build_vocabulary(source, config.data.max_words)
    model = captioner.from_config(config.model, len(vocab))
    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer = train.data_parallel_step(model, 0.0, mesh)
    state = trainer.put_state(train.initial_state(config, model, mesh))
    batches = iter(pipeline.train_dataset(source, vocab, config.data, config.train.batch_size,
                                          config.seed))
    losses = []
    for _ in range(steps):
        batch = next(batches)
        state, metrics = trainer.step(state, trainer.put_batch(batch))
        losses.append(float(metrics['loss']))
    return losses, batch


def test_training_from_the_cache_equals_the_frozen_encoder_on_images(tmp_path):
    config = _config(train_stages=0)
    config.data.tfds_dir = str(tmp_path / 'tfds')
    on_the_fly, batch = _losses(config, 5)
    assert 'images' in batch
    config.data.features_dir = str(tmp_path / 'features')
    dirs = inference.extract_features(config)
    assert [os.path.basename(d) for d in dirs] == ['train', 'val']
    cached, batch = _losses(config, 5)
    assert 'features' in batch and batch['features'].dtype == np.float16
    # The same trajectory, to the precision of float16 grids.
    np.testing.assert_allclose(cached, on_the_fly, rtol=2e-3)
    assert on_the_fly[-1] < on_the_fly[0]
