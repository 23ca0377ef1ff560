"""Winograd's F(2x2, 3x3) convolution: XLA's convolution to float32 rounding, where it runs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap.models import resnet, winograd


def _xla_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('height, width', [(7, 7), (8, 6), (1, 5), (2, 3), (14, 14)])
def test_winograd_equals_the_convolution_at_even_and_odd_sizes(height, width):
    # Odd sizes end on a padded tile whose extra outputs are cropped.
    x = jax.random.normal(jax.random.key(0), (3, height, width, 5))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 5, 4))
    want = _xla_conv(x, kernel)
    got = jax.jit(winograd.conv3x3)(x, kernel)
    assert got.shape == want.shape == (3, height, width, 4)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)


def test_winograd_matches_each_kernel_tap_on_its_own():
    # One nonzero tap at a time: each of the 9 offsets lands where the convolution puts it.
    x = jax.random.normal(jax.random.key(2), (1, 5, 6, 2))
    for i in range(3):
        for j in range(3):
            kernel = jnp.zeros((3, 3, 2, 3)).at[i, j].set(jax.random.normal(jax.random.key(i * 3 + j),
                                                                             (2, 3)))
            want = _xla_conv(x, kernel)
            # Scaled: where the tap reads padding, the convolution's exact zeros come
            # out of Winograd's transforms as rounding (1.3e-6 on an H200).
            np.testing.assert_allclose(winograd.conv3x3(x, kernel), want, rtol=1e-5,
                                       atol=1e-6 * float(jnp.abs(want).max()),
                                       err_msg=f'tap ({i}, {j})')


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='Winograd runs on CPU only')
@pytest.mark.parametrize('channels, train, runs_winograd', [
    (winograd.MIN_CHANNELS, False, True),        # inference, enough channels
    (winograd.MIN_CHANNELS, True, False),        # training keeps the convolution
    (winograd.MIN_CHANNELS // 2, False, False)])  # too few channels to pay
def test_resnet_blocks_use_winograd_only_in_inference_with_enough_channels(channels, train,
                                                                            runs_winograd):
    block = resnet.BottleneckBlock(filters=channels, strides=1, project_shortcut=True)
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 8))
    variables = block.init(jax.random.key(4), x, train=False)
    apply = jax.jit(functools.partial(block.apply, train=train, mutable=['batch_stats']))
    compiled = apply.lower(variables, x).compile().as_text()
    assert (' convolution(' not in compiled) == runs_winograd
    y, _ = apply(variables, x)
    # The same block with XLA's convolution everywhere.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(winograd, 'MIN_CHANNELS', 10**9)
        want, _ = jax.jit(functools.partial(block.apply, train=train, mutable=['batch_stats']))(
            variables, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))
