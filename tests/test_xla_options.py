"""The XLA:CPU options of the decoders and the feature extractor: YNNPACK keeps the matmuls alone."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import decode, inference, xla_options
from jaxcap.models import captioner

VOCAB, MAX_LEN = 11, 7

# YNNPACK and these options are XLA:CPU's: a GPU or TPU has neither to inspect.
cpu_only = pytest.mark.skipif(jax.default_backend() != 'cpu', reason="checks XLA:CPU's options")


@pytest.fixture(scope='module')
def model_and_inputs():
    # Big enough for XLA to give the matmuls (and, by default, the score reduction) to YNNPACK.
    model = captioner.Captioner(vocab_size=VOCAB, stage_sizes=(), embed_dim=32, units=64,
                                attention_units=64)
    features = jax.random.normal(jax.random.key(3), (8, 4, 4, 6))
    variables = captioner.init_variables(model, 0, features, jnp.zeros((8, 3), jnp.int32))
    variables['params']['decoder']['logits']['kernel'] *= 20.0   # no argmax near-ties
    return model, variables, features


def _ynn_fusion_bodies(compiled_text):
    """The HLO of each computation that a YNNPACK fusion calls."""
    called = [re.search(r'calls=%?([\w.\-]+)', line).group(1)
              for line in compiled_text.splitlines() if '"kind":"__ynn_fusion"' in line]
    assert called, 'no YNNPACK fusion at all: the matmuls should still use it'
    return [re.search(r'\n%?' + re.escape(name) + r' .*?\n\}', compiled_text, re.S).group(0)
            for name in called]


@cpu_only
@pytest.mark.parametrize('beam_size', [1, 3])
def test_decoder_reductions_stay_out_of_ynnpack_and_its_matmuls_stay_in(model_and_inputs,
                                                                        beam_size):
    model, variables, features = model_and_inputs
    decoder = decode.make_decoder(model, MAX_LEN, beam_size=beam_size)
    bodies = _ynn_fusion_bodies(decoder.lower(variables, features).compile().as_text())
    assert any(' dot(' in body for body in bodies)
    assert not [body for body in bodies if ' reduce(' in body]


@pytest.mark.parametrize('beam_size', [1, 3])
def test_cpu_options_leave_the_captions_unchanged(model_and_inputs, beam_size):
    model, variables, features = model_and_inputs
    ours = decode.make_decoder(model, MAX_LEN, beam_size=beam_size)(variables, features)
    plain = jax.jit(lambda v, x: decode.beam_search(model, v, x, MAX_LEN, beam_size, 'gnmt', 0.6, False)
                    if beam_size > 1 else decode.greedy_decode(model, v, x, MAX_LEN))(variables, features)
    np.testing.assert_array_equal(ours.tokens_BxL, plain.tokens_BxL)
    np.testing.assert_allclose(ours.log_prob_B, plain.log_prob_B, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope='module')
def resnet_and_images():
    # One bottleneck block per stage: the 7x7 stem and 3x3 convolutions of ResNet-50, 1x1s as matmuls.
    model = captioner.Captioner(vocab_size=VOCAB, stage_sizes=(1, 1), embed_dim=8, units=8,
                                attention_units=8)
    images = jax.random.randint(jax.random.key(5), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    variables = captioner.init_variables(model, 0, images, jnp.zeros((2, 3), jnp.int32))
    return model, variables, images


@cpu_only
def test_feature_extraction_runs_its_convolutions_outside_ynnpack(resnet_and_images):
    model, variables, images = resnet_and_images
    compiled = inference.grid_encoder(model).lower(variables, images).compile().as_text()
    assert ' convolution(' in compiled
    bodies = _ynn_fusion_bodies(compiled)   # the 1x1 convolutions' matmuls
    assert not [body for body in bodies if ' convolution(' in body]


def test_feature_extraction_options_leave_the_grids_unchanged(resnet_and_images):
    model, variables, images = resnet_and_images
    ours = inference.grid_encoder(model)(variables, images)
    plain = jax.jit(lambda x: model.apply(variables, x, method=captioner.Captioner.encode_grid))(images)
    assert ours.shape == plain.shape == (2, 8, 8, 512)
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5 * float(jnp.abs(plain).max()))


@pytest.mark.parametrize('count, chunk', [(11, 4), (9, 3), (5, 8)])
def test_feature_extraction_in_chunks_gives_every_image_its_own_grid(resnet_and_images, count, chunk):
    model, variables, _ = resnet_and_images
    images = jax.random.randint(jax.random.key(count), (count, 64, 64, 3), 0, 256).astype(jnp.uint8)
    ours = inference.grid_encoder(model, chunk=chunk)(variables, images)
    plain = jax.jit(lambda x: model.apply(variables, x, method=captioner.Captioner.encode_grid))(images)
    assert ours.shape == plain.shape == (count, 8, 8, 512)
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5 * float(jnp.abs(plain).max()))


def test_a_decoder_inside_another_jit_runs_there_with_the_same_captions(model_and_inputs):
    # jax refuses compiler options on a nested jit: the decoder must still compose.
    model, variables, features = model_and_inputs
    decoder = decode.make_decoder(model, MAX_LEN, beam_size=1)
    inner = jax.jit(lambda v, x: decoder(v, x).tokens_BxL)(variables, features)
    np.testing.assert_array_equal(inner, decoder(variables, features).tokens_BxL)


@cpu_only   # elsewhere cpu_options() is None without asking XLA
def test_an_option_xla_does_not_know_falls_back_to_its_defaults(monkeypatch, caplog):
    monkeypatch.setattr(xla_options, 'CPU_OPTIONS', {'xla_cpu_no_such_option': 'x'})
    xla_options.cpu_options.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert xla_options.cpu_options() is None
        assert 'rejected the compiler options' in caplog.text
        assert float(xla_options.jit(lambda x: 2 * x)(np.float32(3))) == 6.0
    finally:
        xla_options.cpu_options.cache_clear()   # the next caller gets the real options
