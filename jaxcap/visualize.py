"""Attention heatmaps: which image regions the decoder looked at for each word.

Figures are drawn with matplotlib's object API on an Agg canvas, never through
``pyplot``: that needs no display (headless-safe), leaves the process-wide
backend alone (importing this module in a notebook does not break inline
plots), and keeps no global figure registry, so nothing leaks across calls.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

_MAX_COLUMNS = 5
_PANEL_INCHES = (2.4, 2.6)  # width, height: room for the word above each image
_DISPLAY_MAX_SIDE = 320  # panels are small; full-size photos only bloat the PNG
_CAPTION_WRAP = 28


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f'Expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}.'
        )


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinearly upsamples a float grid to height x width (PIL 'F' mode keeps floats)."""
    resized = Image.fromarray(grid.astype(np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def _normalise(heat: np.ndarray) -> np.ndarray:
    """Min-max scales to [0, 1]; a flat map (no preference) becomes all zeros."""
    low, high = float(heat.min()), float(heat.max())
    if high - low < 1e-12:
        return np.zeros_like(heat)
    return (heat - low) / (high - low)


def overlay_attention(
    image: np.ndarray,
    alpha_R: np.ndarray,
    grid_hw: tuple[int, int],
    *,
    cmap: str = 'jet',
    strength: float = 0.6,
) -> np.ndarray:
    """Blends one word's attention map over the image.

    The map is reshaped row-major to ``grid_hw`` (cell ``r`` is row
    ``r // grid_w``, column ``r % grid_w``, counted from the top-left, which is
    how a ``(B, H, W, C)`` feature map flattens to ``(B, H*W, C)``), upsampled
    bilinearly to the image size and min-max normalised. Each pixel is then
    mixed with its colormap colour in proportion to its heat, so unattended
    regions keep their original colours.

    Args:
        image: HxWx3 uint8 RGB image.
        alpha_R: Attention weights, shape ``(grid_h * grid_w,)``.
        grid_hw: ``(grid_h, grid_w)`` of the encoder's feature grid.
        cmap: Matplotlib colormap name.
        strength: Colour weight at the hottest pixel, in [0, 1].

    Returns:
        The blended HxWx3 uint8 image.

    Raises:
        ValueError: If the image or attention shape is wrong.
    """
    _check_image(image)
    alpha = np.asarray(alpha_R, dtype=np.float32)
    grid_h, grid_w = grid_hw
    if alpha.shape != (grid_h * grid_w,):
        raise ValueError(
            f'alpha_R has shape {alpha.shape}, expected ({grid_h * grid_w},) for grid_hw {grid_hw}.'
        )
    height, width = image.shape[:2]
    heat = _normalise(_upsample(alpha.reshape(grid_h, grid_w), height, width))
    colours = matplotlib.colormaps[cmap](heat)[..., :3] * 255.0
    weight = strength * heat[..., None]
    blended = image.astype(np.float32) * (1.0 - weight) + colours * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _check_attention(alpha: np.ndarray, num_words: int, grid_hw: tuple[int, int]) -> None:
    grid_h, grid_w = grid_hw
    if alpha.ndim != 2 or alpha.shape[0] < num_words or alpha.shape[1] != grid_h * grid_w:
        raise ValueError(
            f'alpha_TxR has shape {alpha.shape}, expected (T >= {num_words} words, '
            f'R = {grid_h}*{grid_w} = {grid_h * grid_w}) for {num_words} words and '
            f'grid_hw {grid_hw}.'
        )


def _display_copy(image: np.ndarray) -> np.ndarray:
    """Shrinks big photos (keeping aspect) so the figure stays small and fast."""
    height, width = image.shape[:2]
    scale = _DISPLAY_MAX_SIDE / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def _plain(text: str) -> str:
    """Escapes '$' so matplotlib does not parse words like '$5' as mathtext."""
    return text.replace('$', r'\$')


def _draw_panel(ax: Axes, image: np.ndarray, label: str) -> None:
    ax.imshow(image)
    ax.set_title(_plain(label), fontsize=10)
    ax.axis('off')


def plot_attention(
    image: np.ndarray,
    words: Sequence[str],
    alpha_TxR: np.ndarray,
    grid_hw: tuple[int, int],
    path: str | os.PathLike,
    title: str | None = None,
) -> str:
    """Saves a PNG with one attention panel per generated word.

    The first panel is the plain image titled with the whole caption; each
    following panel is :func:`overlay_attention` of one word's attention row,
    titled with the word. Panels are laid out in rows of up to five.

    Args:
        image: HxWx3 uint8 RGB image (at any size; shrunk for display).
        words: The generated words, in order.
        alpha_TxR: Attention weights, shape ``(T, grid_h * grid_w)`` with
            ``T >= len(words)``; row ``t`` belongs to ``words[t]`` (extra rows,
            e.g. for ``<end>`` or padding, are ignored).
        grid_hw: ``(grid_h, grid_w)`` of the encoder's feature grid.
        path: Where to write the PNG; parent directories are created.
        title: Optional figure title.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: If the image or attention shapes are wrong.
    """
    _check_image(image)
    alpha = np.asarray(alpha_TxR, dtype=np.float32)
    _check_attention(alpha, len(words), grid_hw)
    shown = _display_copy(image)

    num_panels = len(words) + 1
    columns = min(_MAX_COLUMNS, num_panels)
    rows = math.ceil(num_panels / columns)
    figure = Figure(
        figsize=(columns * _PANEL_INCHES[0], rows * _PANEL_INCHES[1]), layout='constrained'
    )
    FigureCanvasAgg(figure)  # attaches the headless canvas that savefig renders with
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    _draw_panel(axes[0], shown, textwrap.fill(' '.join(words), _CAPTION_WRAP))
    for ax, word, alpha_R in zip(axes[1:], words, alpha):
        _draw_panel(ax, overlay_attention(shown, alpha_R, grid_hw), word)
    for ax in axes[num_panels:]:
        ax.axis('off')
    if title:
        figure.suptitle(_plain(title))

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format='png', dpi=100)
    return path
