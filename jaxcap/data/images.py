"""Robust image loading, resizing and model-input preprocessing.

``load_image`` turns any image file PIL can decode into an HxWx3 uint8 RGB
array, or raises :class:`ImageLoadError` with a one-line message; training data
and user-supplied images go through the same path (`decode`), so the model sees
the same pixel statistics for both.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PREPROCESS_MODES = ('unit', 'caffe')

# Keras ResNet50 'caffe' means, in BGR order, for 0-255 inputs.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# Transparent pixels are composited on white: that is how browsers and viewers
# show such images (icons, logos, product shots), so it matches what a human
# captioner saw. Dropping alpha instead exposes whatever colour is stored under
# fully transparent pixels, which is often black or garbage.
_BACKGROUND_RGB = (255, 255, 255)
_ALPHA_MODES = frozenset({'RGBA', 'LA', 'PA', 'RGBa'})
_SIXTEEN_BIT_MODES = frozenset({'I', 'I;16', 'I;16L', 'I;16B', 'I;16N'})


class ImageLoadError(ValueError):
    """An image file could not be loaded.

    Attributes:
        path: The file that failed.
        reason: What went wrong.
        hint: What the user can do about it.
    """

    def __init__(self, path: str, reason: str, hint: str = 'Check the file or remove it.') -> None:
        # Keep all fields in args so the exception pickles (e.g. across data-loader workers).
        super().__init__(path, reason, hint)
        self.path = path
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return f'Cannot load image {self.path!r}: {self.reason}. {self.hint}'


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise ImageLoadError(path, 'file not found', 'Check the path and working directory.')
    if os.path.isdir(path):
        raise ImageLoadError(path, 'is a directory, not an image file', 'Pass an image file.')


def _check_pixel_count(image: Image.Image, path: str) -> None:
    """Rejects decompression bombs before decoding any pixels.

    PIL itself only warns between ``Image.MAX_IMAGE_PIXELS`` (~89.5 MP by
    default) and twice that; we refuse the whole range so a hostile or broken
    file cannot exhaust memory in a data-loader worker.
    """
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ImageLoadError(
            path,
            f'image is {width}x{height} = {width * height} pixels, above the '
            f'{limit}-pixel safety limit (possible decompression bomb)',
            'Downscale it first, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it.',
        )


def _sixteen_bit_to_uint8(image: Image.Image) -> np.ndarray:
    """Scales 0..65535 to 0..255 (rounding), rather than clipping at 255 like PIL's convert."""
    values = np.asarray(image).astype(np.float64)
    # Mode 'I' is 32-bit signed, but in practice holds 16-bit PNG/TIFF samples.
    values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
    return np.rint(values).astype(np.uint8)


def _composite_on_background(image: Image.Image) -> Image.Image:
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, _BACKGROUND_RGB + (255,))
    return Image.alpha_composite(background, rgba).convert('RGB')


def _to_rgb_image(image: Image.Image) -> Image.Image:
    """Converts any decoded PIL image to an RGB one."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_sixteen_bit_to_uint8(image), 'L').convert('RGB')
    # 'transparency' covers palette/L/RGB images with a tRNS chunk or GIF transparency.
    if image.mode in _ALPHA_MODES or 'transparency' in image.info:
        return _composite_on_background(image)
    if image.mode != 'RGB':
        # Covers 1, L, P, CMYK (PIL undoes Adobe's inverted CMYK), YCbCr, LAB, HSV, F.
        return image.convert('RGB')
    return image


def decode(image: Image.Image, size: int | None = None, exif_orientation: bool = True
           ) -> np.ndarray:
    """An opened PIL image (header read, pixels not yet) -> HxWx3 uint8 RGB, size x size if given.

    With a `size`, a JPEG whose sides are both at least twice `size` is decoded
    at 1/2, 1/4 or 1/8 scale, the greatest reduction that keeps both sides at
    least `size` (libjpeg's DCT scaling, PIL's `draft`), and then resized as
    `resize` does. A 640x480 JPEG to 224 took 2.1 ms to decode and 2.1 to resize at
    full scale, 2.65 ms for both this way; the pixels differ by ~2/255 on
    average (another low-pass filter). Training data (`jaxcap.data.coco`) and
    user images (`load_image`) both come through here, so they stay alike.
    """
    if size is not None:
        _check_size(size)
        image.draft(None, (size, size))   # a no-op for other formats
    # Image.open only reads the header; load() decodes everything now, so a
    # truncated or corrupt file fails here instead of later, half-loaded.
    image.load()
    if exif_orientation:
        ImageOps.exif_transpose(image, in_place=True)  # no extra full-size copy
    rgb = _to_rgb_image(image)
    if size is not None and rgb.size != (size, size):
        rgb = _resized(rgb, size)
    return np.array(rgb, dtype=np.uint8)


def _decode(path: str, size: int | None) -> np.ndarray:
    with Image.open(path) as image:
        _check_pixel_count(image, path)
        return decode(image, size)


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Loads an image file as RGB, whatever its mode, orientation or bit depth.

    Handles grayscale, 1-bit, palette (with transparency), RGBA/LA (composited
    on white), CMYK JPEG, 16-bit grayscale (scaled, not clipped) and EXIF
    orientation. Multi-frame files (GIF, TIFF) yield their first frame.

    Args:
        path: Image file path.
        size: resize to size x size (see `decode`: a large JPEG is decoded at a
            reduced scale first); None keeps the image's own size.

    Returns:
        An HxWx3 uint8 RGB array (a fresh, writable copy).

    Raises:
        ImageLoadError: If the path is missing or a directory, the file is not
            an image, is corrupt or truncated, or is larger than
            ``PIL.Image.MAX_IMAGE_PIXELS``.
    """
    path = os.fspath(path)
    if size is not None:
        _check_size(size)
    _check_path(path)
    try:
        return _decode(path, size)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError:
        raise ImageLoadError(
            path,
            'image is far above the PIL.Image.MAX_IMAGE_PIXELS safety limit '
            '(possible decompression bomb)',
            'Downscale it first, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it.',
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            path, 'not a recognised image format', 'Pass a JPEG, PNG, GIF, BMP, TIFF or WebP file.'
        ) from None
    except PermissionError:
        raise ImageLoadError(path, 'permission denied', 'Check the file permissions.') from None
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types on bad data.
        # `from None`: the message already carries PIL's reason; its traceback only adds noise.
        raise ImageLoadError(
            path,
            f'cannot decode image ({type(err).__name__}: {err})',
            'The file may be corrupt or truncated; re-download or re-encode it.',
        ) from None


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes an RGB image to ``size`` x ``size`` (aspect ratio is not kept).

    Uses PIL's bilinear filter, which widens its support when downscaling, so
    it antialiases. Training data and user images must both go through this.

    Args:
        image: HxWx3 uint8 array.
        size: Output side length in pixels.

    Returns:
        A ``size`` x ``size`` x 3 uint8 array.

    Raises:
        ValueError: If ``image`` is not HxWx3 uint8 or ``size`` < 1.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f'Expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}.'
        )
    _check_size(size)
    return np.asarray(_resized(Image.fromarray(image), size), dtype=np.uint8)


def _check_size(size: int) -> None:
    if size < 1:
        raise ValueError(f'size must be >= 1, got {size}.')


def _resized(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.Resampling.BILINEAR)


def preprocess(images_uint8: jax.typing.ArrayLike, mode: str) -> jax.Array:
    """Maps uint8 RGB pixels to the float input a backbone expects.

    Runs under ``jit`` (``mode`` must be static). Works on any leading batch
    dims.

    Args:
        images_uint8: ``(..., H, W, 3)`` RGB values in 0..255.
        mode: ``'unit'`` for ``x / 127.5 - 1`` (range [-1, 1]); ``'caffe'`` for
            Keras ResNet50 preprocessing: RGB->BGR, then subtract the ImageNet
            BGR means (103.939, 116.779, 123.68) from 0..255 values.

    Returns:
        float32 array of the same shape.

    Raises:
        ValueError: If ``mode`` is unknown or the last dim is not 3.
    """
    if mode not in PREPROCESS_MODES:
        valid = ', '.join(PREPROCESS_MODES)
        raise ValueError(f'Unknown preprocess mode {mode!r}; valid modes: {valid}.')
    x = jnp.asarray(images_uint8).astype(jnp.float32)
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f'Expected (..., H, W, 3) images, got shape {x.shape}.')
    if mode == 'unit':
        return x / 127.5 - 1.0
    return x[..., ::-1] - jnp.asarray(_CAFFE_MEAN_BGR, dtype=jnp.float32)
