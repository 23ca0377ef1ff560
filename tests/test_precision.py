"""bfloat16 mixed precision (`model.dtype`): float32 parameters, bf16 matmuls, and it trains."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from jaxcap import train
from jaxcap.data import text
from jaxcap.models import captioner

# 30 steps: over the first 12, bf16's loss fell to 0.69-0.71 of its start depending on
# the device (one CPU device, eight, an H200), too close to any threshold. By step 30 it
# is 0.50 on one CPU device, and on eight rounding bf16 as GPUs do (float32: 0.485).
VOCAB, STEPS = 13, 30


def _batch():
    config = tiny.get_config()
    rng = np.random.default_rng(0)
    size, max_len = config.data.image_size, config.data.max_len
    tokens = np.zeros((4, max_len), np.int32)
    for i, n in enumerate([3, 7, 10, 14]):
        tokens[i, :n + 2] = [text.START, *rng.integers(4, VOCAB, n), text.END]
    return {'images': rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
            'tokens': tokens, 'mask': (tokens != text.PAD).astype(np.float32)}


def _train(dtype: str, batch):
    """STEPS Adam steps on one fixed batch: (losses, final state, model)."""
    config = tiny.get_config()
    config.model.dtype = dtype
    model = captioner.from_config(config.model, VOCAB)
    tx = optax.adam(1e-2)
    state = train.create_train_state(model, tx, 0, batch['images'][:1], batch['tokens'][:1, :-1])
    step = jax.jit(functools.partial(train.train_step, model=model, attention_reg=0.0))
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics['loss']))
    return np.array(losses), state, model


@pytest.fixture(scope='module')
def runs():
    batch = _batch()
    return batch, {dtype: _train(dtype, batch) for dtype in ('float32', 'bfloat16')}


def test_bfloat16_training_reduces_the_loss_and_stays_close_to_float32(runs):
    _, results = runs
    f32, bf16 = results['float32'][0], results['bfloat16'][0]
    assert bf16[-1] < 0.6 * bf16[0], bf16
    # Same initial parameters: the first loss differs only by bf16 rounding
    # (~3 significant digits per matmul input), later ones drift a little more.
    np.testing.assert_allclose(bf16[0], f32[0], rtol=1e-2)
    np.testing.assert_allclose(bf16, f32, atol=0.1 * f32[0])


def test_bfloat16_keeps_float32_parameters_and_logits(runs):
    batch, results = runs
    _, state, model = results['bfloat16']
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    logits, alpha = model.apply(state.variables(), batch['images'], batch['tokens'][:, :-1])
    assert logits.dtype == jnp.float32 and alpha.dtype == jnp.float32
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)


def test_bfloat16_runs_the_decoder_matmuls_in_bfloat16(runs):
    batch, results = runs
    _, state, model = results['bfloat16']
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(
        state.variables(), batch['images'], batch['tokens'][:, :-1])
    dots = [e for e in _all_equations(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
    bf16 = [e for e in dots if e.invars[0].aval.dtype == jnp.bfloat16]
    # The ResNet stays float32; the projection, attention keys, input gates, the
    # loop's three fused matmuls and the vocabulary projection run in bf16.
    assert len(bf16) >= 7, [str(e.invars[0].aval) for e in dots]
    # The vocabulary projection accumulates in float32 (the loss needs the precision).
    vocab = [e for e in bf16 if e.outvars[0].aval.shape[-1] == VOCAB]
    assert vocab and all(e.outvars[0].aval.dtype == jnp.float32 for e in vocab)


def _all_equations(jaxpr):
    """Every equation, also those inside scans, custom derivatives and other sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, 'jaxpr', sub)
                if hasattr(inner, 'eqns'):
                    yield from _all_equations(inner)


def test_an_unknown_dtype_names_the_config_key():
    config = tiny.get_config()
    config.model.dtype = 'float16'
    with pytest.raises(ValueError, match='model.dtype'):
        captioner.from_config(config.model, VOCAB)
