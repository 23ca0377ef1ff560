"""Tests for jaxcap.visualize: attention overlays and the per-word figure."""

import numpy as np
import pytest
from PIL import Image

from jaxcap import visualize

GRID_HW = (3, 4)  # non-square, so a transposed reshape would put the heat elsewhere
HEIGHT, WIDTH = 60, 80  # each grid cell covers 20 x 20 pixels


def _grey_image():
    return np.full((HEIGHT, WIDTH, 3), 128, np.uint8)


def _one_hot(row, col):
    alpha = np.zeros(GRID_HW[0] * GRID_HW[1], np.float32)
    alpha[row * GRID_HW[1] + col] = 1.0
    return alpha


def _red_heat(alpha):
    """Red-channel gain of an overlay over the overlay of uniform attention."""
    image = _grey_image()
    uniform = np.full_like(alpha, 1.0 / alpha.size)
    peaked = visualize.overlay_attention(image, alpha, GRID_HW).astype(np.int32)
    flat = visualize.overlay_attention(image, uniform, GRID_HW).astype(np.int32)
    return peaked[..., 0] - flat[..., 0]


@pytest.mark.parametrize('cell', [(0, 0), (0, 3), (2, 0), (1, 2)])
def test_overlay_heat_lands_on_the_attended_cell(cell):
    row, col = cell
    heat = _red_heat(_one_hot(row, col))
    peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
    assert (peak_y // 20, peak_x // 20) == cell  # the hottest pixel is inside the cell
    # And the cell's block is the hottest of all cells on average.
    block_means = heat.reshape(3, 20, 4, 20).mean(axis=(1, 3))
    assert np.unravel_index(np.argmax(block_means), block_means.shape) == cell


def test_overlay_of_uniform_attention_is_the_plain_image():
    image = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    out = visualize.overlay_attention(image, np.full(12, 1 / 12, np.float32), GRID_HW)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, image)


def test_overlay_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r'\(10,\).*\(12,\)'):
        visualize.overlay_attention(_grey_image(), np.ones(10), GRID_HW)
    with pytest.raises(ValueError, match='HxWx3 uint8'):
        visualize.overlay_attention(np.zeros((4, 4), np.uint8), np.ones(12), GRID_HW)


def test_plot_attention_writes_a_png(tmp_path):
    words = ['a', 'dog', 'costs', '$5', 'on', 'the', 'grass']  # '$' must not trigger mathtext
    rng = np.random.default_rng(0)
    alpha = rng.dirichlet(np.ones(12), size=len(words) + 2)  # extra rows (e.g. <end>) are fine
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    path = tmp_path / 'nested' / 'dir' / 'attention.png'
    returned = visualize.plot_attention(image, words, alpha, GRID_HW, path, title='step 100')
    assert returned == str(path)
    with Image.open(path) as png:
        assert png.format == 'PNG'
        width, height = png.size
    # 8 panels -> 2 rows of 5 columns at 2.4 x 2.6 inches, 100 dpi.
    assert 800 <= width <= 1600 and 350 <= height <= 800


def test_plot_attention_does_not_register_pyplot_figures(tmp_path):
    from matplotlib import pyplot as plt  # noqa: PLC0415 - only to inspect its registry

    before = plt.get_fignums()
    for i in range(3):
        path = tmp_path / f'{i}.png'
        visualize.plot_attention(_grey_image(), ['a'], np.ones((1, 12)), GRID_HW, path)
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    'alpha_shape',
    [(2, 12), (3, 11), (36,)],
    ids=['too-few-rows', 'wrong-region-count', 'not-2d'],
)
def test_plot_attention_rejects_bad_shapes(tmp_path, alpha_shape):
    words = ['a', 'red', 'bus']
    with pytest.raises(ValueError) as info:
        visualize.plot_attention(
            _grey_image(), words, np.ones(alpha_shape), GRID_HW, tmp_path / 'x.png'
        )
    message = str(info.value)
    assert str(alpha_shape) in message and '(3, 4)' in message
    assert not (tmp_path / 'x.png').exists()
