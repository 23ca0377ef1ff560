"""The encoder feature cache: exact grids, order, resumption, staleness, memory, grain."""

import concurrent.futures
import functools
import gc
import json
import os
import pickle

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from jaxcap.data import features, pipeline
from jaxcap.models import captioner

IMAGE_SIZE = 8
# float16 keeps 11 significant bits: a relative error of at most 2**-11 ~ 4.9e-4.
FLOAT16_RTOL = 1e-3


def _records(n, seed=0, id_offset=1000):
    """Records of odd sizes, some grayscale, with ids that are not their positions."""
    rng = np.random.default_rng(seed)
    shapes = [(10, 12, 3), (IMAGE_SIZE, IMAGE_SIZE, 3), (9, 7, 1), (16, 5, 3), (6, 9)]
    return [{'image': rng.integers(0, 256, shapes[i % len(shapes)], dtype=np.uint8),
             'image_id': id_offset + 7 * i,
             'captions': [f'caption {i}'.encode(), b'another one']}
            for i in range(n)]


_PROJECTION = np.random.default_rng(42).normal(size=(3, 5)).astype(np.float32)


@jax.jit
def _toy_grid(images_BxSxSx3):
    """Mean-pools each image into a 2x2 grid of 5 random projections of its colours."""
    x = images_BxSxSx3.astype(jnp.float32) / 255.0
    b, s = x.shape[0], x.shape[1]
    pooled = x.reshape(b, 2, s // 2, 2, s // 2, 3).mean(axis=(2, 4))
    return pooled @ _PROJECTION * 10.0


class _Counted:
    """Wraps an encode_fn, counting its calls and batch sizes; may fail on call `fail_at`."""

    def __init__(self, fn=_toy_grid, fail_at=None):
        self.fn, self.fail_at, self.batch_sizes = fn, fail_at, []

    @property
    def calls(self):
        return len(self.batch_sizes)

    def __call__(self, images):
        if self.calls + 1 == self.fail_at:
            raise KeyboardInterrupt('simulated interruption')
        self.batch_sizes.append(len(images))
        return self.fn(images)


def _expected_grids(records):
    images = np.stack([pipeline._sized(r['image'], IMAGE_SIZE) for r in records])
    return np.asarray(_toy_grid(images))


def _extract(records, out_dir, encode_fn=None, **kwargs):
    kwargs = {'image_size': IMAGE_SIZE, 'batch_size': 3, 'shard_size': 5, 'progress': False,
              'fingerprint': 'toy', **kwargs}
    return features.extract(encode_fn or _Counted(), records, str(out_dir), **kwargs)


def test_extracted_grids_equal_the_encoder_outputs_in_source_order(tmp_path):
    # 11 records, shards of 5 -> 5, 5, 1 (a last partial shard); batches of 3 -> every
    # shard ends in a partial batch, padded so the encoder sees only batches of 3.
    records, encode = _records(11), _Counted()
    _extract(records, tmp_path, encode)
    assert encode.batch_sizes == [3] * 5   # 2 + 2 + 1 calls
    assert sorted(os.listdir(tmp_path)) == [
        'index.json', 'shard-00000.npy', 'shard-00001.npy', 'shard-00002.npy']

    source = features.FeatureSource(records, str(tmp_path))
    expected = _expected_grids(records)
    assert len(source) == 11 and source.grid_shape == (2, 2, 5)
    np.testing.assert_array_equal(source.image_ids, [r['image_id'] for r in records])
    for i, record in enumerate(source):
        assert 'image' not in record and record['captions'] == records[i]['captions']
        assert record['image_id'] == records[i]['image_id']
        assert record['features'].dtype == np.float16
        np.testing.assert_allclose(record['features'], expected[i], rtol=FLOAT16_RTOL, atol=1e-6)


def test_float32_option_stores_the_encoder_output_unrounded(tmp_path):
    records = _records(7)
    _extract(records, tmp_path, dtype='float32')
    source = features.FeatureSource(records, str(tmp_path))
    grids = np.stack([source[i]['features'] for i in range(len(source))])
    assert grids.dtype == np.float32
    # 50x tighter than float16 rounding; not exact only because XLA's sums may
    # round differently for another batch shape.
    np.testing.assert_allclose(grids, _expected_grids(records), rtol=1e-5, atol=1e-6)


def test_float16_overflow_fails_instead_of_storing_inf(tmp_path):
    with pytest.raises(ValueError, match='float32'):
        _extract(_records(3), tmp_path, lambda x: np.full((len(x), 1, 1, 1), 1e5, np.float32))


def test_an_interrupted_extraction_resumes_without_recomputing_finished_shards(tmp_path):
    records = _records(11)
    # Call 3 is the first batch of shard 1: shard 0 (calls 1-2) is finished, shard 1 is not.
    with pytest.raises(KeyboardInterrupt):
        _extract(records, tmp_path / 'cache', _Counted(fail_at=3))
    finished = os.stat(tmp_path / 'cache' / 'shard-00000.npy')
    with pytest.raises(features.CacheError, match=r'incomplete \(1 of 3 shards\).*--mode=extract'):
        features.FeatureSource(records, str(tmp_path / 'cache'))

    encode = _Counted()
    _extract(records, tmp_path / 'cache', encode)
    assert encode.calls == 3   # shard 1 (2 batches) and shard 2 (1 batch) only
    again = os.stat(tmp_path / 'cache' / 'shard-00000.npy')
    assert (again.st_ino, again.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)

    _extract(records, tmp_path / 'reference')
    resumed = features.FeatureSource(records, str(tmp_path / 'cache'))
    reference = features.FeatureSource(records, str(tmp_path / 'reference'))
    for i in range(len(records)):
        np.testing.assert_array_equal(resumed[i]['features'], reference[i]['features'])

    encode = _Counted()
    _extract(records, tmp_path / 'cache', encode)
    assert encode.calls == 0   # a finished cache is left alone


def test_a_damaged_shard_and_leftover_temporaries_are_redone(tmp_path):
    records = _records(11)
    _extract(records, tmp_path)
    with open(tmp_path / 'shard-00001.npy', 'r+b') as f:
        f.truncate(40)   # e.g. a disk that filled up
    (tmp_path / 'shard-00002.npy.tmp').write_bytes(b'half written')
    encode = _Counted()
    _extract(records, tmp_path, encode)
    assert encode.calls == 2   # shard 1 only
    assert not any(name.endswith('.tmp') for name in os.listdir(tmp_path))
    source = features.FeatureSource(records, str(tmp_path))
    np.testing.assert_allclose(source[7]['features'], _expected_grids(records)[7],
                               rtol=FLOAT16_RTOL, atol=1e-6)


def test_a_stale_cache_is_detected_when_extracting(tmp_path):
    records = _records(11)
    _extract(records, tmp_path)
    with pytest.raises(features.CacheError, match=f'{tmp_path}.*fingerprint'):
        _extract(records, tmp_path, fingerprint='another encoder')
    with pytest.raises(features.CacheError, match='num_records'):
        _extract(records[:10], tmp_path)
    with pytest.raises(features.CacheError, match='image_id'):
        _extract(_records(11, id_offset=5), tmp_path)   # same length, other images

    encode = _Counted()
    _extract(records, tmp_path, encode, fingerprint='another encoder', overwrite=True)
    assert encode.calls == 5   # everything again
    features.FeatureSource(records, str(tmp_path), fingerprint='another encoder')


def test_a_stale_or_missing_cache_is_detected_when_reading(tmp_path):
    records = _records(11)
    _extract(records, tmp_path)
    hint = 'python launch.py --mode=extract'
    missing = tmp_path / 'nothing'
    with pytest.raises(features.CacheError, match=f'No feature cache in {missing}.*{hint}'):
        features.FeatureSource(records, str(tmp_path / 'nothing'))
    with pytest.raises(features.CacheError, match=f'{tmp_path}.*fingerprint.*{hint}'):
        features.FeatureSource(records, str(tmp_path), fingerprint='another encoder')
    with pytest.raises(features.CacheError, match='image_size'):
        features.FeatureSource(records, str(tmp_path), image_size=2 * IMAGE_SIZE)
    with pytest.raises(features.CacheError, match='num_records is 11 in the cache but 12'):
        features.FeatureSource(_records(12), str(tmp_path))
    with pytest.raises(features.CacheError, match='record 0 has image_id'):
        features.FeatureSource(records[::-1], str(tmp_path))

    # A difference in the middle is not worth reading every record up front for,
    # but is caught as soon as that record is read.
    shuffled = records[:4] + [records[5], records[4]] + records[6:]
    source = features.FeatureSource(shuffled, str(tmp_path), fingerprint='toy')
    source[3]
    with pytest.raises(features.CacheError, match='record 4 has image_id 1035, the cache 1028'):
        source[4]


def test_a_cache_of_an_older_format_is_stale(tmp_path):
    # Format 1 grids came from images decoded at full scale (`images.decode` now
    # reduces large JPEGs while decoding): other pixels, so other grids.
    records = _records(11)
    _extract(records, tmp_path)
    index_path = tmp_path / features.INDEX_FILE
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, 'format': 1}))
    with pytest.raises(features.CacheError, match='format is 1 in the cache but 2 now'):
        features.FeatureSource(records, str(tmp_path))
    with pytest.raises(features.CacheError, match='format is 1 in the cache but 2 now'):
        _extract(records, tmp_path)


def test_feature_source_in_grain_pipelines_threads_and_pickles(tmp_path):
    records = _records(11)
    _extract(records, tmp_path)
    source = features.FeatureSource(records, str(tmp_path))
    every_other = grain.MapDataset.source(source)[0::2]
    assert [r['image_id'] for r in every_other] == [r['image_id'] for r in records[0::2]]
    np.testing.assert_array_equal(every_other[3]['features'], source[6]['features'])

    batches = list(grain.MapDataset.source(source).map(lambda r: r['features']).batch(4)
                   .to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))
    np.testing.assert_array_equal(np.concatenate(batches),
                                  np.stack([source[i]['features'] for i in range(11)]))

    rows = np.random.default_rng(0).integers(0, 11, 400)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda i: source[i]['features'], rows))
    for i, grid in zip(rows, threaded):
        np.testing.assert_array_equal(grid, source[i]['features'])

    copy = pickle.loads(pickle.dumps(source))   # after the maps were opened
    np.testing.assert_array_equal(copy[10]['features'], source[10]['features'])
    assert source[-1]['image_id'] == records[-1]['image_id']
    with pytest.raises(IndexError):
        source[11]


class _TextOnlySource:
    """A source like COCO's: `metadata` reads a record without decoding its image."""

    def __init__(self, records):
        self.records, self.images_decoded = records, 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        self.images_decoded += 1
        return self.records[index]

    def metadata(self, index):
        return {k: v for k, v in self.records[index].items() if k != 'image'}


def test_feature_source_never_decodes_images_of_a_source_with_metadata(tmp_path):
    records = _records(11)
    _extract(records, tmp_path)
    source = _TextOnlySource(records)
    cached = features.FeatureSource(source, str(tmp_path))
    assert [r['image_id'] for r in cached] == [r['image_id'] for r in records]
    assert cached[4]['captions'] == records[4]['captions']
    assert 'features' not in pipeline.metadata_of(cached, 4)
    assert source.images_decoded == 0


def _rss_bytes():
    with open('/proc/self/status') as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))
    return kb * 1024


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='needs Linux /proc')
def test_reading_a_few_records_of_a_large_cache_keeps_memory_small(tmp_path):
    # 1,600 grids of 16x16x256 float16 = 128 KiB each: a 200 MiB cache in 7 shards.
    n, grid = 1600, (16, 16, 256)
    ramp = jnp.arange(np.prod(grid), dtype=jnp.float32).reshape(grid) / np.prod(grid)
    encode = jax.jit(lambda x: x[:, :1, :1, :1].astype(jnp.float32) + ramp)
    records = [{'image': np.full((2, 2, 3), i % 256, np.uint8), 'image_id': i, 'captions': []}
               for i in range(n)]
    features.extract(encode, records, str(tmp_path), image_size=2, batch_size=100,
                     shard_size=256, progress=False)
    assert sum(f.stat().st_size for f in tmp_path.glob('shard-*.npy')) > 200 * 2**20

    gc.collect()
    before = _rss_bytes()
    source = features.FeatureSource(records, str(tmp_path))
    rows = range(0, n, 97)   # 17 records, in every shard
    grids = [source[i]['features'] for i in rows]
    growth = _rss_bytes() - before
    assert growth < 50 * 2**20, f'RSS grew by {growth / 2**20:.0f} MiB reading {len(rows)} records'
    for i, g in zip(rows, grids):
        np.testing.assert_allclose(g, (i % 256) + np.asarray(ramp), rtol=FLOAT16_RTOL)


def _random_encode_variables(model, image_size):
    """Random values for `encode`'s variables (ResNet with non-trivial BatchNorm statistics,
    projection, positions), without the decoder's; filled in numpy because compiling
    flax's initialisers takes ~10 s on a loaded 2-core CPU."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
    shapes = jax.eval_shape(
        functools.partial(model.init, method=captioner.Captioner.encode), jax.random.key(0), images)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if path[-1].key == 'kernel':   # He initialisation keeps activations O(1)
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, std, leaf.shape).astype(np.float32)
        if path[-1].key in ('scale', 'var'):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_cached_grids_give_the_captioner_the_same_regions_as_its_encoder(tmp_path):
    config = tiny.get_config()
    config.data.tfds_dir = str(tmp_path / 'tfds')
    config.data.features_dir = str(tmp_path / 'features')
    size = config.data.image_size
    model = captioner.from_config(config.model, vocab_size=20)   # ResNet (1, 1), 4 filters
    variables = _random_encode_variables(model, size)
    encode = jax.jit(functools.partial(model.apply, variables,
                                       method=captioner.Captioner.encode_grid))

    fingerprint = features.fingerprint_encoder(config)
    out_dir = features.extract_split(config, 'train', encode, fingerprint, progress=False)
    assert out_dir == os.path.join(config.data.features_dir, 'train')
    records = pipeline.load_source(config.data, 'train')
    cached = features.load_cached_source(config.data, 'train', records, fingerprint)
    assert cached.grid_shape == (4, 4, 32)   # 32 / 4 (stem) / 2 (stage 2); 4 * 4 * 2 channels

    # Captioner.encode takes uint8 images or (float) cached grids: what training does with each.
    rows = [0, 17, len(cached) - 1]
    grids = np.stack([cached[i]['features'] for i in rows])
    on_the_fly = np.stack([pipeline._sized(records[i]['image'], size) for i in rows])
    encode_regions = jax.jit(functools.partial(model.apply, variables,
                                               method=captioner.Captioner.encode))
    regions, from_cache = encode_regions(on_the_fly), encode_regions(grids)
    scale = float(np.abs(regions).max())
    assert scale > 0
    # float16 grids (relative error <= 2**-11) through a 32-input projection: measured
    # 4e-4 x scale; another record's grid would be off by O(scale).
    np.testing.assert_allclose(from_cache, regions, rtol=0, atol=2e-3 * scale)


def test_split_dirs_are_safe_file_names_and_distinct():
    data = ml_collections.ConfigDict({'features_dir': '~/features'})
    home = os.path.expanduser('~')
    assert features.split_dir(data, 'val') == f'{home}/features/val'
    assert features.split_dir(data, 'train+restval') == f'{home}/features/train+restval'
    half = features.split_dir(data, 'train[:50%]')
    assert os.path.dirname(half) == f'{home}/features' and '/' not in os.path.basename(half)
    assert half.startswith(f'{home}/features/train__50__-')
    assert half != features.split_dir(data, 'train[:50_]')
    with pytest.raises(ValueError, match='features_dir'):
        features.split_dir(ml_collections.ConfigDict({'features_dir': ''}), 'val')


def test_the_encoder_fingerprint_follows_weights_and_seed(tmp_path):
    config = tiny.get_config()
    base = features.fingerprint_encoder(config)
    assert features.fingerprint_encoder(config) == base
    config.seed = 1
    assert features.fingerprint_encoder(config) != base   # random init: the seed decides
    weights = tmp_path / 'encoder.msgpack'
    weights.write_bytes(b'weights A')
    config.model.encoder.weights = str(weights)
    with_a = features.fingerprint_encoder(config)
    config.seed = 0
    assert features.fingerprint_encoder(config) == with_a   # loaded weights: the seed does not
    weights.write_bytes(b'weights B')
    assert features.fingerprint_encoder(config) != with_a
