"""The grain pipeline over the TFDS shapes source: determinism, masks, padding, sharding."""

import numpy as np
import pytest

from configs import tiny
from jaxcap.data import pipeline, text


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    config = tiny.get_config()
    config.data.tfds_dir = str(tmp_path_factory.mktemp('tfds'))
    source = pipeline.load_source(config.data, 'train')
    vocab = pipeline.build_vocabulary(source, config.data.max_words)
    return config, source, vocab


def _batches(data, seed, n, batch_size=8, **kwargs):
    config, source, vocab = data
    it = iter(pipeline.train_dataset(source, vocab, config.data, batch_size, seed, **kwargs))
    return [next(it) for _ in range(n)]


def test_training_batches_have_the_promised_shapes_and_masks(data):
    config = data[0]
    batch = _batches(data, 0, 1)[0]
    size, max_len = config.data.image_size, config.data.max_len
    assert batch['images'].shape == (8, size, size, 3) and batch['images'].dtype == np.uint8
    assert batch['tokens'].shape == (8, max_len) and batch['tokens'].dtype == np.int32
    np.testing.assert_array_equal(batch['mask'], batch['tokens'] != text.PAD)
    assert np.all(batch['tokens'][:, 0] == text.START)
    assert np.all((batch['tokens'] == text.END).sum(1) == 1)


def test_tokens_are_one_of_the_image_references(data):
    config, source, vocab = data
    references = {}
    for i in range(len(source)):
        record = source[i]
        key = np.asarray(record['image']).tobytes()
        # Long captions are cut to max_len - 2 words (room for <start> and <end>).
        references[key] = {' '.join(c.split()[:config.data.max_len - 2])
                           for c in pipeline.captions_of(record)}
    for batch in _batches(data, 0, 3):
        for image, tokens in zip(batch['images'], batch['tokens']):
            assert vocab.decode(tokens) in references[image.tobytes()]


def test_same_seed_same_stream_and_another_seed_differs(data):
    a, b, c = _batches(data, 3, 4), _batches(data, 3, 4), _batches(data, 4, 4)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x['tokens'], z['tokens']) for x, z in zip(a, c))


def test_an_epoch_visits_every_image_once_and_the_next_reshuffles(data):
    config, source, _ = data
    per_epoch = len(source) // 8   # 48 images, batches of 8
    batches = _batches(data, 0, 2 * per_epoch)
    keys = [img.tobytes() for b in batches for img in b['images']]
    first, second = keys[:len(source)], keys[len(source):]
    assert len(set(first)) == len(source) and set(first) == set(second)
    assert first != second


def test_hosts_read_disjoint_shards_that_cover_the_data(data):
    config, source, _ = data
    steps = len(source) // 8   # one epoch of global batches of 2 x 4
    shards = [{img.tobytes() for b in _batches(data, 0, steps, 4, process_index=i, process_count=2)
               for img in b['images']} for i in range(2)]
    assert not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == len(source)


def test_hosts_rows_put_together_are_the_one_host_global_batch(data):
    # The same global batches, and the same reference drawn per row, whatever the
    # number of hosts: a 2-host run trains on exactly what a 1-host run does.
    config, source, vocab = data
    one = _batches(data, 0, 3, batch_size=8)
    halves = [_batches(data, 0, 3, batch_size=4, process_index=i, process_count=2) for i in range(2)]
    for step, whole in enumerate(one):
        for key in ('images', 'tokens', 'mask'):
            np.testing.assert_array_equal(
                whole[key], np.concatenate([halves[0][step][key], halves[1][step][key]]))


def test_eval_batches_pad_the_last_batch_and_mark_it(data):
    config, _, _ = data
    source = pipeline.load_source(config.data, 'val')   # 10 images
    batches = list(pipeline.eval_batches(source, 4, config.data.image_size))
    assert [b['valid'].tolist() for b in batches] == [[True] * 4, [True] * 4, [True, True, False, False]]
    ids = [i for b in batches for i in b['image_ids']]
    assert sorted(ids) == sorted(int(source[i]['image_id']) for i in range(len(source)))
    assert all(len(r) == 5 and isinstance(r[0], str) for b in batches for r in b['references'])
    assert all(b['images'].shape[0] == 4 for b in batches)


def test_a_split_smaller_than_a_batch_is_refused(data):
    config, source, vocab = data
    with pytest.raises(ValueError, match='lower train.batch_size'):
        pipeline.train_dataset(source, vocab, config.data, 64, 0)


def test_unknown_data_set_name_is_refused():
    config = tiny.get_config()
    config.data.name = 'cocoo'
    with pytest.raises(ValueError, match="'cocoo'"):
        pipeline.load_source(config.data, 'train')


# ----------------------------------------------------------------------------- images of any shape


@pytest.mark.parametrize('shape', [(37, 91), (37, 91, 1), (37, 91, 3), (500, 20, 3)])
def test_images_of_any_size_and_grayscale_become_rgb_squares(shape):
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    sized = pipeline._sized(image, 24)
    assert sized.shape == (24, 24, 3) and sized.dtype == np.uint8
    if len(shape) == 2 or shape[-1] == 1:   # gray: three equal channels
        assert np.array_equal(sized[..., 0], sized[..., 1])
        assert np.array_equal(sized[..., 0], sized[..., 2])


def test_an_image_already_at_size_is_passed_through():
    image = np.random.default_rng(0).integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    assert pipeline._sized(image, 24) is image


# ----------------------------------------------------------------------------- feature-cache records


def _feature_records(n, dtype=np.float16):
    """What a feature-cache source returns: 'features' (h x w x C) in place of 'image'."""
    rng = np.random.default_rng(0)
    return [{'features': rng.normal(size=(3, 3, 5)).astype(dtype), 'image_id': 1000 + i,
             'captions': [b'a red circle', b'one red circle']} for i in range(n)]


def test_training_batches_from_cached_features_carry_features_not_images(data):
    config, _, vocab = data
    source = _feature_records(16)
    batch = next(iter(pipeline.train_dataset(source, vocab, config.data, 8, 0)))
    assert set(batch) == {'features', 'tokens', 'mask'}
    assert batch['features'].shape == (8, 3, 3, 5) and batch['features'].dtype == np.float16
    assert batch['tokens'].shape == (8, config.data.max_len)
    np.testing.assert_array_equal(batch['mask'], batch['tokens'] != text.PAD)
    # Every row is one of the records' grids, untouched.
    grids = {r['features'].tobytes() for r in source}
    assert all(row.tobytes() in grids for row in batch['features'])


def test_eval_batches_from_cached_features_are_padded_like_images():
    source = _feature_records(5, np.float32)
    batches = list(pipeline.eval_batches(source, 4, image_size=32))
    assert [sorted(b) for b in batches] == [['features', 'image_ids', 'references', 'valid']] * 2
    assert [b['valid'].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
    assert all(b['features'].shape == (4, 3, 3, 5) and b['features'].dtype == np.float32
               for b in batches)
    np.testing.assert_array_equal(batches[1]['features'][0], source[4]['features'])
    np.testing.assert_array_equal(batches[1]['features'][3], source[4]['features'])  # padding
    assert [i for b in batches for i in b['image_ids']] == [1000, 1001, 1002, 1003, 1004]
    assert batches[0]['references'][0] == ['a red circle', 'one red circle']


# ----------------------------------------------------------------------------- train split and fraction


def test_random_subset_is_seeded_sized_and_ordered():
    source = list(range(101))
    half = pipeline.random_subset(source, 0.5, seed=0)
    assert len(half) == 50   # floor(0.5 x 101)
    assert len(pipeline.random_subset(range(100), 0.29, seed=0)) == 29   # not float's 28.999...
    assert list(half) == sorted(set(half))   # distinct records, in source order
    assert list(half) == list(pipeline.random_subset(source, 0.5, seed=0))
    assert list(half) != list(pipeline.random_subset(source, 0.5, seed=1))
    # With one seed, a smaller fraction keeps a subset of a larger one.
    assert set(pipeline.random_subset(source, 0.2, seed=0)) <= set(half)
    assert pipeline.random_subset(source, 1.0, seed=0) is source


@pytest.mark.parametrize('fraction', [0.0, -0.5, 1.5, 0.001])
def test_fractions_outside_0_1_or_keeping_nothing_are_refused(fraction):
    with pytest.raises(ValueError, match='train_fraction'):
        pipeline.random_subset(list(range(100)), fraction, seed=0)


def test_the_reference_fraction_of_coco_train_is_41391_images():
    # The reference's 50% of the 82,783 Karpathy train images.
    assert len(pipeline.random_subset(range(82_783), 0.5, seed=0)) == 41_391


def test_load_train_source_defaults_to_the_whole_train_split(data):
    config, source, _ = data
    train = pipeline.load_train_source(config.data)   # train_split 'train', fraction 1.0
    assert len(train) == len(source)
    assert [int(train[i]['image_id']) for i in range(len(train))] == [
        int(source[i]['image_id']) for i in range(len(source))]


def test_load_train_source_takes_a_split_expression_and_a_fraction(data):
    config = data[0].copy_and_resolve_references()
    config.data.train_split = 'train+val'   # 48 + 10 scenes
    config.data.train_fraction = 0.5
    train = pipeline.load_train_source(config.data)
    assert len(train) == 29
    ids = [int(train[i]['image_id']) for i in range(len(train))]
    assert len(set(ids)) == 29 and max(ids) >= 48   # val ids follow the 48 train ids
    config.data.build_seed = 7   # the subset's seed (training's config.seed is not involved)
    assert ids != [int(r['image_id']) for r in pipeline.load_train_source(config.data)]


def test_hosts_shard_the_subset_not_the_whole_split(data):
    config = data[0].copy_and_resolve_references()
    config.data.train_fraction = 0.5
    subset = pipeline.load_train_source(config.data)   # 24 of the 48 scenes
    vocab = data[2]
    keys = set()
    for host in range(2):
        it = iter(pipeline.train_dataset(subset, vocab, config.data, 4, 0, host, 2))
        shard = {img.tobytes() for _ in range(3) for img in next(it)['images']}
        assert not shard & keys
        keys |= shard
    assert keys == {np.asarray(subset[i]['image']).tobytes() for i in range(len(subset))}


def test_vocabulary_reads_records_through_metadata_when_a_source_has_it():
    class TextOnly:
        """A source whose records cannot be read whole, only their metadata."""
        def __len__(self):
            return 3

        def __getitem__(self, index):
            raise AssertionError('the whole record was read')

        def metadata(self, index):
            return {'image_id': index, 'captions': [b'a blue square']}

    subset = pipeline.Subset(TextOnly(), np.array([0, 2]))
    assert pipeline.metadata_of(subset, 1) == {'image_id': 2, 'captions': [b'a blue square']}
    vocab = pipeline.build_vocabulary(subset, 10)
    assert vocab.decode(vocab.encode('a blue square', 8)) == 'a blue square'
