"""Encoder feature cache: run a frozen encoder once over a split, train from its grids.

`extract` writes a split's grids to a directory of shards::

    <features_dir>/<split>/index.json        what the cache holds, and which shards are done
    <features_dir>/<split>/shard-00000.npy   (shard_size, h, w, C) float16 grids, in source order
    ...

Every file is written under a temporary name and renamed into place, and a shard
counts as done only once `index.json` lists it, so an interrupted extraction
leaves no half-written file and a rerun computes only the missing shards.

`FeatureSource` is the random-access source that training and evaluation read
instead of the images: record `i` of the records source with its 'image'
replaced by 'features', read from memory-mapped shards (COCO's 123k grids are
~24 GB in float16; only the rows a batch touches are paged in).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grain
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxcap import workdir
from jaxcap.data import pipeline

Record = dict[str, Any]
EncodeFn = Callable[[np.ndarray], Any]

INDEX_FILE = 'index.json'
# 2: images decoded at a reduced scale where they are large enough (`images.decode`);
# a cache of version 1 holds grids of slightly different pixels, so it is stale.
FORMAT_VERSION = 2
DTYPES = ('float16', 'float32')
# The header fields a cache and an extraction must agree on; anything else is stale.
_HEADER_KEYS = ('format', 'fingerprint', 'num_records', 'image_size', 'shard_size', 'dtype')
_EXTRACT_HINT = 'python launch.py --mode=extract --config=...'


class CacheError(ValueError):
    """A feature cache is missing, incomplete, or was built from other data or another encoder."""


def shard_name(shard: int) -> str:
    """File name of shard number `shard`."""
    return f'shard-{shard:05d}.npy'


def extract(encode_fn: EncodeFn, source: Sequence[Record], out_dir: str, *, image_size: int,
            batch_size: int, fingerprint: str = '', shard_size: int = 1024,
            dtype: str = 'float16', num_threads: int = 2, overwrite: bool = False,
            progress: bool = True) -> str:
    """Encodes every record of `source`, in order, into shards under `out_dir`.

    Resumable: shards that an earlier (interrupted) run finished are kept and
    never recomputed. Every call to `encode_fn` gets exactly `batch_size` images
    (the last batch of a shard is padded), so a jitted encoder compiles once.

    Args:
        encode_fn: uint8 images (batch_size, S, S, 3) -> grids (batch_size, h, w, C),
            e.g. a jitted frozen ResNet.
        source: random-access records with 'image' (uint8 HxWx3 or HxWx1, any
            size) and 'image_id'.
        out_dir: the cache directory (created if needed).
        image_size: images are resized to image_size x image_size first, as the
            input pipeline does.
        batch_size: images per `encode_fn` call.
        fingerprint: what the grids depend on besides the images (encoder
            architecture, weights, preprocessing); a cache built with another
            fingerprint is stale.
        shard_size: records per shard file (the unit of resumption).
        dtype: stored dtype, 'float16' (half the disk) or 'float32'.
        num_threads: threads reading and resizing images.
        overwrite: replace a stale cache instead of failing.
        progress: show a progress bar on stderr.

    Returns:
        `out_dir`.

    Raises:
        CacheError: `out_dir` holds a cache of other data or another encoder
            (and `overwrite` is False), or `source` is empty.
        ValueError: a bad argument, or grids that overflow float16.
    """
    _check_extract_args(image_size, batch_size, shard_size, dtype)
    if len(source) == 0:
        raise CacheError('Cannot extract features of an empty source.')
    out_dir = os.path.expanduser(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    index = _resume_or_start(source, out_dir, overwrite, {
        'format': FORMAT_VERSION, 'fingerprint': fingerprint, 'num_records': len(source),
        'image_size': image_size, 'shard_size': shard_size, 'dtype': dtype})
    todo = [s for s in range(_num_shards(index)) if not _shard_done(out_dir, index, s)]
    bar = tqdm(total=len(source), initial=len(source) - sum(_shard_rows(index, s) for s in todo),
               desc=f'extract {os.path.basename(out_dir)}', unit='img', file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    with bar:
        for shard in todo:
            image_ids = _write_shard(encode_fn, source, out_dir, index, shard, batch_size,
                                     num_threads, bar)
            index['shards'][str(shard)] = image_ids
            workdir.write_json(os.path.join(out_dir, INDEX_FILE), index)
    return out_dir


def _check_extract_args(image_size: int, batch_size: int, shard_size: int, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f'Unknown feature dtype {dtype!r}; valid: {", ".join(DTYPES)}.')
    for name, value in (('image_size', image_size), ('batch_size', batch_size),
                        ('shard_size', shard_size)):
        if value < 1:
            raise ValueError(f'{name} must be >= 1, got {value}.')


def _resume_or_start(source: Sequence[Record], out_dir: str, overwrite: bool,
                     header: dict[str, Any]) -> dict[str, Any]:
    """The index to continue from: the existing one if it matches `header`, else a fresh one."""
    _remove_temporaries(out_dir)
    path = os.path.join(out_dir, INDEX_FILE)
    if os.path.exists(path):
        index = _read_json(path)
        problem = _header_mismatch(index, header) or _ids_mismatch(index, source)
        if problem is None:
            return index
        if not overwrite:
            raise CacheError(
                f'{out_dir} holds a feature cache of other data or another encoder ({problem}). '
                'Delete that directory or choose another config.data.features_dir.')
        _remove_shards(out_dir)
    index = dict(header, grid_shape=None, shards={})
    workdir.write_json(path, index)
    return index


def _header_mismatch(index: dict[str, Any], header: dict[str, Any]) -> str | None:
    for key in _HEADER_KEYS:
        if index.get(key) != header[key]:
            return f'{key} is {index.get(key)!r} in the cache but {header[key]!r} now'
    return None


def _ids_mismatch(index: dict[str, Any], source: Sequence[Record]) -> str | None:
    """Checks the first image id of every finished shard (one record read per shard)."""
    for key, image_ids in index['shards'].items():
        row = int(key) * index['shard_size']
        actual = int(pipeline.metadata_of(source, row)['image_id'])
        if actual != image_ids[0]:
            return f'record {row} has image_id {actual}, the cache {image_ids[0]}'
    return None


def _num_shards(index: dict[str, Any]) -> int:
    return -(-index['num_records'] // index['shard_size'])


def _shard_rows(index: dict[str, Any], shard: int) -> int:
    start = shard * index['shard_size']
    return min(index['shard_size'], index['num_records'] - start)


def _shard_done(out_dir: str, index: dict[str, Any], shard: int) -> bool:
    """Listed in the index, and its file is there with the right shape and dtype."""
    if str(shard) not in index['shards']:
        return False
    try:
        grids = np.load(os.path.join(out_dir, shard_name(shard)), mmap_mode='r')
    except (OSError, ValueError):
        return False
    expected = (_shard_rows(index, shard), *index['grid_shape'])
    return grids.shape == expected and grids.dtype == np.dtype(index['dtype'])


def _write_shard(encode_fn: EncodeFn, source: Sequence[Record], out_dir: str,
                 index: dict[str, Any], shard: int, batch_size: int, num_threads: int,
                 bar: tqdm) -> list[int]:
    """Encodes one shard into a temporary file, renames it into place; returns its image ids."""
    start, rows = shard * index['shard_size'], _shard_rows(index, shard)
    path = os.path.join(out_dir, shard_name(shard))
    tmp_path = path + '.tmp'
    grids, image_ids, row = None, [], 0
    for batch in _image_batches(source, start, start + rows, index['image_size'], batch_size,
                                num_threads):
        n = len(batch['image_id'])
        batch_grids = _encode(encode_fn, batch['image'], batch_size, index['dtype'])[:n]
        if grids is None:  # the grid shape is known only once the encoder has run
            grids = _open_shard(tmp_path, index, rows, batch_grids.shape[1:])
        grids[row:row + n] = batch_grids
        image_ids.extend(int(i) for i in batch['image_id'])
        row += n
        bar.update(n)
    grids.flush()
    del grids  # unmap before the rename
    os.replace(tmp_path, path)
    return image_ids


def _image_batches(source: Sequence[Record], start: int, stop: int, image_size: int,
                   batch_size: int, num_threads: int):
    """Resized images and ids of records [start, stop), read ahead by grain threads."""
    ds = grain.MapDataset.source(source)[start:stop]
    ds = ds.map(functools.partial(_resized, image_size=image_size))
    ds = ds.batch(batch_size, drop_remainder=False)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2))


def _resized(record: Record, image_size: int) -> dict[str, np.ndarray]:
    # The input pipeline's own resizing, so cached grids match on-the-fly ones.
    return {'image': pipeline._sized(record['image'], image_size),
            'image_id': np.int64(record['image_id'])}


def _encode(encode_fn: EncodeFn, images: np.ndarray, batch_size: int, dtype: str) -> np.ndarray:
    """encode_fn on a batch padded to batch_size rows, cast to the stored dtype."""
    pad = batch_size - len(images)
    if pad:
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    grids = np.asarray(encode_fn(images))
    if not np.all(np.isfinite(grids)):
        raise ValueError('The encoder produced NaN or inf; check its weights.')
    with np.errstate(over='ignore'):  # overflow is reported below, with what to do about it
        stored = grids.astype(dtype)
    if not np.all(np.isfinite(stored)):
        raise ValueError(f'The encoder grids overflow {dtype} (above {np.finfo(dtype).max:g}); '
                         "extract with dtype='float32'.")
    return stored


def _open_shard(tmp_path: str, index: dict[str, Any], rows: int,
                grid_shape: tuple[int, ...]) -> np.memmap:
    """A writable .npy memmap, so a shard never has to fit in RAM twice."""
    if index['grid_shape'] is None:
        index['grid_shape'] = list(grid_shape)
    elif tuple(index['grid_shape']) != tuple(grid_shape):
        raise ValueError(f'The encoder returned grids of shape {tuple(grid_shape)}, but the '
                         f'cache holds {tuple(index["grid_shape"])}.')
    return np.lib.format.open_memmap(tmp_path, mode='w+', dtype=index['dtype'],
                                     shape=(rows, *grid_shape))


class FeatureSource(Sequence):
    """`records_source` with each record's 'image' replaced by its cached grid, 'features'.

    Shards are memory-mapped lazily, on first use, so only the rows that are
    read are paged in. Pickles without its open maps (each copy reopens them),
    and is safe to share between grain's reader threads.

    The image ids of the first and last records are checked on construction and
    every record's on access, so a cache built from other data fails with a
    `CacheError` instead of pairing grids with the wrong captions.

    Records are read with `pipeline.metadata_of`, so a source with a
    `metadata(index)` method (COCO's) is never asked to decode an image; other
    TFDS sources decode it and the image is dropped (a plain TFDS source can
    skip that if opened with `decoders={'image': tfds.decode.SkipDecoding()}`).
    """

    def __init__(self, records_source: Sequence[Record], features_dir: str, *,
                 fingerprint: str | None = None, image_size: int | None = None):
        """Opens the cache in `features_dir` for `records_source`.

        Args:
            records_source: the source the cache was extracted from.
            features_dir: the cache directory (`extract`'s out_dir).
            fingerprint: if given, the cache must have been built with it.
            image_size: if given, the cache must have been built at this size.

        Raises:
            CacheError: the cache is missing, incomplete, or stale.
        """
        self._records = records_source
        self._dir = os.path.expanduser(features_dir)
        index = _open_index(self._dir)
        self._check_header(index, fingerprint, image_size)
        self._shard_size = index['shard_size']
        self.dtype = np.dtype(index['dtype'])
        self.grid_shape = tuple(index['grid_shape'])
        self.image_ids = np.array(
            [i for s in range(_num_shards(index)) for i in index['shards'][str(s)]], np.int64)
        for row in {0, len(self) - 1}:
            self._check_image_id(row, pipeline.metadata_of(records_source, row))
        self._init_maps()

    def _check_header(self, index: dict[str, Any], fingerprint: str | None,
                      image_size: int | None) -> None:
        expected = {'format': FORMAT_VERSION, 'num_records': len(self._records)}
        if fingerprint is not None:
            expected['fingerprint'] = fingerprint
        if image_size is not None:
            expected['image_size'] = image_size
        for key, value in expected.items():
            if index.get(key) != value:
                _stale(self._dir, f'{key} is {index.get(key)!r} in the cache but {value!r} now')

    def _check_image_id(self, row: int, record: Record) -> None:
        actual = int(record['image_id'])
        if actual != self.image_ids[row]:
            _stale(self._dir, f'record {row} has image_id {actual}, '
                              f'the cache {int(self.image_ids[row])}')

    def _init_maps(self) -> None:
        self._maps: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state['_maps'], state['_lock']  # memmaps and locks do not pickle; reopen lazily
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_maps()

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Record:
        record = self.metadata(index)
        record['features'] = self.features(index)
        return record

    def metadata(self, index: int) -> Record:
        """Record `index` without image or features (see `pipeline.metadata_of`)."""
        row = _check_index(index, len(self))
        record = dict(pipeline.metadata_of(self._records, row))
        self._check_image_id(row, record)
        record.pop('image', None)
        return record

    def features(self, row: int) -> np.ndarray:
        """The grid of record `row`, (h, w, C) in the stored dtype, copied out of the map."""
        shard, offset = divmod(_check_index(row, len(self)), self._shard_size)
        return np.array(self._shard(shard)[offset])

    def _shard(self, shard: int) -> np.ndarray:
        grids = self._maps.get(shard)
        if grids is None:
            with self._lock:
                grids = self._maps.get(shard)
                if grids is None:
                    grids = np.load(os.path.join(self._dir, shard_name(shard)), mmap_mode='r')
                    self._maps[shard] = grids
        return grids


def _check_index(index: int, length: int) -> int:
    row = int(index)
    row = row + length if row < 0 else row
    if not 0 <= row < length:
        raise IndexError(f'Index {index} out of range for {length} records.')
    return row


def _open_index(features_dir: str) -> dict[str, Any]:
    """The index of a finished cache, or a CacheError saying how to build it."""
    path = os.path.join(features_dir, INDEX_FILE)
    if not os.path.exists(path):
        raise CacheError(f'No feature cache in {features_dir}: build it with `{_EXTRACT_HINT}` '
                         '(the same config as training).')
    index = _read_json(path)
    done = [s for s in range(_num_shards(index)) if _shard_done(features_dir, index, s)]
    if len(done) < _num_shards(index):
        raise CacheError(f'The feature cache in {features_dir} is incomplete ({len(done)} of '
                         f'{_num_shards(index)} shards); finish it with `{_EXTRACT_HINT}` '
                         '(it resumes where it stopped).')
    return index


def _stale(features_dir: str, problem: str) -> NoReturn:
    raise CacheError(f'The feature cache in {features_dir} was built from other data or another '
                     f'encoder ({problem}). Delete it and rebuild it with `{_EXTRACT_HINT}`.')


def split_dir(data_config: ml_collections.ConfigDict, split: str) -> str:
    """The cache directory of `split`: features_dir/<split as a safe file name>.

    Split expressions such as 'train+restval' or 'train[:50%]' become file
    names; any changed character adds a short hash, so distinct splits never
    share a directory.
    """
    if not data_config.features_dir:
        raise ValueError('config.data.features_dir is empty; set '
                         '--config.data.features_dir=DIR to extract or read cached features.')
    safe = re.sub(r'[^A-Za-z0-9._+-]', '_', split)
    if safe != split or safe in ('', '.', '..'):
        safe = f'{safe}-{hashlib.sha1(split.encode()).hexdigest()[:8]}'
    return os.path.join(os.path.expanduser(data_config.features_dir), safe)


def extract_split(config: ml_collections.ConfigDict, split: str, encode_fn: EncodeFn,
                  encoder_fingerprint: str, *, source: Sequence[Record] | None = None,
                  overwrite: bool = False, progress: bool = True) -> str:
    """`extract` over a split of the configured data set into `split_dir(config.data, split)`.

    Args:
        config: the experiment config (data.*, and eval.batch_size for the
            encoder batches).
        split: TFDS split (expression) to encode.
        encode_fn: see `extract`.
        encoder_fingerprint: see `extract`'s fingerprint (e.g. `fingerprint_encoder(config)`).
        source: the records to encode; default `pipeline.load_source(config.data, split)`.
            Pass the training source when training reads a subset of the split.
        overwrite: replace a stale cache instead of failing.
        progress: show a progress bar on stderr.

    Returns:
        The cache directory.
    """
    out_dir = split_dir(config.data, split)
    if source is None:
        source = pipeline.load_source(config.data, split)
    return extract(encode_fn, source, out_dir, image_size=config.data.image_size,
                   batch_size=config.eval.batch_size, fingerprint=encoder_fingerprint,
                   overwrite=overwrite, progress=progress)


def load_cached_source(data_config: ml_collections.ConfigDict, split: str,
                       records_source: Sequence[Record],
                       fingerprint: str | None = None) -> FeatureSource:
    """The FeatureSource of `split` (features_dir/<split>) over `records_source`."""
    return FeatureSource(records_source, split_dir(data_config, split),
                         fingerprint=fingerprint, image_size=data_config.image_size)


def fingerprint_encoder(config: ml_collections.ConfigDict) -> str:
    """A string that changes whenever the frozen encoder's grids would.

    Covers the architecture, preprocessing, compute dtype, and the weights: the
    weights file's content hash, or the seed when the encoder is randomly
    initialised. The image size is checked separately.
    """
    encoder = config.model.encoder
    parts = {'stage_sizes': [int(s) for s in encoder.stage_sizes],
             'num_filters': encoder.num_filters, 'preprocess': encoder.preprocess,
             'dtype': config.model.dtype}
    if encoder.weights:
        parts['weights_sha256'] = _file_sha256(os.path.expanduser(encoder.weights))
    else:
        parts['seed'] = config.seed
    return json.dumps(parts, sort_keys=True)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _remove_temporaries(out_dir: str) -> None:
    """Drops what an interrupted run left half-written."""
    for name in os.listdir(out_dir):
        if name.endswith('.tmp'):
            os.remove(os.path.join(out_dir, name))


def _remove_shards(out_dir: str) -> None:
    for name in os.listdir(out_dir):
        if re.fullmatch(r'shard-\d{5}\.npy', name):
            os.remove(os.path.join(out_dir, name))
