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


def _batches(data, seed, n, **kwargs):
    config, source, vocab = data
    it = iter(pipeline.train_dataset(source, vocab, config.data, 8, seed, **kwargs))
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
    per_host = len(source) // 2 // 8
    shards = [{img.tobytes() for b in _batches(data, 0, per_host, process_index=i, process_count=2)
               for img in b['images']} for i in range(2)]
    assert not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == len(source)


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
