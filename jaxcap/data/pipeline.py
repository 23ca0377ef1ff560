"""Input pipeline: TFDS random-access source -> grain -> batches of numpy arrays.

Training batches are `{'images': uint8 BxHxWx3, 'tokens': int32 BxT, 'mask': float32 BxT}`:
one of an image's reference captions is drawn per example per epoch (seeded by
grain, so the stream is a pure function of the seed and the step), and the whole
iterator position is checkpointable. Evaluation batches walk a split once in
order and pad the last batch, marking real examples in `valid`.
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
    """A random-access source for `split`, building the data set first if needed."""
    if data_config.name == 'shapes':
        from jaxcap.data import shapes
        builder = shapes.build(data_dir(data_config), shapes.make_config(
            image_size=data_config.image_size, num_train=data_config.num_train,
            num_val=data_config.num_val, num_test=data_config.num_test,
            seed=data_config.build_seed))
        return builder.as_data_source(split)
    raise ValueError(f"Unknown data set config.data.name={data_config.name!r}; known: 'shapes'.")


def captions_of(record: Record) -> list[str]:
    """The record's reference captions as str (TFDS returns bytes)."""
    return [c.decode('utf-8') if isinstance(c, bytes) else str(c) for c in record['captions']]


def build_vocabulary(source: Sequence[Record], max_words: int) -> text.Vocabulary:
    """Vocabulary of the most frequent words of every reference caption in `source`."""
    return text.Vocabulary.build(
        (c for i in range(len(source)) for c in captions_of(source[i])), max_words)


class _ToTrainingExample(grain.transforms.RandomMap):
    """Record -> {'images', 'tokens', 'mask'} with one reference drawn at random."""

    def __init__(self, vocab: text.Vocabulary, max_len: int, image_size: int):
        self.vocab, self.max_len, self.image_size = vocab, max_len, image_size

    def random_map(self, record: Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
        captions = captions_of(record)
        tokens = self.vocab.encode(captions[rng.integers(len(captions))], self.max_len)
        return {
            'images': _sized(record['image'], self.image_size),
            'tokens': tokens,
            'mask': (tokens != text.PAD).astype(np.float32),
        }


def _sized(image: np.ndarray, size: int) -> np.ndarray:
    image = np.asarray(image)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image if image.shape[:2] == (size, size) else image_ops.resize(image, size)


def train_dataset(source: Sequence[Record], vocab: text.Vocabulary,
                  data_config: ml_collections.ConfigDict, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless shuffled training batches for this host (its 1/process_count of the data).

    Shuffling happens before `repeat`, so every epoch is a fresh permutation of
    the whole split and no example is seen twice before all were seen once.
    """
    if len(source) < process_count * batch_size:
        raise ValueError(f'The training split has {len(source)} examples, fewer than one global '
                         f'batch ({process_count} x {batch_size}); lower train.batch_size.')
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.seed(seed).shuffle().repeat(None)
    ds = ds.random_map(_ToTrainingExample(vocab, data_config.max_len, data_config.image_size))
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.num_threads,
                                                prefetch_buffer_size=data_config.prefetch))


def eval_batches(source: Sequence[Record], batch_size: int, image_size: int,
                 num_examples: int = 0) -> Iterator[dict[str, Any]]:
    """The first `num_examples` of a split (0: all), in order, in padded batches.

    Every batch has exactly `batch_size` rows so the decoder compiles once; rows
    past the end of the split repeat the last example and have `valid` False.
    """
    total = len(source) if num_examples <= 0 else min(num_examples, len(source))
    for start in range(0, total, batch_size):
        indices = list(range(start, min(start + batch_size, total)))
        records = [source[i] for i in indices]
        pad = batch_size - len(records)
        images = [_sized(r['image'], image_size) for r in records]
        yield {
            'images': np.stack(images + [images[-1]] * pad),
            'valid': np.array([True] * len(records) + [False] * pad),
            'image_ids': [int(r['image_id']) for r in records],
            'references': [captions_of(r) for r in records],
        }
