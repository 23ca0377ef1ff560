"""Input pipeline: TFDS random-access source -> grain -> batches of numpy arrays.

Sources are sequences of records `{'image' (uint8 HxWx3, HxWx1 or HxW, any size),
'image_id', 'captions'}`; a feature-cache source (`jaxcap.data.features`) has
'features' (an encoder grid h x w x C) in place of 'image'.

Training batches are `{'images': uint8 BxSxSx3 | 'features': BxhxwxC (the cache's
dtype), 'tokens': int32 BxT, 'mask': float32 BxT}`: one of an image's reference
captions is drawn per example per epoch (seeded by grain, so the stream is a pure
function of the seed and the step), and the whole iterator position is
checkpointable. Evaluation batches walk a split once in order and pad the last
batch, marking real examples in `valid`.

The training source is `load_train_source`: `data.train_split` (a TFDS split
expression, e.g. COCO's 'train+restval'), then a seeded random `data.train_fraction`
of it, the same on every host and run, before `train_dataset` shards it by host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxcap.data import images as image_ops
from jaxcap.data import text

Record = dict[str, Any]


def data_dir(data_config: ml_collections.ConfigDict) -> str:
    """Where TFDS keeps built data sets: the config's, else TFDS' own default."""
    if data_config.tfds_dir:
        return os.path.expanduser(data_config.tfds_dir)
    import tensorflow_datasets as tfds  # heavy import, only when needed
    return tfds.core.constants.DATA_DIR


def load_source(data_config: ml_collections.ConfigDict, split: str) -> Sequence[Record]:
    """A random-access source for `split` (a TFDS split expression such as 'train+restval').

    The synthetic shapes data set is built first if needed; COCO must have been
    prepared (`python -m jaxcap.data.coco`; otherwise the error says how).
    """
    if data_config.name == 'coco':
        from jaxcap.data import coco
        return coco.load_source(split, data_dir(data_config),
                                os.path.expanduser(data_config.manual_dir), data_config.image_size)
    if data_config.name == 'shapes':
        from jaxcap.data import shapes
        builder = shapes.build(data_dir(data_config), shapes.make_config(
            image_size=data_config.image_size, num_train=data_config.num_train,
            num_val=data_config.num_val, num_test=data_config.num_test,
            seed=data_config.build_seed))
        return builder.as_data_source(split)
    raise ValueError(f"Unknown data set config.data.name={data_config.name!r}; "
                     "known: 'shapes', 'coco'.")


def load_train_source(data_config: ml_collections.ConfigDict) -> Sequence[Record]:
    """The training source: split `data_config.train_split`, then `train_subset` of it."""
    return train_subset(load_source(data_config, data_config.train_split), data_config)


def training_source(config: ml_collections.ConfigDict) -> Sequence[Record]:
    """What training reads: `load_train_source`, with cached grids if `data.features_dir` is set."""
    return _with_cached_features(config, config.data.train_split, load_train_source(config.data))


def evaluation_source(config: ml_collections.ConfigDict, split: str) -> Sequence[Record]:
    """What evaluating `split` reads: its records, with cached grids if `data.features_dir` is set."""
    return _with_cached_features(config, split, load_source(config.data, split))


def _with_cached_features(config, split: str, records: Sequence[Record]) -> Sequence[Record]:
    if not config.data.features_dir:
        return records
    from jaxcap.data import features  # imports this module
    return features.load_cached_source(config.data, split, records,
                                       features.fingerprint_encoder(config))


def train_subset(source: Sequence[Record], data_config: ml_collections.ConfigDict
                 ) -> Sequence[Record]:
    """The `data_config.train_fraction` of `source` that training uses.

    Seeded by `data_config.build_seed`, not the training seed: the subset is part
    of what the data is (like the shapes scenes), so runs that differ only in
    `config.seed` train on the same images. Apply it to a feature cache of the
    whole split too, so cached and on-the-fly training see the same records.
    """
    return random_subset(source, data_config.train_fraction, data_config.build_seed)


def random_subset(source: Sequence[Record], fraction: float, seed: int) -> Sequence[Record]:
    """A seeded random `fraction` of `source`'s records, kept in source order.

    `floor(fraction * len(source))` records (the reference's 50% of COCO's 82,783
    train images was 41,391). A pure function of (len(source), fraction, seed):
    every host and every run pick the same records, and with the same seed a
    smaller fraction picks a subset of a larger one.

    Raises:
        ValueError: `fraction` is not in (0, 1], or keeps no record.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f'data.train_fraction must be in (0, 1], got {fraction}.')
    if fraction == 1.0:
        return source
    count = int(fraction * len(source) + 1e-9)   # 0.29 x 100 is 28.999...: still 29
    if count < 1:
        raise ValueError(f'data.train_fraction={fraction} of {len(source)} records keeps none; '
                         'raise it.')
    order = np.random.default_rng(seed).permutation(len(source))
    return Subset(source, np.sort(order[:count]))


class Subset(Sequence):
    """Records `indices` of `source`, by random access (nothing is loaded ahead)."""

    def __init__(self, source: Sequence[Record], indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Record:
        return self.source[int(self.indices[index])]  # IndexError past the end, as Sequence needs

    def metadata(self, index: int) -> Record:
        """See `metadata_of`."""
        return metadata_of(self.source, int(self.indices[index]))


def metadata_of(source: Sequence[Record], index: int) -> Record:
    """Record `index` for its text ('image_id', 'captions'), skipping the image when it can.

    Sources with a `metadata(index)` method (COCO's, subsets) read a record
    without decoding its image, which makes a pass over COCO's captions fast;
    other sources return the whole record.
    """
    metadata = getattr(source, 'metadata', None)
    return metadata(index) if callable(metadata) else source[index]


def captions_of(record: Record) -> list[str]:
    """The record's reference captions as str (TFDS returns bytes)."""
    return [c.decode('utf-8') if isinstance(c, bytes) else str(c) for c in record['captions']]


def build_vocabulary(source: Sequence[Record], max_words: int) -> text.Vocabulary:
    """Vocabulary of the most frequent words of every reference caption in `source`."""
    return text.Vocabulary.build(
        (c for i in range(len(source)) for c in captions_of(metadata_of(source, i))), max_words)


class _HostRows(grain.transforms.RandomMap):
    """Global batch of example indices -> this host's rows as training arrays.

    Every host walks the same global order and draws the same reference per
    global row, then loads only its own rows: the global batch at step N is
    the same whatever the number of hosts, so results do not depend on it.
    """

    def __init__(self, source: Sequence[Record], vocab: text.Vocabulary, max_len: int,
                 image_size: int, rows: slice):
        self.source, self.vocab, self.max_len, self.image_size = source, vocab, max_len, image_size
        self.rows = rows

    def random_map(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        draws = rng.random(len(indices))[self.rows]  # one per global row, then ours
        examples = [self._example(self.source[int(i)], u) for i, u in zip(indices[self.rows], draws)]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def _example(self, record: Record, draw: float) -> dict[str, np.ndarray]:
        captions = captions_of(record)
        tokens = self.vocab.encode(captions[int(draw * len(captions))], self.max_len)
        key, inputs = _model_input(record, self.image_size)
        return {key: inputs, 'tokens': tokens, 'mask': (tokens != text.PAD).astype(np.float32)}


def _model_input(record: Record, image_size: int) -> tuple[str, np.ndarray]:
    """('features', the cached grid as stored) or ('images', the image resized to image_size)."""
    if 'features' in record:
        return 'features', np.asarray(record['features'])
    return 'images', _sized(record['image'], image_size)


def _sized(image: np.ndarray, size: int) -> np.ndarray:
    """Any-size uint8 HxWx3, HxWx1 or HxW (grayscale) image -> size x size x 3."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image if image.shape[:2] == (size, size) else image_ops.resize(image, size)


def train_dataset(source: Sequence[Record], vocab: text.Vocabulary,
                  data_config: ml_collections.ConfigDict, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless shuffled training batches: this host's `batch_size` rows of each global batch.

    Shuffling happens before `repeat`, so every epoch is a fresh permutation of
    the whole split and no example is seen twice before all were seen once.
    The global batch (`batch_size * process_count` rows) does not depend on
    the number of hosts; each host reads only the records of its rows.
    """
    global_batch = batch_size * process_count
    if len(source) < global_batch:
        raise ValueError(f'The training split has {len(source)} examples, fewer than one global '
                         f'batch ({process_count} x {batch_size}); lower train.batch_size.')
    order = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    ds = order.batch(global_batch, drop_remainder=True).random_map(
        _HostRows(source, vocab, data_config.max_len, data_config.image_size, rows))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.num_threads,
                                                prefetch_buffer_size=data_config.prefetch))


def eval_batches(source: Sequence[Record], batch_size: int, image_size: int,
                 num_examples: int = 0) -> Iterator[dict[str, Any]]:
    """The first `num_examples` of a split (0: all), in order, in padded batches.

    Every batch has exactly `batch_size` rows so the decoder compiles once; rows
    past the end of the split repeat the last example and have `valid` False.
    Batches carry 'images' (resized to `image_size`), or 'features' for a
    feature-cache source.
    """
    total = len(source) if num_examples <= 0 else min(num_examples, len(source))
    for start in range(0, total, batch_size):
        indices = list(range(start, min(start + batch_size, total)))
        records = [source[i] for i in indices]
        pad = batch_size - len(records)
        inputs = [_model_input(r, image_size) for r in records]
        arrays = [array for _, array in inputs]
        yield {
            inputs[0][0]: np.stack(arrays + [arrays[-1]] * pad),
            'valid': np.array([True] * len(records) + [False] * pad),
            'image_ids': [int(r['image_id']) for r in records],
            'references': [captions_of(r) for r in records],
        }
