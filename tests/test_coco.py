"""COCO through TFDS, on a tiny mock of `coco_captions/2014`; the COCO configs.

The mock (`build_mock_coco`, fixture `mock_coco_dir`) is a real TFDS build: the
real `CocoCaptions` builder writes array_record files and metadata, with only its
download and example generation replaced by a few synthetic examples (odd sizes,
grayscale and CMYK JPEGs, 5-6 captions each). Everything downstream of the
generator is TFDS' own code: storage, split expressions, decoding, metadata.
`tfds.testing.mock_data` cannot stand in for it here: its random generator gives
coco_captions' nested sequences ('objects', 'captions') unequal lengths, which
fail to encode as soon as a decoder is passed (we read images undecoded), it makes
no grayscale images, and it ignores split names and sizes.

For an end-to-end test (train a few steps, evaluate) on it::

    from test_coco import mock_coco_dir, tiny_coco_config  # noqa: F401 (a fixture)

    def test_coco_end_to_end(mock_coco_dir, tmp_path):
        config = tiny_coco_config(mock_coco_dir)
        scores = train.train_and_evaluate(config, str(tmp_path / 'work'))

(or move the fixture into tests/conftest.py). The data dir is built once per
session, in ~5 s, and is read-only afterwards.
"""

import io
import os
import pickle
from unittest import mock

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import coco as coco_config
from configs import coco_finetune
from jaxcap.data import coco, pipeline, text

# Images per split of the mock; ids are unique across splits.
MOCK_SPLITS = {'train': 10, 'restval': 6, 'val': 5, 'test': 3}
_ID_BASE = {'train': 100_000, 'restval': 200_000, 'val': 300_000, 'test': 400_000}
_WORDS = {
    'subject': ('man', 'woman', 'dog', 'cat', 'train', 'bus', 'giraffe', 'pizza'),
    'verb': ('standing', 'sitting', 'parked', 'lying'),
    'place': ('street', 'table', 'field', 'beach', 'kitchen'),
}


def mock_image(split: str, index: int) -> tuple[np.ndarray, str]:
    """Pixels and PIL mode of mock image `index`: odd sizes; every 3rd gray, every 4th CMYK."""
    rng = np.random.default_rng([list(MOCK_SPLITS).index(split), index])
    height, width = (int(v) for v in rng.integers(17, 90, size=2))
    mode = 'L' if index % 3 == 0 else 'CMYK' if index % 4 == 1 else 'RGB'
    channels = {'L': 1, 'RGB': 3, 'CMYK': 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return (pixels[:, :, 0] if mode == 'L' else pixels), mode


def mock_captions(split: str, index: int) -> list[str]:
    """5 captions (6 for every 5th image, as some COCO images have), from a tiny grammar."""
    rng = np.random.default_rng([list(MOCK_SPLITS).index(split), index, 1])
    count = 6 if index % 5 == 0 else 5
    return [f'A {rng.choice(_WORDS["subject"])} {rng.choice(_WORDS["verb"])} '
            f'on the {rng.choice(_WORDS["place"])}.' for _ in range(count)]


def _jpeg(pixels: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format='JPEG', quality=95)
    return buffer.getvalue()


def _split_generators(self, dl_manager, splits):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, count) for split, count in splits.items()}


def _generate_examples(self, split, count):
    for index in range(count):
        image_id = _ID_BASE[split] + index
        yield image_id, {
            'image': _jpeg(*mock_image(split, index)),
            'image/filename': f'COCO_{split}_{image_id:012d}.jpg',
            'image/id': image_id,
            'objects': [],
            'captions': [{'id': image_id * 10 + k, 'text': c}
                         for k, c in enumerate(mock_captions(split, index))],
        }


def build_mock_coco(data_dir: str, splits: dict[str, int] | None = None) -> str:
    """Prepares a tiny coco_captions/2014 in `data_dir` with `coco.prepare`; returns data_dir."""
    from tensorflow_datasets.object_detection import coco_captions
    splits = dict(MOCK_SPLITS if splits is None else splits)
    with mock.patch.object(coco_captions.CocoCaptions, '_split_generators',
                           lambda self, dl: _split_generators(self, dl, splits)), \
            mock.patch.object(coco_captions.CocoCaptions, '_generate_examples', _generate_examples):
        coco.prepare(data_dir)
    return data_dir


@pytest.fixture(scope='session')
def mock_coco_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding the mock coco_captions/2014 (see the module docstring)."""
    return build_mock_coco(str(tmp_path_factory.mktemp('tfds_coco')))


def tiny_coco_config(data_dir: str) -> ml_collections.ConfigDict:
    """configs/coco.py scaled down to the mock: every key of the recipe, tiny sizes.

    The train source is train+restval (16 images), halved by train_fraction to 8;
    the encoder is a frozen, randomly initialised 2-stage ResNet on 32x32 images.
    """
    config = coco_config.get_config()
    config.data.tfds_dir = data_dir
    config.data.image_size = 32
    config.data.max_words = 100
    config.data.max_len = 12
    config.data.num_threads = 1
    config.data.prefetch = 2
    config.data.features_dir = ''
    config.model.encoder.stage_sizes = (1, 1)
    config.model.encoder.num_filters = 4
    config.model.encoder.weights = ''
    config.model.embed_dim = 16
    config.model.units = 32
    config.model.attention_units = 16
    config.model.max_decode_len = 10
    config.train.batch_size = 4
    config.train.num_steps = 4
    config.train.log_every_steps = 2
    config.train.validate_every_steps = 0
    config.train.validate_examples = 4
    config.eval.batch_size = 4
    config.eval.num_heatmaps = 1
    config.eval.beam_sizes = (1, 2)
    config.ckpt.every_steps = 2
    return config


def _ids(source) -> list[int]:
    return [int(source[i]['image_id']) for i in range(len(source))]


def _expected_ids(*splits: str) -> set[int]:
    return {_ID_BASE[s] + i for s in splits for i in range(MOCK_SPLITS[s])}


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize('sized', [False, True])
def test_records_have_rgb_images_ids_and_captions(mock_coco_dir, sized):
    # The pipeline's records come at the model's image size; the module's own
    # source, without one, at the stored size.
    data_config = tiny_coco_config(mock_coco_dir).data
    size = data_config.image_size
    source = (pipeline.load_source(data_config, 'val') if sized
              else coco.load_source('val', data_dir=mock_coco_dir))
    assert len(source) == MOCK_SPLITS['val']
    for i in range(len(source)):
        record = source[i]
        assert set(record) == {'image', 'image_id', 'captions'}
        index = record['image_id'] - _ID_BASE['val']
        pixels, mode = mock_image('val', index)
        image = record['image']
        # Gray (2-D) and CMYK (4 channels) JPEGs come back as RGB.
        shape = (size, size, 3) if sized else (*pixels.shape[:2], 3)
        assert image.dtype == np.uint8 and image.shape == shape, mode
        if mode == 'L':
            assert np.array_equal(image[..., 0], image[..., 1])
            assert np.array_equal(image[..., 0], image[..., 2])
        assert pipeline.captions_of(record) == mock_captions('val', index)
        assert all(isinstance(c, bytes) for c in record['captions'])   # as TFDS stores text
    assert sorted(_ids(source)) == sorted(_expected_ids('val'))


def test_the_mock_covers_gray_cmyk_and_rgb_images_of_odd_sizes():
    # Guards the mock itself: the tests above rely on it having every kind of image.
    kinds = [mock_image('val', i) for i in range(MOCK_SPLITS['val'])]
    assert {mode for _, mode in kinds} == {'L', 'CMYK', 'RGB'}
    assert len({p.shape[:2] for p, _ in kinds}) == len(kinds)   # all sizes differ
    assert all(p.shape[:2] != (32, 32) for p, _ in kinds)       # and all need resizing


def test_metadata_reads_a_record_without_its_image(mock_coco_dir):
    source = pipeline.load_source(tiny_coco_config(mock_coco_dir).data, 'test')
    for i in range(len(source)):
        full = source[i]
        assert source.metadata(i) == {'image_id': full['image_id'], 'captions': full['captions']}
    with mock.patch.object(coco, 'decode_image', side_effect=AssertionError('decoded')):
        pipeline.build_vocabulary(source, 100)


def test_negative_and_out_of_range_indices(mock_coco_dir):
    source = pipeline.load_source(tiny_coco_config(mock_coco_dir).data, 'test')
    assert source[-1]['image_id'] == source[len(source) - 1]['image_id']
    with pytest.raises(IndexError):
        source[len(source)]
    assert len(list(source)) == len(source)   # Sequence iteration stops at the end


def test_source_pickles_for_grain_workers(mock_coco_dir):
    source = pipeline.load_source(tiny_coco_config(mock_coco_dir).data, 'val')
    copy = pickle.loads(pickle.dumps(source))
    assert copy[2]['image_id'] == source[2]['image_id']
    np.testing.assert_array_equal(copy[2]['image'], source[2]['image'])


# ----------------------------------------------------------------------------- splits


def test_train_plus_restval_concatenates_both_splits(mock_coco_dir):
    data = tiny_coco_config(mock_coco_dir).data
    both = pipeline.load_source(data, 'train+restval')
    assert len(both) == MOCK_SPLITS['train'] + MOCK_SPLITS['restval']
    assert sorted(_ids(both)) == sorted(_expected_ids('train', 'restval'))
    assert _ids(both) == _ids(pipeline.load_source(data, 'train')) + _ids(
        pipeline.load_source(data, 'restval'))


def test_load_train_source_uses_train_split_and_fraction(mock_coco_dir):
    config = tiny_coco_config(mock_coco_dir)   # train+restval (16 images), fraction 0.5
    source = pipeline.load_train_source(config.data)
    assert len(source) == 8
    ids = _ids(source)
    assert len(set(ids)) == 8 and set(ids) <= _expected_ids('train', 'restval')
    assert ids == _ids(pipeline.load_train_source(config.data))   # deterministic
    config.data.build_seed = 1
    assert ids != _ids(pipeline.load_train_source(config.data))   # the subset's seed
    config.data.train_fraction, config.data.train_split = 1.0, 'train'
    assert sorted(_ids(pipeline.load_train_source(config.data))) == sorted(_expected_ids('train'))


def test_unknown_split_is_refused(mock_coco_dir):
    with pytest.raises(ValueError, match='trian'):
        pipeline.load_source(tiny_coco_config(mock_coco_dir).data, 'trian')


# ----------------------------------------------------------------------------- batches


def test_train_batches_resize_every_image_to_rgb_squares(mock_coco_dir):
    config = tiny_coco_config(mock_coco_dir)
    source = pipeline.load_train_source(config.data)
    vocab = pipeline.build_vocabulary(source, config.data.max_words)
    batches = iter(pipeline.train_dataset(source, vocab, config.data, 4, seed=0))
    size, max_len = config.data.image_size, config.data.max_len
    for _ in range(4):   # two epochs of the 8 images: every kind of image goes through
        batch = next(batches)
        assert set(batch) == {'images', 'tokens', 'mask'}
        assert batch['images'].shape == (4, size, size, 3) and batch['images'].dtype == np.uint8
        assert batch['tokens'].shape == (4, max_len) and batch['tokens'].dtype == np.int32
        assert batch['mask'].dtype == np.float32
        np.testing.assert_array_equal(batch['mask'], batch['tokens'] != text.PAD)
        assert np.all(batch['tokens'][:, 0] == text.START)
    # Captions are lowercased and stripped of punctuation: 'A dog ... street.' -> 'a dog ... street'
    assert {'a', 'on', 'the', 'street'} <= set(vocab.stoi)


def test_eval_batches_on_coco_are_padded_and_complete(mock_coco_dir):
    config = tiny_coco_config(mock_coco_dir)
    source = pipeline.load_source(config.data, 'val')   # 5 images, batches of 4
    batches = list(pipeline.eval_batches(source, 4, config.data.image_size))
    assert [b['valid'].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
    assert all(b['images'].shape == (4, 32, 32, 3) for b in batches)
    assert sorted(i for b in batches for i in b['image_ids']) == sorted(_expected_ids('val'))
    assert all(isinstance(r[0], str) for b in batches for r in b['references'])


# ----------------------------------------------------------------------------- not prepared


def test_missing_data_set_fails_with_what_to_run(tmp_path):
    config = tiny_coco_config(str(tmp_path / 'empty'))
    config.data.manual_dir = str(tmp_path / 'zips')
    with pytest.raises(coco.NotPreparedError) as error:
        pipeline.load_source(config.data, 'train')
    message = str(error.value)
    assert str(tmp_path / 'empty') in message   # where it looked
    assert (f'python -m jaxcap.data.coco --data_dir={tmp_path / "empty"} '
            f'--manual_dir={tmp_path / "zips"}') in message   # what to run
    assert 'train2014.zip' in message and 'caption_datasets.zip' in message   # what to download
    assert not (tmp_path / 'empty').exists()   # and nothing was written


def test_default_manual_dir_is_named_in_the_message(tmp_path):
    message = coco.not_prepared_message(str(tmp_path))
    assert os.path.join(str(tmp_path), 'downloads', 'manual') in message


def test_a_tfrecord_build_is_refused_with_how_to_rebuild(tmp_path):
    from tensorflow_datasets.object_detection import coco_captions
    splits = {'train': 2}
    with mock.patch.object(coco_captions.CocoCaptions, '_split_generators',
                           lambda self, dl: _split_generators(self, dl, splits)), \
            mock.patch.object(coco_captions.CocoCaptions, '_generate_examples', _generate_examples):
        coco.make_builder(str(tmp_path)).download_and_prepare(file_format='tfrecord')
    with pytest.raises(coco.NotPreparedError, match='tfrecord.*no random access'):
        coco.load_source('train', str(tmp_path))


def test_prepare_command_line_reuses_a_prepared_data_set(mock_coco_dir, capsys):
    coco.main([f'--data_dir={mock_coco_dir}'])   # already prepared: no download, no rebuild
    assert 'train 10' in capsys.readouterr().out


# ----------------------------------------------------------------------------- configs


def test_coco_config_is_the_reference_recipe():
    config = coco_config.get_config()
    assert config.data.name == 'coco'
    assert (config.data.image_size, config.data.max_words, config.data.max_len) == (224, 5000, 35)
    assert config.data.train_split == 'train+restval' and config.data.train_fraction == 0.5
    assert config.data.features_dir   # frozen encoder: read the cached grids
    encoder = config.model.encoder
    assert tuple(encoder.stage_sizes) == (3, 4, 6, 3) and encoder.num_filters == 64
    assert encoder.preprocess == 'caffe' and encoder.train_stages == 0 and encoder.weights
    model = config.model
    assert (model.embed_dim, model.units, model.attention_units) == (256, 512, 512)
    assert model.position_embedding is False
    optim = config.optim
    assert (optim.learning_rate, optim.warmup_steps, optim.decay) == (1e-3, 0, 'constant')
    assert config.train.batch_size == 64
    # 10 epochs of (image, caption) pairs: 10 x floor(0.5 x 113,287) x 5 / 64.
    assert config.train.num_steps == 10 * 56_643 * 5 // 64 == 44_252
    assert config.eval.split == 'val' and tuple(config.eval.beam_sizes) == (1, 3)


def test_coco_configs_declare_the_same_keys_as_the_default():
    def keys(node, prefix=''):
        return {k for name, v in node.items()
                for k in (keys(v, f'{prefix}{name}.') if isinstance(v, ml_collections.ConfigDict)
                          else {prefix + name})}
    from configs import shapes
    expected = keys(shapes.get_config()) | {'data.manual_dir'}
    assert keys(coco_config.get_config()) == expected
    assert keys(coco_finetune.get_config()) == expected


def test_finetune_config_trains_the_top_stages_on_images():
    config, frozen = coco_finetune.get_config(), coco_config.get_config()
    assert config.model.encoder.train_stages == 2
    assert config.optim.encoder_lr_scale == 0.1
    assert config.data.features_dir == ''
    # Everything else is the recipe.
    for group in ('data', 'model', 'optim'):
        a, b = config[group].to_dict(), frozen[group].to_dict()
        assert {k for k in a if a[k] != b[k]} <= {'features_dir', 'encoder', 'encoder_lr_scale'}
