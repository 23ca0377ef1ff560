"""ResNet v1 in the Keras layout, returning the last convolutional grid.

Layer names follow Keras' `ResNet50` (`conv1_conv`, `conv2_block1_1_conv`, ...) so
that converted ImageNet weights map one to one. The layout is Keras' v1: convs
with biases, BatchNorm epsilon 1.001e-5, zero-pad 3 + 7x7/2 stem, zero-pad 1 +
3x3/2 max-pool, and the stride on the first 1x1 conv (and the 1x1 projection)
of a stage's first block. `ResNet50` is only a preset; small presets for tests
and the synthetic data live beside it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models import winograd

BN_EPSILON = 1.001e-5   # Keras' ResNet value, not Flax's default 1e-5
BN_MOMENTUM = 0.99      # Keras' BatchNormalization default


class Conv(nn.Module):
    """`nn.Conv` (same parameters, names and initialisers) whose 1x1 case is a matmul on CPU.

    XLA:CPU lowers a 1x1 convolution to its convolution kernel, which ran at
    40-75 GFLOP/s on the 2-core VM against 90-110 for the same work as a matmul
    (ResNet-50's 1x1 convolutions at batch 32). Larger kernels stay
    convolutions: there XLA:CPU was as fast as, or faster than, a matmul over
    the patches. GPUs and TPUs keep their native convolution throughout.

    `winograd`: a 3x3 convolution with 64+ input channels may run as Winograd's
    F(2x2, 3x3) on CPU (`jaxcap.models.winograd`), equal to float32 rounding.
    Layers in inference mode ask for it: training keeps XLA's convolution.
    """
    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: str = 'VALID'   # or 'SAME'
    winograd: bool = False

    @nn.compact
    def __call__(self, x_BxHxWxC):
        kernel = self.param('kernel', nn.initializers.lecun_normal(),
                            (*self.kernel_size, x_BxHxWxC.shape[-1], self.features))
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
        if self.kernel_size == (1, 1) and jax.default_backend() == 'cpu':
            y = jnp.dot(x_BxHxWxC[:, ::self.strides, ::self.strides], kernel[0, 0])
        elif self.winograd and winograd.applies(self.kernel_size, self.strides, self.padding,
                                                x_BxHxWxC.shape[-1]):
            y = winograd.conv3x3(x_BxHxWxC, kernel)
        else:
            y = jax.lax.conv_general_dilated(x_BxHxWxC, kernel, (self.strides,) * 2, self.padding,
                                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return y + bias


class BottleneckBlock(nn.Module):
    """1x1 (stride) -> 3x3 -> 1x1 (4x filters), plus a shortcut; v1: stride on the 1x1.

    `output_stride`: compute the output only at every n-th row and column (the
    last 1x1 conv, its BatchNorm, the sum and the ReLU are per position). Only
    for a block whose BatchNorm uses its running averages: in training, the
    batch statistics would then cover fewer positions.
    """
    filters: int
    strides: int
    project_shortcut: bool
    bn_axis_name: str | None = None
    output_stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                                 momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                 axis_name=self.bn_axis_name if train else None)
        shortcut = x
        if self.project_shortcut:
            shortcut = Conv(4 * self.filters, (1, 1), self.strides, padding='VALID', name='0_conv')(x)
            shortcut = norm(name='0_bn')(shortcut)
        y = Conv(self.filters, (1, 1), self.strides, padding='VALID', name='1_conv')(x)
        y = nn.relu(norm(name='1_bn')(y))
        y = Conv(self.filters, (3, 3), padding='SAME', winograd=not train, name='2_conv')(y)
        y = nn.relu(norm(name='2_bn')(y))
        if self.output_stride > 1:
            step = self.output_stride
            y, shortcut = y[:, ::step, ::step], shortcut[:, ::step, ::step]
        y = Conv(4 * self.filters, (1, 1), padding='VALID', name='3_conv')(y)
        y = norm(name='3_bn')(y)
        return nn.relu(shortcut + y)


class ResNet(nn.Module):
    """ResNet v1 backbone without the classifier head.

    Attributes:
      stage_sizes: blocks per stage (ResNet-50: 3, 4, 6, 3).
      num_filters: bottleneck width of the first stage; doubles every stage, and
        each block outputs 4x its width (ResNet-50: 64 -> 2048 channels out).
      train_stages: how many stages, counted from the top, learn: -1 all (the
        stem too), 0 none (a frozen encoder). Frozen layers run in inference mode
        (BatchNorm statistics untouched) and no gradient flows into them.
      bn_axis_name: the mapped batch axis, in a per-device training step, so
        that BatchNorm statistics are those of the global batch.
    """
    stage_sizes: Sequence[int]
    num_filters: int = 64
    train_stages: int = -1
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x_BxHxWx3, train: bool = False, return_stages: bool = False):
        """Returns the final grid (B, H/32, W/32, C) for 4 stages, or every stage's output."""
        num_frozen = frozen_stage_count(len(self.stage_sizes), self.train_stages)

        def learns(stage: int) -> bool:  # the stem counts as stage 0
            return train and stage >= num_frozen

        x = jnp.pad(x_BxHxWx3, ((0, 0), (3, 3), (3, 3), (0, 0)))
        x = Conv(self.num_filters, (7, 7), 2, padding='VALID', name='conv1_conv')(x)
        x = nn.BatchNorm(use_running_average=not learns(0), momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, axis_name=self.bn_axis_name if learns(0) else None,
                         name='conv1_bn')(x)
        x = nn.relu(x)
        # Zero padding before the max-pool is harmless: inputs are post-ReLU, >= 0.
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')

        def subsampled(stage: int) -> bool:
            # A stage's first block reads its input through 1x1 convs of stride 2:
            # 3/4 of the previous stage's output is never read. Where its last block
            # is in inference mode, it computes only what is read (ResNet-50 on CPU:
            # ~4% less time), and the next block no longer strides. Stage outputs
            # asked for are computed whole.
            return stage + 1 < len(self.stage_sizes) and not learns(stage) and not return_stages

        stages = []
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                last = j == num_blocks - 1
                x = BottleneckBlock(
                    filters=self.num_filters * 2**i,
                    strides=2 if (i > 0 and j == 0 and not subsampled(i - 1)) else 1,
                    project_shortcut=(j == 0),
                    bn_axis_name=self.bn_axis_name,
                    output_stride=2 if (last and subsampled(i)) else 1,
                    name=f'conv{i + 2}_block{j + 1}')(x, learns(i))
            if i + 1 == num_frozen:
                x = jax.lax.stop_gradient(x)  # nothing below learns: skip its backward pass
            stages.append(x)
        return stages if return_stages else x


def frozen_stage_count(num_stages: int, train_stages: int) -> int:
    """Stages, from the bottom, that do not learn (the stem goes with the first)."""
    if train_stages < 0 or train_stages >= num_stages:
        return 0
    return num_stages - train_stages


def is_frozen_layer(layer_name: str, num_stages: int, train_stages: int) -> bool:
    """Whether a top-level ResNet layer (`conv1_bn`, `conv3_block2`, ...) is frozen."""
    num_frozen = frozen_stage_count(num_stages, train_stages)
    if layer_name.startswith('conv1_'):
        return num_frozen > 0
    stage = int(layer_name[len('conv'):layer_name.index('_')]) - 2
    return stage < num_frozen


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), num_filters=64)
# Small presets for tests and the synthetic scenes: 64x64 input -> 8x8 grid.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), num_filters=8)
ResNetSmall = functools.partial(ResNet, stage_sizes=(1, 1), num_filters=16)

