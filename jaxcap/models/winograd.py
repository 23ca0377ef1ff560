"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3): 16 multiplies for 36.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016).
Each 2x2 block of outputs is read from a 4x4 tile of the input (tiles overlap
by 2). With d a tile and g a 3x3 kernel, the block is

    A^T [(G g G^T) * (B^T d B)] A

where * multiplies elementwise: per channel pair, 16 products instead of the
direct 2 x 2 x 9 = 36. Over channels, each of the 16 positions of the
transformed tile is one matmul (tiles x C_in) @ (C_in x C_out), so the matmul
work is 16/36 of the convolution's; the transforms are additions.

On XLA:CPU the matmuls saved outweigh the transforms' memory traffic at
ResNet-50's shapes: its 3x3 convolutions alone, on chunks of 8 images (as
feature extraction runs them), ran 1.53-1.55x (56x56x64), 1.41-1.44x
(28x28x128), 1.78-1.79x (14x14x256) and 1.34-1.42x (7x7x512) as fast as XLA's
convolution (BENCHMARKS.md, round 11). The result is the convolution's to
float32 rounding (the sums run in another order): ~1e-6 of the output's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)

# Input channels from which `conv3x3` replaces XLA:CPU's convolution (`applies`):
# the fewest measured. With fewer, the matmuls shrink and the transforms stay.
MIN_CHANNELS = 64

# The 2-D transforms on tiles flattened row by row: kron(M, M) vec(X) = vec(M X M^T).
_INPUT_16x16 = np.kron(_B_T, _B_T)
_KERNEL_16x9 = np.kron(_G, _G)
_OUTPUT_4x16 = np.kron(_A_T, _A_T)


def conv3x3(x_BxHxWxC, kernel_3x3xCxK):
    """`lax.conv_general_dilated(x, kernel, (1, 1), 'SAME')`, NHWC and HWIO, by F(2x2, 3x3)."""
    batch, height, width, _ = x_BxHxWxC.shape
    rows, cols = -(-height // 2), -(-width // 2)   # tiles: odd sizes get a padded last one
    x = jnp.pad(x_BxHxWxC, ((0, 0), (1, 2 * rows + 1 - height), (1, 2 * cols + 1 - width), (0, 0)))
    # The input at tile offset (u, v) of every tile, as (tiles, C) matrices.
    at_offset = [x[:, u:u + 2 * rows - 1:2, v:v + 2 * cols - 1:2].reshape(batch * rows * cols, -1)
                 for u in range(4) for v in range(4)]
    taps = [kernel_3x3xCxK[i, j] for i in range(3) for j in range(3)]
    # One matmul per transformed position, kept apart: stacked, the 16 operands
    # were copied into one array (more time than the matmuls saved).
    products = [jnp.dot(_combine(_INPUT_16x16[p], at_offset), _combine(_KERNEL_16x9[p], taps))
                for p in range(16)]
    y_ab = [_combine(_OUTPUT_4x16[ab], products).reshape(batch, rows, cols, -1) for ab in range(4)]
    # Output (2i + a, 2j + b) of tile (i, j): interleave the four.
    y = jnp.stack([jnp.stack(y_ab[0:2], axis=3), jnp.stack(y_ab[2:4], axis=3)], axis=2)
    return y.reshape(batch, 2 * rows, 2 * cols, -1)[:, :height, :width]


def _combine(coefficients, arrays):
    """sum_i coefficients[i] * arrays[i], skipping zeros and multiplying by +-1 as adds."""
    total = None
    for c, a in zip(coefficients, arrays, strict=True):
        if c == 0:
            continue
        term = a if c == 1 else -a if c == -1 else float(c) * a
        total = term if total is None else total + term
    return total


def applies(kernel_size, strides: int, padding: str, in_channels: int) -> bool:
    """Whether `conv3x3` should replace the convolution: a 3x3 SAME, stride 1, on CPU.

    Only with `MIN_CHANNELS` input channels or more.
    """
    return (tuple(kernel_size) == (3, 3) and strides == 1 and padding == 'SAME'
            and in_channels >= MIN_CHANNELS and jax.default_backend() == 'cpu')
