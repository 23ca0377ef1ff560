"""Tests for jaxcap.data.images: loading every awkward kind of file, resize, preprocess."""

import pickle

import jax
import numpy as np
import pytest
from PIL import Image

from jaxcap.data import images
from jaxcap.data.images import ImageLoadError, load_image

ORIENTATION_TAG = 0x0112


def _assert_rgb(array, height, width):
    assert array.dtype == np.uint8
    assert array.shape == (height, width, 3)


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


# --------------------------------------------------------------------------- modes


def test_grayscale_png(tmp_path):
    path = _save(Image.new('L', (5, 3), 77), tmp_path / 'gray.png')
    out = load_image(path)
    _assert_rgb(out, 3, 5)
    assert (out == 77).all()


def test_one_bit_png(tmp_path):
    image = Image.new('1', (4, 2), 0)
    image.putpixel((3, 1), 1)
    out = load_image(_save(image, tmp_path / 'bits.png'))
    _assert_rgb(out, 2, 4)
    assert out[1, 3].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_rgba_png_is_composited_on_white(tmp_path):
    image = Image.new('RGBA', (3, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 128), (0, 255, 0, 255)])
    out = load_image(_save(image, tmp_path / 'rgba.png'))
    _assert_rgb(out, 1, 3)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent black -> white
    np.testing.assert_allclose(out[0, 1], [255, 127, 127], atol=1)  # half red over white
    assert out[0, 2].tolist() == [0, 255, 0]


def test_la_png(tmp_path):
    out = load_image(_save(Image.new('LA', (2, 2), (0, 0)), tmp_path / 'la.png'))
    _assert_rgb(out, 2, 2)
    assert (out == 255).all()


@pytest.mark.parametrize('suffix', ['png', 'gif'])
def test_palette_with_transparency(tmp_path, suffix):
    image = Image.new('P', (4, 2), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # 0: black, 1: blue
    for x in (2, 3):
        for y in (0, 1):
            image.putpixel((x, y), 1)
    out = load_image(_save(image, tmp_path / f'palette.{suffix}', transparency=0))
    _assert_rgb(out, 2, 4)
    assert (out[:, :2] == 255).all()  # transparent index -> white, not black
    assert (out[:, 2:] == [0, 0, 255]).all()


def test_palette_without_transparency(tmp_path):
    image = Image.new('P', (2, 2), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    out = load_image(_save(image, tmp_path / 'palette.png'))
    assert (out == [10, 200, 30]).all()


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new('CMYK', (16, 16), (0, 255, 255, 0)), tmp_path / 'cmyk.jpg', quality=95)
    with Image.open(path) as check:
        assert check.mode == 'CMYK'
    out = load_image(path)
    _assert_rgb(out, 16, 16)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), [255, 0, 0], atol=8)  # red


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / 'deep.png')
    with Image.open(path) as check:
        assert check.mode.startswith('I')
    out = load_image(path)
    _assert_rgb(out, 1, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[0, 2].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 24 high with a red block top-left. Orientation 6 means
    # "rotate 90 degrees clockwise to display", so the result is 24 wide x 40
    # high with the block top-right.
    image = Image.new('RGB', (40, 24), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    out = load_image(_save(image, tmp_path / 'rotated.jpg', exif=exif.tobytes(), quality=95))
    _assert_rgb(out, 40, 24)
    assert out[2, 21, 0] > 200 and out[2, 21, 2] < 60  # top-right is red
    assert out[2, 2, 0] < 60  # top-left is blue


def test_one_pixel_image(tmp_path):
    out = load_image(_save(Image.new('RGB', (1, 1), (1, 2, 3)), tmp_path / 'dot.png'))
    _assert_rgb(out, 1, 1)
    assert out[0, 0].tolist() == [1, 2, 3]


def test_returns_writable_copy(tmp_path):
    out = load_image(_save(Image.new('RGB', (2, 2)), tmp_path / 'w.png'))
    out[0, 0] = 5  # callers augment in place


# --------------------------------------------------------------------------- failures


def _noise_image(size=64):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _truncated(tmp_path, suffix):
    full = _save(_noise_image(), tmp_path / f'full.{suffix}')
    data = full.read_bytes()
    cut = tmp_path / f'truncated.{suffix}'
    cut.write_bytes(data[: len(data) // 2])
    return cut


def _random_bytes(tmp_path):
    path = tmp_path / 'noise.jpg'
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return path


def _text_file(tmp_path):
    path = tmp_path / 'notes.png'
    path.write_text('this is not an image\n')
    return path


def _empty_file(tmp_path):
    path = tmp_path / 'empty.jpg'
    path.write_bytes(b'')
    return path


def _directory(tmp_path):
    path = tmp_path / 'folder.jpg'
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ('make', 'reason'),
    [
        (lambda p: _truncated(p, 'jpg'), 'truncated'),
        (lambda p: _truncated(p, 'png'), 'decode'),
        (_random_bytes, 'not a recognised'),
        (_text_file, 'not a recognised'),
        (_empty_file, 'not a recognised'),
        (_directory, 'directory'),
        (lambda p: p / 'missing.jpg', 'not found'),
    ],
    ids=['truncated-jpeg', 'truncated-png', 'random-bytes', 'text', 'empty', 'directory',
         'missing'],
)
def test_bad_files_raise_image_load_error(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message
    assert reason in message
    assert '\n' not in message
    assert info.value.__cause__ is None  # no raw PIL traceback chained on


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
@pytest.mark.parametrize('side', [11, 20], ids=['above-limit', 'above-twice-limit'])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, side):
    path = _save(Image.new('RGB', (side, 10)), tmp_path / 'big.png')
    # 110 pixels: PIL only warns, we refuse. 200 pixels: PIL raises, we convert.
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)
    with pytest.raises(ImageLoadError, match='decompression bomb') as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_image_load_error_pickles():
    error = pickle.loads(pickle.dumps(ImageLoadError('a.jpg', 'broken', 'fix it')))
    assert isinstance(error, ValueError)
    assert str(error) == "Cannot load image 'a.jpg': broken. fix it"


# --------------------------------------------------------------------------- resize


def test_resize_shape_and_dtype():
    out = images.resize(np.zeros((30, 50, 3), np.uint8), 16)
    _assert_rgb(out, 16, 16)


def test_resize_antialiases():
    # A 1-pixel checkerboard downscaled 8x must average to grey, not alias to 0 or 255.
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    out = images.resize(np.repeat(checker[:, :, None], 3, axis=2), 8)
    np.testing.assert_allclose(out, 127.5, atol=3)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match='HxWx3 uint8'):
        images.resize(np.zeros((4, 4), np.uint8), 2)
    with pytest.raises(ValueError, match='size'):
        images.resize(np.zeros((4, 4, 3), np.uint8), 0)


# --------------------------------------------------------------------------- preprocess


def test_preprocess_caffe_hand_pixel():
    pixel = np.array([[[10, 20, 30]]], np.uint8)  # R=10, G=20, B=30
    out = images.preprocess(pixel, 'caffe')
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)


def test_preprocess_unit_range():
    out = images.preprocess(np.array([[[0, 255, 0]]], np.uint8), 'unit')
    np.testing.assert_allclose(out[0, 0], [-1.0, 1.0, -1.0])


def test_preprocess_batch_dims_and_jit():
    batch = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5, 3), dtype=np.uint8)
    jitted = jax.jit(images.preprocess, static_argnames='mode')
    for mode in images.PREPROCESS_MODES:
        out = jitted(batch, mode=mode)
        assert out.shape == batch.shape
        np.testing.assert_allclose(out, images.preprocess(batch, mode), rtol=1e-6)


def test_preprocess_bad_mode_lists_valid_modes():
    with pytest.raises(ValueError, match='unit, caffe'):
        images.preprocess(np.zeros((1, 1, 3), np.uint8), 'torch')


# --------------------------------------------------------------------------- loading at a size


def _photo_like_jpeg(path, width, height, exif=b''):
    """Smooth gradients, blocks and noise: what a photo's JPEG holds."""
    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels[height // 4: height // 2, width // 4: width // 2] = (250, 30, 40)
    pixels += rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return _save(image, path, quality=90, exif=exif)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_then_resized(tmp_path, monkeypatch):
    path = _photo_like_jpeg(tmp_path / 'big.jpg', 640, 480)
    resized_from = []
    resize = images._resized
    monkeypatch.setattr(images, '_resized', lambda image, size: resized_from.append(image.size)
                        or resize(image, size))
    out = load_image(path, 224)
    _assert_rgb(out, 224, 224)
    assert resized_from == [(320, 240)]           # libjpeg decoded it at half scale
    # Another low-pass than a full decode and resize, but the same picture.
    full = images.resize(load_image(path), 224).astype(int)
    assert np.abs(out.astype(int) - full).mean() < 3


def test_a_jpeg_under_twice_the_size_is_decoded_in_full(tmp_path):
    path = _photo_like_jpeg(tmp_path / 'small.jpg', 400, 300)
    np.testing.assert_array_equal(load_image(path, 224), images.resize(load_image(path), 224))


def test_the_exif_orientation_applies_to_an_image_loaded_at_a_size(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6                       # stored 640 x 480, shown 480 x 640
    path = _photo_like_jpeg(tmp_path / 'turned.jpg', 640, 480, exif=exif.tobytes())
    with Image.open(path) as stored:
        shown = np.rot90(np.asarray(stored.convert('RGB')), k=-1)   # 90 degrees clockwise
    expected = images.resize(np.ascontiguousarray(shown), 64).astype(int)
    out = load_image(path, 64).astype(int)
    assert np.abs(out - expected).mean() < 3
    # Unrotated, the picture would differ: the rotation matters here.
    assert np.abs(np.rot90(out) - expected).mean() > 20


def test_training_images_and_user_images_decode_alike(tmp_path):
    from jaxcap.data import coco
    path = _photo_like_jpeg(tmp_path / 'same.jpg', 640, 480)
    with open(path, 'rb') as f:
        np.testing.assert_array_equal(coco.decode_image(f.read(), 224), load_image(path, 224))


def test_a_bad_size_names_the_argument(tmp_path):
    path = _photo_like_jpeg(tmp_path / 'any.jpg', 40, 30)
    with pytest.raises(ValueError, match='size must be >= 1'):
        load_image(path, 0)
